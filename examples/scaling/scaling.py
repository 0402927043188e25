#!/usr/bin/python3
"""Scaling study: the same training config at several rank counts, weak and strong scaling.

  /usr/bin/python3 examples/scaling/scaling.py run [--config examples/configs/small.yaml]
      [--ranks 1 2 4] [--modes weak strong] [--steps 8] [--warmup 3] [--threads 1]
      [--micro-batch M] [--global-batch G] [--out runs/scaling]
  /usr/bin/python3 examples/scaling/scaling.py collect --weak DIR [--strong DIR] [--out DIR]

`run` launches build/bin/moe-train under mpirun once per (mode, rank count) on this machine:
  weak   fixed tokens per rank: train.micro_batch = M, train.global_batch = M x ranks
  strong fixed global batch:    train.global_batch = G, train.micro_batch = G / ranks
(M and G default to the config's train.micro_batch and train.global_batch; no accumulation.)
On a cluster, run slurm/scaling.sbatch with MODE=weak and MODE=strong and give its OUT_DIRs
to `collect`. Both read <dir>/np<N>/metrics.jsonl (moe-train --metrics) and layout.json,
drop the first --warmup steps, and write <out>/scaling.csv and <out>/scaling.png.

Per (mode, ranks): step_s = median step_seconds over the steps after warm-up; tokens_per_s =
global tokens per step / step_s; parallel efficiency = tokens_per_s / (ranks x tokens_per_s at
1 rank) (for weak scaling this is per-rank throughput against 1 rank's); exchange_fraction and
expert_imbalance are medians of the per-step figures. Runs with more ranks x threads than the
machine's cores are marked oversubscribed in the CSV and on the plot.
"""
import argparse
import csv
import json
import os
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIELDS = ["mode", "ranks", "nodes", "threads", "oversubscribed", "global_batch", "micro_batch",
          "tokens_per_step", "steps_measured", "step_s", "tokens_per_s", "tokens_per_s_per_rank",
          "parallel_efficiency", "exchange_fraction", "expert_imbalance", "mfu", "loadavg"]


def die(msg):
    print(f"scaling: error: {msg}", file=sys.stderr)
    sys.exit(1)


def config_batches(config):
    """train.micro_batch and train.global_batch of a config, as moe-config resolves them."""
    exe = os.path.join(ROOT, "build", "bin", "moe-config")
    out = subprocess.run([exe, "check", "--config", config], capture_output=True, text=True)
    if out.returncode != 0:
        die(f"moe-config check --config {config} failed:\n{out.stderr.strip()}")
    section, vals = "", {}
    for line in out.stdout.splitlines():
        s = line.split("#")[0].rstrip()
        if not s.strip():
            continue
        if not s.startswith(" "):
            section = s.strip().rstrip(":")
        elif section == "train" and ":" in s:
            k, v = s.strip().split(":", 1)
            vals[k.strip()] = v.strip()
    try:
        return int(vals["micro_batch"]), int(vals["global_batch"])
    except (KeyError, ValueError):
        die(f"cannot read train.micro_batch / train.global_batch from moe-config check {config}")


def run(args):
    mpirun = "mpirun"
    exe = os.path.join(ROOT, "build", "bin", "moe-train")
    if not os.access(exe, os.X_OK):
        die(f"{exe} not found: build first (scripts/build.sh)")
    micro0, global0 = config_batches(args.config)
    micro = args.micro_batch or micro0
    glob = args.global_batch or global0
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads),
               OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               OMPI_MCA_rmaps_base_oversubscribe="1")
    dirs = {}
    for mode in args.modes:
        base = os.path.join(args.out, mode)
        dirs[mode] = base
        for n in args.ranks:
            if mode == "weak":
                mb, gb = micro, micro * n
            else:
                if glob % n:
                    print(f"scaling: {mode} np {n}: skipped, global batch {glob} is not "
                          f"divisible by {n} ranks")
                    continue
                mb, gb = glob // n, glob
            d = os.path.join(base, f"np{n}")
            os.makedirs(d, exist_ok=True)
            for f in ("metrics.jsonl", "layout.json"):
                if os.path.exists(os.path.join(d, f)):
                    os.remove(os.path.join(d, f))
            cmd = [mpirun, "-np", str(n), "--bind-to", "none", "-x", "OMP_NUM_THREADS", exe,
                   "--config", args.config, "--metrics", os.path.join(d, "metrics.jsonl"),
                   "--set", f"run.dir={d}", "--set", f"checkpoint.dir={d}/checkpoints",
                   "--set", f"train.steps={args.steps}", "--set", "train.eval_every=0",
                   "--set", "train.eval_batches=1", "--set", "checkpoint.every=0",
                   "--set", f"train.micro_batch={mb}", "--set", f"train.global_batch={gb}",
                   "--set", f"log.every={args.steps}"] + args.extra
            load = os.getloadavg()[0]  # other jobs on the machine skew the figures
            print(f"scaling: {mode} np {n}: micro_batch {mb}, global_batch {gb} (load average "
                  f"{load:.1f})", flush=True)
            with open(os.path.join(d, "out.log"), "w") as log:
                rc = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
            if rc != 0:
                with open(os.path.join(d, "out.log")) as log:
                    err = [l for l in log if "error:" in l]
                die(f"{mode} np {n} failed (exit {rc}): {err[0].strip() if err else d + '/out.log'}")
            with open(os.path.join(d, "layout.json"), "w") as f:
                json.dump({"ranks": n, "nodes": 1, "threads": args.threads,
                           "cores_per_node": os.cpu_count(), "mode": mode,
                           "micro_batch": mb, "global_batch": gb, "loadavg": load}, f)
    return dirs


