"""Extension instances, created once and bound to the app in create_app."""
import os
from datetime import datetime, timedelta, timezone

import flask_login
from flask import current_app, session
from flask_login.utils import encode_cookie
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy.orm import DeclarativeBase


class Base(DeclarativeBase):
    pass


class LoginManager(flask_login.LoginManager):
    """Flask-Login whose "remember me" cookie carries exactly the session cookie's flags.

    Flask-Login reads fixed REMEMBER_COOKIE_* settings, while the session cookie decides
    Secure per request (app.SessionCookies); a remember cookie without it would travel
    over plain http and outlive the session it copies.
    """

    def _set_cookie(self, response):
        app = current_app._get_current_object()
        cookies = app.session_interface
        duration = session.get("_remember_seconds")
        duration = (timedelta(seconds=duration) if duration is not None
                    else app.config.get("REMEMBER_COOKIE_DURATION", timedelta(days=30)))
        response.set_cookie(
            app.config.get("REMEMBER_COOKIE_NAME", "remember_token"),
            value=encode_cookie(str(session["_user_id"])),
            expires=datetime.now(timezone.utc) + duration,
            domain=app.config.get("REMEMBER_COOKIE_DOMAIN"),
            path=app.config.get("REMEMBER_COOKIE_PATH", "/"),
            secure=cookies.get_cookie_secure(app),
            httponly=cookies.get_cookie_httponly(app),
            samesite=cookies.get_cookie_samesite(app),
        )


db = SQLAlchemy(model_class=Base)
login_manager = LoginManager()


def __getattr__(name):
    """`limiter` and `csrf` are made on first import, by the web app: Flask-Limiter with its
    storage backends and Flask-WTF with WTForms cost every admin CLI start ~0.1 s, and the
    CLI neither limits nor posts forms."""
    if name == "limiter":
        from flask_limiter import Limiter
        from flask_limiter.util import get_remote_address

        class ConsoleLimiter(Limiter):
            """No default limits: the gateway applies per-user/per-key limits itself
            (rate_limits.py) and console routes opt in (login brute-force limiting), so the
            app-wide check before each request has nothing to find under /v1. Skipping it
            there saves ~50 us of every API request on a slow core; the decorated console
            routes are checked by their decorators (in_middleware=False) as before."""

            def _check_request_limit(self, callable_name=None, in_middleware=True):
                from flask import request
                if in_middleware and request.path.startswith("/v1/"):
                    return None
                return super()._check_request_limit(callable_name, in_middleware)

            def init_app(self, app):
                """Its hooks after each request (headers, deductions, then the context's
                release) have nothing to do under /v1 either: ~17 us of every API request.
                They run for the console only."""
                super().init_app(app)
                for hooks in (app.after_request_funcs[None], app.teardown_request_funcs[None]):
                    hooks[:] = [_console_only(hook) if _bound_to(hook, self) else hook
                                for hook in hooks]
        globals()["limiter"] = ConsoleLimiter(key_func=get_remote_address, default_limits=[])
    elif name == "csrf":
        from flask_wtf.csrf import CSRFProtect
        globals()["csrf"] = CSRFProtect()
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return globals()[name]


def _bound_to(hook, owner):
    """Whether `hook` is a method of `owner`, plain or wrapped in functools.partial."""
    bound = getattr(hook, "args", ())[:1] if getattr(hook, "func", None) is not None else ()
    return getattr(hook, "__self__", None) is owner or (bound != () and bound[0] is owner)


def _console_only(hook):
    """`hook` (after_request or teardown_request) skipped for /v1 requests."""
    from flask import request

    def outside_the_api(response_or_error):
        if request.path.startswith("/v1/"):
            return response_or_error
        return hook(response_or_error)
    return outside_the_api


def bind_migrations(app):
    """Bind Flask-Migrate to `app` on first use and return it. Alembic takes a third of a
    CLI start to import, and only `flask db`, init-db and bootstrap run migrations."""
    if "migrate" not in app.extensions:
        from flask_migrate import Migrate
        # render_as_batch: SQLite needs table rebuilds for ALTERs.
        Migrate(app, db, directory=os.path.join(app.root_path, "migrations"),
                render_as_batch=True)
    return app.extensions["migrate"].migrate
