"""A hold's life: reserve → renew → checkpoint → settle, or sweep when its worker is gone.

A hold is credits set aside for one in-flight request, keyed by the request id (a row in
`reservations`). Money moves only through conditional UPDATEs plus a ledger row in the same
transaction, so concurrent requests can never spend the same credits twice and
sum(ledger) == balance for every user.

- reserve: one conditional UPDATE on the user (available >= amount) and one on the key (its
  credit limit), plus the hold row carrying a lease and what a log row needs.
- renew: the worker's keeper pushes the lease forward for every request it still serves.
- checkpoint: while a stream runs, the worker writes what it has delivered so far.
- settle: release the hold and charge the actual cost in the caller's transaction (with its
  log row). A cost beyond the hold (an upstream that ignored its cap) is still charged, as an
  `overrun` ledger row: the balance may go below zero by that much and the member is refused
  (402) until topped up.
- sweep: a hold whose lease lapsed belongs to a dead worker: it is settled at its last
  checkpoint and logged Failed ("worker lost"), never released free of what was delivered.

The request path reserves and settles through the worker's group-commit writer (writer.py),
which runs these same statements for many requests in one transaction; the functions here
run one at a time in the session's transaction (the sweeper, the CLI, tests).

Lock order everywhere is hold row -> user row -> key row, so PostgreSQL never deadlocks on
these paths; write transactions start with a write so SQLite's WAL snapshots never need an
upgrade that could fail.
"""
from dataclasses import dataclass
from datetime import timedelta

from flask import current_app
from sqlalchemy import bindparam, delete, insert, or_, select, update

from extensions import db
from give_way import give_way
from models import ApiKey, LedgerEntry, RequestLog, Reservation, User, utcnow
from money import format_credits
from request_log import add_request_log

USERS = User.__table__
KEYS = ApiKey.__table__
HOLDS = Reservation.__table__
LOGS = RequestLog.__table__
LEDGER = LedgerEntry.__table__
WORKER_LOST = "worker lost: settled at its last checkpoint"


class CreditsRefused(Exception):
    """The wallet, or the key's credit limit, cannot cover a request (HTTP 402)."""
    code = "insufficient_credits"


class InsufficientCredits(CreditsRefused):
    code = "insufficient_credits"


class KeyCreditLimit(CreditsRefused):
    code = "key_credit_limit"


@dataclass
class Hold:
    """Credits reserved for one in-flight request; `held` is False when nothing was written."""
    request_id: str
    user_id: int
    key_id: int | None
    amount_micro: int
    held: bool = True


def lease_seconds():
    """How long a hold stays live without its worker renewing it."""
    return int(current_app.config.get("HOLD_LEASE_SECONDS") or 60)


def _expire(model, row_id):
    """Mark a cached ORM object stale after a Core UPDATE changed its row."""
    obj = db.session.identity_map.get(db.session.identity_key(model, row_id))
    if obj is not None:
        db.session.expire(obj)


def _expire_owner(user_id, key_id):
    _expire(User, user_id)
    if key_id is not None:
        _expire(ApiKey, key_id)


# --- reserve -----------------------------------------------------------------------------

# Built once: constructing these per request costs more than running them.
_RESERVE_USER = (
    update(USERS).where(USERS.c.id == bindparam("uid"),
                        USERS.c.balance_micro - USERS.c.reserved_micro >= bindparam("amount"))
    .values(reserved_micro=USERS.c.reserved_micro + bindparam("amount")))
_RESERVE_KEY = (
    update(KEYS).where(KEYS.c.id == bindparam("kid"), or_(
        KEYS.c.credit_limit_micro.is_(None),
        KEYS.c.spent_micro + KEYS.c.reserved_micro + bindparam("amount")
        <= KEYS.c.credit_limit_micro))
    .values(reserved_micro=KEYS.c.reserved_micro + bindparam("amount")))
HOLD_CONTEXT = ("key_name", "model", "endpoint", "is_stream", "client_ip")
_INSERT_HOLD = insert(HOLDS).values(
    {name: bindparam(name) for name in
     ("request_id", "user_id", "key_id", "amount_micro", "created_at", "lease_until")
     + HOLD_CONTEXT})
_AVAILABLE = select(USERS.c.balance_micro - USERS.c.reserved_micro).where(
    USERS.c.id == bindparam("uid"))


