"""Added latency and throughput of the relay, against the fake upstream, in one run.

Run by hand:  .venv/bin/python bench/bench_relay.py [--requests 500] [--concurrency 16]

It starts the fake upstream and a gunicorn+gevent gateway (one worker, SQLite,
exactly as `make run`), then measures the same non-streaming chat request
sent (a) straight to the fake upstream and (b) through the gateway. The
difference of the medians is the latency the gateway adds (auth, limits,
reservation, routing, settlement and the log row included). Ratios within one
run are what to compare: this machine is shared and noisy.
"""
import argparse
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import requests

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tests.support import FakeUpstream, LiveGateway  # noqa: E402

BODY = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello there"}]}


def timed_calls(url, headers, count, concurrency):
    """Latencies (ms) of `count` POSTs with `concurrency` in flight, and the wall time."""
    local = {}

    def one(_):
        session = local.setdefault(os.getpid(), {}).get("s")
        session = requests.Session() if session is None else session
        started = time.perf_counter()
        response = session.post(url, json=BODY, headers=headers, timeout=30)
        elapsed = (time.perf_counter() - started) * 1000
        assert response.status_code == 200, response.text
        return elapsed

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        latencies = list(pool.map(one, range(count)))
    return latencies, time.perf_counter() - started


def summary(name, latencies, wall):
    latencies = sorted(latencies)
    p50 = statistics.median(latencies)
    p95 = latencies[int(len(latencies) * 0.95) - 1]
    print(f"{name:<22} p50 {p50:7.2f} ms   p95 {p95:7.2f} ms   {len(latencies) / wall:8.1f} req/s")
    return p50


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args()

    upstream = FakeUpstream()
    upstream.start()
    workdir = tempfile.mkdtemp(prefix="tokenopen-bench-")
    gateway = LiveGateway(f"sqlite:///{workdir}/bench.db", workdir, upstream,
                          extra_env={"TOKENOPEN_CACHE_TTL": "5"})
    gateway.start()
    try:
        gateway.reset()
        key = gateway.member(credits=1_000_000)
        direct = (upstream.url + "/v1/chat/completions", {})
        relayed = (gateway.base_url + "/chat/completions", {"Authorization": f"Bearer {key}"})
        for url, headers in (direct, relayed):  # warm up pools, caches and the tokenizer
            timed_calls(url, headers, 20, 2)
        print(f"{args.requests} non-stream chat requests; sequential, then {args.concurrency} "
              f"in flight\n")
        base = summary("upstream direct", *timed_calls(*direct, args.requests, 1))
        through = summary("through gateway", *timed_calls(*relayed, args.requests, 1))
        print(f"\nadded latency (p50 difference, sequential): {through - base:.2f} ms\n")
        summary("upstream direct", *timed_calls(*direct, args.requests, args.concurrency))
        summary("through gateway", *timed_calls(*relayed, args.requests, args.concurrency))
        rows = len(gateway.logs())
        print(f"\nlog rows written: {rows} (every relayed request has one)")
    finally:
        gateway.stop()
        upstream.stop()


if __name__ == "__main__":
    main()
