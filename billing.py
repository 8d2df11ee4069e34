"""Pricing, reservations, settlement and the ledger: integer micro-credits only.

Every balance change is one conditional UPDATE (no read-then-write) plus a LedgerEntry
in the same transaction, so concurrent requests can never spend the same credits twice
and sum(ledger) == balance for every user. Lock order everywhere is
reservation row -> user row -> key row, so PostgreSQL never deadlocks on these paths;
write transactions start with a write (never a SELECT) so SQLite's WAL snapshots never
need an upgrade that could fail.
"""
import secrets
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from fractions import Fraction

from flask import current_app
from sqlalchemy import bindparam, delete, func, insert, or_, select, update

from cache import TTLCache
from extensions import db
from models import MICRO, ApiKey, LedgerEntry, ModelPrice, RedemptionCode, RequestLog, \
    Reservation, User, utcnow
from money import format_credits

TOKENS_PER_PRICE_UNIT = 1_000_000  # prices are per 1M tokens
USERS = User.__table__
KEYS = ApiKey.__table__
RESERVATIONS = Reservation.__table__
CODES = RedemptionCode.__table__


# --- prices ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Price:
    """A model's price: micro-credits per 1M tokens (input, output, cached input, cache
    write) and flat micro-credits per request, per image and per audio second."""
    model: str
    input_micro: int
    output_micro: int
    cached_input_micro: int
    per_request_micro: int
    cache_write_micro: int = 0
    per_image_micro: int = 0
    per_second_micro: int = 0

    @classmethod
    def from_row(cls, row):
        """A Price from a ModelPrice row (missing cache prices mean the input price)."""
        def or_input(value):
            return int(row.input_micro or 0) if value is None else int(value)
        return cls(row.model, int(row.input_micro or 0), int(row.output_micro or 0),
                   or_input(row.cached_input_micro), int(row.per_request_micro or 0),
                   or_input(row.cache_write_micro), int(row.per_image_micro or 0),
                   int(row.per_second_micro or 0))

    @property
    def is_free(self):
        return not (self.input_micro or self.output_micro or self.cached_input_micro
                    or self.per_request_micro or self.cache_write_micro
                    or self.per_image_micro or self.per_second_micro)


_prices = TTLCache(depends_on=(ModelPrice,))


def invalidate_prices():
    """Forget cached prices in this process (price edits through the ORM do this by themselves)."""
    _prices.clear()


def _load_price(model):
    row = db.session.scalar(select(ModelPrice).filter_by(model=model))
    return Price.from_row(row) if row is not None else None


def price_for(model):
    """The model's price (cached per worker for CACHE_TTL seconds), None if unpriced."""
    return _prices.get(model, lambda: _load_price(model))


def set_price(model, input_micro, output_micro, cached_input_micro=None, per_request_micro=0,
              cache_write_micro=None, per_image_micro=0, per_second_micro=0):
    """Create or replace a model's price (micro-credits per 1M tokens, flat fees); commits."""
    model = (model or "").strip()
    if not model:
        raise ValueError("model name is required")
    for name, value in (("input", input_micro), ("output", output_micro),
                        ("cached input", cached_input_micro), ("per request", per_request_micro),
                        ("cache write", cache_write_micro), ("per image", per_image_micro),
                        ("per second", per_second_micro)):
        if value is not None and (not isinstance(value, int) or value < 0):
            raise ValueError(f"{name} price must be a non-negative amount of credits")
    row = db.session.scalar(select(ModelPrice).filter_by(model=model)) or ModelPrice(model=model)
    row.input_micro = input_micro
    row.output_micro = output_micro
    row.cached_input_micro = cached_input_micro
    row.cache_write_micro = cache_write_micro
    row.per_request_micro = per_request_micro or 0
    row.per_image_micro = per_image_micro or 0
    row.per_second_micro = per_second_micro or 0
    db.session.add(row)
    db.session.commit()  # the ORM flush cleared this worker's price cache
    return row


def delete_price(model):
    """Remove a model's price (the model is then refused); returns False if it had none."""
    row = db.session.scalar(select(ModelPrice).filter_by(model=model))
    if row is None:
        return False
    db.session.delete(row)
    db.session.commit()  # the ORM flush cleared this worker's price cache
    return True


