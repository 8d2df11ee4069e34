"""What used to stall a whole served worker, every request in flight with it: SQLite's WAL
checkpoints inside the writer's commits (now beside them, sqlite_wal.py: on the live gateway
and the checkpoint tick itself) and full garbage collections over every start-up object (now
frozen, gunicorn.conf.py)."""
import os
import shutil
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from sqlalchemy import create_engine, make_url, text
from sqlalchemy.exc import OperationalError

import sqlite_wal

CHAT_BODY = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello"}]}


def _rows_in_database_file(db_path, request_ids, scratch):
    """Which of `request_ids` have reached the database file itself (the WAL left behind)."""
    copy = os.path.join(scratch, "main-file-only.db")
    shutil.copyfile(db_path, copy)
    conn = sqlite3.connect(copy)
    try:
        conn.execute("PRAGMA journal_mode=DELETE")  # read the copy alone: no -wal beside it
        marks = ",".join("?" * len(request_ids))
        return {row[0] for row in conn.execute(
            f"SELECT request_id FROM request_logs WHERE request_id IN ({marks})", request_ids)}
    finally:
        conn.close()


def test_served_worker_checkpoints_in_the_background(live, tmp_path):
    """A handful of requests writes far fewer than the 1,000 pages that would make SQLite
    checkpoint inside a commit: their rows reach the database file only because the worker's
    checkpointer copies the log every half second."""
    key = live.member(credits=100)
    request_ids = []
    for _ in range(3):
        answer = requests.post(f"{live.base_url}/chat/completions", json=CHAT_BODY,
                               headers={"Authorization": f"Bearer {key}"}, timeout=30)
        assert answer.status_code == 200, answer.text
        request_ids.append(answer.headers["x-request-id"])
    db_path = make_url(live.db_url).database
    deadline = time.monotonic() + 10
    while (found := _rows_in_database_file(db_path, request_ids, tmp_path)) != set(request_ids):
        assert time.monotonic() < deadline, f"only {found} reached {db_path}"
        time.sleep(0.2)


def test_a_locked_database_holds_back_the_writer_not_the_worker(live):
    """While another connection holds SQLite's write lock (as a RESTART checkpoint does
    while it finishes), the writer waits for it with gevent sleeps: the worker goes on
    answering, and the chat request waiting for its hold completes once the lock goes.
    SQLite's own busy handler would sleep the worker's one thread: /healthz would wait too."""
    key = live.member(credits=100)
    locker = sqlite3.connect(make_url(live.db_url).database, isolation_level=None, timeout=10)
    locker.execute("BEGIN IMMEDIATE")  # the write lock, as a RESTART holds it
    locked_at = time.monotonic()
    try:
        with ThreadPoolExecutor(1) as pool:
            chat = pool.submit(requests.post, f"{live.base_url}/chat/completions",
                               json=CHAT_BODY, headers={"Authorization": f"Bearer {key}"},
                               timeout=30)
            time.sleep(0.3)
            assert not chat.done(), "the chat request should be waiting for the lock"
            asked = time.monotonic()
            health = requests.get(f"{live.url}/healthz", timeout=10)
            health_seconds = time.monotonic() - asked
            time.sleep(max(0.0, locked_at + 1.5 - time.monotonic()))
            assert not chat.done(), "the chat request should still be waiting for the lock"
            locker.execute("ROLLBACK")
            answer = chat.result()
    finally:
        locker.close()
    assert health.status_code == 200, health.text
    assert health_seconds < 0.5, f"/healthz took {health_seconds:.2f} s behind the lock"
    assert answer.status_code == 200, answer.text
    with live.app.app_context():
        from models import RequestLog
        row = RequestLog.query.filter_by(request_id=answer.headers["x-request-id"]).one()
        assert row.status == "Success" and row.credits_micro > 0


