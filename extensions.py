"""Extension instances, created once and bound to the app in create_app."""
from flask_limiter import Limiter
from flask_limiter.util import get_remote_address
from flask_login import LoginManager
from flask_migrate import Migrate
from flask_sqlalchemy import SQLAlchemy
from flask_wtf.csrf import CSRFProtect
from sqlalchemy.orm import DeclarativeBase


class Base(DeclarativeBase):
    pass


db = SQLAlchemy(model_class=Base)
migrate = Migrate(render_as_batch=True)  # SQLite needs table rebuilds for ALTERs
login_manager = LoginManager()
csrf = CSRFProtect()
# No default limits: the gateway applies per-user/per-key limits itself and
# console routes opt in (login brute-force limiting).
limiter = Limiter(key_func=get_remote_address, default_limits=[])
