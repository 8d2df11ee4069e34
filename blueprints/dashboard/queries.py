"""The SQL behind the overview and the dashboard: aggregates over the UsageDaily rollup."""
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import func, or_, select

from extensions import db
from models import MICRO, ApiKey, Channel, ChannelModel, UsageDaily, User, utcnow

RANGES = (7, 30, 90)
FALLBACK_MODEL = "gpt-4o-mini"


def day_list(days, today=None):
    """The last `days` UTC days as 'YYYY-MM-DD', oldest first, ending today."""
    today = today or utcnow().date()
    return [(today - timedelta(days=back)).isoformat() for back in range(days - 1, -1, -1)]


TOP_N = 10


def usage_scope(viewer, everyone, user_id=None):
    """WHERE clauses limiting UsageDaily to what `viewer` may chart: everyone's or one user's
    (admins), else the viewer's own."""
    if viewer.is_admin and user_id:
        return [UsageDaily.user_id == user_id]
    return [] if everyone and viewer.is_admin else [UsageDaily.user_id == viewer.id]


def _totals():
    return (func.coalesce(func.sum(UsageDaily.requests), 0),
            func.coalesce(func.sum(UsageDaily.failed), 0),
            func.coalesce(func.sum(UsageDaily.prompt_tokens), 0),
            func.coalesce(func.sum(UsageDaily.completion_tokens), 0),
            func.coalesce(func.sum(UsageDaily.credits_micro), 0))


@dataclass
class Usage:
    """Summed usage of one day, model or key."""
    label: str
    requests: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    credits_micro: int = 0

    @classmethod
    def from_row(cls, label, row):
        return cls(label, *(int(value or 0) for value in row))

    @property
    def credits(self):
        """Credits as a float, for charts only (money math stays integral)."""
        return self.credits_micro / MICRO

    @property
    def tokens(self):
        return self.prompt_tokens + self.completion_tokens

    def add(self, other):
        """Sum `other` into this one (folding the tail of a breakdown into "other")."""
        self.requests += other.requests
        self.failed += other.failed
        self.prompt_tokens += other.prompt_tokens
        self.completion_tokens += other.completion_tokens
        self.credits_micro += other.credits_micro
        return self


METRICS = {"credits": "credits_micro", "requests": "requests", "tokens": "tokens"}


def top_n(usages, metric, n=TOP_N):
    """The `n` largest by `metric`, then one "other (k more)" row summing the rest, so a team
    of 60 keys draws 11 bars, not 60. Rows with nothing to show for `metric` are left out."""
    attr = METRICS[metric]
    ranked = sorted((u for u in usages if getattr(u, attr)), key=lambda u: -getattr(u, attr))
    head, tail = ranked[:n], ranked[n:]
    if tail:
        other = Usage(f"other ({len(tail)} more)")
        for usage in tail:
            other.add(usage)
        head.append(other)
    return head


def daily_usage(scope, days):
    """One Usage per day of the range (days without traffic are zeros), GROUP BY day in SQL."""
    labels = day_list(days)
    rows = db.session.execute(
        select(UsageDaily.day, *_totals()).where(*scope, UsageDaily.day >= labels[0])
        .group_by(UsageDaily.day)).all()
    by_day = {row[0]: Usage.from_row(row[0], row[1:]) for row in rows}
    return [by_day.get(day, Usage(day)) for day in labels]


def usage_by_model(scope, days):
    """Usage per model over the range, most credits first."""
    since = day_list(days)[0]
    rows = db.session.execute(
        select(UsageDaily.model, *_totals()).where(*scope, UsageDaily.day >= since)
        .group_by(UsageDaily.model)
        .order_by(func.sum(UsageDaily.credits_micro).desc(), UsageDaily.model)).all()
    return [Usage.from_row(row[0] or "(unknown)", row[1:]) for row in rows]


def usage_by_key(scope, days, with_owner=False):
    """Usage per key over the range, most credits first; labels carry the owner for admins."""
    since = day_list(days)[0]
    query = (select(UsageDaily.key_name, func.max(User.email), *_totals())
             .outerjoin(User, User.id == UsageDaily.user_id)
             .where(*scope, UsageDaily.day >= since)
             .group_by(UsageDaily.user_id, UsageDaily.key_id, UsageDaily.key_name)
             .order_by(func.sum(UsageDaily.credits_micro).desc(), UsageDaily.key_name))
    usage = []
    for row in db.session.execute(query).all():
        label = row[0] or "(deleted key)"
        if with_owner and row[1]:
            label = f"{label} · {row[1]}"
        usage.append(Usage.from_row(label, row[2:]))
    return usage


def usage_by_user(scope, days):
    """Usage per user over the range (admins' team view), most credits first."""
    since = day_list(days)[0]
    rows = db.session.execute(
        select(func.max(User.email), *_totals())
        .outerjoin(User, User.id == UsageDaily.user_id)
        .where(*scope, UsageDaily.day >= since).group_by(UsageDaily.user_id)
        .order_by(func.sum(UsageDaily.credits_micro).desc())).all()
    return [Usage.from_row(row[0] or "(deleted user)", row[1:]) for row in rows]


def today_usage(user_id):
    """The user's requests and credits spent today (UTC), from the rollup."""
    row = db.session.execute(select(*_totals()).where(
        UsageDaily.user_id == user_id, UsageDaily.day == utcnow().date().isoformat())).one()
    return Usage.from_row("today", row)


def active_key_count(user_id):
    """Keys of the user that can make calls now: enabled and not expired."""
    return db.session.scalar(select(func.count(ApiKey.id)).where(
        ApiKey.user_id == user_id, ApiKey.disabled.is_(False),
        or_(ApiKey.expires_at.is_(None), ApiKey.expires_at > utcnow())))


def quickstart_model(user):
    """The first model (in the order channels were given them) that `user`'s group may call."""
    names = db.session.scalars(
        select(ChannelModel.public_name).join(Channel).where(Channel.enabled.is_(True))
        .group_by(ChannelModel.public_name).order_by(func.min(ChannelModel.id))).all()
    return next((name for name in names if user.group.allows_model(name)), FALLBACK_MODEL)
