"""Requests per minute, tokens per minute and requests in flight, per key and per user.

A request is checked against each party's limits in order (the key's, then its user's
group limits) and is counted only when it passes them all: the check and the count are
one Lua script in Redis (exact across workers and nodes) or one uninterrupted block of
Python in memory (exact inside the one worker `make run` starts without Redis).

- RPM and TPM count in fixed minute windows of Redis's clock.
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
    window: int = 0
    backend: str | None = None  # "redis", "memory", or None (nothing counted)
    used: tuple = ()  # per party: (requests, tokens, in flight) after this admission
    reset: int = 60  # seconds until the minute window resets
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
    ok, index, kind, retry, window, used = result
    if not ok:
        raise _refusal(parties[index], kind, retry, used, tokens)
    return Admission(request_id, parties, tokens, window, backend, used, retry)


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
    tpm = [p.prefix for p in admission.parties if p.tpm] if delta else []
    if not slots and not tpm:
        return
    if admission.backend == "redis":
        try:
            redis_store.run(lambda conn: _scripts(conn)["release"](
                keys=slots + tpm, args=[admission.request_id, len(slots), admission.window,
                                        delta]))
        except redis_store.Unavailable:
            pass  # the lease lapses by itself
    else:
        _memory.release(admission.request_id, slots, tpm, admission.window, delta)


def headers(admission):
    """OpenAI's x-ratelimit-* headers for the limit with the fewest remaining, per kind."""
    if admission is None or not admission.used:
        return {}
    out = {}
    for kind, position, limit_of in (("requests", 0, lambda p: p.rpm),
                                     ("tokens", 1, lambda p: p.tpm)):
        best = None
        for party, used in zip(admission.parties, admission.used):
            limit = limit_of(party)
            if limit:
                remaining = max(limit - used[position], 0)
                if best is None or remaining < best[1]:
                    best = (limit, remaining)
        if best:
            out[f"x-ratelimit-limit-{kind}"] = str(best[0])
            out[f"x-ratelimit-remaining-{kind}"] = str(best[1])
            out[f"x-ratelimit-reset-{kind}"] = f"{admission.reset}s"
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
# per party. Returns {ok, party index (1-based), kind, retry/reset s, window, used...}.
ADMIT = """
local t = redis.call('TIME')
local now_s = tonumber(t[1])
local now_ms = now_s * 1000 + math.floor(tonumber(t[2]) / 1000)
local window = math.floor(now_s / 60)
local reset = 60 - (now_s % 60)
local rid, tokens, lease = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local used = {}
for i = 1, #KEYS do
  local rpm, tpm, conc = tonumber(ARGV[1 + 3 * i]), tonumber(ARGV[2 + 3 * i]), tonumber(ARGV[3 + 3 * i])
  local r = tonumber(redis.call('GET', KEYS[i] .. ':rpm:' .. window) or '0')
  local k = tonumber(redis.call('GET', KEYS[i] .. ':tpm:' .. window) or '0')
  local c = 0
  if conc > 0 then
    redis.call('ZREMRANGEBYSCORE', KEYS[i] .. ':conc', '-inf', now_ms)
    c = redis.call('ZCARD', KEYS[i] .. ':conc')
  end
  if rpm > 0 and r + 1 > rpm then return {0, i, 'rpm', reset, window, r} end
  if tpm > 0 and k + tokens > tpm then return {0, i, 'tpm', reset, window, k} end
  if conc > 0 and c + 1 > conc then return {0, i, 'conc', 1, window, c} end
  used[i] = {r, k, c}
end
local out = {1, 0, '', reset, window}
for i = 1, #KEYS do
  local rpm, tpm, conc = tonumber(ARGV[1 + 3 * i]), tonumber(ARGV[2 + 3 * i]), tonumber(ARGV[3 + 3 * i])
  local r, k, c = used[i][1], used[i][2], used[i][3]
  if rpm > 0 then
    r = redis.call('INCR', KEYS[i] .. ':rpm:' .. window)
    redis.call('EXPIRE', KEYS[i] .. ':rpm:' .. window, 120)
  end
  if tpm > 0 and tokens > 0 then
    k = redis.call('INCRBY', KEYS[i] .. ':tpm:' .. window, tokens)
    redis.call('EXPIRE', KEYS[i] .. ':tpm:' .. window, 120)
  end
  if conc > 0 then
    redis.call('ZADD', KEYS[i] .. ':conc', now_ms + lease, rid)
    redis.call('PEXPIRE', KEYS[i] .. ':conc', lease * 2)
    c = c + 1
  end
  table.insert(out, r)
  table.insert(out, k)
  table.insert(out, c)
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
# ARGV: request id, number of concurrency prefixes, the admission's window, token correction.
RELEASE = """
local slots, window, delta = tonumber(ARGV[2]), ARGV[3], tonumber(ARGV[4])
for i = 1, slots do redis.call('ZREM', KEYS[i] .. ':conc', ARGV[1]) end
for i = slots + 1, #KEYS do
  local key = KEYS[i] .. ':tpm:' .. window
  if delta ~= 0 and redis.call('EXISTS', key) == 1 then
    if tonumber(redis.call('INCRBY', key, delta)) < 0 then redis.call('SET', key, 0, 'KEEPTTL') end
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
    ok, index, kind, retry, window = int(out[0]), int(out[1]), out[2], int(out[3]), int(out[4])
    if isinstance(kind, bytes):
        kind = kind.decode()
    if not ok:
        return False, index - 1, kind, retry, window, int(out[5])
    flat = [int(v) for v in out[5:]]
    used = tuple(tuple(flat[i:i + 3]) for i in range(0, len(flat), 3))
    return True, 0, "", retry, window, used


