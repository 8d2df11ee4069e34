"""Test helpers: row factories, PostgreSQL databases, and the live server processes."""
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import requests
from sqlalchemy import create_engine, text

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHON = sys.executable
PG_HOST = os.environ.get("TOKENOPEN_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432")


def pg_admin_url():
    return f"{PG_HOST}/test"


def postgres_database_url(name):
    """Create (or recreate) database `name` on the local PostgreSQL and return its URL."""
    engine = create_engine(pg_admin_url(), isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :n"), {"n": name})
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    engine.dispose()
    return f"{PG_HOST}/{name}"


def drop_postgres_database(name):
    """Drop a test database (after its connections are gone)."""
    engine = create_engine(pg_admin_url(), isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :n"), {"n": name})
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
    engine.dispose()


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_http(url, timeout=30, proc=None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process for {url} exited with {proc.returncode}")
        try:
            if requests.get(url, timeout=1).status_code < 500:
                return
        except requests.RequestException:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not come up in {timeout}s")


# --- money readers (call inside an app context) -------------------------------------------

def balances(user_id):
    """(balance, reserved) of a user, straight from the database."""
    from extensions import db
    from models import User
    row = db.session.execute(db.select(User.balance_micro, User.reserved_micro)
                             .filter_by(id=user_id)).one()
    db.session.commit()
    return tuple(row)


def key_row(full_key):
    """The ApiKey row of a full sk- key."""
    from extensions import db
    from models import ApiKey
    row = db.session.scalar(db.select(ApiKey).filter_by(key_hash=ApiKey.hash_key(full_key)))
    db.session.commit()
    return row


# --- row factories (call inside an app context) -------------------------------------------

def make_user(email, password="password123", is_admin=False, group=None, credits=None,
              balance_micro=None):
    """Create a user; `credits` grants that many credits through a ledger row."""
    from bootstrap import create_user
    from extensions import db
    from models import LedgerEntry
    user = create_user(email, password, is_admin=is_admin, group_name=group)
    micro = balance_micro if balance_micro is not None else int((credits or 0) * 1_000_000)
    if micro:
        user.balance_micro = micro
        db.session.add(LedgerEntry(user_id=user.id, kind="grant", amount_micro=micro,
                                   balance_after_micro=micro, note="test grant"))
    db.session.commit()
    return user.id


def make_key(email, name="test key", **fields):
    """Create an API key for `email`; returns the full sk- key."""
    from extensions import db
    from models import ApiKey, User
    user = db.session.scalar(db.select(User).filter_by(email=email))
    key, full_key = ApiKey.generate(user, name, **fields)
    db.session.add(key)
    db.session.commit()
    return full_key


def make_channel(name, type="openai", base_url="", api_key="sk-upstream-secret",
                 models="gpt-4o-mini", priority=0, weight=1, enabled=True):
    from extensions import db
    from models import Channel
    channel = Channel(name=name, type=type, base_url=base_url, api_key=api_key,
                      priority=priority, weight=weight, enabled=enabled)
    channel.set_models(models)
    db.session.add(channel)
    db.session.commit()
    return channel.id


def make_price(model, input=1.0, output=2.0, cached_input=None, per_request=0.0,
               cache_write=None, per_image=0.0, per_second=0.0):
    """Prices in credits per 1M tokens (per_request/image/second: flat credits)."""
    from extensions import db
    from models import ModelPrice
    from money import parse_credits
    row = db.session.scalar(db.select(ModelPrice).filter_by(model=model)) or ModelPrice(model=model)
    row.input_micro = parse_credits(input)
    row.output_micro = parse_credits(output)
    row.cached_input_micro = None if cached_input is None else parse_credits(cached_input)
    row.cache_write_micro = None if cache_write is None else parse_credits(cache_write)
    row.per_request_micro = parse_credits(per_request)
    row.per_image_micro = parse_credits(per_image)
    row.per_second_micro = parse_credits(per_second)
    db.session.add(row)
    db.session.commit()
    return row.id


# --- live processes -----------------------------------------------------------------------

class FakeUpstream:
    """tests/fake_upstream.py in its own process, on a free port."""

    def __init__(self):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = None

    def start(self):
        self.proc = subprocess.Popen([PYTHON, os.path.join(ROOT, "tests", "fake_upstream.py"),
                                      "--port", str(self.port)], cwd=ROOT)
        wait_http(self.url + "/_health", proc=self.proc)

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)

    def events(self, since=0):
        """What the fake upstream saw: requests, headers, closed connections."""
        return requests.get(self.url + "/_events", params={"since": since}, timeout=5).json()

    def clear(self):
        requests.post(self.url + "/_reset", timeout=5)


class LiveGateway:
    """gunicorn + gevent serving TokenOpen on `db_url`, exactly as `make run` does."""

    def __init__(self, db_url, workdir, upstream, extra_env=None):
        self.db_url = db_url
        self.workdir = workdir
        self.upstream = upstream
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.base_url = self.url + "/v1"
        self.proc = None
        self.env = dict(os.environ)
        self.env.update({
            "TOKENOPEN_DATABASE_URL": db_url,
            "TOKENOPEN_SECRET_KEY": "live-test-secret",
            "TOKENOPEN_CACHE_TTL": "0",
            "TOKENOPEN_UPSTREAM_TIMEOUT": "2",
            "TOKENOPEN_CHANNEL_COOLDOWN": "30",
            "HOST": "127.0.0.1",
            "PORT": str(self.port),
            "WEB_CONCURRENCY": "1",
        })
        self.env.pop("TOKENOPEN_REDIS_URL", None)
        self.env.update(extra_env or {})
        self._app = None

    @property
    def app(self):
        """An app object on the same database, for creating rows and reading results."""
        if self._app is None:
            from app import create_app
            self._app = create_app({"SQLALCHEMY_DATABASE_URI": self.db_url,
                                    "SECRET_KEY": "live-test-secret", "TESTING": True})
        return self._app

    def start(self):
        subprocess.run([PYTHON, "-m", "flask", "--app", "app", "init-db"], cwd=ROOT,
                       env=self.env, check=True, capture_output=True)
        self.log = open(os.path.join(self.workdir, "gunicorn.log"), "w")
        self.proc = subprocess.Popen(
            [PYTHON, "-m", "gunicorn", "-c", "gunicorn.conf.py", "wsgi:app"],
            cwd=ROOT, env=self.env, stdout=self.log, stderr=subprocess.STDOUT)
        wait_http(self.url + "/healthz", proc=self.proc)

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # quick shutdown: tests hold keep-alive sockets
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        if self._app is not None:
            from extensions import db
            with self._app.app_context():
                db.engine.dispose()

    def reset(self):
        """Empty every table but the migration marker; default group unlimited for tests."""
        from bootstrap import ensure_default_group
        from extensions import db
        with self.app.app_context():
            for table in reversed(db.metadata.sorted_tables):
                db.session.execute(table.delete())
            group = ensure_default_group()
            group.rpm = 0  # ids are reused after a reset; a test of limits sets its own
            db.session.commit()
        self.upstream.clear()

    def run(self, fn, *args, **kwargs):
        """Call fn(*args) inside an app context on the gateway's database."""
        with self.app.app_context():
            return fn(*args, **kwargs)

    def user(self, email="member@example.com", **kw):
        return self.run(make_user, email, **kw)

    def key(self, email="member@example.com", **kw):
        return self.run(make_key, email, **kw)

    def channel(self, name="fake", models="gpt-4o-mini", **kw):
        kw.setdefault("base_url", self.upstream.url)
        return self.run(make_channel, name, models=models, **kw)

    def price(self, model="gpt-4o-mini", **kw):
        return self.run(make_price, model, **kw)

    def member(self, email="member@example.com", credits=100, models="gpt-4o-mini",
               price=True, **key_fields):
        """A ready member: user with credits, a fake-upstream channel and price; returns sk-."""
        self.user(email, credits=credits)
        if models:
            self.channel(models=models)
            if price:
                for model in models.split(","):
                    self.price(model.split("=")[0])
        return self.key(email, **key_fields)

    def logs(self, **filters):
        """RequestLog rows as dicts, oldest first."""
        from extensions import db
        from models import RequestLog

        def fetch():
            rows = db.session.scalars(db.select(RequestLog).filter_by(**filters)
                                      .order_by(RequestLog.id)).all()
            return [{c.name: getattr(r, c.name) for c in RequestLog.__table__.columns}
                    for r in rows]
        return self.run(fetch)

    def wait_logs(self, count, timeout=5, **filters):
        """Logs are written as the response finishes; poll until `count` rows exist."""
        deadline = time.time() + timeout
        rows = self.logs(**filters)
        while len(rows) < count and time.time() < deadline:
            time.sleep(0.05)
            rows = self.logs(**filters)
        return rows

    def scalar(self, statement):
        from extensions import db
        return self.run(lambda: db.session.scalar(statement))

    def gunicorn_log(self):
        self.log.flush()
        with open(os.path.join(self.workdir, "gunicorn.log")) as fh:
            return fh.read()


# --- console helpers (logs, dashboard) ----------------------------------------------------

ARTIFACTS = os.path.join(ROOT, "tests", "artifacts")  # screenshots and figures, gitignored
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run"]


@contextlib.contextmanager
def headless_chromium():
    """Debian's chromium, headless, driven by Playwright (it never downloads a browser)."""
    from playwright.sync_api import sync_playwright
    os.makedirs(ARTIFACTS, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", headless=True,
                                    args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@contextlib.contextmanager
def gateway_behind_proxy(name, tmp_path, fake_upstream, env):
    """A live gateway on its own PostgreSQL database `name`, reached through a TcpProxy the
    test can cut and restore: yields (gateway, proxy); stops both and drops the database."""
    from tests.tcp_proxy import TcpProxy
    direct = postgres_database_url(name)
    proxy = TcpProxy("127.0.0.1", 5432).start()
    gw = LiveGateway(direct, str(tmp_path), fake_upstream, env)
    gw.env["TOKENOPEN_DATABASE_URL"] = direct.replace("127.0.0.1:5432",
                                                      f"127.0.0.1:{proxy.port}")
    gw.start()
    try:
        yield gw, proxy
    finally:
        gw.stop()
        proxy.stop()
        drop_postgres_database(name)


def login_session(client, user_id):
    """Log `client` in as `user_id` by writing Flask-Login's session keys (unit tests only)."""
    from extensions import db
    from models import User
    with client.application.app_context():
        token = db.session.get(User, user_id).session_token
    with client.session_transaction() as session:
        session["_user_id"] = token
        session["_fresh"] = True
    return client


def insert_logs(rows):
    """Insert RequestLog rows (dicts; sensible defaults) and rebuild their users' UsageDaily
    rollup in SQL, as the relay would have kept it. Returns the rows with their defaults."""
    import uuid

    from cli.seed import rebuild_usage_daily
    from extensions import db
    from models import RequestLog
    defaults = {"endpoint": "/v1/chat/completions", "status": "Success", "http_status": 200,
                "model": "gpt-4o-mini", "key_name": "test key", "channel_name": "fake",
                "prompt_tokens": 10, "completion_tokens": 5, "cached_tokens": 0,
                "credits_micro": 25, "latency_ms": 100, "is_stream": False, "estimated": False,
                "billing": "billed"}
    full = [{**defaults, "request_id": "req-" + uuid.uuid4().hex, **row} for row in rows]
    db.session.execute(db.insert(RequestLog), full)
    db.session.commit()
    rebuild_usage_daily(sorted({row["user_id"] for row in full}))
    return full


_TICKING = """
import gc, json, time
import gevent
gc.collect()
gc.freeze()  # as a served worker does (gunicorn.conf.py): full collections stay short
_gaps, _done = [], []
def _tick():
    last = time.monotonic()
    while not _done:
        gevent.sleep(0.005)
        now = time.monotonic()
        _gaps.append(now - last)
        last = now
_ticker = gevent.spawn(_tick)
_result = gevent.spawn(lambda: {work}).get()
_done.append(True)
_ticker.join()
print(json.dumps({{"result": _result, "longest_gap": max(_gaps)}}))
"""


def longest_stall(setup, work):
    """In a fresh gevent-patched interpreter at the project root, as a served worker: run the
    code `setup`, then the expression `work` in a greenlet beside one that ticks every 5 ms.
    Returns (work's result, the longest the ticker waited in seconds): how long `work` held
    up every other greenlet of the worker."""
    code = ("from gevent import monkey; monkey.patch_all()\n"
            "import sqlite_wal\n"
            "sqlite_wal._in_background = True  # no checkpoints inside commits, as served\n"
            + textwrap.dedent(setup) + _TICKING.format(work=work))
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    return figures["result"], figures["longest_gap"]
