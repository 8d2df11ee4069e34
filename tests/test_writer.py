"""The group-commit writer (writer.py) on SQLite and PostgreSQL: a batch means exactly what
its units mean one by one, batches really form, one bad unit fails alone, and settlements
caught by a database blip end settled exactly once."""
import contextlib
import json
import os
import sqlite3
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytest
from sqlalchemy import event
from sqlalchemy.exc import IntegrityError, OperationalError

import billing
import cache
import holds
import sqlite_wal
import writer
from extensions import db
from models import MICRO, ApiKey, LedgerEntry, RequestLog, Reservation, UsageDaily, utcnow
from tests.support import balances, make_key, make_user
from tests.tcp_proxy import TcpProxy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def key_id_of(full_key):
    kid = db.session.scalar(db.select(ApiKey.id).filter_by(key_hash=ApiKey.hash_key(full_key)))
    db.session.commit()
    return kid


def reserve_unit(uid, kid, request_id, amount):
    return writer.Reserve(uid, kid, request_id, amount, {
        "request_id": request_id, "user_id": uid, "key_id": kid, "amount_micro": amount,
        "created_at": utcnow(), "lease_until": utcnow() + timedelta(seconds=60), "key_name": "k",
        "model": "m", "endpoint": "chat", "is_stream": False, "client_ip": None})


def settle_unit(hold, cost, delivered=True, user_id=None):
    return writer.Settle(hold=hold, cost=cost, note="m", delivered=delivered, log=dict(
        request_id=hold.request_id, user_id=user_id or hold.user_id, key_id=hold.key_id,
        key_name="k", model="m", endpoint="chat", status="Success", http_status=200,
        prompt_tokens=3, completion_tokens=4))


def run_alone(units):
    """Each unit in its own transaction (what the writer does for a batch of one)."""
    results = []
    with db.engine.connect() as conn:
        for unit in units:
            results += writer.run_batch(conn, [unit])
            conn.commit()
    return results


def run_as_one_batch(units):
    with db.engine.connect() as conn:
        results = writer.run_batch(conn, units)
        conn.commit()
    return results


def outcome(result):
    if isinstance(result, holds.CreditsRefused):
        return result.code, str(result)
    if isinstance(result, holds.Hold):
        return "held", result.amount_micro, result.held
    return result


def money_of(uid, kid):
    key = db.session.get(ApiKey, kid)
    ledger = [(r.kind, r.amount_micro, r.balance_after_micro, r.request_id[2:]) for r in
              db.session.scalars(db.select(LedgerEntry).filter_by(user_id=uid)
                                 .where(LedgerEntry.kind != "grant").order_by(LedgerEntry.id))]
    logs = sorted((r.request_id[2:], r.credits_micro, r.billing) for r in db.session.scalars(
        db.select(RequestLog).filter_by(user_id=uid)))
    rollup = [(u.requests, u.credits_micro) for u in db.session.scalars(
        db.select(UsageDaily).filter_by(user_id=uid))]
    state = (balances(uid), (key.spent_micro, key.reserved_micro), ledger, logs, rollup)
    db.session.commit()
    return state


