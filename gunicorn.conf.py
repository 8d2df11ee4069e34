"""gunicorn settings for `make run`: gevent workers, one unless Redis shares the limits."""
import multiprocessing
import os
import shutil
import tempfile

bind = f"{os.environ.get('HOST', '127.0.0.1')}:{os.environ.get('PORT', '8000')}"
worker_class = "gevent"
# In-memory rate limits are exact only inside one process (SPEC §9).
workers = int(os.environ.get("WEB_CONCURRENCY") or (
    multiprocessing.cpu_count() if os.environ.get("TOKENOPEN_REDIS_URL") else 1))
worker_connections = 2000
# Streams can last as long as the upstream timeout; gevent workers heartbeat on their own.
timeout = int(os.environ.get("TOKENOPEN_UPSTREAM_TIMEOUT", "600")) + 30
# SIGTERM: the hold keeper lets streams run for TOKENOPEN_DRAIN_SECONDS, then interrupts them
# (billed and logged); gunicorn's own deadline comes after that.
graceful_timeout = int(os.environ.get("TOKENOPEN_DRAIN_SECONDS", "60")) + 30
keepalive = 75
accesslog = os.environ.get("TOKENOPEN_ACCESS_LOG") or None
errorlog = "-"
# gunicorn 27 opens a control socket at ~/.gunicorn/gunicorn.ctl, one path for every master of
# the user: two nodes (or test servers) on one machine would take it from each other, and we
# have no use for it. Older gunicorns ignore the setting.
control_socket_disable = True


def post_worker_init(worker):
    """Each worker runs a hold keeper: checkpoints its streams, renews its leases, retries
    settlements a database error held back, settles holds of dead workers, drains on SIGTERM.
    On SQLite, WAL checkpoints leave the commits for a native thread (sqlite_wal.py).
    (The tokenizer is not loaded here: blueprints/api/tokens.py loads it on first need.)"""
    from sqlite_wal import start_checkpointer
    start_checkpointer(worker.wsgi)
    from blueprints.api.inflight import start_keeper
    from blueprints.api.relay import delivered_so_far
    start_keeper(worker.wsgi, delivered_so_far, worker)
    from retention import start_pruner
    start_pruner(worker.wsgi)
    freeze_startup_objects()


def freeze_startup_objects():
    """Collect once, then move every object alive now (modules, the app, its caches' classes:
    ~100k) out of the collector's reach. A full collection walked them all, 80-115 ms on this
    VM's core, stalling every request in flight (the sequential p99); after the freeze it
    walks only what was made since (11 ms). Nothing alive now is garbage, so nothing leaks.

    The frozen objects no longer count as the old generation whose growth by a quarter is
    CPython's other condition for a full collection, so after the freeze one came every 10
    middle-generation collections: 6 of 105-154 ms each while 2,000 streams opened at once
    (traced in a served worker). Every 100 makes it none there; young cycles are still
    collected as often as before."""
    import gc
    gc.collect()
    gc.freeze()
    gc.set_threshold(700, 10, 100)  # CPython's defaults but the last (10)


def _prometheus_dir():
    """Where the workers' metric files go: one fresh directory per master (never shared by two
    masters: each would count the other's workers), emptied at start. Set before any worker
    imports prometheus_client, which reads it at import."""
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if path:
        shutil.rmtree(path, ignore_errors=True)  # stale files of a previous run would add up
        os.makedirs(path, exist_ok=True)
    else:
        path = tempfile.mkdtemp(prefix="tokenopen-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
        _created_dirs.append(path)
    return path


_created_dirs = []
prometheus_dir = _prometheus_dir()


def child_exit(server, worker):
    """A worker's live gauges (requests in flight) stop counting when it dies."""
    from prometheus_client import multiprocess
    multiprocess.mark_process_dead(worker.pid, prometheus_dir)


def on_exit(server):
    for path in _created_dirs:
        shutil.rmtree(path, ignore_errors=True)
