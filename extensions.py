"""Extension instances, created once and bound to the app in create_app."""
from datetime import datetime, timedelta, timezone

import flask_login
from flask import current_app, session
from flask_limiter import Limiter
from flask_limiter.util import get_remote_address
from flask_login.utils import encode_cookie
from flask_migrate import Migrate
from flask_sqlalchemy import SQLAlchemy
from flask_wtf.csrf import CSRFProtect
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
migrate = Migrate(render_as_batch=True)  # SQLite needs table rebuilds for ALTERs
login_manager = LoginManager()
csrf = CSRFProtect()
# No default limits: the gateway applies per-user/per-key limits itself and
# console routes opt in (login brute-force limiting).
limiter = Limiter(key_func=get_remote_address, default_limits=[])
