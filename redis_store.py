"""The optional Redis that every worker and node shares (TOKENOPEN_REDIS_URL).

One client per process with short socket timeouts, and a breaker: after a failure
Redis is skipped for a second, so a dead Redis costs a request at most one short
wait, never a stall. Outages are logged loudly once a minute; the first command that
works again ends the outage, without a restart.
"""
import logging
import threading
import time

from flask import current_app, has_app_context

import this_process

SOCKET_TIMEOUT = 0.5  # seconds; Redis answers in well under a millisecond when healthy
SKIP_AFTER_FAILURE = 1.0  # seconds Redis is not tried after a failure
LOG_EVERY = 60  # seconds between two "Redis unreachable" lines

log = logging.getLogger("tokenopen.redis")


class Unavailable(Exception):
    """Redis is configured but cannot be reached right now."""


_clients = {}
_lock = threading.Lock()
_state = {"skip_until": 0.0, "logged_at": 0.0, "down_since": None}


def configured_url():
    """The Redis URL of the current app, or None (then everything stays in this process)."""
    return current_app.config.get("REDIS_URL") if has_app_context() else None


def client(url=None):
    """This process's client for `url` (or the app's Redis); None when no Redis is set."""
    url = url or configured_url()
    if not url:
        return None
    key = (this_process.pid(), url)  # a forked worker must not share its parent's sockets
    found = _clients.get(key)
    if found is None:
        with _lock:
            found = _clients.get(key)
            if found is None:
                import redis  # only once a Redis is set: the CLI and Redis-less nodes skip it
                found = redis.Redis.from_url(url, socket_timeout=SOCKET_TIMEOUT,
                                             socket_connect_timeout=SOCKET_TIMEOUT,
                                             health_check_interval=30)
                _clients[key] = found
    return found


def run(command, url=None):
    """command(client)'s result; Unavailable when Redis is set but down (or skipped for now)."""
    conn = client(url)
    if conn is None:
        raise Unavailable("no Redis configured")
    if time.monotonic() < _state["skip_until"]:
        raise Unavailable("Redis is unreachable")
    try:
        result = command(conn)
    except errors() as err:
        note_failure(err)
        raise Unavailable(str(err)) from None
    if _state["down_since"] is not None:
        _warn(f"Redis is reachable again after {time.monotonic() - _state['down_since']:.0f} s; "
              "limits are exact again")
        _state["down_since"] = None
    return result


def errors():
    """What a lost Redis raises (the redis module is loaded by then: a client exists)."""
    import redis
    return (redis.ConnectionError, redis.TimeoutError, OSError)


def note_failure(err):
    """Skip Redis for a moment and say so, loudly, at most once a minute."""
    now = time.monotonic()
    _state["skip_until"] = now + SKIP_AFTER_FAILURE
    if _state["down_since"] is None:
        _state["down_since"] = now
    if now - _state["logged_at"] >= LOG_EVERY or _state["logged_at"] == 0.0:
        _state["logged_at"] = now
        _warn(f"REDIS UNREACHABLE ({err.__class__.__name__}: {err}): rate limits fail open "
              "and caches fall back to their TTL until it returns", error=True)


def is_down():
    """True while the last Redis command failed (until one works again)."""
    return _state["down_since"] is not None


def health():
    """'ok', 'degraded' (configured but unreachable) or 'off' (no Redis configured)."""
    if not configured_url():
        return "off"
    try:
        run(lambda conn: conn.ping())
    except Unavailable:
        return "degraded"
    return "ok"


def _warn(message, error=False):
    logger = current_app.logger if has_app_context() else log
    (logger.error if error else logger.warning)(message)
