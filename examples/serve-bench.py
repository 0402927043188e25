#!/usr/bin/env python3
"""serve-bench.py: a load generator for a running moe-serve.

    python3 examples/serve-bench.py --url http://127.0.0.1:8000 [--concurrency 1 8 32]
        [--requests 64] [--min-waves 2] [--max-tokens 64] [--prompt "And God said"] [--json]

For each concurrency C, C streamed greedy completions are in flight at any time (each finished
one is followed by the next) until --requests have finished, and the script reports generated
tokens/s over the wall time, time to first token (request sent -> first event) and per-token
latency (gap between events) as p50/p99. Each concurrency runs at least --min-waves x C requests
(more than --requests when C is large), so that every client slot finishes a request and starts
another at least that often: with a single wave the figures would be one burst of prefills.
Standard library only (sockets, selectors; one thread, so that the load generator takes
little of the CPU it shares with the server); the server must be on 127.0.0.1 or a trusted host.
"""
import argparse
import json
import selectors
import socket
import statistics
import time
import urllib.parse


def percentile(xs, p):
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100.0 * (len(xs) - 1))))]


class Stream:
    """One streamed completion on a non-blocking socket, fed by the event loop in run().

    No per-event JSON parsing: the load generator shares the machine with the server in the
    benchmark, so it counts the events' "token_id" keys in the bytes as they arrive (JSON
    escapes every quote inside a text piece, so the key cannot occur in a text). Tokens that
    arrive in one read share its time (their gaps after the first are 0).
    """
    MARKER, DONE = b'"token_id"', b"data: [DONE]"

    def __init__(self, host, port, body):
        self.t0 = time.perf_counter()
        self.sock = socket.create_connection((host, port), timeout=300)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.sendall((f"POST /v1/completions HTTP/1.1\r\nHost: {host}:{port}\r\n"
                           f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
                           "Connection: close\r\n\r\n").encode() + body)
        self.sock.setblocking(False)
        self.head, self.status, self.error_body = b"", None, b""
        self.tokens, self.ttft, self.gaps, self.last, self.tail = 0, None, [], None, b""

    def feed(self, data):
        """Bytes just read (b"" at the end); True when the stream is over."""
        now, eof = time.perf_counter(), not data
        if self.status is None:
            self.head += data
            if b"\r\n\r\n" not in self.head:
                if eof:
                    raise RuntimeError("connection closed before the response header")
                return False
            head, data = self.head.split(b"\r\n\r\n", 1)
            self.status = int(head.split(b" ", 2)[1])
        if self.status != 200:
            self.error_body += data
            if not eof:
                return False
            raise RuntimeError(f"HTTP {self.status}: {self.error_body[:200]!r}")
        window = self.tail + data  # tail: the end of the previous reads, for split keys
        n = window.count(self.MARKER) - self.tail.count(self.MARKER)
        if n:
            if self.ttft is None:
                self.ttft = now - self.t0
            else:
                self.gaps.append(now - self.last)
            self.gaps.extend([0.0] * (n - 1))
            self.last = now
            self.tokens += n
        self.tail = window[-(len(self.DONE) - 1):]
        return eof or self.DONE in window


def run(url, concurrency, n_requests, max_tokens, prompt):
    """C streams at a time, each followed by the next request as soon as it ends; one thread
    waits on all the sockets at once (selectors)."""
    u = urllib.parse.urlparse(url)
    body = json.dumps({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                       "stream": True}).encode()
    sel = selectors.DefaultSelector()
    started, results, errors = 0, [], []

    def start():
        nonlocal started
        started += 1
        try:
            st = Stream(u.hostname, u.port or 80, body)
            sel.register(st.sock, selectors.EVENT_READ, st)
        except Exception as e:  # reported, not fatal: the figures say how many failed
            errors.append(str(e))

    t0 = time.perf_counter()
    while started < min(concurrency, n_requests):
        start()
    while sel.get_map():
        ready = sel.select(timeout=300)
        if not ready:
            errors.extend(["timed out"] * len(sel.get_map()))
            break
        for key, _ in ready:
            st = key.data
            try:
                over = st.feed(st.sock.recv(65536))
            except BlockingIOError:
                continue
            except Exception as e:
                over = True
                errors.append(str(e))
                st.tokens = -1
            if over:
                sel.unregister(st.sock)
                st.sock.close()
                if st.tokens >= 0:
                    results.append((st.tokens, st.ttft, st.gaps))
                if started < n_requests:
                    start()
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
    ap.add_argument("--min-waves", type=int, default=2,
                    help="at least this many requests per client slot")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--prompt", default="And God said")
    ap.add_argument("--json", action="store_true", help="one JSON line per concurrency")
    a = ap.parse_args()
    rows = [run(a.url, c, max(a.requests, a.min_waves * c), a.max_tokens, a.prompt)
            for c in a.concurrency]
    for r in rows:
        if a.json:
            print(json.dumps(r))
        else:
            print(f"concurrency {r['concurrency']:3d}: {r['tokens_per_s']:9.1f} tok/s | "
                  f"ttft p50 {r['ttft_ms_p50']:7.2f} ms p99 {r['ttft_ms_p99']:7.2f} ms | "
                  f"per token p50 {r['token_ms_p50']:6.2f} ms p99 {r['token_ms_p99']:6.2f} ms | "
                  f"{r['requests']} requests, {r['errors']} errors")
    if len(rows) > 1 and rows[0]["tokens_per_s"] > 0:
        for r in rows[1:]:
            print(f"batching gain (concurrency {r['concurrency']} vs {rows[0]['concurrency']}): "
                  f"{r['tokens_per_s'] / rows[0]['tokens_per_s']:.1f}x")


if __name__ == "__main__":
    main()
