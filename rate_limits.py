"""Requests per minute, tokens per minute and requests in flight, per key and per user.

A request is checked against each party's limits in order (the key's, then its user's
group limits) and is counted only when it passes them all: the check and the count are
one Lua script in Redis (exact across workers and nodes) or one uninterrupted block of
Python in memory (exact inside the one worker `make run` starts without Redis).

- RPM and TPM count in minute windows that start with a party's first counted request
  (on Redis's clock), like Flask-Limiter's fixed window.
- TPM admits by reservation: the prompt estimate plus the output cap go in when the
  request is admitted, and `release` corrects them to the actual tokens, so the tokens
  admitted in a minute never exceed the limit.
- Concurrency is a sorted set of request ids scored by the expiry of their lease; the
  relay renews the lease while the request lives, so a dead worker's slots come back.

Redis unreachable: limits fail open (redis_store logs it once a minute).
"""
import threading
import time
from dataclasses import dataclass, field

from flask import current_app, has_app_context

import redis_store

PREFIX = "tokenopen:rl:"
DEFAULT_LEASE_SECONDS = 30


class RateLimited(Exception):
    """A request refused by a limit; the relay answers it as 429 with Retry-After."""

    def __init__(self, message, retry_after, code="rate_limit_exceeded", headers=None):
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after
        self.code = code
        self.headers = headers or {}


class ConcurrencyLimited(RateLimited):
    """Too many requests of this key or user in flight at once."""

    def __init__(self, message, retry_after=1, headers=None):
        super().__init__(message, retry_after, "concurrency_limit_exceeded", headers)


@dataclass(frozen=True)
class Party:
    """Whose limits these are ("key" 12 or "user" 7) and the limits; 0 = unlimited."""
    scope: str
    id: int
    rpm: int = 0
    tpm: int = 0
    concurrency: int = 0
    who: str = ""

    @property
    def limited(self):
        return bool(self.rpm or self.tpm or self.concurrency)

    @property
    def prefix(self):
        return f"{PREFIX}{self.scope}:{self.id}"


@dataclass
class Admission:
    """What one admitted request holds: its TPM reservation and its concurrency slots."""
    request_id: str
    parties: tuple = ()
    tokens: int = 0
    backend: str | None = None  # "redis", "memory", or None (nothing counted)
    used: tuple = ()  # per party: (requests, tokens, in flight) after this admission
    windows: tuple = ()  # per party: the id of the minute window it was counted in
    resets: tuple = ()  # per party: seconds until that window ends
    renewed_at: float = field(default_factory=time.monotonic)
    released: bool = False

    @property
    def holds_slots(self):
        return self.backend is not None and any(p.concurrency for p in self.parties)


# --- the public interface ----------------------------------------------------------------

def admit(request_id, parties, tokens=0):
    """Admit a request against every party's limits in order, counting it only if all pass;
    raises RateLimited / ConcurrencyLimited (counting nothing) otherwise."""
    parties = tuple(p for p in parties if p.limited)
    tokens = max(int(tokens or 0), 0)
    if not parties:
        return Admission(request_id)
    if redis_store.configured_url():
        try:
            result = redis_store.run(lambda conn: _admit_redis(conn, request_id, parties,
                                                               tokens))
        except redis_store.Unavailable:
            return Admission(request_id, parties, tokens)  # fail open
        backend = "redis"
    else:
        result = _memory.admit(request_id, parties, tokens, _lease_seconds())
        backend = "memory"
    if not result[0]:
        _, index, kind, retry, used = result
        raise _refusal(parties[index], kind, retry, used, tokens)
    _, used, windows, resets = result
    return Admission(request_id, parties, tokens, backend, used, windows, resets)


