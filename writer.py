"""The worker's group-commit writer: the hot path's two transactions, batched.

Every request writes twice: its hold before forwarding (reserve) and, once answered, its
settlement with its log row and usage rollup (settle). Requests hand these units to their
worker's one writer (a greenlet under gevent, a thread elsewhere) and wait; the writer takes
every unit pending, runs them all in ONE transaction on its own connection with prebuilt
statements (executemany where rows are alike), commits once and wakes each waiter with its
own result. Idle, a unit is written at once (a batch of one, no timer); while a batch is
written the next one gathers. A waiter returns only after its commit, so no client ever sees
an answer whose charge is not durable, and a kill -9 mid-batch leaves the holds to their lease.

Inside a batch each unit keeps the meaning it has alone: a reservation is a conditional
UPDATE whose rowcount decides it (a key refusal gives the user's part back in the same
transaction), so one unit's refusal never touches another's; a settlement takes its hold or,
if the sweeper took it first, is settled late (holds.settle_late's rules). Locks are taken in
one order everywhere (PostgreSQL would deadlock otherwise): hold rows by request id, then users
by id (each user's keys right after it), then log rows, then usage_daily by its key.

A database error rolls the batch back and its units are retried one by one, so a bad unit
fails alone with the error it would have met alone. Settling is idempotent by request id: a
settlement retried after a commit that did land finds its hold gone and its own log row, and
charges nothing twice.
"""
import os
import threading
from collections import defaultdict, deque
from dataclasses import dataclass, field
from datetime import timedelta

from sqlalchemy import bindparam, delete, select, update
from sqlalchemy.exc import DBAPIError, DisconnectionError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

import holds
from extensions import db
from holds import HOLDS, KEYS, LEDGER, LOGS, USERS
from models import utcnow
from request_log import LOG_COLUMNS, LOG_DEFAULTS, _INSERT_LOG, _rollup_upsert, rollup_values

DATABASE_DOWN = (OperationalError, InterfaceError, DisconnectionError, PoolTimeout)
IDLE_SECONDS = 30  # an idle writer gives its connection back and ends; the next unit restarts it

_TAKE_HOLDS = (delete(HOLDS).where(HOLDS.c.request_id.in_(holds._holds_in_order("rids")))
               .returning(HOLDS.c.request_id))
_TOUCH_KEY = update(KEYS).where(KEYS.c.id == bindparam("kid")).values(
    last_used_at=bindparam("now"))
_OLD_LOGS = select(LOGS).where(LOGS.c.request_id.in_(bindparam("rids", expanding=True)))
_REPLACE_LOG = update(LOGS).where(LOGS.c.request_id == bindparam("rid"))


# --- units of work --------------------------------------------------------------------------

@dataclass(eq=False)
class Reserve:
    """Hold `amount` for one request (holds.reserve_credits' meaning)."""
    user_id: int
    key_id: int | None
    request_id: str
    amount: int
    row: dict  # the hold row to insert (lease and context included)


@dataclass(eq=False)
class Settle:
    """Settle one request's hold at `cost` and write its log row (and rollup).

    `log` holds the log row's fields except credits_micro and billing, which depend on what
    the settlement finds; `delivered`: something came back upstream (else the request is
    void unless the sweeper already charged a checkpoint); `touch_key`: also write the key's
    last_used_at."""
    hold: object
    cost: int
    note: str | None
    log: dict
    delivered: bool = True
    estimated: bool = False
    touch_key: int | None = None


@dataclass(eq=False)
class _Waiting:
    unit: object
    done: threading.Event = field(default_factory=threading.Event)
    result: object = None
    error: BaseException | None = None


# --- what callers use --------------------------------------------------------------------

def reserve_credits(user_id, key_id, request_id, amount_micro, lease_seconds, **context):
    """holds.reserve_credits through the writer: a Hold once committed; raises
    InsufficientCredits or KeyCreditLimit (nothing left behind), or the database error."""
    amount = int(amount_micro)
    if amount < 0:
        raise ValueError("a reservation cannot be negative")
    now = utcnow()
    row = {name: context.get(name) for name in holds.HOLD_CONTEXT}
    row.update(request_id=request_id, user_id=user_id, key_id=key_id, amount_micro=amount,
               created_at=now, lease_until=now + timedelta(seconds=lease_seconds),
               is_stream=bool(context.get("is_stream")))
    return submit(Reserve(user_id, key_id, request_id, amount, row))