def reserve_credits(user_id, key_id, request_id, amount_micro, **context):
    """Hold `amount_micro` for one request; COMMITS. `context` (key_name, model, endpoint,
    is_stream, client_ip) is what the sweeper logs if the worker dies. Raises
    InsufficientCredits or KeyCreditLimit and leaves nothing behind."""
    amount = int(amount_micro)
    if amount < 0:
        raise ValueError("a reservation cannot be negative")
    if amount == 0:
        # A free request holds nothing, but a wallet left negative by an overrun still refuses.
        available = db.session.scalar(_AVAILABLE, {"uid": user_id})
        db.session.commit()
        if available is not None and available < 0:
            raise _insufficient(user_id, 0)
        return Hold(request_id, user_id, key_id, 0, held=False)
    now = utcnow()
    try:
        took = db.session.execute(_RESERVE_USER, {"uid": user_id, "amount": amount})
        if took.rowcount != 1:
            db.session.rollback()
            raise _insufficient(user_id, amount)
        if key_id is not None:
            took = db.session.execute(_RESERVE_KEY, {"kid": key_id, "amount": amount})
            if took.rowcount != 1:
                db.session.rollback()
                raise _key_limit(key_id, amount)
        row = {name: context.get(name) for name in HOLD_CONTEXT}
        row.update(request_id=request_id, user_id=user_id, key_id=key_id, amount_micro=amount,
                   created_at=now, lease_until=now + timedelta(seconds=lease_seconds()),
                   is_stream=bool(context.get("is_stream")))
        db.session.execute(_INSERT_HOLD, row)
        db.session.commit()
    except BaseException:
        db.session.rollback()
        raise
    _expire_owner(user_id, key_id)
    return Hold(request_id, user_id, key_id, amount)


_OWNER_MONEY = select(USERS.c.balance_micro, USERS.c.reserved_micro).where(
    USERS.c.id == bindparam("uid"))
_KEY_MONEY = select(KEYS.c.credit_limit_micro, KEYS.c.spent_micro, KEYS.c.reserved_micro).where(
    KEYS.c.id == bindparam("kid"))


def _insufficient(user_id, amount, conn=None):
    """The refusal, read on `conn` (the writer's, inside its batch) or the session (then
    rolled back)."""
    row = (conn or db.session).execute(_OWNER_MONEY, {"uid": user_id}).first()
    if conn is None:
        db.session.rollback()
    if row is not None and row.balance_micro < 0:
        return InsufficientCredits(
            f"Your balance is {format_credits(row.balance_micro)} credits: an upstream produced "
            "more than the cap it was sent and the excess was charged. Top up your wallet to "
            "continue.")
    available = max(row.balance_micro - row.reserved_micro, 0) if row else 0
    in_flight = (f" ({format_credits(row.reserved_micro)} credits are held by requests in "
                 "flight)" if row and row.reserved_micro else "")
    return InsufficientCredits(
        f"Insufficient credits: this request may cost up to {format_credits(amount)} credits; "
        f"your available balance is {format_credits(available)}{in_flight}. "
        "Top up your wallet or lower max_tokens.")


def _key_limit(key_id, amount, conn=None):
    row = (conn or db.session).execute(_KEY_MONEY, {"kid": key_id}).first()
    if conn is None:
        db.session.rollback()
    if row is None:
        return KeyCreditLimit("This API key no longer exists.")
    left = max(row.credit_limit_micro - row.spent_micro - row.reserved_micro, 0)
    return KeyCreditLimit(
        f"This API key's credit limit is reached: this request may cost up to "
        f"{format_credits(amount)} credits and the key has {format_credits(left)} of its "
        f"{format_credits(row.credit_limit_micro)}-credit limit left. Ask for a higher limit "
        "or lower max_tokens.")


# --- renew and checkpoint ----------------------------------------------------------------

def _holds_in_order(rids_param):
    """The hold rows named by `rids_param`, locked in request-id order (PostgreSQL): every
    statement that touches many holds locks them in the same order, so none deadlock."""
    return (select(HOLDS.c.request_id)
            .where(HOLDS.c.request_id.in_(bindparam(rids_param, expanding=True)))
            .order_by(HOLDS.c.request_id).with_for_update())


_RENEW = (update(HOLDS).where(HOLDS.c.request_id.in_(_holds_in_order("rids")))
          .values(lease_until=bindparam("until")))
