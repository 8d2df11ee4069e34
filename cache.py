"""Per-worker caches for the hot path's lookups (keys, channels, prices, settings).

Bounded LRU caches with a TTL (cachetools). Each names the models it is built from;
when a transaction that changed any of those rows COMMITS, the caches built from
them are cleared in this process and, when Redis is configured, in every other
worker and node through Redis pub/sub (the TTL is the fallback while Redis is down).
Code that changes rows with a Core UPDATE calls `changed(Model)` so the same happens.

A miss is loaded once however many greenlets ask at the same moment (single flight),
and a load that raced with a clear is not stored. "Not found" answers live in a small
cache of their own for at most a second, so a key-guessing flood cannot evict real keys.
"""
import os
import threading
import time

import cachetools
from flask import current_app, has_app_context
from sqlalchemy import event
from sqlalchemy.orm import Session

import redis_store

MAX_ENTRIES = 10_000
MAX_MISSES = 1_000
MISS_TTL = 1.0  # seconds
CHANNEL = "tokenopen:cache"

_caches = []
_MISSING = object()


class TTLCache:
    """Values live for app.config['CACHE_TTL'] seconds; 0 turns caching off."""

    def __init__(self, depends_on=(), maxsize=MAX_ENTRIES):
        self.depends_on = tuple(depends_on)
        self.maxsize = maxsize
        self._ttl = None
        self._found = self._misses = None
        self._generation = 0
        self._lock = threading.Lock()
        self._loading = {}  # key -> lock of the load in progress
        _caches.append(self)

    def _stores(self, ttl):
        if self._ttl != ttl:
            self._ttl = ttl
            self._found = cachetools.TTLCache(self.maxsize, ttl)
            self._misses = cachetools.TTLCache(MAX_MISSES, min(ttl, MISS_TTL))
        return self._found, self._misses

    def get(self, key, load):
        """The cached value for `key`, calling load() when missing or expired (once at a time)."""
        ttl = current_app.config["CACHE_TTL"]
        if ttl <= 0:
            return load()
        _listen_once()
        found, misses = self._stores(ttl)
        value = found.get(key, _MISSING)
        if value is _MISSING and key in misses:
            value = None
        if value is not _MISSING:
            return value
        with self._lock:
            loading = self._loading.setdefault(key, threading.Lock())
        with loading:  # single flight: the others wait for this load and read its result
            try:
                value = found.get(key, _MISSING)
                if value is not _MISSING:
                    return value
                if key in misses:
                    return None
                generation = self._generation
                value = load()
                if generation == self._generation:  # not cleared while loading
                    (found if value is not None else misses)[key] = value
                return value
            finally:
                with self._lock:
                    self._loading.pop(key, None)

    def clear(self):
        """Forget everything (and any load in progress will not be stored)."""
        self._generation += 1
        if self._found is not None:
            self._found.clear()
            self._misses.clear()


def clear_for(names):
    """Clear every cache built from a model named in `names` (class names)."""
    for cache in _caches:
        if any(kind.__name__ in names for kind in cache.depends_on):
            cache.clear()


def changed(*models):
    """Note that the current transaction changed rows of `models` outside the ORM's sight."""
    from extensions import db
    db.session.info.setdefault("cache_changed", set()).update(m.__name__ for m in models)


@event.listens_for(Session, "after_flush")
def _note_changed_rows(session, flush_context):
    touched = {type(obj).__name__ for obj in (*session.new, *session.dirty, *session.deleted)}
    if touched:
        session.info.setdefault("cache_changed", set()).update(touched)


@event.listens_for(Session, "after_commit")
def _forget_committed_rows(session):
    """After commit, not at flush: a lookup in between would re-cache the old row."""
    names = session.info.pop("cache_changed", None)
    if names:
        clear_for(names)
        _publish(names)


@event.listens_for(Session, "after_rollback")
def _forget_rolled_back(session):
    session.info.pop("cache_changed", None)


# --- other workers and nodes ---------------------------------------------------------------

def _publish(names):
    if not redis_store.configured_url():
        return
    message = f"{os.getpid()}:{','.join(sorted(names))}"
    try:
        redis_store.run(lambda conn: conn.publish(CHANNEL, message))
    except redis_store.Unavailable:
        pass  # the others see it within CACHE_TTL


_listener = {"pid": None}


def _listen_once():
    """Start this process's pub/sub listener the first time a cache is used (after fork)."""
    if _listener["pid"] == os.getpid() or not has_app_context():
        return
    url = redis_store.configured_url()
    if not url:
        return
    _listener["pid"] = os.getpid()
    threading.Thread(target=_listen, args=(url,), name="cache-invalidation",
                     daemon=True).start()


def _listen(url):
    """Clear what other processes changed; after a lost connection, clear everything."""
    import redis
    pid = str(os.getpid())
    while True:
        try:
            conn = redis.Redis.from_url(url, socket_connect_timeout=redis_store.SOCKET_TIMEOUT,
                                        socket_timeout=None, health_check_interval=30)
            pubsub = conn.pubsub(ignore_subscribe_messages=True)
            pubsub.subscribe(CHANNEL)
            for cache in _caches:  # anything may have changed while we were not listening
                cache.clear()
            for message in pubsub.listen():
                sender, _, names = message["data"].decode().partition(":")
                if sender != pid:
                    clear_for(set(names.split(",")))
        except Exception:  # noqa: BLE001 - keep listening; the TTL covers the gap
            time.sleep(1)
