"""Settings from TOKENOPEN_* environment variables, read when the app is built."""
import os
import secrets
import tempfile
from datetime import timedelta


def _int(env, name, default):
    value = env.get(name)
    return int(value) if value not in (None, "") else default


def _secret_key(instance_path):
    """Read the session key from the instance folder, creating it once."""
    path = os.path.join(instance_path, "secret_key")
    try:
        with open(path) as fh:
            return fh.read().strip()
    except FileNotFoundError:
        pass
    # Several processes may start at once (gunicorn workers, test runners): each writes a
    # whole key to its own file and links it into place; the first link wins and everyone
    # reads the winner, so nobody sees a missing or half-written key.
    fd, draft = tempfile.mkstemp(dir=instance_path, prefix=".secret_key.")
    try:
        with os.fdopen(fd, "w") as fh:  # mkstemp creates it owner-only (0600)
            fh.write(secrets.token_hex(32))
        try:
            os.link(draft, path)
        except FileExistsError:
            pass
    finally:
        os.unlink(draft)
    with open(path) as fh:
        return fh.read().strip()


def _engine_options(database_url):
    """A dead PostgreSQL must fail a request in seconds (503), not hang it."""
    options = {"pool_pre_ping": True}
    if database_url.startswith("postgresql"):
        options.update(pool_timeout=5, connect_args={"connect_timeout": 3})
    return options


def load_config(instance_path, env=None):
    """Return the app settings: defaults, overridden by TOKENOPEN_* variables."""
    env = os.environ if env is None else env
    # Owner-only: the instance folder holds the secret key and, by default, the database.
    os.makedirs(instance_path, mode=0o700, exist_ok=True)
    redis_url = env.get("TOKENOPEN_REDIS_URL") or None
    database_url = env.get("TOKENOPEN_DATABASE_URL") or (
        "sqlite:///" + os.path.join(instance_path, "tokenopen.db"))
    return {
        "SQLALCHEMY_DATABASE_URI": database_url,
        "SECRET_KEY": env.get("TOKENOPEN_SECRET_KEY") or _secret_key(instance_path),
        # Fernet key(s) for upstream keys at rest, comma-separated, the first encrypts;
        # unset: derived from SECRET_KEY (encryption.py).
        "ENCRYPTION_KEY": env.get("TOKENOPEN_ENCRYPTION_KEY") or None,
        "REDIS_URL": redis_url,
        # Flask-Limiter storage: exact in memory with one worker, shared in Redis.
        "RATELIMIT_STORAGE_URI": redis_url or "memory://",
        "RATELIMIT_HEADERS_ENABLED": False,
        # Fixed windows count every token even past a TPM limit (see rate_limits.py).
        "RATELIMIT_STRATEGY": "fixed-window",
        "ADMIN_EMAIL": env.get("TOKENOPEN_ADMIN_EMAIL") or None,
        "ADMIN_PASSWORD": env.get("TOKENOPEN_ADMIN_PASSWORD") or None,
        "PUBLIC_URL": (env.get("TOKENOPEN_PUBLIC_URL") or "").rstrip("/") or None,
        "REGISTRATION": env.get("TOKENOPEN_REGISTRATION", "open"),
        "UPSTREAM_TIMEOUT": _int(env, "TOKENOPEN_UPSTREAM_TIMEOUT", 600),
        "UPSTREAM_CONNECT_TIMEOUT": _int(env, "TOKENOPEN_UPSTREAM_CONNECT_TIMEOUT", 5),
        # Overall deadline of one upstream stream, besides the per-read timeout (SPEC §10).
        "STREAM_MAX_SECONDS": _int(env, "TOKENOPEN_STREAM_MAX_SECONDS", 3600),
        # Upstream answers larger than this are refused (502), never buffered whole.
        "MAX_RESPONSE_BYTES": _int(env, "TOKENOPEN_MAX_RESPONSE_BYTES", 64 * 1024 * 1024),
        "MAX_BODY_BYTES": _int(env, "TOKENOPEN_MAX_BODY_BYTES", 32 * 1024 * 1024),
        # Werkzeug stops reading past this too, even for bodies sent without Content-Length.
        "MAX_CONTENT_LENGTH": _int(env, "TOKENOPEN_MAX_BODY_BYTES", 32 * 1024 * 1024),
        "DEFAULT_OUTPUT_CAP": _int(env, "TOKENOPEN_DEFAULT_OUTPUT_CAP", 4096),
        # Seconds a worker may serve a key/channel/price from its own cache.
        "CACHE_TTL": _int(env, "TOKENOPEN_CACHE_TTL", 2),
        # Channel health: failures in a row before a cool-down, and its length.
        "CHANNEL_FAILURES_BEFORE_COOLDOWN": _int(env, "TOKENOPEN_CHANNEL_FAILURES", 3),
        "CHANNEL_COOLDOWN_SECONDS": _int(env, "TOKENOPEN_CHANNEL_COOLDOWN", 60),
        # Holds (SPEC §10): a hold whose worker stops renewing its lease for this long is
        # settled by the sweeper at its last checkpoint; open streams are checkpointed this often.
        "HOLD_LEASE_SECONDS": _int(env, "TOKENOPEN_HOLD_LEASE_SECONDS", 60),
        "CHECKPOINT_SECONDS": float(env.get("TOKENOPEN_CHECKPOINT_SECONDS") or 2),
        "SWEEP_INTERVAL": _int(env, "TOKENOPEN_SWEEP_INTERVAL", 20),
        # SIGTERM lets streams finish for this long, then interrupts them, billed and logged.
        "DRAIN_SECONDS": _int(env, "TOKENOPEN_DRAIN_SECONDS", 60),
        # Requests in flight hold a slot on a lease the relay renews; a dead worker's lapse.
        "LIMIT_LEASE_SECONDS": _int(env, "TOKENOPEN_LIMIT_LEASE_SECONDS", 30),
        "METRICS_TOKEN": env.get("TOKENOPEN_METRICS_TOKEN") or None,
        "LOG_RETENTION_DAYS": _int(env, "TOKENOPEN_LOG_RETENTION_DAYS", 0),
        # A dead Redis must not take the console's login limiting down with it.
        "RATELIMIT_SWALLOW_ERRORS": True,
        "RATELIMIT_IN_MEMORY_FALLBACK_ENABLED": True,
        "RATELIMIT_STORAGE_OPTIONS": {"socket_timeout": 0.5, "socket_connect_timeout": 0.5},
        "LOGIN_LIMIT": env.get("TOKENOPEN_LOGIN_LIMIT", "10 per minute"),
        # Every POST /register counts, per client IP: account floods and e-mail probing.
        "REGISTER_LIMIT": env.get("TOKENOPEN_REGISTER_LIMIT", "10 per hour"),
        "WTF_CSRF_TIME_LIMIT": None,
        "SESSION_COOKIE_HTTPONLY": True,
        "SESSION_COOKIE_SAMESITE": "Lax",
        # The remember cookie takes the session cookie's flags (extensions.LoginManager).
        "REMEMBER_COOKIE_DURATION": timedelta(days=30),
        "SQLALCHEMY_ENGINE_OPTIONS": _engine_options(database_url),
    }
