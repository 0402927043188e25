"""Compares per-step values of moe-train --metrics files (JSON lines) against a reference.

  compare_metrics.py [--keys loss,val_loss] [--steps FIRST:LAST] [--tol X] REF OTHER...

Every step in FIRST..LAST (inclusive; default: every step of REF) must be present in REF and
in each OTHER with finite values, and |OTHER - REF| <= X (absolute; default 1e-4) for each key
that REF has at that step. --tol 0 asks for bit-equal values. Prints one row per step and the
largest difference per file; exits 1 on any failure.
"""
import argparse
import json
import math
import os
import sys


def load(path):
    steps = {}
    with open(path) as f:
        for line in f:
            rec = json.loads(line)
            if not rec.get("summary"):
                steps[rec["step"]] = rec
    return steps


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--keys", default="loss")
    ap.add_argument("--steps")
    ap.add_argument("--tol", type=float, default=1e-4)
    ap.add_argument("ref")
    ap.add_argument("others", nargs="+")
    a = ap.parse_args()
    keys = a.keys.split(",")
    ref = load(a.ref)
    others = [load(p) for p in a.others]
    if a.steps:
        first, last = (int(x) for x in a.steps.split(":"))
        steps = range(first, last + 1)
    else:
        steps = sorted(ref)
    ok = True
    worst = [0.0] * len(others)
    name = lambda p: os.path.basename(p)
    print(f"step key       {name(a.ref):12s}  " + "  ".join(f"{name(p):10s}" for p in a.others))
    for s in steps:
        if s not in ref:
            print(f"step {s}: missing in {a.ref}")
            ok = False
            continue
        for k in keys:
            if k not in ref[s]:
                continue
            r = ref[s][k]
            row = f"{s:4d} {k:9s} {r:.9f}"
            for i, o in enumerate(others):
                if s not in o or k not in o[s]:
                    row += f"  missing in {a.others[i]}"
                    ok = False
                    continue
                v = o[s][k]
                if not (math.isfinite(r) and math.isfinite(v)):
                    row += f"  {v} (not finite)"
                    ok = False
                    continue
                d = abs(v - r)
                worst[i] = max(worst[i], d)
                row += f"  {v - r:+.3e}"
                if d > a.tol:
                    row += " (over)"
                    ok = False
            print(row)
    for p, w in zip(a.others, worst):
        print(f"max |diff| {w:.3e}: {p} vs {a.ref} (tolerance {a.tol:g} absolute)")
    print("OK" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
