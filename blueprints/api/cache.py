"""A tiny per-worker TTL cache for the hot path's lookups (keys, channels)."""
import time

from flask import current_app


class TTLCache:
    """Values live for app.config['CACHE_TTL'] seconds; 0 turns caching off."""

    def __init__(self):
        self._entries = {}

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
