"""holds.py on SQLite and PostgreSQL: reserve, renew, checkpoint, settle (with overruns),
release and the sweep of holds whose worker died."""
from datetime import timedelta

import pytest

import billing
import holds
from extensions import db
from models import MICRO, ApiKey, LedgerEntry, RequestLog, Reservation, User, utcnow
from tests.support import balances, key_row, longest_stall, make_key, make_user


def hold_row(request_id):
    row = db.session.scalar(db.select(Reservation).filter_by(request_id=request_id))
    db.session.commit()
    return row


def lapse_lease(request_id, seconds=10):
    """Make a hold look like its worker stopped renewing it `seconds` ago."""
    past = utcnow() - timedelta(seconds=seconds)
    db.session.execute(db.update(Reservation).filter_by(request_id=request_id)
                       .values(lease_until=past))
    db.session.commit()


def ledger(request_id):
    rows = db.session.execute(db.select(LedgerEntry.kind, LedgerEntry.amount_micro)
                              .filter_by(request_id=request_id).order_by(LedgerEntry.id)).all()
    db.session.commit()
    return [tuple(r) for r in rows]


# --- reserve ---------------------------------------------------------------------------------

def test_reserve_then_settle_cheaper_releases_the_rest(ctx):
    uid = make_user("a@example.com", credits=10)
    full = make_key("a@example.com")
    key = key_row(full)
    hold = holds.reserve_credits(uid, key.id, "req-1", 4 * MICRO, key_name="laptop",
                                 model="gpt-x", endpoint="chat", is_stream=True)
    assert hold.held and hold.amount_micro == 4 * MICRO
    assert balances(uid) == (10 * MICRO, 4 * MICRO)
    row = hold_row("req-1")
    assert (row.amount_micro, row.key_name, row.model, row.is_stream) == (
        4 * MICRO, "laptop", "gpt-x", True)
    assert row.lease_until > utcnow() + timedelta(seconds=30)  # a fresh lease
    charged = holds.settle_credits(hold, 1_234_567, note="chat")
    db.session.commit()
    assert charged == 1_234_567
    assert balances(uid) == (10 * MICRO - 1_234_567, 0)
    entry = db.session.scalar(db.select(LedgerEntry).filter_by(request_id="req-1"))
    assert (entry.kind, entry.amount_micro, entry.balance_after_micro, entry.note) == (
        "charge", -1_234_567, 10 * MICRO - 1_234_567, "chat")
    key = key_row(full)
    assert (key.spent_micro, key.reserved_micro) == (1_234_567, 0)
    assert hold_row("req-1") is None


def test_reserve_refuses_with_a_402_a_person_understands(ctx):
    uid = make_user("a@example.com", credits=2)
    with pytest.raises(holds.InsufficientCredits) as err:
        holds.reserve_credits(uid, None, "req-1", 2_500_000)
    assert err.value.code == "insufficient_credits"
    assert "may cost up to 2.5 credits" in str(err.value)
    assert "available balance is 2" in str(err.value)
    assert balances(uid) == (2 * MICRO, 0)
    assert hold_row("req-1") is None
    hold = holds.reserve_credits(uid, None, "req-2", 2 * MICRO)  # exactly the balance is fine
    with pytest.raises(holds.InsufficientCredits) as err:
        holds.reserve_credits(uid, None, "req-3", 1)
    assert "held by requests in flight" in str(err.value)
    holds.release_credits(hold)
    assert balances(uid) == (2 * MICRO, 0)


def test_key_credit_limit_counts_spent_and_reserved(ctx):
    uid = make_user("a@example.com", credits=100)
    full = make_key("a@example.com", credit_limit_micro=5 * MICRO)
    kid = key_row(full).id
    first = holds.reserve_credits(uid, kid, "r1", 3 * MICRO)
    with pytest.raises(holds.KeyCreditLimit) as err:
        holds.reserve_credits(uid, kid, "r2", 3 * MICRO)
    assert err.value.code == "key_credit_limit"
    assert "2 of its 5-credit limit left" in str(err.value)
    assert balances(uid) == (100 * MICRO, 3 * MICRO)  # the user's hold was rolled back too
    holds.settle_credits(first, 3 * MICRO)
    db.session.commit()
    second = holds.reserve_credits(uid, kid, "r2", 2 * MICRO)
    with pytest.raises(holds.KeyCreditLimit):
        holds.reserve_credits(uid, kid, "r3", 1)
    holds.release_credits(second)
    assert key_row(full).spent_micro == 3 * MICRO