def cost_micro(price, prompt_tokens, completion_tokens, cached_tokens, multiplier_ppm,
               cache_write_tokens=0, images=0, seconds=0):
    """SPEC §9/§10: (((prompt - cached - written) * in + cached * cached_in
    + written * cache_write + completion * out) / 1M + per_request + images * per_image
    + seconds * per_second) * multiplier, rounded UP to a whole micro-credit once. Integers only.
    `prompt_tokens` includes cached reads and cache writes, as OpenAI reports them."""
    prompt = _count(prompt_tokens)
    cached = min(_count(cached_tokens), prompt)
    written = min(_count(cache_write_tokens), prompt - cached)
    # Everything scaled by 1M tokens (price unit) and by 1M ppm, divided once at the end.
    flat = (price.per_request_micro + _count(images) * price.per_image_micro
            + _count(seconds) * price.per_second_micro)
    scaled = ((prompt - cached - written) * price.input_micro
              + cached * price.cached_input_micro + written * price.cache_write_micro
              + _count(completion_tokens) * price.output_micro
              + flat * TOKENS_PER_PRICE_UNIT) * max(int(multiplier_ppm), 0)
    return -(-scaled // (TOKENS_PER_PRICE_UNIT * MICRO))  # ceiling division


def usage_cost_micro(price, usage, multiplier_ppm):
    """cost_micro of a providers.base.Usage (or anything with the same fields)."""
    return cost_micro(price, usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens,
                      multiplier_ppm, usage.cache_write_tokens, usage.images, usage.seconds)


def hold_micro(price, prompt_tokens, output_tokens, multiplier_ppm, images=0, seconds=0):
    """What to reserve before forwarding: the most the request can cost. No cache discount is
    assumed and every prompt token is priced at the dearest input rate."""
    dearest = max(price.input_micro, price.cached_input_micro, price.cache_write_micro)
    upper = Price(price.model, dearest, price.output_micro, dearest, price.per_request_micro,
                  dearest, price.per_image_micro, price.per_second_micro)
    return cost_micro(upper, prompt_tokens, output_tokens, 0, multiplier_ppm,
                      images=images, seconds=seconds)


def _count(value):
    """A token/image/second count as a non-negative int (anything else counts 0)."""
    return value if isinstance(value, int) and value > 0 else 0


def _credits(micro):
    return format_credits(micro)


def _expire(model, row_id):
    """Mark a cached ORM object stale after a Core UPDATE changed its row."""
    obj = db.session.identity_map.get(db.session.identity_key(model, row_id))
    if obj is not None:
        db.session.expire(obj)


# --- grants, codes -----------------------------------------------------------------------

def grant_credits(user_id, amount_micro, kind="grant", note=None, created_by_id=None):
    """Add (or with a negative amount deduct, never below zero available) credits; ledger row; commits."""
    amount = int(amount_micro)
    if kind not in ("grant", "adjustment", "refund"):
        raise ValueError(f"unknown ledger kind for a grant: {kind}")
    if amount == 0:
        raise ValueError("the amount must not be zero")
    try:
        conditions = [USERS.c.id == user_id]
        if amount < 0:
            conditions.append(USERS.c.balance_micro - USERS.c.reserved_micro + amount >= 0)
        took = db.session.execute(update(USERS).where(*conditions)
                                  .values(balance_micro=USERS.c.balance_micro + amount))
        if took.rowcount != 1:
            db.session.rollback()
            row = db.session.execute(select(USERS.c.balance_micro, USERS.c.reserved_micro)
                                     .where(USERS.c.id == user_id)).first()
            if row is None:
                raise ValueError("no such user")
            raise ValueError(f"cannot deduct {_credits(-amount)} credits: the available "
                             f"balance is {_credits(row.balance_micro - row.reserved_micro)}")
        balance = db.session.scalar(select(USERS.c.balance_micro).where(USERS.c.id == user_id))
        entry = LedgerEntry(user_id=user_id, kind=kind, amount_micro=amount,
                            balance_after_micro=balance, note=note, created_by_id=created_by_id)
        db.session.add(entry)
        db.session.commit()
    except BaseException:
        db.session.rollback()
        raise
    _expire(User, user_id)
    return entry


def create_codes(amount_micro, count, expires_at=None, created_by_id=None):
    """Create `count` single-use codes worth `amount_micro` each, as one batch; commits."""
    amount, count = int(amount_micro), int(count)
    if amount <= 0:
        raise ValueError("a code must be worth more than 0 credits")
    if not 1 <= count <= 10_000:
        raise ValueError("count must be between 1 and 10000")
    batch = secrets.token_hex(6)
    codes = [RedemptionCode.new_code() for _ in range(count)]
    db.session.add_all(RedemptionCode(code=code, amount_micro=amount, batch=batch,
                                      expires_at=expires_at, created_by_id=created_by_id)
                       for code in codes)
    db.session.commit()
    return codes


def redeem_code(user_id, code):
    """Credit a redemption code once even under concurrent attempts; returns micro-credits.
    Raises ValueError('...') with a human message for unknown/used/expired codes.
    On success the caller's pending rows are committed with it; on failure rolled back."""
    code = (code or "").strip().lower()
    if not code:
        raise ValueError("Enter a redemption code.")
    now = utcnow()
    try:
        # redeemed_at (not redeemed_by_id, which is nulled when a user is deleted) marks use.
        took = db.session.execute(
            update(CODES).where(CODES.c.code == code, CODES.c.redeemed_at.is_(None),
                                or_(CODES.c.expires_at.is_(None), CODES.c.expires_at > now))
            .values(redeemed_at=now, redeemed_by_id=user_id))
        if took.rowcount != 1:
            db.session.rollback()
            raise ValueError(_why_unusable(code, now))
        amount = db.session.scalar(select(CODES.c.amount_micro).where(CODES.c.code == code))
        took = db.session.execute(update(USERS).where(USERS.c.id == user_id)
                                  .values(balance_micro=USERS.c.balance_micro + amount))
        if took.rowcount != 1:
            db.session.rollback()
            raise ValueError("no such user")
        balance = db.session.scalar(select(USERS.c.balance_micro).where(USERS.c.id == user_id))
        db.session.add(LedgerEntry(user_id=user_id, kind="redemption", amount_micro=amount,
                                   balance_after_micro=balance,
                                   note=f"code {code[:6]}…{code[-4:]}"))
        db.session.commit()
    except BaseException:
        db.session.rollback()
        raise
    _expire(User, user_id)
    return amount


def _why_unusable(code, now):
    row = db.session.execute(select(CODES.c.redeemed_at, CODES.c.expires_at)
                             .where(CODES.c.code == code)).first()
    if row is None:
        return "That redemption code does not exist. Check it for typos."
    if row.redeemed_at is not None:
        return "That redemption code has already been used."
    return "That redemption code has expired."


# --- audit -------------------------------------------------------------------------------

def check_ledger():
    """Human-readable drift lines: users whose sum(ledger) != balance, or whose open
    reservations != reserved_micro, or keys whose reserved != their open reservations. [] = clean."""
    ledger = (select(LedgerEntry.user_id, func.sum(LedgerEntry.amount_micro).label("total"))
              .group_by(LedgerEntry.user_id).subquery())
    overrun = (select(LedgerEntry.user_id, func.sum(-LedgerEntry.amount_micro).label("total"))
               .where(LedgerEntry.kind == "overrun").group_by(LedgerEntry.user_id).subquery())
    held = (select(RESERVATIONS.c.user_id, func.sum(RESERVATIONS.c.amount_micro).label("total"))
            .group_by(RESERVATIONS.c.user_id).subquery())
    users = db.session.execute(
        select(USERS.c.id, USERS.c.email, USERS.c.balance_micro, USERS.c.reserved_micro,
               func.coalesce(ledger.c.total, 0).label("ledger"),
               func.coalesce(held.c.total, 0).label("held"),
               func.coalesce(overrun.c.total, 0).label("overrun"))
        .outerjoin(ledger, ledger.c.user_id == USERS.c.id)
        .outerjoin(overrun, overrun.c.user_id == USERS.c.id)
        .outerjoin(held, held.c.user_id == USERS.c.id).order_by(USERS.c.id)).all()
    lines = []
    for u in users:
        if u.balance_micro != u.ledger:
            lines.append(f"user {u.email}: balance {_credits(u.balance_micro)} but the ledger "
                         f"sums to {_credits(u.ledger)} "
                         f"(drift {_credits(u.balance_micro - u.ledger)})")
        if u.reserved_micro != u.held:
            lines.append(f"user {u.email}: reserved {_credits(u.reserved_micro)} but open "
                         f"reservations hold {_credits(u.held)}")
        if u.balance_micro < 0 and -u.balance_micro > u.overrun:
            lines.append(f"user {u.email}: negative balance {_credits(u.balance_micro)} "
                         f"beyond the {_credits(u.overrun)} credits of recorded overruns")
    key_held = (select(RESERVATIONS.c.key_id, func.sum(RESERVATIONS.c.amount_micro)
                       .label("total")).group_by(RESERVATIONS.c.key_id).subquery())
    keys = db.session.execute(
        select(KEYS.c.id, KEYS.c.name, KEYS.c.prefix, KEYS.c.last4, KEYS.c.reserved_micro,
               func.coalesce(key_held.c.total, 0).label("held"))
        .outerjoin(key_held, key_held.c.key_id == KEYS.c.id)
        .where(KEYS.c.reserved_micro != func.coalesce(key_held.c.total, 0))
        .order_by(KEYS.c.id)).all()
    for k in keys:
        lines.append(f"key {k.name!r} ({k.prefix}…{k.last4}): reserved "
                     f"{_credits(k.reserved_micro)} but open reservations hold "
                     f"{_credits(k.held)}")
    db.session.commit()
    return lines


def user_count():
    """How many users check_ledger looked at."""
    return db.session.scalar(select(func.count()).select_from(USERS))


# --- the legacy OpenAI billing endpoints ---------------------------------------------------

def _json_number(micro, per_unit=MICRO):
    """micro-credits -> a JSON number of `per_unit`-sized units, for chat front-ends.

    JSON numbers are binary floats to every client, so the exact integer ratio is
    converted once, here, for display; no money arithmetic ever uses the result."""
    whole, rest = divmod(int(micro), per_unit)
    return whole if rest == 0 else float(Fraction(int(micro), per_unit))


def _spent_micro(user_id):
    """All credits ever charged to a user (positive), from the ledger."""
    total = db.session.scalar(select(func.coalesce(func.sum(LedgerEntry.amount_micro), 0))
                              .where(LedgerEntry.user_id == user_id,
                                     LedgerEntry.kind == "charge"))
    return -int(total or 0)


def subscription_summary(user, key):
    """Body of GET /v1/dashboard/billing/subscription (OpenAI's old shape, 1 credit = 1 USD).

    hard_limit_usd is balance + spent for the wallet, or the key's credit limit when the key
    has one, so a front-end's `hard_limit_usd - total_usage / 100` is what is left."""
    if key is not None and key.credit_limit_micro is not None:
        limit = key.credit_limit_micro
    else:
        limit = user.balance_micro + _spent_micro(user.id)
    expires = key.expires_at if key is not None else None
    access_until = int(expires.replace(tzinfo=timezone.utc).timestamp()) if expires else 0
    return {
        "object": "billing_subscription",
        "has_payment_method": True,
        "soft_limit_usd": _json_number(limit),
        "hard_limit_usd": _json_number(limit),
        "system_hard_limit_usd": _json_number(limit),
        "access_until": access_until,
    }


def parse_billing_date(value):
    """'2024-05-01' (or a date/datetime) -> a naive UTC datetime at that day's start."""
    if isinstance(value, datetime):
        return value.replace(tzinfo=None)
    if isinstance(value, date):
        return datetime(value.year, value.month, value.day)
    try:
        return datetime.strptime(str(value).strip(), "%Y-%m-%d")
    except ValueError:
        raise ValueError(f"dates must look like 2024-05-31, got {value!r}") from None


def usage_total(user, key, start_date, end_date):
    """Body of GET /v1/dashboard/billing/usage: total_usage in hundredths of a credit.

    start_date is inclusive and end_date exclusive, as OpenAI's endpoint had them. A key with
    a credit limit reports its own usage (matching its hard_limit_usd), otherwise the user's."""
    start, end = parse_billing_date(start_date), parse_billing_date(end_date)
    if end <= start:
        raise ValueError("end_date must be after start_date")
    query = select(func.coalesce(func.sum(RequestLog.credits_micro), 0)).where(
        RequestLog.created_at >= start, RequestLog.created_at < end)
    if key is not None and key.credit_limit_micro is not None:
        query = query.where(RequestLog.key_id == key.id)
    else:
        query = query.where(RequestLog.user_id == user.id)
    micro = int(db.session.scalar(query) or 0)
    return {"object": "list", "total_usage": _json_number(micro, MICRO // 100)}