def summarise(mode, d, warmup):
    rows = []
    for name in sorted(os.listdir(d)):
        path = os.path.join(d, name, "metrics.jsonl")
        if not (name.startswith("np") and os.path.exists(path)):
            continue
        n = int(name[2:])
        layout = {"ranks": n, "nodes": 1, "threads": 1, "cores_per_node": 0}
        lp = os.path.join(d, name, "layout.json")
        if os.path.exists(lp):
            with open(lp) as f:
                layout.update(json.load(f))
        steps = []
        with open(path) as f:
            for line in f:
                rec = json.loads(line)
                if not rec.get("summary") and "step_seconds" in rec:
                    steps.append(rec)
        kept = steps[warmup:]
        if not kept:
            print(f"scaling: {path}: only {len(steps)} step(s), none after {warmup} warm-up "
                  f"step(s); skipped", file=sys.stderr)
            continue
        step_s = statistics.median(r["step_seconds"] for r in kept)
        tokens = statistics.median(r["tokens_per_s"] * r["step_seconds"] for r in kept)
        nodes = int(layout["nodes"])
        rpn = -(-n // nodes)
        cores = int(layout.get("cores_per_node") or 0)
        rows.append({
            "mode": mode, "ranks": n, "nodes": nodes, "threads": layout["threads"],
            "oversubscribed": int(cores > 0 and rpn * int(layout["threads"]) > cores),
            "global_batch": layout.get("global_batch", ""),
            "micro_batch": layout.get("micro_batch", ""),
            "tokens_per_step": round(tokens), "steps_measured": len(kept),
            "step_s": step_s, "tokens_per_s": tokens / step_s,
            "tokens_per_s_per_rank": tokens / step_s / n,
            "exchange_fraction": statistics.median(r["exchange_fraction"] for r in kept),
            "expert_imbalance": statistics.median(r["expert_imbalance"] for r in kept),
            "mfu": statistics.median(r["mfu"] for r in kept),
            "loadavg": layout.get("loadavg", "")})
    rows.sort(key=lambda r: r["ranks"])
    base = next((r for r in rows if r["ranks"] == 1), rows[0] if rows else None)
    for r in rows:
        r["parallel_efficiency"] = (r["tokens_per_s"] / (r["ranks"] / base["ranks"]) /
                                    base["tokens_per_s"])
    return rows


def write_csv(rows, path):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})