def test_free_request_holds_nothing_but_a_negative_wallet_still_refuses(ctx):
    uid = make_user("a@example.com", credits=1)
    hold = holds.reserve_credits(uid, None, "free", 0)
    assert not hold.held
    assert holds.settle_credits(hold, 0) == 0
    holds.release_credits(hold)
    db.session.commit()
    assert hold_row("free") is None and ledger("free") == []
    big = holds.reserve_credits(uid, None, "big", MICRO)
    holds.settle_credits(big, 3 * MICRO)  # an upstream that ignored its cap
    db.session.commit()
    with pytest.raises(holds.InsufficientCredits, match="Top up"):
        holds.reserve_credits(uid, None, "free-2", 0)


# --- settle: the charge is the actual cost ----------------------------------------------------

def test_cost_beyond_the_hold_is_charged_as_an_overrun(ctx):
    """Finding 2: settlement used to cap the charge at the available balance."""
    uid = make_user("a@example.com", credits=5)
    full = make_key("a@example.com")
    kid = key_row(full).id
    other = holds.reserve_credits(uid, kid, "other", 1 * MICRO)  # someone else's hold
    hold = holds.reserve_credits(uid, kid, "big", 2 * MICRO)
    charged = holds.settle_credits(hold, 9 * MICRO, note="gpt-x")  # far past its cap
    db.session.commit()
    assert charged == 9 * MICRO
    assert balances(uid) == (-4 * MICRO, 1 * MICRO)
    assert ledger("big") == [("charge", -2 * MICRO), ("overrun", -7 * MICRO)]
    overrun = db.session.scalar(db.select(LedgerEntry).filter_by(kind="overrun"))
    assert overrun.balance_after_micro == -4 * MICRO and "cap" in overrun.note
    assert key_row(full).spent_micro == 9 * MICRO
    # the other request still settles within its own hold, and the member is then refused
    assert holds.settle_credits(other, MICRO) == MICRO
    db.session.commit()
    assert balances(uid) == (-5 * MICRO, 0)
    with pytest.raises(holds.InsufficientCredits, match="balance is -5"):
        holds.reserve_credits(uid, kid, "next", 1)
    assert billing.check_ledger() == []  # negative only by recorded overruns
    billing.grant_credits(uid, 6 * MICRO, note="top-up")
    assert holds.reserve_credits(uid, kid, "after", MICRO).held
    holds.release_credits(hold_for("after", uid, kid, MICRO))


def hold_for(request_id, uid, kid, amount):
    return holds.Hold(request_id, uid, kid, amount)


def test_settle_is_part_of_the_callers_transaction(ctx):
    uid = make_user("a@example.com", credits=5)
    hold = holds.reserve_credits(uid, None, "req", 2 * MICRO)
    holds.settle_credits(hold, MICRO)
    db.session.rollback()  # the caller's log write failed: nothing of the settle remains
    assert balances(uid) == (5 * MICRO, 2 * MICRO)
    assert holds.settle_credits(hold, MICRO) == MICRO
    db.session.commit()
    assert balances(uid) == (4 * MICRO, 0)


def test_release_twice_gives_back_once(ctx):
    uid = make_user("a@example.com", credits=5)
    hold = holds.reserve_credits(uid, None, "req", 2 * MICRO)
    assert holds.release_credits(hold) is True
    assert holds.release_credits(hold) is False
    assert balances(uid) == (5 * MICRO, 0)


def test_settling_a_deleted_keys_hold_still_charges_the_user(ctx):
    """Finding 4 (billing side): the key is gone, the user still pays for what was delivered."""
    uid = make_user("a@example.com", credits=5)
    full = make_key("a@example.com")
    kid = key_row(full).id
    hold = holds.reserve_credits(uid, kid, "req", 2 * MICRO)
    db.session.execute(db.delete(ApiKey).filter_by(id=kid))
    db.session.commit()
    assert holds.settle_credits(hold, MICRO) == MICRO
    db.session.commit()
    assert balances(uid) == (4 * MICRO, 0)


# --- leases and the sweep -------------------------------------------------------------------

def test_sweep_touches_only_lapsed_leases_whatever_their_age(ctx):
    """Finding 5: `billing sweep --max-age 0` used to free every request in flight."""
    uid = make_user("a@example.com", credits=10)
    kid = key_row(make_key("a@example.com")).id
    live = holds.reserve_credits(uid, kid, "live", 2 * MICRO)
    db.session.execute(db.update(Reservation).filter_by(request_id="live")
                       .values(created_at=utcnow() - timedelta(hours=5)))
    db.session.commit()
    assert holds.sweep_lapsed(0) == 0  # an old stream whose worker renews its lease
    assert balances(uid) == (10 * MICRO, 2 * MICRO)
    assert holds.renew_leases(["live", "unknown"]) == 1
    lapse_lease("live")
    assert holds.sweep_lapsed(0) == 1
    assert balances(uid) == (10 * MICRO, 0)  # nothing delivered: nothing charged
    assert holds.settle_credits(live, MICRO) is None  # the late worker charges nothing twice
    db.session.commit()
    assert balances(uid) == (10 * MICRO, 0)