# --- memory (one process) ----------------------------------------------------------------

class MemoryCounters:
    """The same rules as the Redis scripts, for a gateway without Redis (one worker)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._minute = {}  # (prefix, kind, window) -> count
        self._slots = {}  # prefix -> {request id: lease expiry (monotonic)}
        self._window = None

    def admit(self, request_id, parties, tokens, lease):
        now = time.time()
        window, reset = int(now // 60), 60 - int(now % 60)
        mono = time.monotonic()
        with self._lock:
            self._forget_old_windows(window)
            used = []
            for index, party in enumerate(parties):
                r = self._minute.get((party.prefix, "rpm", window), 0)
                k = self._minute.get((party.prefix, "tpm", window), 0)
                slots = self._slots.get(party.prefix, {})
                for rid in [rid for rid, until in slots.items() if until <= mono]:
                    del slots[rid]
                c = len(slots)
                if party.rpm and r + 1 > party.rpm:
                    return False, index, "rpm", reset, window, r
                if party.tpm and k + tokens > party.tpm:
                    return False, index, "tpm", reset, window, k
                if party.concurrency and c + 1 > party.concurrency:
                    return False, index, "conc", 1, window, c
                used.append((r, k, c))
            counted = []
            for party, (r, k, c) in zip(parties, used):
                if party.rpm:
                    r = self._minute[(party.prefix, "rpm", window)] = r + 1
                if party.tpm and tokens:
                    k = self._minute[(party.prefix, "tpm", window)] = k + tokens
                if party.concurrency:
                    self._slots.setdefault(party.prefix, {})[request_id] = mono + lease
                    c += 1
                counted.append((r, k, c))
            return True, 0, "", reset, window, tuple(counted)

    def renew(self, request_id, prefixes, lease):
        with self._lock:
            for prefix in prefixes:
                slots = self._slots.get(prefix, {})
                if request_id in slots:
                    slots[request_id] = time.monotonic() + lease

    def release(self, request_id, slots, tpm, window, delta):
        with self._lock:
            for prefix in slots:
                self._slots.get(prefix, {}).pop(request_id, None)
                if not self._slots.get(prefix, True):
                    del self._slots[prefix]
            for prefix in tpm:
                key = (prefix, "tpm", window)
                if key in self._minute:
                    self._minute[key] = max(self._minute[key] + delta, 0)

    def reset(self):
        with self._lock:
            self._minute.clear()
            self._slots.clear()

    def _forget_old_windows(self, window):
        if window != self._window:  # a new minute: the old counts are history
            self._window = window
            for key in [k for k in self._minute if k[2] < window]:
                del self._minute[key]


_memory = MemoryCounters()


def reset_memory():
    """Forget the in-process counters (tests, and `limiter.reset()`'s counterpart)."""
    _memory.reset()