def test_a_served_workers_statement_waits_for_the_lock_with_time_sleep(tmp_path, monkeypatch):
    """With the worker's checkpointer on, SQLite reports a locked database at once and the
    statement is retried after each time.sleep (gevent's in a served worker) until the lock
    goes; without it, SQLite's own busy timeout is in force and nothing is retried here."""
    from app import _sqlite_pragmas  # noqa: F401 - registers the connect listeners
    engine = create_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE t (x INTEGER)"))
        assert conn.execute(text("PRAGMA busy_timeout")).scalar() == sqlite_wal.BUSY_TIMEOUT_MS
    engine.dispose()
    monkeypatch.setattr(sqlite_wal, "_in_background", True)
    locker = sqlite3.connect(tmp_path / "db.sqlite", isolation_level=None)
    locker.execute("BEGIN IMMEDIATE")
    naps, release_after = [], [3]

    def nap(seconds):  # the lock goes after the third wait (the first time)
        naps.append(seconds)
        if len(naps) == release_after[0]:
            locker.execute("ROLLBACK")

    monkeypatch.setattr(sqlite_wal.time, "sleep", nap)
    with engine.begin() as conn:
        assert conn.execute(text("PRAGMA busy_timeout")).scalar() == 0
        conn.execute(text("INSERT INTO t VALUES (1)"))
    assert naps == [0.0005, 0.001, 0.002]
    locker.execute("BEGIN IMMEDIATE")
    naps.clear()
    release_after[0] = None
    monkeypatch.setattr(sqlite_wal, "BUSY_TIMEOUT_MS", 20)  # then it gives up, as SQLite would
    with pytest.raises(OperationalError, match="database is locked"):
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO t VALUES (2)"))
    assert sum(naps) >= 0.02 and max(naps) == sqlite_wal.BUSY_PAUSE_MAX_SECONDS
    locker.execute("ROLLBACK")
    # A transaction whose snapshot is older than the last commit can never write: it fails
    # at once (SQLITE_BUSY_SNAPSHOT), as under SQLite's own busy handler.
    reader = sqlite3.connect(tmp_path / "db.sqlite", isolation_level=None,
                             factory=sqlite_wal.PatientConnection)
    reader.execute("PRAGMA busy_timeout=0")
    stale = reader.cursor()
    stale.execute("BEGIN")
    stale.execute("SELECT count(*) FROM t").fetchone()
    locker.execute("INSERT INTO t VALUES (3)")
    naps.clear()
    with pytest.raises(sqlite3.OperationalError) as refused:
        stale.execute("INSERT INTO t VALUES (4)")
    assert refused.value.sqlite_errorcode == sqlite_wal.SQLITE_BUSY_SNAPSHOT and naps == []
    reader.close()
    locker.close()
    engine.dispose()


def test_connections_skip_commit_checkpoints_only_with_a_checkpointer(tmp_path, monkeypatch):
    from app import _sqlite_pragmas  # noqa: F401 - registers the connect listener
    engine = create_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    with engine.connect() as conn:
        assert conn.execute(text("PRAGMA wal_autocheckpoint")).scalar() == 1000
    engine.dispose()
    monkeypatch.setattr(sqlite_wal, "_in_background", True)
    with engine.connect() as conn:
        assert conn.execute(text("PRAGMA wal_autocheckpoint")).scalar() == 0
    engine.dispose()


def _wal_database(path):
    """A WAL database whose writer never checkpoints (as in a served worker)."""
    writer = sqlite3.connect(path, isolation_level=None)
    writer.execute("PRAGMA journal_mode=WAL")
    writer.execute("PRAGMA wal_autocheckpoint=0")
    writer.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, pad BLOB)")
    return writer


def _write_rows(writer, count):
    for _ in range(count):
        writer.execute("INSERT INTO t (pad) VALUES (zeroblob(3000))")


def _checkpointer(path, statements):
    conn = sqlite3.connect(path, timeout=0, isolation_level=None)
    conn.set_trace_callback(statements.append)
    return conn