def test_a_lapsed_hold_is_settled_at_its_checkpoint_and_logged_worker_lost(ctx):
    """Finding 6: a dead worker's streams used to be released free, with no log row."""
    uid = make_user("a@example.com", credits=10)
    full = make_key("a@example.com")
    kid = key_row(full).id
    hold = holds.reserve_credits(uid, kid, "stream", 3 * MICRO, key_name="laptop",
                                 model="gpt-x", endpoint="chat", is_stream=True,
                                 client_ip="10.0.0.9")
    holds.checkpoint(hold, 120, 480, 20, 1_500_000, channel_id=7, channel_name="main")
    row = hold_row("stream")
    assert (row.prompt_tokens, row.completion_tokens, row.checkpoint_micro) == (120, 480, 1_500_000)
    lapse_lease("stream")
    assert holds.sweep_lapsed() == 1
    assert balances(uid) == (10 * MICRO - 1_500_000, 0)
    assert ledger("stream") == [("charge", -1_500_000)]
    log = db.session.scalar(db.select(RequestLog).filter_by(request_id="stream"))
    assert (log.status, log.credits_micro, log.completion_tokens, log.channel_name,
            log.key_name, log.model, log.is_stream, log.estimated) == (
        "Failed", 1_500_000, 480, "main", "laptop", "gpt-x", True, True)
    assert "worker lost" in log.error
    assert key_row(full).spent_micro == 1_500_000
    assert holds.sweep_lapsed() == 0


def test_the_sweep_charges_an_overrun_checkpoint_too(ctx):
    uid = make_user("a@example.com", credits=1)
    hold = holds.reserve_credits(uid, None, "r", MICRO, model="m", endpoint="chat")
    holds.checkpoint(hold, 10, 9000, 0, 3 * MICRO)
    lapse_lease("r")
    assert holds.sweep_lapsed() == 1
    assert ledger("r") == [("charge", -MICRO), ("overrun", -2 * MICRO)]
    assert balances(uid) == (-2 * MICRO, 0)


def test_request_ids_are_never_confused(ctx):
    """Finding 5 (SQLite): reused reservation ids let a late settle delete another's hold."""
    uid = make_user("a@example.com", credits=10)
    first = holds.reserve_credits(uid, None, "first", MICRO)
    lapse_lease("first")
    holds.sweep_lapsed()
    second = holds.reserve_credits(uid, None, "second", 2 * MICRO)  # may reuse the row id
    assert holds.settle_credits(first, MICRO) is None
    db.session.commit()
    assert hold_row("second") is not None and balances(uid) == (10 * MICRO, 2 * MICRO)
    holds.release_credits(second)


def test_a_gevent_worker_keeps_serving_while_it_sweeps_a_dead_workers_holds(tmp_path):
    """300 lapsed holds (a dead worker's streams) swept by a gevent worker: its other
    greenlets wait one settlement at most, not the whole sweep (~0.4 s here when the sweep
    never let the loop turn)."""
    swept, stall = longest_stall(f"""
        from datetime import timedelta
        import holds
        from app import create_app
        from bootstrap import ensure_default_group
        from extensions import db
        from models import Reservation, utcnow
        from tests.support import make_user
        app = create_app({{"SQLALCHEMY_DATABASE_URI": "sqlite:///{tmp_path}/db.sqlite",
                          "TESTING": True, "SECRET_KEY": "test"}})
        def lapse_all():
            db.session.execute(db.update(Reservation).values(
                lease_until=utcnow() - timedelta(seconds=9)))
            db.session.commit()
        def sweep():
            with app.app_context():
                return holds.sweep_lapsed()
        with app.app_context():
            db.create_all()
            ensure_default_group()
            uid = make_user("a@example.com", credits=1000)
            holds.reserve_credits(uid, None, "warm", 1000)
            lapse_all()
            assert holds.sweep_lapsed() == 1  # warm: its statements compiled
            for i in range(300):
                holds.reserve_credits(uid, None, f"lost-{{i}}", 1000, model="m", is_stream=True)
            lapse_all()
        """, "sweep()")
    assert swept == 300
    assert stall < 0.05, f"the worker's greenlets were held up {stall * 1000:.0f} ms"
