"""Request-log retention: rows older than N days are deleted; the daily rollups stay.

`TOKENOPEN_LOG_RETENTION_DAYS` (0 = keep forever) is applied by a background loop in
every worker (deleting in small batches is idempotent, so several workers may run it),
and `flask --app app logs prune --older-than-days N` does it on demand.

In a gevent worker a SQLite statement runs on the worker's one thread: every greenlet waits
while a batch is deleted (~15 us a row here, seven B-trees each). So the loop deletes small
batches and rests between them: a backlog (retention newly set on a year of logs, or an
hour's worth at full load) costs requests a few ms now and then, not a frozen worker (one
5,000-row batch after another stalled it ~1.6 s per 100k rows).
"""
import threading
import time
from datetime import timedelta

from sqlalchemy import delete, select

from extensions import db
from models import RequestLog, utcnow

BATCH = 500  # rows per transaction: a short lock, and a short stall of a gevent worker
PAUSE_SECONDS = 0.1  # the background loop's rest between batches (~5,000 rows/s at most)
PRUNE_EVERY = 3600  # seconds


def prune_request_logs(older_than_days, batch=None, pause=0.0):
    """Delete request logs older than `older_than_days` days, `batch` rows a transaction
    with `pause` seconds between; returns how many went. UsageDaily (the dashboard's
    rollups) is left as it is."""
    batch = batch or BATCH
    if older_than_days <= 0:
        return 0
    cutoff = utcnow() - timedelta(days=older_than_days)
    total = 0
    while True:
        ids = select(RequestLog.id).where(RequestLog.created_at < cutoff).limit(batch)
        deleted = db.session.execute(delete(RequestLog).where(RequestLog.id.in_(
            ids.scalar_subquery()))).rowcount
        db.session.commit()
        total += deleted or 0
        if not deleted or deleted < batch:
            return total
        time.sleep(pause)  # gevent's in a worker: its requests run meanwhile


def prune_once(app):
    """Apply the configured retention once; failures are logged, never raised."""
    days = app.config.get("LOG_RETENTION_DAYS") or 0
    if days <= 0:
        return 0
    with app.app_context():
        try:
            pruned = prune_request_logs(days, pause=PAUSE_SECONDS)
            if pruned:
                app.logger.info("pruned %d request log(s) older than %d days", pruned, days)
            return pruned
        except Exception:  # noqa: BLE001 - retention must never take the worker down
            db.session.rollback()
            app.logger.exception("request log pruning failed")
            return 0


def start_pruner(app, interval=PRUNE_EVERY):
    """Prune now and every `interval` seconds in a daemon thread (a greenlet under gevent)."""
    if (app.config.get("LOG_RETENTION_DAYS") or 0) <= 0:
        return

    def loop():
        while True:
            prune_once(app)
            time.sleep(interval)

    threading.Thread(target=loop, name="log-retention", daemon=True).start()
