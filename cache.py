"""Per-worker caches for the hot path's lookups (keys, channels, prices, settings).

Bounded LRU caches with a TTL (cachetools). Each names the models it is built from;
when a transaction that changed any of those rows COMMITS, the caches built from
them are cleared in this process and, when Redis is configured, in every other
worker and node through Redis pub/sub (the TTL is the fallback while Redis is down).
Code that changes rows with a Core UPDATE calls `changed(Model)` so the same happens.

A miss is loaded once however many greenlets ask at the same moment (single flight),
and a load that raced with a clear is not stored. "Not found" answers live in a small
cache of their own for at most a second, so a key-guessing flood cannot evict real keys.
In a gevent worker a value in use is reloaded ahead of its TTL, once no request waits.
"""
import threading
import time
from collections import deque
from contextlib import contextmanager

import cachetools
from flask import current_app, has_app_context
from sqlalchemy import event
from sqlalchemy.orm import Session

import redis_store
import this_process

MAX_ENTRIES = 10_000
MAX_MISSES = 1_000
MISS_TTL = 1.0  # seconds
REFRESH_AT = 0.75  # of a value's life: used after this, it is reloaded ahead (gevent workers)
CHANNEL = "tokenopen:cache"

_caches = []


class TTLCache:
    """Values live for app.config['CACHE_TTL'] seconds; 0 turns caching off.

    In a gevent worker a value still in use past REFRESH_AT of its life is reloaded ahead,
    once no request waits for its answer (below): the request that found it gets it at once.
    A load is 0.2-2 ms of synchronous ORM work on SQLite, and the caches one request filled
    all expired together: every CACHE_TTL one request paid ~5 ms for four loads (the p99 at
    low load). Nothing is served past its TTL: a value found expired (a worker never quiet,
    or a value unused for a while) is loaded in place, as before."""

    def __init__(self, depends_on=(), maxsize=MAX_ENTRIES):
        self.depends_on = tuple(depends_on)
        self.maxsize = maxsize
        self._ttl = None
        self._found = self._misses = None
        self._generation = 0
        self._lock = threading.Lock()
        self._loading = {}  # key -> lock of the load in progress
        self._refreshing = set()  # keys with a reload ahead under way
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
        entry = found.get(key) or misses.get(key)  # (value, when to reload it ahead)
        if entry is not None:
            if entry[1] <= time.monotonic() and key not in self._refreshing:
                self._reload_ahead(key, load)
            return entry[0]
        return self._load(key, load, found, misses)

    def _load(self, key, load, found, misses, ahead=False):
        with self._lock:
            loading = self._loading.setdefault(key, threading.Lock())
        with loading:  # single flight: the others wait for this load and read its result
            try:
                entry = None if ahead else (found.get(key) or misses.get(key))
                if entry is not None:
                    return entry[0]
                generation = self._generation
                value = load()
                if generation == self._generation:  # not cleared while loading
                    store, other = (found, misses) if value is not None else (misses, found)
                    store[key] = (value, time.monotonic() + store.ttl * REFRESH_AT)
                    other.pop(key, None)  # a reload ahead may find a row gone, or back
                return value
            finally:
                with self._lock:
                    self._loading.pop(key, None)

    def _reload_ahead(self, key, load):
        from gevent import monkey
        if not monkey.is_module_patched("socket"):
            return  # threads (flask run, tests): the value is loaded in place at its TTL
        self._refreshing.add(key)
        _reloads.append((self, current_app._get_current_object(), key, load))
        _start_reloader()

    def _reload(self, app, key, load):
        try:
            with app.app_context():
                self._load(key, load, *self._stores(app.config["CACHE_TTL"]), ahead=True)
        except Exception as err:  # noqa: BLE001 - it expires at its TTL, then loads in place
            # The type only: a database error's text names the server's address.
            app.logger.warning("reloading a cached %s ahead failed (%s)", " / ".join(
                kind.__name__ for kind in self.depends_on) or "value", type(err).__name__)
        finally:
            self._refreshing.discard(key)

    def clear(self):
        """Forget everything (and any load in progress will not be stored)."""
        self._generation += 1
        if self._found is not None:
            self._found.clear()
            self._misses.clear()


# --- reloads ahead, when no request waits (gevent workers) -------------------------------------
# A reload runs on the worker's one thread: run while a request waits for its upstream, it
# would hold that request's answer back as surely as a reload in place. So they wait until no
# request is between its arrival and its answer (`answering`, around the relay), then until
# nothing else is runnable. A worker that is never quiet loads values in place at their TTL.

_reloads = deque()  # (cache, app, key, load) due to be reloaded ahead
_answering = {"requests": 0, "quiet": None}  # quiet: a gevent Event, set while none are
_reloader = {"greenlet": None}


@contextmanager
def answering():
    """Around a request's wait for its answer (exact under gevent, the only place it counts)."""
    _answering["requests"] += 1
    if _answering["quiet"] is not None:
        _answering["quiet"].clear()
    try:
        yield
    finally:
        _answering["requests"] -= 1
        if _answering["requests"] <= 0 and _answering["quiet"] is not None:
            _answering["quiet"].set()


def requests_answering():
    """How many requests are between their arrival and their answer (exact under gevent)."""
    return _answering["requests"]


def _start_reloader():
    import gevent
    from gevent.event import Event
    if _answering["quiet"] is None:
        _answering["quiet"] = Event()
        if _answering["requests"] <= 0:
            _answering["quiet"].set()
    if _reloader["greenlet"] is None or _reloader["greenlet"].dead:
        _reloader["greenlet"] = gevent.spawn(_reload_when_quiet)


def _reload_when_quiet():
    import gevent
    while _reloads:
        _answering["quiet"].wait()
        gevent.idle()  # after what is runnable now (streams' chunks, the writer)
        if _answering["requests"] > 0:
            continue
        cache, app, key, load = _reloads.popleft()
        cache._reload(app, key, load)


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
    message = f"{this_process.pid()}:{','.join(sorted(names))}"
    try:
        redis_store.run(lambda conn: conn.publish(CHANNEL, message))
    except redis_store.Unavailable:
        pass  # the others see it within CACHE_TTL


_listener = {"pid": None}


def _listen_once():
    """Start this process's pub/sub listener the first time a cache is used (after fork).
    A process that finds no Redis then does not look again: it asked on every cache get."""
    if _listener["pid"] == this_process.pid() or not has_app_context():
        return
    _listener["pid"] = this_process.pid()
    url = redis_store.configured_url()
    if not url:
        return
    threading.Thread(target=_listen, args=(url,), name="cache-invalidation",
                     daemon=True).start()


def _listen(url):
    """Clear what other processes changed; after a lost connection, clear everything."""
    import redis
    pid = str(this_process.pid())
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