def test_a_batch_means_exactly_what_its_units_mean_one_by_one(ctx):
    """26 reservations against a 15-credit wallet and a 4-credit key limit, refusals and all,
    then their settlements (cheaper, overruns, void, a hold the sweeper took first) as ONE
    batch each, give the same results, balances, ledger and logs as one unit at a time."""
    states = []
    for prefix, run in (("a-", run_alone), ("b-", run_as_one_batch)):
        email = f"{prefix}@example.com"
        uid = make_user(email, credits=15)
        limited = key_id_of(make_key(email, name="limited", credit_limit_micro=4 * MICRO))
        free = key_id_of(make_key(email, name="free"))
        units = [reserve_unit(uid, limited if i % 3 == 0 else free, f"{prefix}{i}",
                              MICRO if i % 5 else MICRO // 2) for i in range(25)]
        units.insert(3, reserve_unit(uid, 999_999, f"{prefix}gone-key", 1))  # a deleted key
        results = run(units)
        held = [r for r in results if isinstance(r, holds.Hold)]
        assert len(held) < len(units)  # some refused, by the wallet and by the key
        assert {r.code for r in results if not isinstance(r, holds.Hold)} == {
            "insufficient_credits", "key_credit_limit"}
        # The sweeper takes one hold first: its settlement is charged late, the rest of it.
        swept = held[0]
        db.session.execute(db.update(Reservation).filter_by(request_id=swept.request_id)
                           .values(lease_until=utcnow() - timedelta(seconds=5)))
        db.session.commit()
        assert holds.sweep_lapsed() == 1
        costs = [(h, [MICRO // 3, 2 * MICRO, 0, MICRO][i % 4], i % 7 != 6)
                 for i, h in enumerate(held)]
        settled = run([settle_unit(h, cost, delivered) for h, cost, delivered in costs])
        states.append(([outcome(r) for r in results], settled, money_of(uid, free)[:2],
                       money_of(uid, limited)))
        assert billing.check_ledger() == []
    alone, batched = states
    assert batched == alone
    assert batched[1][0][2] is True  # the swept hold was settled late


@contextlib.contextmanager
def commits_counted(engine, gather=0):
    """Count COMMITs on `engine`; with `gather`, the first commit (sets count["first"], then)
    waits until that many more units are queued, so the next batch certainly holds them all."""
    count = {"commits": 0, "first": threading.Event()}
    writer_of_engine = writer.writer_for(engine)

    def on_commit(conn):
        count["commits"] += 1
        count["first"].set()
        if count["commits"] == 1 and gather:
            deadline = time.monotonic() + 30
            while len(writer_of_engine.pending) < gather and time.monotonic() < deadline:
                time.sleep(0.01)

    event.listen(engine, "commit", on_commit)
    try:
        yield count
    finally:
        event.remove(engine, "commit", on_commit)


def in_threads(app, count, fn, first_committing=None):
    """fn(i) in `count` threads, each in its own app context: results or exceptions. With
    `first_committing` (an Event), thread 0 starts alone and the rest once it is set."""
    results = [None] * count

    def work(i):
        with app.app_context():
            try:
                results[i] = fn(i)
            except Exception as err:  # noqa: BLE001 - returned to the test
                results[i] = err
            finally:
                db.session.remove()

    threads = [threading.Thread(target=work, args=(i,)) for i in range(count)]
    for i, thread in enumerate(threads):
        thread.start()
        if i == 0 and first_committing is not None:
            assert first_committing.wait(30)
    for thread in threads:
        thread.join(60)
    return results


def test_concurrent_reservations_are_batched_and_only_the_affordable_succeed(ctx):
    uid = make_user("a@example.com", credits=10)
    kid = key_id_of(make_key("a@example.com"))
    with commits_counted(db.engine, gather=29) as count:
        results = in_threads(ctx, 30, lambda i: writer.reserve_credits(
            uid, kid, f"r-{i}", MICRO, 60, model="m"), count["first"])
    held = [r for r in results if isinstance(r, holds.Hold)]
    refused = [r for r in results if not isinstance(r, holds.Hold)]
    assert len(held) == 10 and all(isinstance(r, holds.InsufficientCredits) for r in refused)
    assert count["commits"] == 2  # 30 reservations: the first alone, the 29 others together
    assert balances(uid) == (10 * MICRO, 10 * MICRO)

    with commits_counted(db.engine, gather=9) as count:
        charged = in_threads(ctx, 10, lambda i: writer.settle(settle_unit(held[i], MICRO // 2)),
                             count["first"])
    assert count["commits"] == 2
    assert [c[0] for c in charged] == [MICRO // 2] * 10
    assert balances(uid) == (5 * MICRO, 0)
    assert db.session.scalar(db.select(db.func.count(RequestLog.id))) == 10
    assert db.session.scalar(db.select(UsageDaily.requests)) == 10
    db.session.commit()


def test_one_bad_unit_fails_alone_and_its_hold_stays_for_the_retry(ctx):
    uid = make_user("a@example.com", credits=10)
    kid = key_id_of(make_key("a@example.com"))
    first = [writer.reserve_credits(uid, kid, f"r-{i}", MICRO, 60) for i in range(4)]
    units = [settle_unit(first[0], MICRO), settle_unit(first[1], MICRO, user_id=999_999),
             settle_unit(first[2], MICRO), reserve_unit(uid, kid, "late-comer", MICRO)]
    with commits_counted(db.engine, gather=3) as count:
        results = in_threads(ctx, 4, lambda i: writer.submit(units[i]), count["first"])
    assert isinstance(results[1], IntegrityError)  # its log row names a user that is gone
    assert results[0][0] == results[2][0] == MICRO and isinstance(results[3], holds.Hold)
    assert count["commits"] == 1 + 2  # the first unit, then each good one alone again
    assert db.session.scalar(db.select(Reservation.id).filter_by(request_id="r-1"))
    db.session.commit()
    assert billing.check_ledger() == []
    # The keeper's retry (here with a good log row) settles it, once.
    assert writer.settle(settle_unit(first[1], MICRO))[0] == MICRO
    for hold in (first[3], results[3]):
        writer.settle(settle_unit(hold, 0, delivered=False))
    assert balances(uid) == (7 * MICRO, 0)


def test_a_settlement_retried_after_its_commit_landed_charges_once(ctx):
    uid = make_user("a@example.com", credits=10)
    hold = writer.reserve_credits(uid, None, "r", 2 * MICRO, 60)
    unit = settle_unit(hold, 3 * MICRO)  # an overrun, too
    assert writer.settle(unit) == (3 * MICRO, "billed", False)
    assert writer.settle(unit) == (3 * MICRO, "billed", True)  # as if the commit was unknown
    assert balances(uid) == (7 * MICRO, 0)
    assert db.session.scalar(db.select(db.func.count(RequestLog.id))) == 1
    assert db.session.scalar(db.select(UsageDaily.credits_micro)) == 3 * MICRO
    assert [r.kind for r in db.session.scalars(db.select(LedgerEntry).filter_by(
        request_id="r").order_by(LedgerEntry.id))] == ["charge", "overrun"]
    db.session.commit()


@pytest.mark.parametrize("backend", ["postgresql"])
def test_settlements_cut_by_a_database_blip_end_settled_exactly_once(ctx, backend):
    """PostgreSQL reached through a proxy the test cuts: a batch of settlements fails whole
    (each waiter gets the error: the relay hands them to the keeper), then every retry after
    the database is back settles each once, and a second retry charges nothing."""
    from app import create_app
    proxy = TcpProxy("127.0.0.1", 5432).start()
    url = ctx.config["SQLALCHEMY_DATABASE_URI"].replace("127.0.0.1:5432",
                                                        f"127.0.0.1:{proxy.port}")
    blip = create_app({"SQLALCHEMY_DATABASE_URI": url, "SECRET_KEY": "test", "TESTING": True,
                       "CACHE_TTL": 0, "RATELIMIT_STORAGE_URI": "memory://"})
    try:
        uid = make_user("a@example.com", credits=10)
        with blip.app_context():
            held = [writer.reserve_credits(uid, None, f"r-{i}", MICRO, 60) for i in range(8)]
            units = [settle_unit(h, MICRO // 4) for h in held]
            proxy.cut()
            failed = in_threads(blip, 8, lambda i: writer.settle(units[i]))
            assert all(isinstance(r, OperationalError) for r in failed), failed
            proxy.restore()
            retried = in_threads(blip, 8, lambda i: writer.settle(units[i]))
            again = in_threads(blip, 8, lambda i: writer.settle(units[i]))
            db.engine.dispose()
        assert [r[0] for r in retried] == [r[0] for r in again] == [MICRO // 4] * 8
        assert balances(uid) == (8 * MICRO, 0)
        assert db.session.scalar(db.select(db.func.count(RequestLog.id))) == 8
        assert db.session.scalar(db.select(db.func.count(LedgerEntry.id)).filter_by(
            kind="charge")) == 8
        assert db.session.scalar(db.select(UsageDaily.requests)) == 8
        db.session.commit()
    finally:
        proxy.stop()


def test_a_live_batch_of_settlements_cut_by_a_blip_ends_settled_exactly_once(
        fake_upstream, tmp_path, request):
    """Through a live gateway on PostgreSQL behind a proxy: eight streams end together while
    the database is cut, so their settlements fail (in the writer's batches); once it is
    back, the hold keeper's retries settle each exactly once (one log row, one charge,
    nothing held)."""
    import openai

    from tests.conftest import _worker_id
    from tests.support import gateway_behind_proxy
    name = f"tokenopen_wblip_{_worker_id(request)}"
    env = {
        "TOKENOPEN_HOLD_LEASE_SECONDS": "3", "TOKENOPEN_CHECKPOINT_SECONDS": "0.5",
        "TOKENOPEN_SWEEP_INTERVAL": "1", "TOKENOPEN_UPSTREAM_TIMEOUT": "10"}
    with gateway_behind_proxy(name, tmp_path, fake_upstream, env) as (gw, proxy):
        gw.reset()
        key = gw.member(credits=10, models="gpt-4o-mini=fault-slow")
        client = openai.OpenAI(base_url=gw.base_url, api_key=key, max_retries=0, timeout=30)
        streams = [iter(client.chat.completions.create(
            model="gpt-4o-mini", stream=True, messages=[{"role": "user", "content": "hi"}]))
            for _ in range(8)]
        for stream in streams:
            next(stream)
        proxy.cut()
        texts = in_threads_plain([lambda s=s: "".join(
            c.choices[0].delta.content or "" for c in s if c.choices) for s in streams])
        assert all("deterministic answer" in t for t in texts)  # all reached [DONE]
        assert gw.logs() == []  # nothing could be written during the outage
        proxy.restore()
        rows = gw.wait_logs(8, timeout=20)
        assert len(rows) == 8 and {r["status"] for r in rows} == {"Success"}
        assert all(r["completion_tokens"] == 9 and r["credits_micro"] > 0 for r in rows)

        def money():
            return (db.session.scalar(db.select(db.func.count(Reservation.id))),
                    [(e.kind, e.request_id) for e in db.session.scalars(
                        db.select(LedgerEntry).where(LedgerEntry.kind != "grant"))])
        deadline = time.time() + 15
        while gw.run(money)[0] and time.time() < deadline:
            time.sleep(0.2)
        held, ledger = gw.run(money)
        assert held == 0
        assert sorted(rid for _, rid in ledger) == sorted(r["request_id"] for r in rows)
        assert {kind for kind, _ in ledger} == {"charge"}
        assert gw.run(billing.check_ledger) == []


def in_threads_plain(functions):
    """Every function at once, each in its own thread: their results, in order."""
    with ThreadPoolExecutor(len(functions)) as pool:
        return list(pool.map(lambda fn: fn(), functions))


@pytest.mark.parametrize("backend", ["postgresql"])
def test_a_batch_locks_a_user_before_any_of_its_keys(ctx, backend):
    """Lock order users -> api_keys holds in every batch, even one whose only write to a key
    is last_used_at (a refused request): otherwise two nodes' batches deadlock."""
    from sqlalchemy import text
    uid = make_user("a@example.com", credits=10)
    kid = key_id_of(make_key("a@example.com"))
    refused_log = writer.Settle(hold=None, cost=0, note=None, delivered=False, touch_key=kid,
                                log=dict(request_id="refused", user_id=uid, key_id=kid,
                                         endpoint="chat", status="Failed", http_status=429))
    with db.engine.connect() as holder, db.engine.connect() as probe:
        holder.execute(text("SELECT id FROM users WHERE id = :u FOR NO KEY UPDATE"), {"u": uid})
        def write():
            with ctx.app_context():
                writer.submit(refused_log)
        batch = threading.Thread(target=write)
        batch.start()
        time.sleep(0.5)
        assert batch.is_alive()  # the batch waits for the user's row...
        probe.execute(text("SET lock_timeout = '100ms'"))
        probe.execute(text("SELECT id FROM api_keys WHERE id = :k FOR NO KEY UPDATE"),
                      {"k": kid})  # ...without holding its key's (it would time out)
        probe.rollback()
        holder.rollback()
        batch.join(10)
    assert db.session.scalar(db.select(RequestLog.status).filter_by(request_id="refused"))
    db.session.commit()


# --- a quiet worker commits where the unit was submitted (Writer.write_here) -----------------

def test_a_quiet_sqlite_worker_commits_where_the_unit_was_submitted(ctx, backend, monkeypatch):
    """No other request answering, the writer idle with its connection open: the unit is
    committed in the caller's thread, except on PostgreSQL (its round trips would switch
    greenlets in the middle) and when another request is answering (the writer gathers)."""
    uid = make_user("a@example.com", credits=10)
    committed_in = []
    record = lambda conn: committed_in.append(threading.get_ident())  # noqa: E731
    event.listen(db.engine, "commit", record)
    try:
        holds_ = [writer.reserve_credits(uid, None, "r-0", MICRO, 60),  # opens its connection
                  writer.reserve_credits(uid, None, "r-1", MICRO, 60)]
        monkeypatch.setitem(cache._answering, "requests", 2)
        holds_.append(writer.reserve_credits(uid, None, "r-2", MICRO, 60))
    finally:
        event.remove(db.engine, "commit", record)
    here = threading.get_ident()
    assert committed_in[0] != here and committed_in[2] != here
    assert (committed_in[1] == here) == (backend == "sqlite")
    assert len(committed_in) == 3 and balances(uid) == (10 * MICRO, 3 * MICRO)
    for hold in holds_:
        writer.settle(settle_unit(hold, MICRO // 4))
    assert balances(uid) == (10 * MICRO - 3 * (MICRO // 4), 0)


@pytest.mark.parametrize("backend", ["sqlite"])
def test_a_quiet_commit_that_finds_the_database_locked_is_handed_to_the_writer(
        ctx, backend, monkeypatch):
    """In a served worker (busy timeout 0, `sqlite_wal`), a lock held by another process is
    not waited for in the caller's greenlet: the unit is rolled back and the writer commits
    it once the lock is gone, once."""
    monkeypatch.setattr(sqlite_wal, "_in_background", True)
    db.engine.dispose()  # connections from now on get the served worker's pragmas
    uid = make_user("a@example.com", credits=10)
    first = writer.reserve_credits(uid, None, "r-0", MICRO, 60)  # opens its connection
    other_process = sqlite3.connect(db.engine.url.database, isolation_level=None)
    other_process.execute("BEGIN IMMEDIATE")
    committed_in = []
    record = lambda conn: committed_in.append(threading.get_ident())  # noqa: E731
    event.listen(db.engine, "commit", record)
    try:
        waiting = threading.Thread(target=lambda: in_threads(
            ctx, 1, lambda i: committed_in.append(
                ("caller", threading.get_ident(),
                 writer.reserve_credits(uid, None, "r-1", MICRO, 60)))))
        waiting.start()
        time.sleep(0.3)
        assert waiting.is_alive() and committed_in == []  # waiting for the lock, not failed
        other_process.execute("ROLLBACK")
        waiting.join(10)
    finally:
        event.remove(db.engine, "commit", record)
        other_process.close()
    [writer_thread, (_, caller, hold)] = committed_in
    assert isinstance(hold, holds.Hold) and writer_thread != caller
    assert balances(uid) == (10 * MICRO, 2 * MICRO)
    for h in (first, hold):
        writer.settle(settle_unit(h, 0, delivered=False))


_NO_SWITCH = """
from gevent import monkey; monkey.patch_all()
import json, sys, greenlet
import sqlite_wal
sqlite_wal._in_background = True  # as served: busy timeout 0, no waiting in SQLite
from app import create_app
from bootstrap import ensure_default_group
from extensions import db
import writer
from tests.support import make_user
app = create_app({"SQLALCHEMY_DATABASE_URI": "sqlite:///" + sys.argv[1], "SECRET_KEY": "x",
                  "REDIS_URL": None})
with app.app_context():
    db.create_all(); ensure_default_group(); db.session.commit()
    uid = make_user("a@example.com", credits=10)
    writer.settle(writer.Settle(hold=writer.reserve_credits(uid, None, "r-0", 5, 60), cost=1,
                                note="m", log=dict(request_id="r-0", user_id=uid,
                                endpoint="chat", status="Success", http_status=200)))
    switches = []
    greenlet.settrace(lambda event, args: switches.append(event))
    hold = writer.reserve_credits(uid, None, "r-1", 5, 60)
    charged = writer.settle(writer.Settle(hold=hold, cost=3, note="m", log=dict(
        request_id="r-1", user_id=uid, endpoint="chat", status="Success", http_status=200)))
    greenlet.settrace(None)
print(json.dumps({"switches": switches, "charged": charged}))
"""


def test_a_quiet_served_worker_reserves_and_settles_without_a_greenlet_switch(tmp_path):
    """The property that makes committing in the request's greenlet safe: nothing switches
    in it, so no kill or timeout can land between a settlement's statements and its commit.
    (Handed to the writer, each unit is two switches each way.)"""
    done = subprocess.run([sys.executable, "-c", _NO_SWITCH, str(tmp_path / "t.db")],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    assert figures["charged"] == [3, "billed", False]
    assert figures["switches"] == []