def settle(unit):
    """Settle and log (a Settle) once committed: (charged micro-credits, billing state, late)
    where late means the sweeper had settled the hold first. Raises the database error."""
    return submit(unit)


def submit(unit):
    """Hand `unit` to this worker's writer and wait for its commit."""
    waiting = _Waiting(unit)
    writer_for(db.engine).put(waiting)
    waiting.done.wait()
    if waiting.error is not None:
        raise waiting.error
    return waiting.result


_writers = {}  # (pid, engine id) -> Writer
_writers_lock = threading.Lock()


def writer_for(engine):
    key = (os.getpid(), id(engine))
    found = _writers.get(key)
    if found is None:
        with _writers_lock:
            found = _writers.setdefault(key, Writer(engine))
    return found


def flush():
    """Wait until every writer of this process has written what it was given (shutdown)."""
    for writer in list(_writers.values()):
        if writer.pid == os.getpid():
            writer.wait_idle()


# --- the writer -----------------------------------------------------------------------------

class Writer:
    """One per worker and database: a queue, a greenlet (or thread) and its connection."""

    def __init__(self, engine):
        self.engine = engine
        self.pid = os.getpid()
        self.pending = deque()
        self.cv = threading.Condition()
        self.running = False
        self.writing = False
        self.conn = None

    def put(self, waiting):
        with self.cv:
            self.pending.append(waiting)
            if not self.running:
                self.running = True
                threading.Thread(target=self._loop, name="group-commit-writer",
                                 daemon=True).start()
            self.cv.notify_all()

    def wait_idle(self):
        with self.cv:
            while self.pending or self.writing:
                self.cv.wait(1)

    def _loop(self):
        try:
            while True:
                with self.cv:
                    self.writing = False
                    self.cv.notify_all()
                    if not self.pending:
                        self.cv.wait(IDLE_SECONDS)
                    if not self.pending:
                        self.running = False
                        break
                    batch = list(self.pending)
                    self.pending.clear()
                    self.writing = True
                self._write(batch)
        finally:
            self._drop_connection()
            with self.cv:  # never strand a waiter, even if this loop is killed
                stranded, self.running, self.writing = list(self.pending), False, False
                self.pending.clear()
                self.cv.notify_all()
            for waiting in stranded:
                waiting.error = RuntimeError("the group-commit writer stopped")
                waiting.done.set()

    def _write(self, batch):
        try:
            try:
                self._commit(batch)
            except Exception as err:  # noqa: BLE001 - every waiter gets its own answer
                if len(batch) == 1:
                    batch[0].error = err
                else:
                    self._one_by_one(batch)
        except BaseException as err:  # killed mid-batch: the holds are left to their lease
            for waiting in batch:
                if waiting.result is None and waiting.error is None:
                    waiting.error = RuntimeError(f"the group-commit writer stopped: {err!r}")
            raise
        finally:
            for waiting in batch:
                waiting.done.set()

    def _one_by_one(self, batch):
        """After a failed batch: each unit alone, so a bad one fails alone. When the database
        itself is gone, the rest fail with the same error at once (no connect per unit)."""
        down = None
        for waiting in batch:
            if down is not None:
                waiting.error = down
                continue
            try:
                self._commit([waiting])
            except Exception as err:  # noqa: BLE001
                waiting.error = err
                if _connection_lost(err):
                    down = err

    def _commit(self, batch):
        """Run `batch` in one transaction; on success give each waiter its result."""
        if self.conn is None:
            self.conn = self.engine.connect()
        conn = self.conn
        try:
            results = run_batch(conn, [w.unit for w in batch])
            conn.commit()
        except BaseException:
            self._drop_connection()
            raise
        for waiting, result in zip(batch, results):
            if isinstance(result, holds.CreditsRefused):
                waiting.error = result
            else:
                waiting.result = result

    def _drop_connection(self):
        """Roll back and give the connection back (a broken one is invalidated by the pool)."""
        conn, self.conn = self.conn, None
        if conn is not None:
            try:
                conn.rollback()
                conn.close()
            except Exception:  # noqa: BLE001 - the database may be what failed
                try:
                    conn.invalidate()
                except Exception:  # noqa: BLE001
                    pass


