"""Long loops in a gevent worker give its other greenlets a turn.

A greenlet runs until it waits for I/O. A loop that never waits holds up every request of
its worker: settling, deleting or exporting rows on SQLite (whose calls block the thread),
or writing to a client that reads as fast as it is written to. `give_way()` inside such a
loop lets the event loop poll and run whatever is ready. gevent.sleep(0) would not do: it
runs greenlets already ready but polls nothing, so timers and sockets wait on.
"""
import time

TURN_SECONDS = 0.0001


def give_way():
    """One turn of the event loop (gevent's sleep in a served worker; 0.1 ms elsewhere)."""
    time.sleep(TURN_SECONDS)