def test_checkpoint_copies_the_log_into_the_database_file(tmp_path):
    path = str(tmp_path / "db.sqlite")
    writer = _wal_database(path)
    _write_rows(writer, 20)
    statements = []
    frames = sqlite_wal.checkpoint(_checkpointer(path, statements))
    assert frames > 20
    assert statements == ["PRAGMA wal_checkpoint(PASSIVE)"]  # below the limit: copy only
    copy = tmp_path / "alone.db"
    shutil.copyfile(path, copy)
    alone = sqlite3.connect(copy)
    alone.execute("PRAGMA journal_mode=DELETE")
    assert alone.execute("SELECT count(*) FROM t").fetchone()[0] == 20


def test_checkpoint_starts_the_log_over_past_the_limit(tmp_path, monkeypatch):
    """Under steady load a writer always appends while the copy runs, so SQLite would never
    start the log over on its own; past the limit the tick does (RESTART)."""
    path = str(tmp_path / "db.sqlite")
    writer = _wal_database(path)
    _write_rows(writer, 20)
    statements = []
    checkpointer = _checkpointer(path, statements)
    monkeypatch.setattr(sqlite_wal, "RESTART_FRAMES", 20)
    assert sqlite_wal.checkpoint(checkpointer) > 20
    assert statements == ["PRAGMA wal_checkpoint(PASSIVE)", "PRAGMA wal_checkpoint(RESTART)"]
    writer.execute("BEGIN")  # a writer that began after the restart writes from the log's start
    _write_rows(writer, 1)
    writer.execute("COMMIT")
    assert sqlite_wal.checkpoint(checkpointer) <= 4


def test_both_files_are_synced_before_a_restart_holds_writers_back(tmp_path, monkeypatch):
    """The RESTART syncs the log and the database file with writers waiting; synced first,
    beside them, it has only what came since to sync."""
    path = str(tmp_path / "db.sqlite")
    writer = _wal_database(path)
    _write_rows(writer, 20)
    statements = []
    synced = []
    real_fsync = os.fsync

    def recording_fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        statements.append("fsync")
        real_fsync(fd)
    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(sqlite_wal, "RESTART_FRAMES", 20)
    sqlite_wal.checkpoint(_checkpointer(path, statements), path)
    assert statements == ["PRAGMA wal_checkpoint(PASSIVE)", "fsync", "fsync",
                          "PRAGMA wal_checkpoint(RESTART)"]
    assert synced == [path, path + "-wal"]
    statements.clear()
    _write_rows(writer, 1)
    sqlite_wal.checkpoint(_checkpointer(path, statements), path)
    assert "fsync" not in statements  # below the limit: a PASSIVE copy, nothing synced


def test_a_slow_sync_puts_the_restart_off_unless_the_log_is_far_past_its_size(
        tmp_path, monkeypatch):
    """A slow sync means a struggling disk, and the RESTART would sync again with writers
    waiting: it waits for a later tick, until the log is far past its size."""
    path = str(tmp_path / "db.sqlite")
    writer = _wal_database(path)
    _write_rows(writer, 20)
    monkeypatch.setattr(sqlite_wal, "_sync_files", lambda *paths: time.sleep(0.3))
    monkeypatch.setattr(sqlite_wal, "RESTART_FRAMES", 20)
    statements = []
    sqlite_wal.checkpoint(_checkpointer(path, statements), path)
    assert statements == ["PRAGMA wal_checkpoint(PASSIVE)"]
    monkeypatch.setattr(sqlite_wal, "STUCK_FRAMES", 20)
    statements.clear()
    sqlite_wal.checkpoint(_checkpointer(path, statements), path)
    assert "PRAGMA wal_checkpoint(RESTART)" in statements


def test_checkpoint_gives_way_to_a_busy_writer(tmp_path, monkeypatch):
    """While a writer holds its lock the tick neither waits nor fails."""
    path = str(tmp_path / "db.sqlite")
    writer = _wal_database(path)
    _write_rows(writer, 30)
    monkeypatch.setattr(sqlite_wal, "RESTART_FRAMES", 10)
    writer.execute("BEGIN IMMEDIATE")
    _write_rows(writer, 1)
    started = time.monotonic()
    sqlite_wal.checkpoint(_checkpointer(path, []))
    assert time.monotonic() - started < 0.5
    writer.execute("COMMIT")
    assert writer.execute("SELECT count(*) FROM t").fetchone()[0] == 31