def _connection_lost(err):
    """The database is unreachable (not one unit's bad data): the others would fail alike."""
    return isinstance(err, DATABASE_DOWN) or (
        isinstance(err, DBAPIError) and err.connection_invalidated)


# --- one batch, one transaction ---------------------------------------------------------------

@dataclass
class _Move:
    """Money one settlement moves: release `released` of its hold, charge `cost`, of which
    `covered` is an ordinary charge and the rest an overrun."""
    unit: Settle
    released: int
    cost: int
    covered: int


def run_batch(conn, units):
    """Every unit's statements in the caller's transaction on `conn` (no commit), in the lock
    order: holds, users (each with its keys), hold inserts, ledger, logs, usage_daily.
    Returns one result per unit: a Hold or a CreditsRefused for a Reserve, a
    (charged, billing state, late) tuple for a Settle."""
    now = utcnow()
    results = {}
    reserves = [u for u in units if isinstance(u, Reserve)]
    settles = [u for u in units if isinstance(u, Settle)]

    # Hold rows first: take every hold being settled; those already gone were swept (late).
    held = [s for s in settles if s.hold is not None and s.hold.held]
    taken = set()
    if held:
        taken = set(conn.execute(_TAKE_HOLDS, {
            "rids": sorted(s.hold.request_id for s in held)}).scalars())
    late = {s for s in held if s.hold.request_id not in taken}
    old_logs = {}
    if late:
        old_logs = {row.request_id: row for row in conn.execute(
            _OLD_LOGS, {"rids": [s.hold.request_id for s in late]})}

    moves_by_user = defaultdict(list)
    for s in settles:
        hold = s.hold
        cost = max(int(s.cost), 0) if s.delivered else 0
        if hold is None:
            results[s] = (0, "void", False)
            continue
        if s in late:
            old = old_logs.get(hold.request_id)
            swept = (old.credits_micro or 0) if old is not None else 0
            extra = max(cost - swept, 0)
            move = _Move(s, 0, extra, min(extra, max(hold.amount_micro - swept, 0)))
            charged = swept + extra
        else:
            released = hold.amount_micro if hold.held else 0
            move = _Move(s, released, cost, min(cost, released))
            charged = cost
        if move.released or move.cost:
            moves_by_user[hold.user_id].append(move)
        if not s.delivered:
            state = "void" if not charged else "estimated"
        else:
            state = "estimated" if s.estimated else "billed"
        results[s] = (charged, state, s in late)
    touches = defaultdict(set)
    for s in settles:
        if s.touch_key is not None and s.log.get("user_id") is not None:
            touches[s.log["user_id"]].add(s.touch_key)
    reserves_by_user = defaultdict(list)
    for r in reserves:
        reserves_by_user[r.user_id].append(r)

    # Users in id order; each user's keys right after it.
    ledger_rows, hold_rows = [], []
    for user_id in sorted(set(moves_by_user) | set(touches) | set(reserves_by_user)):
        if moves_by_user[user_id]:
            ledger_rows += _settle_user(conn, user_id, moves_by_user[user_id], now)
        if touches[user_id]:
            conn.execute(_TOUCH_KEY, [{"kid": kid, "now": now}
                                      for kid in sorted(touches[user_id])])
        for r in reserves_by_user[user_id]:
            results[r] = _reserve(conn, r)
            if isinstance(results[r], holds.Hold) and results[r].held:
                hold_rows.append(r.row)
    if hold_rows:
        conn.execute(holds._INSERT_HOLD, hold_rows)
    if ledger_rows:
        conn.execute(holds._INSERT_LEDGER, ledger_rows)
    _write_logs(conn, settles, results, old_logs, now)
    return [results[u] for u in units]


