"""Per-user (group) and per-key request and token limits, on Flask-Limiter's storage.

The storage is memory:// (exact with the one worker `make run` starts) or
Redis when TOKENOPEN_REDIS_URL is set (exact across workers and nodes). The
fixed-window strategy counts every token even past the limit, so a request
that overshoots the minute's budget holds the next ones back until it resets.
"""
import math
import time

from limits import RateLimitItemPerMinute

from extensions import limiter


def _retry_after(item, scope, identity):
    reset_at, _ = limiter.limiter.get_window_stats(item, scope, str(identity))
    return max(1, math.ceil(reset_at - time.time()))


class RateLimited(Exception):
    """A request refused by a limit; the relay answers it as 429 with Retry-After."""

    def __init__(self, message, retry_after, code="rate_limit_exceeded"):
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after
        self.code = code


def _refuse(what, limit, who, retry_after):
    return RateLimited(f"Rate limit of {limit} {what} per minute for {who} reached; "
                       f"retry in {retry_after} s.", retry_after)


def admit(user_id, group_rpm, group_tpm, key_id, key_rpm, key_tpm):
    """429 while a token budget is spent; otherwise count this request against both RPMs."""
    strategy = limiter.limiter
    for limit, scope, identity, who in ((group_tpm, "tpm-user", user_id, "your group"),
                                        (key_tpm, "tpm-key", key_id, "this key")):
        if limit and limit > 0:
            item = RateLimitItemPerMinute(limit)
            if strategy.get_window_stats(item, scope, str(identity)).remaining <= 0:
                raise _refuse("tokens", limit, who, _retry_after(item, scope, identity))
    for limit, scope, identity, who in ((group_rpm, "rpm-user", user_id, "your group"),
                                        (key_rpm, "rpm-key", key_id, "this key")):
        if limit and limit > 0:
            item = RateLimitItemPerMinute(limit)
            if not strategy.hit(item, scope, str(identity)):
                raise _refuse("requests", limit, who, _retry_after(item, scope, identity))


def count_tokens(user_id, group_tpm, key_id, key_tpm, tokens):
    """Add a finished request's tokens to the TPM windows that apply to it."""
    if tokens <= 0:
        return
    for limit, scope, identity in ((group_tpm, "tpm-user", user_id),
                                   (key_tpm, "tpm-key", key_id)):
        if limit and limit > 0:
            limiter.limiter.hit(RateLimitItemPerMinute(limit), scope, str(identity), cost=tokens)
