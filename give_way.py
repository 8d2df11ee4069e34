"""Long loops in a gevent worker give its other greenlets a turn.

A greenlet runs until it waits for I/O. A loop that never waits holds up every request of
its worker: settling, deleting or exporting rows on SQLite (whose calls block the thread),
or writing to a client that reads as fast as it is written to. `give_way()` inside such a
loop lets the event loop poll and run whatever is ready. gevent.sleep(0) would not do: it
runs greenlets already ready but polls nothing, so timers and sockets wait on.

One long call that cannot be cut up (a SQLite statement scanning a table, the tokenizer's
build) goes to a native thread instead (`in_native_thread`): C code that lets the GIL go
there runs beside the worker's greenlets.
"""
import time

TURN_SECONDS = 0.0001


def give_way():
    """One turn of the event loop (gevent's sleep in a served worker; 0.1 ms elsewhere)."""
    time.sleep(TURN_SECONDS)


def in_native_thread(work):
    """work() in one of gevent's native threads inside a served worker, waiting for it as
    a greenlet; plainly elsewhere. Flask's contexts stay behind: work pushes its own."""
    try:
        from gevent import get_hub, monkey
    except ImportError:
        return work()
    if monkey.is_module_patched("socket"):
        return get_hub().threadpool.apply(work)
    return work()