def renew(admission, force=False):
    """Extend the lease of the request's concurrency slots (at most every few seconds)."""
    if admission is None or admission.released or not admission.holds_slots:
        return
    lease = _lease_seconds()
    now = time.monotonic()
    if not force and now - admission.renewed_at < max(lease / 6, 0.5):
        return
    admission.renewed_at = now
    keys = [p.prefix for p in admission.parties if p.concurrency]
    if admission.backend == "redis":
        try:
            redis_store.run(lambda conn: _scripts(conn)["renew"](
                keys=keys, args=[admission.request_id, int(lease * 1000)]))
        except redis_store.Unavailable:
            pass
    else:
        _memory.renew(admission.request_id, keys, lease)


def release(admission, actual_tokens=None):
    """Give the slots back and correct the TPM reservation to `actual_tokens` (once)."""
    if admission is None or admission.released or admission.backend is None:
        return
    admission.released = True
    slots = [p.prefix for p in admission.parties if p.concurrency]
    delta = 0 if actual_tokens is None else int(actual_tokens) - admission.tokens
    tpm = [(p.prefix, window) for p, window in zip(admission.parties, admission.windows)
           if p.tpm] if delta else []
    if not slots and not tpm:
        return
    if admission.backend == "redis":
        try:
            redis_store.run(lambda conn: _scripts(conn)["release"](
                keys=slots + [prefix for prefix, _ in tpm],
                args=[admission.request_id, len(slots), delta] + [w for _, w in tpm]))
        except redis_store.Unavailable:
            pass  # the lease lapses by itself
    else:
        _memory.release(admission.request_id, slots, tpm, delta)


def headers(admission):
    """OpenAI's x-ratelimit-* headers for the limit with the fewest remaining, per kind."""
    if admission is None or not admission.used:
        return {}
    out = {}
    for kind, position, limit_of in (("requests", 0, lambda p: p.rpm),
                                     ("tokens", 1, lambda p: p.tpm)):
        best = None
        for party, used, reset in zip(admission.parties, admission.used, admission.resets):
            limit = limit_of(party)
            if limit:
                remaining = max(limit - used[position], 0)
                if best is None or remaining < best[1]:
                    best = (limit, remaining, reset)
        if best:
            out[f"x-ratelimit-limit-{kind}"] = str(best[0])
            out[f"x-ratelimit-remaining-{kind}"] = str(best[1])
            out[f"x-ratelimit-reset-{kind}"] = f"{best[2]}s"
    return out


def _refusal(party, kind, retry, used, tokens):
    retry = max(int(retry), 1)
    if kind == "conc":
        return ConcurrencyLimited(
            f"Concurrency limit of {party.concurrency} requests in flight for {party.who or party.scope}"
            f" reached; retry when one of them has finished.", retry)
    if kind == "rpm":
        hdrs = {"x-ratelimit-limit-requests": str(party.rpm),
                "x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": f"{retry}s"}
        return RateLimited(f"Rate limit of {party.rpm} requests per minute for "
                           f"{party.who or party.scope} reached; retry in {retry} s.", retry,
                           headers=hdrs)
    remaining = max(party.tpm - used, 0)
    hdrs = {"x-ratelimit-limit-tokens": str(party.tpm),
            "x-ratelimit-remaining-tokens": str(remaining), "x-ratelimit-reset-tokens": f"{retry}s"}
    if tokens > party.tpm:
        return RateLimited(f"This request needs up to {tokens} tokens (prompt estimate + output "
                           f"cap), more than the limit of {party.tpm} tokens per minute for "
                           f"{party.who or party.scope}; lower max_tokens.", retry, headers=hdrs)
    return RateLimited(f"Rate limit of {party.tpm} tokens per minute for {party.who or party.scope}"
                       f" reached ({remaining} left, this request needs up to {tokens}); "
                       f"retry in {retry} s.", retry, headers=hdrs)


def _lease_seconds():
    if has_app_context():
        return float(current_app.config.get("LIMIT_LEASE_SECONDS") or DEFAULT_LEASE_SECONDS)
    return DEFAULT_LEASE_SECONDS


# --- Redis -------------------------------------------------------------------------------

