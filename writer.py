"""The worker's group-commit writer: the hot path's two transactions, batched.

Every request writes twice: its hold before forwarding (reserve) and, once answered, its
settlement with its log row and usage rollup (settle). Requests hand these units to their
worker's one writer (a greenlet under gevent, a thread elsewhere) and wait; the writer takes
every unit pending, runs them all in ONE transaction on its own connection with prebuilt
statements (executemany where rows are alike), commits once and wakes each waiter with its
own result. Idle, a unit is written at once (a batch of one, no timer); while a batch is
written the next one gathers. A waiter returns only after its commit, so no client ever sees
an answer whose charge is not durable, and a kill -9 mid-batch leaves the holds to their lease.
On SQLite, a unit submitted while no other request is answering is committed by its own
greenlet on the writer's connection, without a switch (Writer.write_here): with nothing to
gather, the hand-off was a tenth of a sequential request.

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
import threading
from collections import defaultdict, deque
from dataclasses import dataclass, field
from datetime import timedelta

from sqlalchemy import bindparam, insert, select, update
from sqlalchemy.exc import DBAPIError, DisconnectionError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

import cache
import holds
import sqlite_wal
import this_process
from extensions import db
from holds import HOLDS, KEYS, LEDGER, LOGS, USERS
from models import utcnow
from request_log import LOG_COLUMNS, LOG_DEFAULTS, _rollup_upsert, rollup_values
from request_log import _INSERT_LOG as _INSERT_LOG_STATEMENT

DATABASE_DOWN = (OperationalError, InterfaceError, DisconnectionError, PoolTimeout)
IDLE_SECONDS = 30  # an idle writer gives its connection back and ends; the next unit restarts it


class Prepared:
    """A prebuilt statement compiled once per dialect to the driver's SQL text and run on the
    DBAPI cursor: SQLAlchemy's per-execution work (cache key, compiled-cache lookup, result
    set-up) measured ~10 us a statement on SQLite, the bare driver ~1.5 us. Bind processors
    (datetimes as text on SQLite, booleans) are still applied, and an INSERT's columns the
    row leaves out get their scalar defaults, as SQLAlchemy would give them."""

    def __init__(self, statement):
        self.statement = statement
        self._compiled = {}
        table = getattr(statement, "table", None)
        self.defaults = {} if statement.is_dml and not statement.is_insert else {
            column.key: column.default.arg for column in getattr(table, "columns", ())
            if column.default is not None and column.default.is_scalar}

    def _filled(self, params):
        missing = self.defaults.keys() - params.keys()
        return dict(params, **{name: self.defaults[name] for name in missing}) \
            if missing else params

    def _for(self, dialect):
        found = self._compiled.get(dialect.name)
        if found is None:
            compiled = self.statement.compile(dialect=dialect)
            processors = dict(compiled._bind_processors)
            if compiled.positiontup is not None:  # qmark / format: a list in this order
                order = tuple(compiled.positiontup)
                steps = tuple((name, processors.get(name)) for name in order)

                def shape(params, steps=steps):
                    return [proc(params[name]) if proc else params[name]
                            for name, proc in steps]
            else:  # named / pyformat: the dict, processed
                def shape(params, processors=processors):
                    if not processors:
                        return params
                    params = dict(params)
                    for name, proc in processors.items():
                        params[name] = proc(params[name])
                    return params
            found = self._compiled[dialect.name] = (compiled.string, shape)
        return found

    def run(self, cursor, dialect, params):
        sql, shape = self._for(dialect)
        try:
            cursor.execute(sql, shape(self._filled(params)))
        except dialect.loaded_dbapi.Error as err:
            raise _wrapped(err, sql, params, cursor, dialect) from err
        return cursor

    def run_many(self, cursor, dialect, rows):
        sql, shape = self._for(dialect)
        try:
            cursor.executemany(sql, [shape(self._filled(row)) for row in rows])
        except dialect.loaded_dbapi.Error as err:
            raise _wrapped(err, sql, rows, cursor, dialect) from err


def _wrapped(err, sql, params, cursor, dialect):
    """The driver's error as SQLAlchemy would raise it (the relay and the 503 handler know
    those), noting whether the connection is lost."""
    lost = dialect.is_disconnect(err, cursor.connection, cursor)
    return DBAPIError.instance(sql, params, err, dialect.loaded_dbapi.Error,
                               hide_parameters=True, connection_invalidated=lost,
                               dialect=dialect)


# The hot statements (holds.py's, built once), run on the driver's cursor.
_RESERVE_USER = Prepared(holds._RESERVE_USER)
_RESERVE_KEY = Prepared(holds._RESERVE_KEY)
_AVAILABLE = Prepared(holds._AVAILABLE)
_INSERT_HOLD = Prepared(holds._INSERT_HOLD)
_RELEASE_AND_CHARGE = Prepared(holds._RELEASE_AND_CHARGE)
_SETTLE_KEY = Prepared(holds._SETTLE_KEY)
_INSERT_LEDGER = Prepared(insert(LEDGER).values({name: bindparam(name) for name in (
    "user_id", "kind", "amount_micro", "balance_after_micro", "note", "request_id",
    "created_at")}))
_INSERT_LOG = Prepared(_INSERT_LOG_STATEMENT)
_LOCK_USER = Prepared(select(USERS.c.id).where(USERS.c.id == bindparam("uid"))
                      .with_for_update(key_share=True))  # FOR NO KEY UPDATE, as an UPDATE takes
_TOUCH_KEY = Prepared(update(KEYS).where(KEYS.c.id == bindparam("kid")).values(
    last_used_at=bindparam("now")))
_GIVE_BACK = Prepared(update(USERS).where(USERS.c.id == bindparam("uid")).values(
    reserved_micro=USERS.c.reserved_micro - bindparam("amount")))
_rollups = {}  # dialect name -> Prepared rollup upsert
_TAKE_HOLD = Prepared(holds._TAKE_HOLD)
# Rare (late settlements): SQLAlchemy Core.
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
    """Hand `unit` to this worker's writer and wait for its commit (or, in a quiet worker,
    commit it here: Writer.write_here)."""
    waiting = _Waiting(unit)
    writer = writer_for(db.engine)
    if not writer.write_here(waiting):
        writer.put(waiting)
        waiting.done.wait()
    if waiting.error is not None:
        raise waiting.error
    return waiting.result


_writers = {}  # (pid, engine id) -> Writer
_writers_lock = threading.Lock()


def writer_for(engine):
    key = (this_process.pid(), id(engine))
    found = _writers.get(key)
    if found is None:
        with _writers_lock:
            found = _writers.setdefault(key, Writer(engine))
    return found


def flush():
    """Wait until every writer of this process has written what it was given (shutdown)."""
    for writer in list(_writers.values()):
        if writer.pid == this_process.pid():
            writer.wait_idle()


# --- the writer -----------------------------------------------------------------------------

class Writer:
    """One per worker and database: a queue, a greenlet (or thread) and its connection.

    When no other request waits for its answer there is nothing to gather, and handing a
    unit over costs more than writing it: two turns of the event loop per unit, ~0.15 ms of a
    sequential request's ~1.4. So a unit that finds the writer idle, its connection open and no
    other request answering is committed in the caller's greenlet (`write_here`), on the
    writer's connection, under the same flag that keeps the writer's own loop out meanwhile.
    That commit must not switch greenlets: a kill or timeout landing inside it would abort a
    settlement the writer would have finished. On SQLite nothing in it switches, except a
    wait for a lock held by another process, and `sqlite_wal.not_waiting` turns that into an
    error: the unit is rolled back and handed to the writer as usual. PostgreSQL's statements
    switch on every round trip, so there units are always handed over."""

    def __init__(self, engine):
        self.engine = engine
        self.pid = this_process.pid()
        self.pending = deque()
        self.cv = threading.Condition()
        self.running = False
        self.writing = False  # a batch is being written (by the loop, or by write_here)
        self.conn = None
        self.in_place = engine.dialect.name == "sqlite"  # write_here may (class docstring)

    def put(self, waiting):
        with self.cv:
            self.pending.append(waiting)
            if not self.running:
                self._start()
            self.cv.notify_all()

    def _start(self):
        """Start the loop (holding self.cv)."""
        self.running = True
        threading.Thread(target=self._loop, name="group-commit-writer", daemon=True).start()

    def write_here(self, waiting):
        """Commit `waiting` in the calling greenlet if the worker is quiet (class docstring);
        returns whether it did (its result or error is set), else the caller hands it over."""
        if not self.in_place or cache.requests_answering() > 1:
            return False
        with self.cv:
            if self.writing or self.pending or self.conn is None:
                return False
            self.writing = True
        try:
            with sqlite_wal.not_waiting():
                self._commit([waiting])  # rolls back and drops the connection on an error
            return True
        except Exception as err:  # noqa: BLE001 - the unit's own answer, as in a batch of one
            if sqlite_wal.is_locked(err):
                return False  # rolled back: the writer waits for the lock its own way
            waiting.error = err
            return True
        finally:
            with self.cv:
                self.writing = False
                if self.pending:  # gathered meanwhile (threads): the loop's to write
                    if not self.running:
                        self._start()
                    self.cv.notify_all()  # (not otherwise: it would wake the idle loop)

    def wait_idle(self):
        with self.cv:
            while self.pending or self.writing:
                self.cv.wait(1)

    def _loop(self):
        mine = False  # whether self.writing is this loop's (not write_here's)
        try:
            while True:
                with self.cv:
                    if mine:
                        self.writing = mine = False
                        self.cv.notify_all()
                    while self.writing or not self.pending:
                        if not self.cv.wait(IDLE_SECONDS) and not (self.writing or self.pending):
                            self.running = False
                            return
                    batch = list(self.pending)
                    self.pending.clear()
                    self.writing = mine = True
                self._write(batch)
        finally:
            with self.cv:  # never strand a waiter, even if this loop is killed
                if mine or not self.writing:  # (not while write_here uses the connection)
                    self._drop_connection()
                    self.writing = False
                stranded = list(self.pending)
                self.running = False
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


class _Tx:
    """The batch's transaction: Core for the rare statements, the driver's cursor (Prepared)
    for the hot ones; both on the same connection."""

    def __init__(self, conn):
        self.conn = conn
        self.dialect = conn.dialect
        self.cursor = conn.connection.dbapi_connection.cursor()

    def run(self, prepared, params):
        return prepared.run(self.cursor, self.dialect, params)

    def many(self, prepared, rows):
        if rows:
            prepared.run_many(self.cursor, self.dialect, rows)


def run_batch(conn, units):
    """Every unit's statements in the caller's transaction on `conn` (no commit), in the lock
    order: holds, users (each with its keys), hold inserts, ledger, logs, usage_daily.
    Returns one result per unit: a Hold or a CreditsRefused for a Reserve, a
    (charged, billing state, late) tuple for a Settle."""
    if not conn.in_transaction():
        conn.begin()  # so conn.commit() commits what the cursor wrote
    tx = _Tx(conn)
    try:
        return _run_batch(tx, units)
    finally:
        tx.cursor.close()


def _run_batch(tx, units):
    now = utcnow()
    results = {}
    reserves = [u for u in units if isinstance(u, Reserve)]
    settles = [u for u in units if isinstance(u, Settle)]

    # Hold rows first, in request-id order: take every hold being settled; those already
    # gone were settled by the sweeper (late).
    held = sorted((s for s in settles if s.hold is not None and s.hold.held),
                  key=lambda s: s.hold.request_id)
    late = {s for s in held
            if tx.run(_TAKE_HOLD, {"rid": s.hold.request_id}).rowcount != 1}
    old_logs = {}
    if late:
        old_logs = {row.request_id: row for row in tx.conn.execute(
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
    ledger_rows = []
    for user_id in sorted(set(moves_by_user) | set(touches) | set(reserves_by_user)):
        if moves_by_user[user_id]:
            ledger_rows += _settle_user(tx, user_id, moves_by_user[user_id], now)
        if reserves_by_user[user_id]:
            results.update(_reserve_user(tx, user_id, reserves_by_user[user_id]))
        if touches[user_id]:
            if not (moves_by_user[user_id] or reserves_by_user[user_id]):
                tx.run(_LOCK_USER, {"uid": user_id})  # a key's row only after its user's
            tx.many(_TOUCH_KEY, [{"kid": kid, "now": now} for kid in sorted(touches[user_id])])
    tx.many(_INSERT_HOLD, [r.row for r in reserves
                           if isinstance(results[r], holds.Hold) and results[r].held])
    tx.many(_INSERT_LEDGER, ledger_rows)
    _write_logs(tx, settles, results, old_logs, now)
    return [results[u] for u in units]


def _settle_user(tx, user_id, moves, now):
    """One UPDATE of the user for all its settlements; their ledger rows carry the running
    balance as if each had settled alone, in arrival order. Returns the ledger rows."""
    row = tx.run(_RELEASE_AND_CHARGE, {
        "uid": user_id, "released": sum(m.released for m in moves),
        "charged": sum(m.cost for m in moves)}).fetchone()
    if row is None:
        return []  # the user is gone (their holds and ledger went with them)
    by_key = defaultdict(lambda: [0, 0])
    running = row[0] + sum(m.cost for m in moves)
    rows = []
    for m in moves:
        running -= m.cost
        hold, note = m.unit.hold, m.unit.note
        if m.covered:
            rows.append({"user_id": user_id, "kind": "charge", "amount_micro": -m.covered,
                         "balance_after_micro": running + (m.cost - m.covered), "note": note,
                         "request_id": hold.request_id, "created_at": now})
        if m.cost > m.covered:
            rows.append({"user_id": user_id, "kind": "overrun",
                         "amount_micro": -(m.cost - m.covered), "balance_after_micro": running,
                         "note": f"{note or 'request'}: the upstream produced more than the "
                                 "cap it was sent",
                         "request_id": hold.request_id, "created_at": now})
        if hold.key_id is not None:
            by_key[hold.key_id][0] += m.released
            by_key[hold.key_id][1] += m.cost
    tx.many(_SETTLE_KEY, [{"kid": kid, "released": r, "charged": c}
                          for kid, (r, c) in sorted(by_key.items())])
    return rows


def _reserve_user(tx, user_id, reserves):
    """One user's reservations, in arrival order, each decided as if it ran alone: its own
    conditional UPDATEs of user then key, a key refusal giving its part back at once. When
    the wallet covers them all, one UPDATE takes them all (each would have passed, as every
    prefix fits) and then each key likewise, all at once if its limit allows."""
    results = {}
    paying = []
    for r in reserves:
        if r.amount:
            paying.append(r)
            continue
        # A free request holds nothing, but a wallet left negative by an overrun still refuses.
        available = tx.run(_AVAILABLE, {"uid": user_id}).fetchone()
        if available is not None and available[0] < 0:
            results[r] = holds._insufficient(user_id, 0, tx.conn)
        else:
            results[r] = holds.Hold(r.request_id, r.user_id, r.key_id, 0, held=False)
    if not (len(paying) > 1 and tx.run(_RESERVE_USER, {
            "uid": user_id, "amount": sum(r.amount for r in paying)}).rowcount == 1):
        for r in paying:  # one by one, as each would run alone
            if tx.run(_RESERVE_USER, {"uid": user_id, "amount": r.amount}).rowcount != 1:
                results[r] = holds._insufficient(user_id, r.amount, tx.conn)
            elif r.key_id is not None and tx.run(
                    _RESERVE_KEY, {"kid": r.key_id, "amount": r.amount}).rowcount != 1:
                tx.run(_GIVE_BACK, {"uid": user_id, "amount": r.amount})
                results[r] = holds._key_limit(r.key_id, r.amount, tx.conn)
            else:
                results[r] = holds.Hold(r.request_id, r.user_id, r.key_id, r.amount)
        return results
    # The wallet covers them all; now each key, all its units at once if its limit allows.
    by_key = defaultdict(list)
    for r in paying:
        by_key[r.key_id].append(r)
    for key_id in sorted(by_key, key=lambda k: (k is None, k)):
        group = by_key[key_id]
        if key_id is not None and not (len(group) > 1 and tx.run(_RESERVE_KEY, {
                "kid": key_id, "amount": sum(r.amount for r in group)}).rowcount == 1):
            for r in group:
                if tx.run(_RESERVE_KEY, {"kid": key_id, "amount": r.amount}).rowcount != 1:
                    tx.run(_GIVE_BACK, {"uid": user_id, "amount": r.amount})
                    results[r] = holds._key_limit(key_id, r.amount, tx.conn)
        for r in group:
            results.setdefault(r, holds.Hold(r.request_id, r.user_id, r.key_id, r.amount))
    return results


def _write_logs(tx, settles, results, old_logs, now):
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
        tx.conn.execute(_REPLACE_LOG.values(changes), {"rid": row["request_id"]})
        if old.user_id is not None:
            _add_rollup(rollups, rollup_values(old._mapping, replaced_by=row))
    tx.many(_INSERT_LOG, new_rows)
    if rollups:
        upsert = _rollups.get(tx.dialect.name)
        if upsert is None:
            upsert = _rollups[tx.dialect.name] = Prepared(_rollup_upsert(tx.dialect.name))
        tx.many(upsert, [rollups[k] for k in sorted(rollups)])


def _add_rollup(rollups, values):
    key = (values["day"], values["user_id"], values["key_id"], values["model"])
    found = rollups.get(key)
    if found is None:
        rollups[key] = values
    else:
        for name in ("requests", "failed", "prompt_tokens", "completion_tokens",
                     "credits_micro"):
            found[name] += values[name]