_CHECKPOINT = (update(HOLDS).where(HOLDS.c.request_id == bindparam("rid")).values(
    prompt_tokens=bindparam("prompt"), completion_tokens=bindparam("completion"),
    cached_tokens=bindparam("cached"), checkpoint_micro=bindparam("cost"),
    channel_id=bindparam("channel_id"), channel_name=bindparam("channel_name"),
    checkpoint_at=bindparam("now"), lease_until=bindparam("until")))


def renew_leases(request_ids):
    """Push the lease of these live holds forward; COMMITS. Returns how many were renewed."""
    request_ids = sorted(request_ids)
    if not request_ids:
        return 0
    until = utcnow() + timedelta(seconds=lease_seconds())
    try:
        renewed = db.session.execute(_RENEW, {"rids": request_ids, "until": until}).rowcount
        db.session.commit()
    except BaseException:
        db.session.rollback()
        raise
    return renewed


def checkpoint(hold, prompt_tokens, completion_tokens, cached_tokens, cost_micro,
               channel_id=None, channel_name=None):
    """Record what has been delivered so far (and renew the lease); COMMITS."""
    checkpoint_many([(hold, prompt_tokens, completion_tokens, cached_tokens, cost_micro,
                      channel_id, channel_name)])


def checkpoint_many(points):
    """Checkpoint many holds in one transaction (one round of a worker's keeper); COMMITS.
    `points`: (hold, prompt, completion, cached, cost, channel_id, channel_name) tuples."""
    now = utcnow()
    until = now + timedelta(seconds=lease_seconds())
    rows = [{"rid": hold.request_id, "prompt": int(prompt), "completion": int(completion),
             "cached": int(cached), "cost": int(cost), "channel_id": channel_id,
             "channel_name": channel_name, "now": now, "until": until}
            for hold, prompt, completion, cached, cost, channel_id, channel_name in points
            if hold is not None and hold.held]
    if not rows:
        return
    rows.sort(key=lambda row: row["rid"])  # hold rows locked in request-id order
    try:
        db.session.execute(_CHECKPOINT, rows)
        db.session.commit()
    except BaseException:
        db.session.rollback()
        raise


# --- settle ------------------------------------------------------------------------------

_TAKE_HOLD = delete(HOLDS).where(HOLDS.c.request_id == bindparam("rid"))
_RELEASE_AND_CHARGE = (
    update(USERS).where(USERS.c.id == bindparam("uid"))
    .values(reserved_micro=USERS.c.reserved_micro - bindparam("released"),
            balance_micro=USERS.c.balance_micro - bindparam("charged"))
    .returning(USERS.c.balance_micro))
_SETTLE_KEY = (update(KEYS).where(KEYS.c.id == bindparam("kid"))
               .values(reserved_micro=KEYS.c.reserved_micro - bindparam("released"),
                       spent_micro=KEYS.c.spent_micro + bindparam("charged")))
_INSERT_LEDGER = insert(LEDGER)


def settle_credits(hold, cost_micro, note=None):
    """Release the hold and charge the actual cost, in the CALLER's transaction (no commit).

    Returns the micro-credits charged, or None when the hold is gone already (its lease
    lapsed and the sweeper settled it): then nothing is charged twice and the caller writes
    no second log row. A cost above the hold is charged too, its excess as an `overrun`."""
    cost = max(int(cost_micro), 0)
    if hold is None:
        return 0
    if hold.held:
        if db.session.execute(_TAKE_HOLD, {"rid": hold.request_id}).rowcount != 1:
            return None
        released = hold.amount_micro
    else:
        released = 0
    _move_money(hold.user_id, hold.key_id, hold.request_id, released, cost, note)
    return cost


def settle_late(hold, cost_micro, note=None):
    """Charge what a request cost beyond what the sweeper charged when it settled the hold
    of this (still living, but late) request at its checkpoint; caller's transaction.
    Returns (charged by the sweeper, charged now)."""
    swept = db.session.scalar(select(LOGS.c.credits_micro)
                              .where(LOGS.c.request_id == hold.request_id)) or 0
    extra = max(int(cost_micro) - swept, 0)
    # Up to the original hold it is an ordinary charge; past it, an overrun as usual.
    _move_money(hold.user_id, hold.key_id, hold.request_id, 0, extra, note,
                covered_limit=max(hold.amount_micro - swept, 0))
    return swept, extra


