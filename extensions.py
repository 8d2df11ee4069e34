"""Extension instances, created once and bound to the app in create_app."""
import os

from flask_limiter import Limiter
from flask_limiter.util import get_remote_address
from flask_login import LoginManager
from flask_sqlalchemy import SQLAlchemy
from flask_wtf.csrf import CSRFProtect
from sqlalchemy.orm import DeclarativeBase


class Base(DeclarativeBase):
    pass


db = SQLAlchemy(model_class=Base)
login_manager = LoginManager()
csrf = CSRFProtect()
# No default limits: the gateway applies per-user/per-key limits itself and
# console routes opt in (login brute-force limiting).
limiter = Limiter(key_func=get_remote_address, default_limits=[])


def bind_migrations(app):
    """Bind Flask-Migrate to `app` on first use and return it. Alembic takes a third of a
    CLI start to import, and only `flask db`, init-db and bootstrap run migrations."""
    if "migrate" not in app.extensions:
        from flask_migrate import Migrate
        # render_as_batch: SQLite needs table rebuilds for ALTERs.
        Migrate(app, db, directory=os.path.join(app.root_path, "migrations"),
                render_as_batch=True)
    return app.extensions["migrate"].migrate
