"""A tiny per-worker TTL cache for the hot path's lookups (keys, channels, prices).

Each cache names the models it is built from. When this process changes any of
those rows through the ORM (console pages, admin actions), the cache is cleared
at once; changes made by other processes (the CLI, other workers) are seen
within CACHE_TTL seconds.
"""
import time
from itertools import chain

from flask import current_app
from sqlalchemy import event
from sqlalchemy.orm import Session

_caches = []


class TTLCache:
    """Values live for app.config['CACHE_TTL'] seconds; 0 turns caching off."""

    def __init__(self, depends_on=()):
        self._entries = {}
        self.depends_on = tuple(depends_on)
        _caches.append(self)

    def get(self, key, load):
        """The cached value for `key`, calling load() when missing or expired."""
        ttl = current_app.config["CACHE_TTL"]
        if ttl <= 0:
            return load()
        now = time.monotonic()
        entry = self._entries.get(key)
        if entry is not None and entry[0] > now:
            return entry[1]
        value = load()
        if len(self._entries) > 10_000:  # bound memory against key-guessing floods
            self._entries.clear()
        self._entries[key] = (now + ttl, value)
        return value

    def clear(self):
        self._entries.clear()


@event.listens_for(Session, "after_flush")
def _forget_changed_rows(session, flush_context):
    """Clear every cache built from a model whose rows this flush added, changed or deleted."""
    touched = {type(obj) for obj in chain(session.new, session.dirty, session.deleted)}
    if not touched:
        return
    for cache in _caches:
        if any(issubclass(kind, cache.depends_on) for kind in touched):
            cache.clear()
