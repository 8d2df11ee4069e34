"""Concurrent reservations, settlements, sweeps, grants and redemptions on SQLite and
PostgreSQL: threads, each with its own app context (own session and connection)."""
import random
import threading

import pytest

import billing
import holds
from blueprints.api.errors import ApiError
from extensions import db
from models import MICRO, ApiKey, LedgerEntry, Reservation, User
from tests.support import make_key, make_user


def run_threads(app, count, fn):
    """Start `count` threads together; each calls fn(i) in its own app context.

    Returns [("ok", value) | ("refused", ApiError code) | ("invalid", message)], in order."""
    barrier = threading.Barrier(count)
    results = [None] * count

    def worker(i):
        with app.app_context():
            try:
                barrier.wait(timeout=30)
                results[i] = ("ok", fn(i))
            except holds.CreditsRefused as err:
                results[i] = ("refused", err.code)
            except ValueError as err:
                results[i] = ("invalid", str(err))
            except Exception as err:  # noqa: BLE001 - reported by the assertion below
                results[i] = ("crashed", repr(err))
            finally:
                db.session.remove()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    crashed = [r for r in results if r is None or r[0] == "crashed"]
    assert not crashed, crashed
    return results


class BalanceWatch:
    """A thread that keeps reading a user's balance and available credits while others write."""

    def __init__(self, app, user_id):
        self.app, self.user_id = app, user_id
        self.lowest_balance = self.lowest_available = None
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._watch)

    def _watch(self):
        with self.app.app_context():
            while not self.stop.is_set():
                row = db.session.execute(db.select(User.balance_micro, User.reserved_micro)
                                         .filter_by(id=self.user_id)).one()
                db.session.commit()
                balance, available = row[0], row[0] - row[1]
                if self.lowest_balance is None or balance < self.lowest_balance:
                    self.lowest_balance = balance
                if self.lowest_available is None or available < self.lowest_available:
                    self.lowest_available = available
            db.session.remove()

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(30)


def user_state(user_id):
    row = db.session.execute(db.select(User.balance_micro, User.reserved_micro)
                             .filter_by(id=user_id)).one()
    held = db.session.scalar(db.select(db.func.coalesce(db.func.sum(Reservation.amount_micro), 0))
                             .filter_by(user_id=user_id))
    ledger = db.session.scalar(db.select(db.func.coalesce(db.func.sum(LedgerEntry.amount_micro),
                                                          0)).filter_by(user_id=user_id))
    db.session.commit()
    return {"balance": row[0], "reserved": row[1], "held": held, "ledger": ledger}


