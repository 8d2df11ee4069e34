"""The application factory: config, extensions, blueprints, error handlers, CLI."""
import os
import sqlite3

from flask import Flask, jsonify, request
from flask.sessions import SecureCookieSessionInterface
from sqlalchemy import event, text
from sqlalchemy.engine import Engine
from werkzeug.middleware.proxy_fix import ProxyFix

import sqlite_wal
from config import load_config
from encryption import secret_box
from extensions import db
from money import format_credits


def create_app(test_config=None, web=True):
    """Build the app: defaults from the environment, then `test_config` overrides.

    web=False builds only what the admin CLI needs (config, database, commands), without
    the console, the API and their extensions: `python -m cli` starts ~0.15 s sooner."""
    app = Flask(__name__, instance_relative_config=True)
    app.config.from_mapping(load_config(app.instance_path))
    if test_config:
        app.config.update(test_config)
    private_sqlite_file(app.config["SQLALCHEMY_DATABASE_URI"])
    db.init_app(app)
    import cli
    cli.register(app)
    if web:
        add_web(app)
    return app


def add_web(app):
    """The console, the API, their extensions, error pages and probes."""
    secret_box(app)  # a malformed TOKENOPEN_ENCRYPTION_KEY fails at start, not on first use
    import metrics
    import redis_store
    from extensions import csrf, limiter, login_manager

    proxies = int(os.environ.get("TOKENOPEN_TRUSTED_PROXIES", "0") or 0)
    if proxies:
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=proxies, x_proto=proxies, x_host=proxies)

    app.session_interface = SessionCookies()
    login_manager.init_app(app)
    login_manager.login_view = "auth.login"

    @login_manager.user_loader
    def load_user(session_token):
        from models import User
        user = db.session.scalar(db.select(User).filter_by(session_token=session_token))
        return user if user is not None and not user.disabled else None
    csrf.init_app(app)
    limiter.init_app(app)  # console routes only (login, register); /v1: rate_limits.py

    from blueprints.admin.routes import bp as admin_bp
    from blueprints.api.routes import bp as api_bp
    from blueprints.auth.routes import bp as auth_bp
    from blueprints.dashboard.routes import bp as dashboard_bp
    from blueprints.keys.routes import bp as keys_bp
    from blueprints.logs.routes import bp as logs_bp
    from blueprints.wallet.routes import bp as wallet_bp
    for blueprint in (auth_bp, keys_bp, wallet_bp, logs_bp, dashboard_bp, admin_bp):
        app.register_blueprint(blueprint)
    app.register_blueprint(api_bp)
    csrf.exempt(api_bp)  # key-authenticated JSON API, no cookies

    import errors
    errors.register(app)
    import security_headers
    security_headers.register(app)
    app.jinja_env.filters["credits"] = format_credits
    from blueprints import console
    console.register(app)

    @app.get("/healthz")
    def healthz():
        """200 once the database answers ("degraded" while a configured Redis does not)."""
        try:
            db.session.execute(text("SELECT 1"))
        except Exception:  # noqa: BLE001 - any failure means unhealthy
            db.session.rollback()
            return jsonify(status="error", detail="database unreachable"), 503
        if redis_store.health() == "degraded":
            return jsonify(status="degraded", detail="redis unreachable: limits fail open")
        return jsonify(status="ok")

    @app.get("/metrics")
    def prometheus_metrics():
        """Prometheus text for every worker of this node (loopback, or the Bearer token)."""
        allowed, status = metrics.may_scrape(
            request.remote_addr, request.headers.get("X-Forwarded-For"),
            request.headers.get("Authorization"), app.config["METRICS_TOKEN"])
        if not allowed:
            return ("Not Found\n" if status == 404 else "Unauthorized\n"), status, \
                {"Content-Type": "text/plain"}
        body, content_type = metrics.exposition()
        return body, 200, {"Content-Type": content_type}


class SessionCookies(SecureCookieSessionInterface):
    """Session cookies are Secure when the public URL is https or the request came over https,
    directly or through a proxy's X-Forwarded-Proto, so plain-http localhost logins still work.
    (Believing the header is safe here: a client that lies only hardens its own cookie.)
    The remember-me cookie asks the same questions (extensions.LoginManager).

    The key-authenticated /v1 API gets a null session: it reads no cookie and never sets one,
    and skipping the signing serializer saves ~30 us of each API request on a slow core."""

    def open_session(self, app, request):
        if request.path.startswith("/v1/"):
            return None  # Flask's null session: readable as empty, never saved
        return super().open_session(app, request)

    def get_cookie_secure(self, app):
        return bool(app.config["SESSION_COOKIE_SECURE"]) or \
            (app.config.get("PUBLIC_URL") or "").startswith("https://") or request.is_secure or \
            request.headers.get("X-Forwarded-Proto", "").split(",")[0].strip() == "https"


def private_sqlite_file(uri):
    """Create a SQLite database file owner-only (0600) before SQLite does it with the umask's
    0644, and tighten one an older version created. SQLite gives its -wal and -shm files the
    database file's mode."""
    path = sqlite_wal.database_file(uri)
    if path is None:
        return
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        try:
            if os.stat(path).st_mode & 0o077:
                os.chmod(path, 0o600)
        except OSError:  # not ours (a shared file set up on purpose): leave it as it is
            pass


@event.listens_for(Engine, "do_connect")
def _patient_sqlite(dialect, conn_rec, cargs, cparams):
    """SQLite connections wait for a locked database without stalling a gevent worker
    (sqlite_wal.PatientConnection)."""
    if dialect.name == "sqlite":
        cparams.setdefault("factory", sqlite_wal.PatientConnection)


@event.listens_for(Engine, "connect")
def _sqlite_pragmas(dbapi_connection, connection_record):
    """WAL lets readers run beside the writer; a locked database is waited for, not failed
    (sqlite_wal.connection_pragmas)."""
    if isinstance(dbapi_connection, sqlite3.Connection):
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        sqlite_wal.connection_pragmas(cursor)
        cursor.close()
