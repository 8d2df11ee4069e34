"""Channel choice: priority, then weighted random; cool-down for channels that keep failing."""
import random
from dataclasses import dataclass
from datetime import timedelta

from flask import current_app
from sqlalchemy import update

import redis_store
from cache import TTLCache, changed
from blueprints.api.providers.base import Target
from encryption import SecretUnreadable
from extensions import db
from models import Channel, ChannelModel, utcnow

_channels_by_model = TTLCache(depends_on=(Channel, ChannelModel))


@dataclass(frozen=True)
class Route:
    """One channel that serves a model, as the router sees it."""
    target: Target
    priority: int
    weight: int
    cooldown_until: object  # datetime or None
    fail_count: int = 0


def _load_routes(model):
    rows = db.session.execute(
        db.select(Channel, ChannelModel.upstream_name)
        .join(ChannelModel, ChannelModel.channel_id == Channel.id)
        .where(ChannelModel.public_name == model, Channel.enabled.is_(True))
    ).all()
    routes = []
    for c, upstream in rows:
        try:
            api_key = c.api_key  # decrypted here, once per cache load, never per request
        except SecretUnreadable:
            current_app.logger.error("channel %s skipped: its API key cannot be decrypted "
                                     "with the configured encryption keys", c.name)
            continue
        routes.append(Route(Target(channel_id=c.id, channel_name=c.name, type=c.type,
                                   base_url=c.base_url, api_key=api_key, upstream_model=upstream,
                                   generation=channel_generation(c)),
                            c.priority, max(c.weight, 0), c.cooldown_until, c.fail_count))
    return routes


def routes_for(model):
    """Every enabled channel serving `model` (cached per worker for CACHE_TTL seconds)."""
    return _channels_by_model.get(model, lambda: _load_routes(model))


def model_exists(model):
    return bool(routes_for(model))


def _weighted_order(routes):
    """Weighted random order without replacement (a weight of 0 goes last)."""
    pool = list(routes)
    ordered = []
    while pool:
        total = sum(r.weight for r in pool)
        if total <= 0:
            random.shuffle(pool)
            ordered.extend(pool)
            break
        pick = random.uniform(0, total)
        for index, route in enumerate(pool):
            pick -= route.weight
            if pick <= 0:
                ordered.append(pool.pop(index))
                break
        else:
            ordered.append(pool.pop())
    return ordered


def choose_channels(model):
    """Routes to try in order: healthy channels by priority (higher first) then weight;
    channels in cool-down only after them, as a last resort."""
    now = utcnow()
    routes = routes_for(model)
    healthy = [r for r in routes if not (r.cooldown_until and r.cooldown_until > now)]
    cooling = [r for r in routes if r.cooldown_until and r.cooldown_until > now]
    ordered = []
    for group in (healthy, cooling):
        for priority in sorted({r.priority for r in group}, reverse=True):
            ordered.extend(_weighted_order([r for r in group if r.priority == priority]))
    return ordered


def note_failure(target, message):
    """Count a failure in a row; after N the channel cools down (health shows it everywhere)."""
    config = current_app.config
    _failed_here.add((target.channel_id, target.generation))
    in_a_row = failures_in_a_row(target.channel_id, add=True, generation=target.generation)
    values = {"fail_count": in_a_row, "last_error": message[:500]}
    if in_a_row >= config["CHANNEL_FAILURES_BEFORE_COOLDOWN"]:
        values["cooldown_until"] = utcnow() + timedelta(seconds=config["CHANNEL_COOLDOWN_SECONDS"])
    try:
        db.session.execute(update(Channel).where(Channel.id == target.channel_id).values(**values))
        changed(Channel)  # every worker and node reloads its routes after the commit
        db.session.commit()
    except Exception:  # noqa: BLE001 - health bookkeeping must never fail a request
        db.session.rollback()
        current_app.logger.exception("could not record failure of channel %s", target.channel_name)


def note_success(route):
    """A success ends the run of failures, on every worker: the count is shared.

    Only a channel with a failure on record is reset: its row counts failures (note_failure
    writes it and every worker's cache reloads it after the commit), so a clean row means a
    clean count, but for a failure another worker noted in the last moments (until the
    invalidation reaches this one); this worker's own failures count even if their row
    could not be written. With Redis the reset is a round trip: ~0.2 ms of every answer,
    when almost every channel has nothing to reset."""
    mine = (route.target.channel_id, route.target.generation)
    if not (route.fail_count or route.cooldown_until or mine in _failed_here):
        return
    _failed_here.discard(mine)
    failures_in_a_row(route.target.channel_id, reset=True, generation=route.target.generation)
    db.session.execute(update(Channel).where(Channel.id == route.target.channel_id).values(
        fail_count=0, cooldown_until=None))
    changed(Channel)
    db.session.commit()


_local_failures = {}  # (channel id, generation) -> failures in a row, when there is no Redis
_failed_here = set()  # (channel id, generation) this worker saw fail since its last success


def channel_generation(channel):
    """A number that tells a channel from an earlier one that had the same id (SQLite reuses
    ids): its creation time in microseconds."""
    created = channel.created_at
    return int(created.timestamp() * 1_000_000) if created is not None else 0


def failures_in_a_row(channel_id, add=False, reset=False, generation=0):
    """The channel's count of failures in a row, shared by all workers through Redis
    (an atomic INCR / DEL); in this process when Redis is not configured or is down."""
    name = f"tokenopen:channel:{channel_id}:{generation}:failures"
    try:
        if add:
            return int(redis_store.run(lambda conn: conn.pipeline().incr(name)
                                       .expire(name, 86400).execute()[0]))
        if reset:
            return int(redis_store.run(lambda conn: conn.delete(name)))
    except redis_store.Unavailable:
        pass
    local = (channel_id, generation)
    if add:
        _local_failures[local] = _local_failures.get(local, 0) + 1
        return _local_failures[local]
    return _local_failures.pop(local, 0)
