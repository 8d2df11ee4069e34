"""SQLite's WAL checkpoints, off the request path.

SQLite copies its write-ahead log back into the database file (a checkpoint, with fsyncs)
inside whichever commit pushes the log past 1,000 pages. In a gevent worker that commit is the
group-commit writer's, and the whole worker stands still while the disk syncs: on this VM's
disk every ~100th request waited 10-20 ms (it was most of `make bench`'s sequential p95/p99).
So a served worker turns automatic checkpoints off on its connections and checkpoints every
half second from a native thread of its own: sqlite3 releases the GIL while it works, and the
greenlets keep serving. Elsewhere (tests' in-process apps, the CLI) SQLite checkpoints as usual.

PASSIVE checkpoints never wait for a lock and run beside writers, so several workers (each
with its checkpointer) are safe; a checkpoint that cannot finish (an old reader) resumes on the
next tick. But the log only starts over from its beginning when a writer begins after a
complete checkpoint, and under steady load one is always appending: past RESTART_FRAMES the
checkpointer starts the log over itself (RESTART, without waiting: it gives up at once while a
writer or reader is busy and tries again next tick). That briefly holds writers back, once per
~16 MB of log, instead of a checkpoint with two fsyncs inside every ~4 MB's commit. The log
file keeps its largest size (tens of MB) and is written over from its start.

Writers wait while a RESTART finishes (its last copy and fsync: ~3-30 ms on this VM's disk),
or while another process (the admin CLI, another worker) holds the write lock. SQLite's own
busy handler waits by sleeping the calling thread: in a gevent worker, the hub with every
greenlet on it, for as long as the lock is held (up to the 10 s busy timeout). So a served
worker's connections have busy timeout 0 and wait their own way (`PatientCursor`): a locked
statement is retried after a gevent sleep, while streams flow and other requests go on.
"""
import logging
import os
import sqlite3
import time
from contextlib import contextmanager

from sqlalchemy import make_url

INTERVAL_SECONDS = 0.5
RESTART_FRAMES = 4096  # log frames (4 KB pages) before the checkpointer starts the log over
STUCK_FRAMES = 16 * RESTART_FRAMES  # then it waits (up to 1 s) for writers to let it
SLOW_SYNC_SECONDS = 0.25  # a sync before a RESTART slower than this: the disk is struggling
BUSY_TIMEOUT_MS = 10_000  # busy timeout outside a served worker (connection_pragmas)
BUSY_PAUSE_SECONDS = 0.0005  # the first wait for a locked database, doubling up to the max
BUSY_PAUSE_MAX_SECONDS = 0.005
SQLITE_BUSY = 5  # "database is locked"; extended codes share its low byte
SQLITE_BUSY_SNAPSHOT = 517  # a read snapshot too old to write from: waiting never helps
log = logging.getLogger(__name__)
_in_background = False  # set in a served worker once its checkpointer runs
_may_wait = True  # False inside `not_waiting`


def connection_pragmas(cursor):
    """For every new SQLite connection (app._sqlite_pragmas): the busy timeout; once this
    process checkpoints in the background, no checkpoint inside commits, and a locked
    database reported at once, for PatientCursor to wait for without stalling the worker."""
    if _in_background:
        cursor.execute("PRAGMA wal_autocheckpoint=0")
        cursor.execute("PRAGMA busy_timeout=0")
    else:
        cursor.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")


class PatientCursor(sqlite3.Cursor):
    """A cursor whose statements wait for a locked database with `time.sleep` (gevent's in a
    served worker) instead of SQLite's busy handler, which sleeps the whole thread."""

    def execute(self, *args):
        return _patiently(super().execute, args)

    def executemany(self, *args):
        return _patiently(super().executemany, args)


class PatientConnection(sqlite3.Connection):
    """sqlite3.connect(factory=...) for every SQLite engine (app._patient_sqlite): its
    cursors, which SQLAlchemy runs every statement on, are PatientCursors."""

    def cursor(self, factory=PatientCursor):
        return super().cursor(factory)