def _settle_user(conn, user_id, moves, now):
    """One UPDATE of the user for all its settlements; their ledger rows carry the running
    balance as if each had settled alone, in arrival order. Returns the ledger rows."""
    balance = conn.execute(holds._RELEASE_AND_CHARGE, {
        "uid": user_id, "released": sum(m.released for m in moves),
        "charged": sum(m.cost for m in moves)}).scalar()
    if balance is None:
        return []  # the user is gone (their holds and ledger went with them)
    by_key = defaultdict(lambda: [0, 0])
    running = balance + sum(m.cost for m in moves)
    rows = []
    for m in moves:
        running -= m.cost
        hold, note = m.unit.hold, m.unit.note
        if m.covered:
            rows.append({"user_id": user_id, "kind": "charge", "amount_micro": -m.covered,
                         "balance_after_micro": running + (m.cost - m.covered), "note": note,
                         "request_id": hold.request_id, "created_at": now,
                         "created_by_id": None})
        if m.cost > m.covered:
            rows.append({"user_id": user_id, "kind": "overrun",
                         "amount_micro": -(m.cost - m.covered), "balance_after_micro": running,
                         "note": f"{note or 'request'}: the upstream produced more than the "
                                 "cap it was sent",
                         "request_id": hold.request_id, "created_at": now,
                         "created_by_id": None})
        if hold.key_id is not None:
            by_key[hold.key_id][0] += m.released
            by_key[hold.key_id][1] += m.cost
    if by_key:
        conn.execute(holds._SETTLE_KEY, [{"kid": kid, "released": r, "charged": c}
                                         for kid, (r, c) in sorted(by_key.items())])
    return rows


def _reserve(conn, r):
    """One reservation, decided by its own conditional UPDATEs (a refusal undoes only itself)."""
    if r.amount == 0:
        # A free request holds nothing, but a wallet left negative by an overrun still refuses.
        available = conn.execute(holds._AVAILABLE, {"uid": r.user_id}).scalar()
        if available is not None and available < 0:
            return holds._insufficient(r.user_id, 0, conn)
        return holds.Hold(r.request_id, r.user_id, r.key_id, 0, held=False)
    if conn.execute(holds._RESERVE_USER, {"uid": r.user_id, "amount": r.amount}).rowcount != 1:
        return holds._insufficient(r.user_id, r.amount, conn)
    if r.key_id is not None and conn.execute(
            holds._RESERVE_KEY, {"kid": r.key_id, "amount": r.amount}).rowcount != 1:
        conn.execute(_GIVE_BACK, {"uid": r.user_id, "amount": r.amount})
        return holds._key_limit(r.key_id, r.amount, conn)
    return holds.Hold(r.request_id, r.user_id, r.key_id, r.amount)


_GIVE_BACK = update(USERS).where(USERS.c.id == bindparam("uid")).values(
    reserved_micro=USERS.c.reserved_micro - bindparam("amount"))


def _write_logs(conn, settles, results, old_logs, now):
    """Log rows (one executemany), late ones replacing the sweeper's, and the rollup: one
    upsert per (day, user, key, model), in that order."""
    new_rows, rollups = [], {}
    for s in settles:
        charged, state, late = results[s]
        row = dict(LOG_DEFAULTS, created_at=now)
        row.update(s.log, credits_micro=charged, billing=state)
        old = old_logs.get(row["request_id"]) if late else None
        if old is None:
            new_rows.append(row)
            if row["user_id"] is not None:
                _add_rollup(rollups, rollup_values(row))
            continue
        changes = {k: v for k, v in row.items() if k in LOG_COLUMNS and k != "created_at"}
        conn.execute(_REPLACE_LOG.values(changes), {"rid": row["request_id"]})
        if old.user_id is not None:
            _add_rollup(rollups, rollup_values(old._mapping, replaced_by=row))
    if new_rows:
        conn.execute(_INSERT_LOG, new_rows)
    if rollups:
        conn.execute(_rollup_upsert(conn.dialect.name), [rollups[k] for k in sorted(rollups)])


def _add_rollup(rollups, values):
    key = (values["day"], values["user_id"], values["key_id"], values["model"])
    found = rollups.get(key)
    if found is None:
        rollups[key] = values
    else:
        for name in ("requests", "failed", "prompt_tokens", "completion_tokens",
                     "credits_micro"):
            found[name] += values[name]