def plot(rows, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = [("tokens_per_s", "tokens/s (all ranks)"), ("parallel_efficiency",
              "parallel efficiency"), ("exchange_fraction", "All2All share of step"),
              ("expert_imbalance", "expert imbalance (max/mean)")]
    fig, axes = plt.subplots(1, 4, figsize=(13, 3.4))
    modes = sorted({r["mode"] for r in rows})
    for ax, (key, label) in zip(axes, panels):
        for mode, style in zip(modes, ["o-", "s--", "^:"]):
            rs = [r for r in rows if r["mode"] == mode]
            xs = [r["ranks"] for r in rs]
            line, = ax.plot(xs, [r[key] for r in rs], style, label=mode)
            over = [r for r in rs if r["oversubscribed"]]
            if over:  # hollow red rings: more ranks x threads than cores
                ax.plot([r["ranks"] for r in over], [r[key] for r in over], "o", ms=12,
                        mfc="none", mec="red")
        if key == "tokens_per_s" and rows:
            one = {m: next((r for r in rows if r["mode"] == m and r["ranks"] == 1), None)
                   for m in modes}
            xs = sorted({r["ranks"] for r in rows})
            for m in modes:
                if one[m]:
                    ax.plot(xs, [one[m]["tokens_per_s"] * x for x in xs], color="gray",
                            lw=0.8, ls=":", label=f"{m}: ideal" if m == modes[0] else None)
        if key == "parallel_efficiency":
            ax.axhline(1.0, color="gray", lw=0.8, ls=":")
            ax.set_ylim(0, 1.15)
        if key == "expert_imbalance":
            ax.set_ylim(bottom=1.0)  # 1 = balanced
        over_x = [r["ranks"] for r in rows if r["oversubscribed"]]
        if over_x:  # shade the rank counts that oversubscribe the cores
            ax.axvspan(min(over_x) / 1.25, max(r["ranks"] for r in rows) * 1.25, color="red",
                       alpha=0.07, lw=0)
            ax.text(min(over_x) / 1.22, ax.get_ylim()[1], "over-\nsubscribed", color="red",
                    fontsize=7, va="top", ha="left")
        ax.set_xscale("log", base=2)
        xr = sorted({r["ranks"] for r in rows})
        ax.set_xlim(xr[0] / 1.5, xr[-1] * 1.5)
        ax.set_xticks(sorted({r["ranks"] for r in rows}))
        ax.set_xticklabels([str(x) for x in sorted({r["ranks"] for r in rows})])
        ax.set_xlabel("ranks")
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    note = ""
    over = sorted({(r["ranks"], r["nodes"]) for r in rows if r["oversubscribed"]})
    if over:
        note = ("red rings: oversubscribed (more ranks x threads than cores; "
                + ", ".join(f"{n} ranks" for n, _ in over) + ")")
    fig.suptitle(title + ("\n" + note if note else ""), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run moe-train under mpirun at each rank count, then collect")
    r.add_argument("--config", default="examples/configs/small.yaml")
    r.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    r.add_argument("--modes", nargs="+", choices=["weak", "strong"], default=["weak", "strong"])
    r.add_argument("--steps", type=int, default=8)
    r.add_argument("--threads", type=int, default=1, help="OpenMP threads per rank")
    r.add_argument("--micro-batch", type=int, default=0, help="weak: sequences per rank")
    r.add_argument("--global-batch", type=int, default=0, help="strong: sequences per step")
    r.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                   help="more moe-train arguments (last)")
    c = sub.add_parser("collect", help="summarise existing runs (e.g. from slurm/scaling.sbatch)")
    c.add_argument("--weak", help="directory with np<N>/metrics.jsonl of a weak-scaling run")
    c.add_argument("--strong", help="directory with np<N>/metrics.jsonl of a strong-scaling run")
    c.add_argument("--title", default="")
    for q in (r, c):
        q.add_argument("--warmup", type=int, default=3, help="leading steps left out")
        q.add_argument("--out", default="runs/scaling")
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    if args.cmd == "run":
        if any(n < 1 for n in args.ranks):
            die("--ranks must be positive")
        if args.steps <= args.warmup:
            die(f"--steps {args.steps} must exceed --warmup {args.warmup}")
        dirs = run(args)
        title = (f"{os.path.basename(args.config)}, {args.steps - args.warmup} steps after "
                 f"{args.warmup} warm-up, {args.threads} thread(s)/rank, "
                 f"{os.cpu_count()} cores, mpirun on one node")
    else:
        dirs = {m: d for m, d in (("weak", args.weak), ("strong", args.strong)) if d}
        if not dirs:
            die("collect needs --weak DIR and/or --strong DIR")
        title = args.title or "scaling study"
    rows = []
    for mode, d in dirs.items():
        if not os.path.isdir(d):
            die(f"{d}: no such directory")
        got = summarise(mode, d, args.warmup)
        if not got:
            die(f"{d}: no np<N>/metrics.jsonl with steps after the warm-up")
        rows += got
    loads = [r["loadavg"] for r in rows if isinstance(r["loadavg"], (int, float))]
    if loads:
        title += f"; load average {min(loads):.1f}-{max(loads):.1f} before the runs"
    csv_path = os.path.join(args.out, "scaling.csv")
    png_path = os.path.join(args.out, "scaling.png")
    write_csv(rows, csv_path)
    plot(rows, png_path, title)
    print(f"{'mode':6} {'ranks':>5} {'nodes':>5} {'step s':>8} {'tokens/s':>9} "
          f"{'tok/s/rank':>10} {'eff':>5} {'exch':>5} {'imbal':>5}")
    for r in rows:
        print(f"{r['mode']:6} {r['ranks']:5d} {r['nodes']:5d} {r['step_s']:8.3f} "
              f"{r['tokens_per_s']:9.0f} {r['tokens_per_s_per_rank']:10.0f} "
              f"{r['parallel_efficiency']:5.2f} {r['exchange_fraction']:5.2f} "
              f"{r['expert_imbalance']:5.2f}" + ("  oversubscribed" if r["oversubscribed"] else ""))
    print(f"scaling: wrote {csv_path} and {png_path}")


if __name__ == "__main__":
    main()