def test_fifty_reservations_from_a_wallet_covering_ten(app):
    with app.app_context():
        uid = make_user("a@example.com", credits=10)
    with BalanceWatch(app, uid) as watch:
        results = run_threads(app, 50, lambda i: holds.reserve_credits(
            uid, None, f"req-{i}", MICRO))
    held = [value for kind, value in results if kind == "ok"]
    assert len(held) == 10
    assert [r for r in results if r[0] != "ok"] == [("refused", "insufficient_credits")] * 40
    assert watch.lowest_balance == 10 * MICRO and watch.lowest_available >= 0
    with app.app_context():
        state = user_state(uid)
        assert state == {"balance": 10 * MICRO, "reserved": 10 * MICRO, "held": 10 * MICRO,
                         "ledger": 10 * MICRO}

    # Settle all ten at once, some above their hold: never negative, ledger == balance.
    costs = [MICRO // 2, 3 * MICRO // 2] * 5

    def settle(i):
        charged = holds.settle_credits(held[i], costs[i], note="concurrent")
        db.session.commit()
        return charged
    with BalanceWatch(app, uid) as watch:
        charged = [value for _, value in run_threads(app, 10, settle)]
    assert watch.lowest_balance >= 0 and watch.lowest_available >= 0
    assert all(0 < c <= cost for c, cost in zip(charged, costs))
    with app.app_context():
        state = user_state(uid)
        assert state["balance"] == 10 * MICRO - sum(charged) >= 0
        assert state["ledger"] == state["balance"]
        assert state["reserved"] == state["held"] == 0
        assert billing.check_ledger() == []


def test_key_credit_limit_holds_under_concurrency(app):
    with app.app_context():
        uid = make_user("a@example.com", credits=100)
        full = make_key("a@example.com", credit_limit_micro=5 * MICRO)
        kid = db.session.scalar(db.select(ApiKey.id).filter_by(key_hash=ApiKey.hash_key(full)))
    results = run_threads(app, 50, lambda i: holds.reserve_credits(uid, kid, f"k-{i}", MICRO))
    assert sum(1 for kind, _ in results if kind == "ok") == 5
    assert sorted({r for r in results if r[0] != "ok"}) == [("refused", "key_credit_limit")]
    with app.app_context():
        key = db.session.get(ApiKey, kid)
        assert (key.reserved_micro, key.spent_micro) == (5 * MICRO, 0)
        assert user_state(uid)["reserved"] == 5 * MICRO
        assert billing.check_ledger() == []


def test_a_code_redeemed_by_twenty_threads_credits_once(app):
    with app.app_context():
        uids = [make_user(f"u{i}@example.com") for i in range(4)]
        code = billing.create_codes(7 * MICRO, 1)[0]
    results = run_threads(app, 20, lambda i: billing.redeem_code(uids[i % 4], code))
    assert [r for r in results if r[0] == "ok"] == [("ok", 7 * MICRO)]
    assert {r for r in results if r[0] != "ok"} == {
        ("invalid", "That redemption code has already been used.")}
    with app.app_context():
        balances = db.session.scalars(db.select(User.balance_micro).filter(User.id.in_(uids)))
        assert sorted(balances) == [0, 0, 0, 7 * MICRO]
        assert db.session.scalar(db.select(db.func.count(LedgerEntry.id))
                                 .filter_by(kind="redemption")) == 1
        assert billing.check_ledger() == []


def test_reserve_settle_grant_and_sweep_racing_keep_the_ledger_exact(app):
    """Requests, top-ups and an over-eager sweeper (max age 0) all at once."""
    with app.app_context():
        uid = make_user("a@example.com", credits=3)
        full = make_key("a@example.com")
        kid = db.session.scalar(db.select(ApiKey.id).filter_by(key_hash=ApiKey.hash_key(full)))
    charged, refused, granted = [], [], []

    def requests(i):
        rng = random.Random(i)
        for n in range(12):
            try:
                hold = holds.reserve_credits(uid, kid, f"t{i}-{n}", 300_000)
            except holds.CreditsRefused:
                refused.append(1)
                continue
            if rng.random() < 0.2:
                holds.release_credits(hold)
                continue
            charged.append(holds.settle_credits(hold, rng.randrange(0, 300_001)))
            db.session.commit()

    def top_up(i):
        for _ in range(10):
            billing.grant_credits(uid, 100_000, note="drip")
            granted.append(100_000)

    def sweeper(i):
        for _ in range(30):
            holds.sweep_lapsed(0)

    jobs = [requests] * 8 + [top_up] * 2 + [sweeper]
    with BalanceWatch(app, uid) as watch:
        run_threads(app, len(jobs), lambda i: jobs[i](i))
    assert watch.lowest_balance >= 0
    with app.app_context():
        state = user_state(uid)
        assert state["balance"] == 3 * MICRO + sum(granted) - sum(charged) >= 0
        assert state["ledger"] == state["balance"]
        assert state["reserved"] == state["held"] == 0
        key = db.session.get(ApiKey, kid)
        assert (key.reserved_micro, key.spent_micro) == (0, sum(charged))
        assert billing.check_ledger() == []


@pytest.fixture(autouse=True)
def ledger_clean_after(app):
    yield
    with app.app_context():
        assert billing.check_ledger() == []