def _patiently(call, args):
    """call(*args), retried while SQLite answers SQLITE_BUSY, for up to BUSY_TIMEOUT_MS in
    all: what SQLite's busy handler does, but sleeping one greenlet. As with the handler, a
    stale snapshot (SQLITE_BUSY_SNAPSHOT) fails at once. Outside a served worker SQLite
    waits as usual (`connection_pragmas`) and nothing is retried here, nor inside
    `not_waiting`."""
    if not (_in_background and _may_wait):
        return call(*args)
    waited, pause = 0.0, BUSY_PAUSE_SECONDS
    while True:
        try:
            return call(*args)
        except sqlite3.OperationalError as err:
            code = getattr(err, "sqlite_errorcode", 0)
            if code & 0xFF != SQLITE_BUSY or code == SQLITE_BUSY_SNAPSHOT \
                    or waited >= BUSY_TIMEOUT_MS / 1000:
                raise
        time.sleep(pause)  # gevent's in a served worker: every other greenlet runs meanwhile
        waited, pause = waited + pause, min(2 * pause, BUSY_PAUSE_MAX_SECONDS)


@contextmanager
def not_waiting():
    """Inside, a statement on a locked database fails at once (`is_locked`) instead of waiting
    in a gevent sleep: for code that must not let another greenlet run in the middle (the
    writer's commit in a request's own greenlet, writer.py). Outside a served worker SQLite's
    busy handler waits as ever, in the calling thread."""
    global _may_wait
    _may_wait = False
    try:
        yield
    finally:
        _may_wait = True


def is_locked(err):
    """True when `err` (SQLite's, or SQLAlchemy's wrapping it) says the database is locked."""
    err = getattr(err, "orig", err)
    return isinstance(err, sqlite3.OperationalError) and \
        getattr(err, "sqlite_errorcode", 0) & 0xFF == SQLITE_BUSY


def database_file(uri):
    """The SQLite file behind `uri`, or None (another database, or in memory)."""
    url = make_url(uri)
    if not url.drivername.startswith("sqlite") or url.database in (None, "", ":memory:") \
            or url.database.startswith("file:") or url.query.get("mode") == "memory":
        return None
    return url.database


def start_checkpointer(app):
    """In a served gevent worker on a SQLite file: checkpoint from a native thread from now
    on. Returns whether it started."""
    global _in_background
    path = database_file(app.config["SQLALCHEMY_DATABASE_URI"])
    if path is None:
        return False
    from gevent import get_hub, monkey
    if not monkey.is_module_patched("socket"):
        return False  # not a gevent worker: SQLite's own checkpoints block nobody else
    sleep = monkey.get_original("time", "sleep")
    _in_background = True
    with app.app_context():  # connections opened before now reopen with connection_pragmas'
        from extensions import db
        db.engine.dispose()
    get_hub().threadpool.spawn(_checkpoint_forever, path, sleep)
    return True


def _checkpoint_forever(path, sleep):
    conn = None
    while True:
        sleep(INTERVAL_SECONDS)
        try:
            if conn is None:
                conn = sqlite3.connect(path, timeout=0, isolation_level=None,
                                       check_same_thread=False)
            checkpoint(conn, path)
        except sqlite3.Error as err:  # the file moved or went away: retry on a new connection
            log.warning("WAL checkpoint of %s failed: %s", path, err)
            if conn is not None:
                conn.close()
                conn = None


def checkpoint(conn, path=None):
    """One tick on `conn` (busy timeout 0): copy what the log holds into the database file;
    past RESTART_FRAMES, start the log over. Far past it (the gaps between writers never
    came), wait up to a second for one. Returns the log's frames.

    A RESTART holds writers back while it copies what was appended since and syncs both
    files, and a PASSIVE copy under steady writes syncs neither: everything copied since the
    last RESTART was synced with writers waiting. So with the database's `path`, both files
    are synced first, beside the writers (a RESTART under steady writes: 36-52 ms median
    against 46-62 ms). When that sync is slow the disk is (this VM's stalls at times, for
    seconds): the RESTART waits for a later tick, unless the log is far past its size."""
    frames = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()[1]
    if frames >= RESTART_FRAMES:  # copies what writers appended meanwhile, holding them back
        stuck = frames >= STUCK_FRAMES
        if path is not None:
            started = time.monotonic()
            _sync_files(path, path + "-wal")
            if time.monotonic() - started > SLOW_SYNC_SECONDS and not stuck:
                return frames
        if stuck:
            conn.execute("PRAGMA busy_timeout=1000")
        try:
            conn.execute("PRAGMA wal_checkpoint(RESTART)").fetchone()
        finally:
            if stuck:
                conn.execute("PRAGMA busy_timeout=0")
    return frames


def _sync_files(*paths):
    """fsync each file (what any process wrote to it), skipping one that is gone."""
    for name in paths:
        try:
            fd = os.open(name, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