def test_served_worker_freezes_what_it_started_with(tmp_path):
    """gunicorn.conf.py's post_worker_init ends by freezing the start-up objects, so a full
    collection no longer walks the ~100k of them while requests wait (a subprocess: the
    config file sets the metrics folder in its environment when read)."""
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = ("import gc, runpy; import flask, sqlalchemy; "
              "ns = runpy.run_path('gunicorn.conf.py'); before = gc.get_freeze_count(); "
              "ns['freeze_startup_objects'](); "
              "print(before, gc.get_freeze_count(), gc.get_threshold()[2])")
    env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=str(tmp_path / "metrics"))
    done = subprocess.run([sys.executable, "-c", script], cwd=root, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    before, after, full_every = map(int, done.stdout.split())
    assert before == 0 and after > 10_000
    assert full_every == 100  # full collections: every 100 middle ones, not every 10


def test_the_keeper_checkpoints_2000_streams_a_batch_at_a_time():
    """Counting what 2,000 open streams delivered (here 0.1 ms each, 200 ms in all) gives the
    worker's requests a turn every CHECKPOINT_BATCH streams, not once at the end."""
    from tests.support import longest_stall
    checkpointed, stall = longest_stall("""
        import time
        from types import SimpleNamespace
        from flask import Flask
        from blueprints.api import inflight
        app = Flask("keeper")
        for i in range(2000):  # no hold: counted, but nothing to write
            inflight.register(SimpleNamespace(request_id=f"s{i}", streaming=True, hold=None,
                                              route=None, checkpointed=None))
        def delivered_of(flight):
            until = time.perf_counter() + 0.0001
            while time.perf_counter() < until:
                pass
            return SimpleNamespace(prompt_tokens=1, completion_tokens=2, cached_tokens=0), 3
        def checkpoint():
            with app.app_context():
                return inflight.checkpoint_streams(app, delivered_of)
        """, "checkpoint()")
    assert checkpointed == 2000
    assert stall < 0.1, f"the worker's greenlets were held up {stall * 1000:.0f} ms"


def test_the_admin_billing_check_runs_beside_the_workers_requests(tmp_path):
    """The console's "billing check" scans the whole ledger in SQLite statements, which hold
    the thread; in a served worker they run in a native thread (SQLite lets the GIL go) and
    the worker's other greenlets keep going."""
    from tests.support import longest_stall
    result, stall = longest_stall(f"""
        import time
        from app import create_app
        from bootstrap import ensure_default_group
        from extensions import db
        from models import LedgerEntry, User, utcnow
        from tests.support import login_session, make_user
        app = create_app({{"SQLALCHEMY_DATABASE_URI": "sqlite:///{tmp_path}/db.sqlite",
                          "TESTING": True, "SECRET_KEY": "test", "WTF_CSRF_ENABLED": False}})
        with app.app_context():
            db.create_all()
            ensure_default_group()
            admin = make_user("admin@example.com", is_admin=True)
            users = [make_user(f"u{{n}}@example.com") for n in range(20)]
            now = utcnow()
            for start in range(0, 600_000, 100_000):
                db.session.execute(db.insert(LedgerEntry), [dict(
                    user_id=users[i % 20], kind="grant", amount_micro=1,
                    balance_after_micro=0, created_at=now) for i in range(start, start + 100_000)])
            for user_id in users:  # each has 30,000 grants of 1
                db.session.get(User, user_id).balance_micro = 30_000
            db.session.commit()
        client = app.test_client()
        login_session(client, admin)
        def check():
            started = time.perf_counter()
            answer = client.post("/admin/billing/check")
            page = client.get("/admin/").get_data(as_text=True)
            return answer.status_code, "Ledger OK" in page, time.perf_counter() - started
        """, "check()")
    status, clean, seconds = result
    assert status == 302 and clean
    assert stall < min(0.1, seconds / 3), \
        f"the check took {seconds * 1000:.0f} ms and held the worker {stall * 1000:.0f} ms"
