"""How long local token counting holds a gevent worker, for prompts of growing size.

Run by hand:  .venv/bin/python bench/bench_tokens.py

For each size it reports the total time of `tokens.count_text` and the longest stretch
between two yields to other greenlets (the time one request can block all the others on
its worker). Issue 9 asks for the latter to stay within a few milliseconds. Both are CPU
time of this thread (time.thread_time), so a loaded machine does not inflate them.
"""
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from blueprints.api import tokens  # noqa: E402

SIZES = (10_000, 100_000, 900_000, 2_000_000, 32_000_000)


def main():
    longest = [0.0]
    last = [0.0]

    def pause():  # what gevent.sleep(0) would be: note the stretch since the last yield
        now = time.thread_time()
        longest[0] = max(longest[0], now - last[0])
        last[0] = now

    tokens._pause = pause
    tokens.warm()
    print(f"{'characters':>12} {'tokens':>10} {'total ms':>9} {'longest hold ms':>16}")
    for size in SIZES:
        text = ("The quick brown fox jumps over the lazy dog. " * (size // 45 + 1))[:size]
        longest[0] = 0.0
        started = last[0] = time.thread_time()
        count = tokens.count_text(text)
        ended = time.thread_time()
        longest[0] = max(longest[0], ended - last[0])
        print(f"{size:>12,} {count:>10,} {(ended - started) * 1000:>9.1f} "
              f"{longest[0] * 1000:>16.1f}")


if __name__ == "__main__":
    main()