# KEYS: one prefix per party. ARGV: request id, tokens, lease ms, then rpm, tpm, concurrency
# per party. A party's minute window starts with its first counted request (a hash with the
# window's id and its request and token counts, expiring after 60 s).
# Returns {0, party index (1-based), kind, retry s, used} or {1, then per party: requests,
# tokens, in flight, window id, seconds to reset}.
ADMIT = """
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local rid, tokens, lease = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local seen = {}
for i = 1, #KEYS do
  local rpm, tpm, conc = tonumber(ARGV[1 + 3 * i]), tonumber(ARGV[2 + 3 * i]), tonumber(ARGV[3 + 3 * i])
  local w = KEYS[i] .. ':win'
  local v = redis.call('HMGET', w, 'r', 't', 'id')
  local r, k, id = tonumber(v[1] or '0'), tonumber(v[2] or '0'), v[3]
  local ttl = redis.call('PTTL', w)
  local reset = 60
  if ttl > 0 then reset = math.ceil(ttl / 1000) end
  if ttl < 0 or not id then r, k, id = 0, 0, tostring(now_ms) end
  local c = 0
  if conc > 0 then
    redis.call('ZREMRANGEBYSCORE', KEYS[i] .. ':conc', '-inf', now_ms)
    c = redis.call('ZCARD', KEYS[i] .. ':conc')
  end
  if rpm > 0 and r + 1 > rpm then return {0, i, 'rpm', reset, r} end
  if tpm > 0 and k + tokens > tpm then return {0, i, 'tpm', reset, k} end
  if conc > 0 and c + 1 > conc then return {0, i, 'conc', 1, c} end
  seen[i] = {r, k, c, id, reset, ttl}
end
local out = {1}
for i = 1, #KEYS do
  local rpm, tpm, conc = tonumber(ARGV[1 + 3 * i]), tonumber(ARGV[2 + 3 * i]), tonumber(ARGV[3 + 3 * i])
  local s = seen[i]
  local r, k, c, id, reset = s[1], s[2], s[3], s[4], s[5]
  local w = KEYS[i] .. ':win'
  if rpm > 0 or (tpm > 0 and tokens > 0) then
    if s[6] < 0 then
      redis.call('DEL', w)
      redis.call('HSET', w, 'id', id)
      redis.call('PEXPIRE', w, 60000)
    end
    if rpm > 0 then r = redis.call('HINCRBY', w, 'r', 1) end
    if tpm > 0 and tokens > 0 then k = redis.call('HINCRBY', w, 't', tokens) end
  end
  if conc > 0 then
    redis.call('ZADD', KEYS[i] .. ':conc', now_ms + lease, rid)
    redis.call('PEXPIRE', KEYS[i] .. ':conc', lease * 2)
    c = c + 1
  end
  table.insert(out, r)
  table.insert(out, k)
  table.insert(out, c)
  table.insert(out, id)
  table.insert(out, reset)
end
return out
"""

# KEYS: the concurrency prefixes. ARGV: request id, lease ms.
RENEW = """
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
for i = 1, #KEYS do
  redis.call('ZADD', KEYS[i] .. ':conc', 'XX', now_ms + tonumber(ARGV[2]), ARGV[1])
  redis.call('PEXPIRE', KEYS[i] .. ':conc', tonumber(ARGV[2]) * 2)
end
return 1
"""

# KEYS: the concurrency prefixes (ARGV[2] of them), then the TPM prefixes.
# ARGV: request id, number of concurrency prefixes, token correction, then the window id
# each TPM prefix was admitted in (a window that has since ended is left alone).
RELEASE = """
local slots, delta = tonumber(ARGV[2]), tonumber(ARGV[3])
for i = 1, slots do redis.call('ZREM', KEYS[i] .. ':conc', ARGV[1]) end
for i = slots + 1, #KEYS do
  local w = KEYS[i] .. ':win'
  if delta ~= 0 and redis.call('HGET', w, 'id') == ARGV[3 + i - slots] then
    if tonumber(redis.call('HINCRBY', w, 't', delta)) < 0 then redis.call('HSET', w, 't', 0) end
  end
end
return 1
"""

_registered = {}


