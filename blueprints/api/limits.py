"""Per-user (group) and per-key request limits, on Flask-Limiter's storage.

The storage is memory:// (exact with the one worker `make run` starts) or
Redis when TOKENOPEN_REDIS_URL is set (exact across workers and nodes).
"""
import math
import time

from limits import RateLimitItemPerMinute

from blueprints.api.errors import ApiError
from extensions import limiter


def _hit(limit, scope, identity):
    item = RateLimitItemPerMinute(limit)
    strategy = limiter.limiter
    if strategy.hit(item, scope, str(identity)):
        return None
    reset_at, _ = strategy.get_window_stats(item, scope, str(identity))
    return max(1, math.ceil(reset_at - time.time()))


def admit(user_id, group_rpm, key_id, key_rpm):
    """Count this request against the user's group RPM and the key's RPM; 429 when over."""
    for limit, scope, identity, who in ((group_rpm, "rpm-user", user_id, "your group"),
                                        (key_rpm, "rpm-key", key_id, "this key")):
        if limit and limit > 0:
            retry_after = _hit(limit, scope, identity)
            if retry_after is not None:
                raise ApiError(429, "rate_limit_exceeded",
                               f"Rate limit of {limit} requests per minute for {who} reached; "
                               f"retry in {retry_after} s.",
                               headers={"Retry-After": str(retry_after)})
