"""`make profile`: where a TokenOpen worker spends its CPU under load, by py-spy.

Starts the fake upstream and TokenOpen as `make bench` does (bench/run.py), loads the gateway
with wrk at `--connections` (1 = sequential) for `--seconds`, samples the worker with py-spy
meanwhile, and prints the worker's CPU per request and the hottest frames: inclusive (a
function and what it calls) and self. Percentages are of the samples py-spy took; on a slow
machine it drops samples, but what it keeps is a fair draw.

    .venv/bin/python bench/profile.py [--connections 50] [--seconds 20] [--top 40]
    .venv/bin/python bench/profile.py --raw out.txt    # also keep py-spy's folded stacks
"""
import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from collections import Counter

import run as bench  # bench/run.py: this script's folder is first on sys.path

PY_SPY = os.path.join(bench.ROOT, ".venv", "bin", "py-spy")


def frame_name(frame):
    """`function (path/file.py:line)` -> `function path/file.py` (lines apart are one)."""
    name, _, where = frame.partition(" (")
    return f"{name} {where.rsplit(':', 1)[0]}" if where else name


def hot_frames(folded_path):
    """(samples, inclusive Counter, self Counter) from py-spy's raw folded output."""
    inclusive, own, total = Counter(), Counter(), 0
    with open(folded_path) as fh:
        text = fh.read()
    # One stack per record, "frame;frame;... count"; a frame named by a repr() that spans
    # lines (Flask's proxies outside a context) continues the record on the next line.
    for stack, count in re.findall(r"(.*?) (\d+)$", text, flags=re.M | re.S):
        frames = [frame_name(f) for f in stack.strip().replace("\n", " ").split(";")]
        total += int(count)
        own[frames[-1]] += int(count)
        for name in set(frames):
            inclusive[name] += int(count)
    return total, inclusive, own


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--seconds", type=int, default=20)
    parser.add_argument("--rate", type=int, default=300, help="py-spy samples per second")
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--raw", metavar="PATH", help="keep py-spy's folded stacks here")
    args = parser.parse_args()
    if not os.path.exists(PY_SPY):
        sys.exit(f"{PY_SPY} is missing: .venv/bin/pip install py-spy")
    if not shutil.which("wrk"):
        sys.exit("wrk is missing: make wrk")

    workdir = tempfile.mkdtemp(prefix="tokenopen-profile-")
    procs = []
    try:
        fake_port = bench.free_port()
        procs.append(bench.start_fake(fake_port, workdir, 1.0, 5))
        gateway = bench.start_tokenopen(workdir, f"http://127.0.0.1:{fake_port}")
        procs.append(gateway.proc)
        bench.wrk(gateway, 4, 2)  # warm-up: caches, pools, the writer
        figures = {}
        load = threading.Thread(target=lambda: figures.update(
            bench.wrk(gateway, args.connections, args.seconds)))
        load.start()
        folded = args.raw or os.path.join(workdir, "py-spy.txt")
        subprocess.run([PY_SPY, "record", "-p", str(gateway.worker_pid), "-d",
                        str(max(1, args.seconds - 2)), "-r", str(args.rate), "-f", "raw",
                        "-o", folded, "--nonblocking"], capture_output=True, check=True)
        load.join()
    finally:
        for proc in reversed(procs):
            bench.stop(proc)

    total, inclusive, own = hot_frames(folded)
    print(f"{args.connections} connection(s), {args.seconds} s: {figures['rps']:,.0f} req/s, "
          f"p50 {figures['p50_ms']:.2f} ms, p99 {figures['p99_ms']:.2f} ms, CPU per request "
          f"{figures['cpu_ms_per_request']:.2f} ms (gunicorn master and worker); "
          f"{total:,} samples")
    for title, counter in (("inclusive", inclusive), ("self", own)):
        print(f"\n-- {title}")
        for name, count in counter.most_common(args.top):
            print(f"{100 * count / total:5.1f}%  {name}")


if __name__ == "__main__":
    main()