def _move_money(user_id, key_id, request_id, released, cost, note, covered_limit=None):
    """Give back `released`, charge `cost` (ledger: charge up to the hold, overrun past it)."""
    if not (released or cost):
        return
    balance = db.session.execute(_RELEASE_AND_CHARGE, {
        "uid": user_id, "released": released, "charged": cost}).scalar()
    if balance is None:
        return  # the user is gone (their holds and ledger went with them)
    covered = min(cost, released if covered_limit is None else covered_limit)
    now = utcnow()
    if covered:
        db.session.execute(_INSERT_LEDGER, {
            "user_id": user_id, "kind": "charge", "amount_micro": -covered,
            "balance_after_micro": balance + (cost - covered), "note": note,
            "request_id": request_id, "created_at": now})
    if cost > covered:
        db.session.execute(_INSERT_LEDGER, {
            "user_id": user_id, "kind": "overrun", "amount_micro": -(cost - covered),
            "balance_after_micro": balance,
            "note": f"{note or 'request'}: the upstream produced more than the cap it was sent",
            "request_id": request_id, "created_at": now})
    if key_id is not None:
        db.session.execute(_SETTLE_KEY, {"kid": key_id, "released": released, "charged": cost})
    _expire_owner(user_id, key_id)


def release_credits(hold):
    """Give a hold back whole (nothing was delivered); COMMITS. False if it was gone already."""
    if hold is None or not hold.held:
        return True
    try:
        if db.session.execute(_TAKE_HOLD, {"rid": hold.request_id}).rowcount != 1:
            db.session.rollback()
            return False
        _move_money(hold.user_id, hold.key_id, hold.request_id, hold.amount_micro, 0, None)
        db.session.commit()
    except BaseException:
        db.session.rollback()
        raise
    return True


# --- sweep -------------------------------------------------------------------------------

_CLAIM_LAPSED = delete(HOLDS).where(HOLDS.c.request_id == bindparam("rid"),
                                    HOLDS.c.lease_until < bindparam("now"))


def sweep_lapsed(max_age_seconds=0):
    """Settle every hold whose lease lapsed (its worker is gone) at its last checkpoint and
    log it Failed; `max_age_seconds` also skips holds younger than that. Returns how many."""
    now = utcnow()
    query = select(HOLDS).where(HOLDS.c.lease_until < now)
    if max_age_seconds:
        query = query.where(HOLDS.c.created_at < now - timedelta(seconds=int(max_age_seconds)))
    lapsed = db.session.execute(query.order_by(HOLDS.c.id)).all()
    db.session.commit()  # end the read so each settlement starts with its write
    settled = 0
    for hold in lapsed:
        give_way()  # a dead worker's thousands of streams, settled at a stretch, stalled the
        try:        # sweeping worker's requests for seconds
            if db.session.execute(_CLAIM_LAPSED, {"rid": hold.request_id, "now": now}) \
                    .rowcount != 1:
                db.session.rollback()  # renewed or settled meanwhile: not ours
                continue
            _move_money(hold.user_id, hold.key_id, hold.request_id, hold.amount_micro,
                        hold.checkpoint_micro, hold.model)
            _log_lost(hold)
            db.session.commit()
            settled += 1
        except BaseException:
            db.session.rollback()
            raise
    return settled


def _log_lost(hold):
    """The log row of a request whose worker died (unless the worker wrote one first)."""
    if db.session.scalar(select(LOGS.c.id).where(LOGS.c.request_id == hold.request_id)):
        return
    latency = int((utcnow() - hold.created_at).total_seconds() * 1000)
    add_request_log(
        request_id=hold.request_id, user_id=hold.user_id, key_id=hold.key_id,
        key_name=hold.key_name, model=hold.model, channel_id=hold.channel_id,
        channel_name=hold.channel_name, endpoint=hold.endpoint or "unknown",
        is_stream=bool(hold.is_stream), prompt_tokens=hold.prompt_tokens,
        completion_tokens=hold.completion_tokens, cached_tokens=hold.cached_tokens,
        credits_micro=hold.checkpoint_micro, status="Failed", http_status=500,
        latency_ms=latency, estimated=True,
        billing="estimated" if hold.checkpoint_micro else "void",
        error=WORKER_LOST, client_ip=hold.client_ip)


def open_holds():
    """Every hold still open: (request_id, user_id, amount_micro, lease_until) rows."""
    rows = db.session.execute(select(HOLDS.c.request_id, HOLDS.c.user_id, HOLDS.c.amount_micro,
                                     HOLDS.c.lease_until).order_by(HOLDS.c.id)).all()
    db.session.commit()
    return rows
