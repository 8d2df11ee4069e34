"""Shared fixtures: the app on SQLite and PostgreSQL, the CLI runner, and live servers.

Database-facing tests take the `app` fixture, which is parametrized over both
databases. Tests that need a real server take `gateway` (gunicorn + gevent +
the fake upstream process), which is also parametrized over both databases
where a test asks for `gateway_pg` / `gateway`.
"""
import os
import sys

import pytest
from sqlalchemy import create_engine, text

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from tests.support import (  # noqa: E402
    LiveGateway, drop_postgres_database, make_channel, make_key, make_price, make_user, pg_admin_url,
    postgres_database_url,
)

BACKENDS = ["sqlite", "postgresql"]


def _worker_id(request):
    """Unique per pytest process, so concurrent runs never drop each other's databases."""
    worker = getattr(request.config, "workerinput", {}).get("workerid", "main")
    return f"{worker}_{os.getpid()}"


@pytest.fixture(scope="session")
def pg_url(request):
    """A PostgreSQL database of this test process's own, created fresh, dropped at the end."""
    name = f"tokenopen_t_{_worker_id(request)}"
    yield postgres_database_url(name)
    drop_postgres_database(name)


@pytest.fixture(scope="session")
def pg_schema(pg_url):
    """Create the schema once per session on this worker's PostgreSQL database."""
    from app import create_app
    from extensions import db
    app = create_app({"SQLALCHEMY_DATABASE_URI": pg_url, "SECRET_KEY": "test",
                      "TESTING": True})
    with app.app_context():
        db.drop_all()
        db.create_all()
        db.engine.dispose()
    return pg_url


def _truncate_all(url):
    from extensions import db
    engine = create_engine(url)
    names = ", ".join(f'"{t.name}"' for t in reversed(db.metadata.sorted_tables))
    with engine.begin() as conn:
        conn.execute(text(f"TRUNCATE {names} RESTART IDENTITY CASCADE"))
    engine.dispose()


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


@pytest.fixture
def app(backend, tmp_path, request):
    """A fresh app on an empty database of the parametrized backend."""
    from app import create_app
    from bootstrap import ensure_default_group
    from extensions import db, limiter
    if backend == "sqlite":
        url = f"sqlite:///{tmp_path}/test.db"
    else:
        url = request.getfixturevalue("pg_schema")
        _truncate_all(url)
    app = create_app({
        "SQLALCHEMY_DATABASE_URI": url, "SECRET_KEY": "test", "TESTING": True,
        "WTF_CSRF_ENABLED": False, "CACHE_TTL": 0, "RATELIMIT_STORAGE_URI": "memory://",
    })
    app.instance_path = str(tmp_path)
    with app.app_context():
        if backend == "sqlite":
            db.create_all()
        ensure_default_group()
        db.session.commit()
    limiter.reset()
    yield app
    with app.app_context():
        db.session.remove()
        db.engine.dispose()


@pytest.fixture
def ctx(app):
    """An app context whose ledger must be clean when the test ends."""
    import billing
    from extensions import db
    with app.app_context():
        yield app
        db.session.rollback()
        assert billing.check_ledger() == []


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def runner(app):
    return app.test_cli_runner()


@pytest.fixture
def factory(app):
    """Functions that create rows in the test database (user, key, channel, price)."""
    class Factory:
        def user(self, email="member@example.com", password="password123", **kw):
            with app.app_context():
                return make_user(email, password, **kw)

        def key(self, email, **kw):
            with app.app_context():
                return make_key(email, **kw)

        def channel(self, name, **kw):
            with app.app_context():
                return make_channel(name, **kw)

        def price(self, model, **kw):
            with app.app_context():
                return make_price(model, **kw)
    return Factory()


# --- live servers -----------------------------------------------------------------------

@pytest.fixture(scope="session")
def fake_upstream():
    """The fake OpenAI/Anthropic/Gemini upstream, a real HTTP server process."""
    from tests.support import FakeUpstream
    server = FakeUpstream()
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def gateway_sqlite(tmp_path_factory, fake_upstream):
    """gunicorn + gevent serving the app on a SQLite file."""
    path = tmp_path_factory.mktemp("gw-sqlite")
    gw = LiveGateway(f"sqlite:///{path}/gw.db", str(path), fake_upstream)
    gw.start()
    yield gw
    gw.stop()


@pytest.fixture(scope="session")
def gateway_pg(tmp_path_factory, fake_upstream, request):
    """gunicorn + gevent serving the app on PostgreSQL (a database of its own)."""
    path = tmp_path_factory.mktemp("gw-pg")
    name = f"tokenopen_gw_{_worker_id(request)}"
    gw = LiveGateway(postgres_database_url(name), str(path), fake_upstream)
    gw.start()
    yield gw
    gw.stop()
    drop_postgres_database(name)


@pytest.fixture(params=BACKENDS)
def gateway(request):
    """A live gateway on each backend; its data is reset before each test."""
    gw = request.getfixturevalue("gateway_sqlite" if request.param == "sqlite" else "gateway_pg")
    gw.reset()
    return gw


@pytest.fixture
def live(gateway_sqlite):
    """A live gateway on SQLite only, for tests whose subject is not the database."""
    gateway_sqlite.reset()
    return gateway_sqlite


__all__ = ["pg_admin_url"]
