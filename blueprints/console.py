"""What every console page shares: the notices above the content and number formatting."""
from flask import request
from flask_login import current_user

from bootstrap import BOOTSTRAP_PASSWORD_SETTING
from extensions import db
from models import MICRO, Setting, User


def format_number(value):
    """39677827 -> '39,677,827' (counts people read at a glance)."""
    return f"{int(value or 0):,}"


def format_credits_short(micro, places=2):
    """Credits for totals and charts: 12_511_634 -> '12.51', 1_234_000_000 -> '1,234'; tiny
    non-zero amounts keep their first significant digits instead of showing 0."""
    micro = int(micro or 0)
    value = micro / MICRO
    if micro and abs(value) < 10 ** -places:
        return f"{value:.6f}".rstrip("0")
    text = f"{value:,.{places}f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


def admin_contacts(limit=2):
    """E-mail addresses of enabled admins a member can ask for credits."""
    return db.session.scalars(db.select(User.email).filter_by(is_admin=True, disabled=False)
                              .order_by(User.id).limit(limit)).all()


def console_notices():
    """Notices for the signed-in user: no credits to call with, a printed password to change."""
    if not current_user.is_authenticated:
        return {}
    notices = {}
    # Members see it everywhere but admin pages; an admin (who may never call the API) only
    # where calls start: the overview and the keys.
    pages = ("/", "/keys") if current_user.is_admin else None
    if current_user.available_micro <= 0 and not request.path.startswith("/admin") and \
            (pages is None or request.path in pages):
        notices["no_credits"] = {"admins": [] if current_user.is_admin else admin_contacts()}
    if current_user.is_admin and \
            Setting.get(BOOTSTRAP_PASSWORD_SETTING) == current_user.password_hash:
        notices["bootstrap_password"] = True
    return notices


def register(app):
    """Template helpers and filters for every console page."""
    app.jinja_env.filters["number"] = format_number
    app.jinja_env.filters["credits_short"] = format_credits_short
    app.context_processor(lambda: {"console_notices": console_notices})
