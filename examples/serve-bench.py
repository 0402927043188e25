#!/usr/bin/env python3
"""serve-bench.py: a load generator for a running moe-serve.

    python3 examples/serve-bench.py --url http://127.0.0.1:8000 [--concurrency 1 8 32]
        [--requests 64] [--max-tokens 64] [--prompt "And God said"] [--json]

For each concurrency C, C client threads send streamed greedy completions back to back until
--requests have finished, and the script reports generated tokens/s over the wall time, time to
first token (request sent -> first event) and per-token latency (gap between events) as p50/p99.
Standard library only (http.client); the server must be on 127.0.0.1 or a trusted host.
"""
import argparse
import http.client
import json
import statistics
import threading
import time
import urllib.parse


def percentile(xs, p):
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100.0 * (len(xs) - 1))))]


def one_request(host, port, body):
    """Streams one completion; returns (tokens, ttft_s, [gaps_s])."""
    conn = http.client.HTTPConnection(host, port, timeout=300)
    t0 = time.perf_counter()
    conn.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:200]!r}")
    tokens, ttft, gaps, last = 0, None, [], None
    for raw in resp:
        line = raw.decode("utf-8", "replace").strip()
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        event = json.loads(line[6:])
        if "token_id" not in event["choices"][0]:
            continue
        now = time.perf_counter()
        if ttft is None:
            ttft = now - t0
        else:
            gaps.append(now - last)
        last = now
        tokens += 1
    conn.close()
    return tokens, ttft, gaps


def run(url, concurrency, n_requests, max_tokens, prompt):
    u = urllib.parse.urlparse(url)
    body = json.dumps({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                       "stream": True})
    lock = threading.Lock()
    left = [n_requests]
    results, errors = [], []

    def client():
        while True:
            with lock:
                if left[0] == 0:
                    return
                left[0] -= 1
            try:
                r = one_request(u.hostname, u.port or 80, body)
                with lock:
                    results.append(r)
            except Exception as e:  # reported, not fatal: the figures say how many failed
                with lock:
                    errors.append(str(e))

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    tokens = sum(r[0] for r in results)
    ttft = [r[1] for r in results if r[1] is not None]
    gaps = [g for r in results for g in r[2]]
    return {
        "concurrency": concurrency,
        "requests": len(results),
        "errors": len(errors),
        "tokens": tokens,
        "wall_s": wall,
        "tokens_per_s": tokens / wall if wall > 0 else 0.0,
        "ttft_ms_p50": 1e3 * percentile(ttft, 50),
        "ttft_ms_p99": 1e3 * percentile(ttft, 99),
        "token_ms_p50": 1e3 * percentile(gaps, 50),
        "token_ms_p99": 1e3 * percentile(gaps, 99),
        "token_ms_mean": 1e3 * statistics.fmean(gaps) if gaps else float("nan"),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--prompt", default="And God said")
    ap.add_argument("--json", action="store_true", help="one JSON line per concurrency")
    a = ap.parse_args()
    rows = [run(a.url, c, a.requests, a.max_tokens, a.prompt) for c in a.concurrency]
    for r in rows:
        if a.json:
            print(json.dumps(r))
        else:
            print(f"concurrency {r['concurrency']:3d}: {r['tokens_per_s']:9.1f} tok/s | "
                  f"ttft p50 {r['ttft_ms_p50']:7.2f} ms p99 {r['ttft_ms_p99']:7.2f} ms | "
                  f"per token p50 {r['token_ms_p50']:6.2f} ms p99 {r['token_ms_p99']:6.2f} ms | "
                  f"{r['requests']} requests, {r['errors']} errors")
    if len(rows) > 1 and rows[0]["tokens_per_s"] > 0:
        print(f"batching gain (concurrency {rows[-1]['concurrency']} vs {rows[0]['concurrency']}): "
              f"{rows[-1]['tokens_per_s'] / rows[0]['tokens_per_s']:.1f}x")


if __name__ == "__main__":
    main()