def _scripts(conn):
    """The three scripts registered on `conn` (EVALSHA, reloaded by redis-py if flushed)."""
    found = _registered.get(id(conn))
    if found is None:
        found = {"admit": conn.register_script(ADMIT), "renew": conn.register_script(RENEW),
                 "release": conn.register_script(RELEASE)}
        _registered[id(conn)] = found
    return found


def _admit_redis(conn, request_id, parties, tokens):
    args = [request_id, tokens, int(_lease_seconds() * 1000)]
    for party in parties:
        args += [party.rpm or 0, party.tpm or 0, party.concurrency or 0]
    out = _scripts(conn)["admit"](keys=[p.prefix for p in parties], args=args)
    if not int(out[0]):
        kind = out[2].decode() if isinstance(out[2], bytes) else out[2]
        return False, int(out[1]) - 1, kind, int(out[3]), int(out[4])
    rows = [out[i:i + 5] for i in range(1, len(out), 5)]
    return True, tuple((int(r), int(k), int(c)) for r, k, c, _, _ in rows), \
        tuple(w.decode() if isinstance(w, bytes) else str(w) for _, _, _, w, _ in rows), \
        tuple(int(reset) for *_, reset in rows)


# --- memory (one process) ----------------------------------------------------------------

class MemoryCounters:
    """The same rules as the Redis scripts, for a gateway without Redis (one worker)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._windows = {}  # prefix -> [window id, ends at (monotonic), requests, tokens]
        self._slots = {}  # prefix -> {request id: lease expiry (monotonic)}

    def admit(self, request_id, parties, tokens, lease):
        now = time.monotonic()
        with self._lock:
            if len(self._windows) > 10_000:  # forget ended windows now and then
                for prefix in [p for p, w in self._windows.items() if w[1] <= now]:
                    del self._windows[prefix]
            seen = []
            for index, party in enumerate(parties):
                window = self._windows.get(party.prefix)
                if window is None or window[1] <= now:
                    window = [f"{time.time_ns()}-{index}", now + 60, 0, 0]
                reset = max(1, int(window[1] - now + 0.999))
                slots = self._slots.get(party.prefix, {})
                for rid in [rid for rid, until in slots.items() if until <= now]:
                    del slots[rid]
                c = len(slots)
                if party.rpm and window[2] + 1 > party.rpm:
                    return False, index, "rpm", reset, window[2]
                if party.tpm and window[3] + tokens > party.tpm:
                    return False, index, "tpm", reset, window[3]
                if party.concurrency and c + 1 > party.concurrency:
                    return False, index, "conc", 1, c
                seen.append((window, c, reset))
            used, windows, resets = [], [], []
            for party, (window, c, reset) in zip(parties, seen):
                if party.rpm or (party.tpm and tokens):
                    self._windows[party.prefix] = window
                    window[2] += 1 if party.rpm else 0
                    window[3] += tokens if party.tpm else 0
                if party.concurrency:
                    self._slots.setdefault(party.prefix, {})[request_id] = now + lease
                    c += 1
                used.append((window[2], window[3], c))
                windows.append(window[0])
                resets.append(reset)
            return True, tuple(used), tuple(windows), tuple(resets)

    def renew(self, request_id, prefixes, lease):
        with self._lock:
            for prefix in prefixes:
                slots = self._slots.get(prefix, {})
                if request_id in slots:
                    slots[request_id] = time.monotonic() + lease

    def release(self, request_id, slots, tpm, delta):
        with self._lock:
            for prefix in slots:
                self._slots.get(prefix, {}).pop(request_id, None)
                if not self._slots.get(prefix, True):
                    del self._slots[prefix]
            for prefix, window_id in tpm:
                window = self._windows.get(prefix)
                if window is not None and window[0] == window_id:
                    window[3] = max(window[3] + delta, 0)

    def reset(self):
        with self._lock:
            self._windows.clear()
            self._slots.clear()


_memory = MemoryCounters()


def reset_memory():
    """Forget the in-process counters (tests, and `limiter.reset()`'s counterpart)."""
    _memory.reset()
