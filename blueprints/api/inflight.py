"""This worker's requests in flight, and the keeper that looks after their holds.

The relay registers every request that holds credits. A background loop per worker (a
greenlet under gevent) then, without touching the request path:
- checkpoints what each open stream has delivered, at most every CHECKPOINT_SECONDS,
  a few hundred streams a transaction (so a DB blip never stalls a stream);
- renews the lease of every hold this worker still serves (live or waiting to settle);
- retries settlements that failed on a database error (through the group-commit writer,
  writer.py), until the database is back;
- settles holds whose lease lapsed (their worker died) at their last checkpoint;
- on SIGTERM, lets streams run for DRAIN_SECONDS, then interrupts the rest so they end
  with the stream_interrupted event, billed and logged, and flushes the writer, before the
  worker exits.
"""
import threading
import time
from collections import deque

from extensions import db
from give_way import give_way
import holds
import writer

CHECKPOINT_BATCH = 200  # streams counted, then written, between two turns of the event loop

_live = {}  # request id -> Flight, for every request of this worker that holds credits
_deferred = deque()  # (flight, settle callable) whose settlement hit a database error
_drain = {"deadline": None}


class StreamInterrupted(Exception):
    """Raised into a stream's greenlet when the worker stops serving it (shutdown)."""


def register(flight):
    """Look after this request's hold until `forget`."""
    _live[flight.request_id] = flight


def forget(flight):
    """The request is settled (or left to the sweeper): stop renewing its lease."""
    _live.pop(flight.request_id, None)


def defer(flight, settle):
    """Keep renewing this hold and retry `settle()` until the database takes it."""
    _deferred.append((flight, settle))


def live_streams():
    return [f for f in list(_live.values()) if f.streaming]


def draining():
    """True once the worker was told to stop (SIGTERM)."""
    return _drain["deadline"] is not None


# --- the keeper's duties ------------------------------------------------------------------

def checkpoint_streams(app, delivered_of):
    """Write the delivered usage of every open stream that progressed since its last one,
    CHECKPOINT_BATCH streams a transaction. Between batches the worker's requests get a turn:
    2,000 streams held them 160 ms at a stretch (the counting more than the writing)."""
    due = []
    for count, flight in enumerate(live_streams(), 1):
        usage, cost = delivered_of(flight)
        if (usage.prompt_tokens, usage.completion_tokens, cost) != flight.checkpointed:
            due.append((flight, usage, cost))
        if count % CHECKPOINT_BATCH == 0:
            give_way()
    for start in range(0, len(due), CHECKPOINT_BATCH):
        batch = due[start:start + CHECKPOINT_BATCH]
        holds.checkpoint_many([
            (flight.hold, usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens,
             cost, flight.route.target.channel_id if flight.route else None,
             flight.route.target.channel_name if flight.route else None)
            for flight, usage, cost in batch])
        for flight, usage, cost in batch:
            flight.checkpointed = (usage.prompt_tokens, usage.completion_tokens, cost)
        give_way()
    return len(due)


def renew_all():
    """Push forward the lease of every hold this worker still answers for."""
    ids = [f.request_id for f in list(_live.values()) if f.hold is not None and f.hold.held]
    ids += [f.request_id for f, _ in list(_deferred) if f.hold is not None and f.hold.held]
    return holds.renew_leases(ids)


def retry_deferred():
    """Run the settlements a database error held back; keep those that fail again."""
    done = 0
    for _ in range(len(_deferred)):
        flight, settle = _deferred.popleft()
        try:
            settle()
            done += 1
        except Exception:  # noqa: BLE001 - still unreachable: try again next tick
            db.session.rollback()
            _deferred.append((flight, settle))
            break
    return done


def interrupt_streams(reason):
    """End every open stream now with `reason` (they bill and log in their own finally)."""
    import gevent
    for flight in live_streams():
        flight.interrupted = reason
        glet = flight.greenlet
        if isinstance(glet, gevent.Greenlet):
            glet.kill(StreamInterrupted(reason), block=False)
        elif glet is not None:
            gevent.kill(glet, StreamInterrupted(reason))


# --- the loop -----------------------------------------------------------------------------

def run_keeper(app, delivered_of, worker=None):
    """The keeper loop (never returns); failures are logged, never raised."""
    config = app.config
    tick = max(0.2, float(config["CHECKPOINT_SECONDS"]))
    renew_every = max(tick, holds_lease(config) / 3)
    sweep_every = max(tick, float(config["SWEEP_INTERVAL"]))
    last_renew = last_sweep = 0.0
    first = True
    while True:
        now = time.monotonic()
        with app.app_context():
            duties = [("checkpoint", lambda: checkpoint_streams(app, delivered_of))]
            if now - last_renew >= renew_every:
                duties.append(("renew", renew_all))
                last_renew = now
            duties.append(("settle", retry_deferred))
            if first or now - last_sweep >= sweep_every:
                duties.append(("sweep", _sweep_and_say(app)))
                last_sweep = now
            for name, duty in duties:
                try:
                    duty()
                except Exception:  # noqa: BLE001 - the keeper must never take the worker down
                    db.session.rollback()
                    app.logger.exception("hold keeper: %s failed", name)
            db.session.remove()
        first = False
        if worker is not None:
            try:
                _watch_shutdown(app, worker)
            except Exception:  # noqa: BLE001
                app.logger.exception("hold keeper: drain failed")
        time.sleep(tick)


def _sweep_and_say(app):
    def sweep():
        settled = holds.sweep_lapsed()
        if settled:
            app.logger.warning("settled %d hold(s) of a lost worker at their checkpoint",
                               settled)
    return sweep


def holds_lease(config):
    return int(config.get("HOLD_LEASE_SECONDS") or 60)


def _watch_shutdown(app, worker):
    """Start the drain when gunicorn stops the worker; interrupt what is left at its end."""
    if worker.alive:
        return
    if _drain["deadline"] is None:
        _drain["deadline"] = time.monotonic() + app.config["DRAIN_SECONDS"]
        app.logger.warning("draining %d stream(s) for up to %s s", len(live_streams()),
                           app.config["DRAIN_SECONDS"])
    elif time.monotonic() >= _drain["deadline"] and live_streams():
        interrupt_streams("The gateway is shutting down; this stream was interrupted.")
    writer.flush()  # what requests handed the writer is committed before the worker exits


def start_keeper(app, delivered_of, worker=None):
    """Run the keeper in a daemon thread (a greenlet under gevent's monkey-patching)."""
    threading.Thread(target=run_keeper, args=(app, delivered_of, worker),
                     name="hold-keeper", daemon=True).start()
