"""First-start setup and upgrades: the default group, the first admin, encrypted channel keys."""
import secrets

from encryption import SecretUnreadable
from extensions import db
from models import ApiKey, Channel, Group, ModelPrice, User

DEFAULT_GROUP = "default"
STARTER_MODEL = "tokenopen-mock"


def ensure_default_group():
    """The group new users join: all models, RPM 60, multiplier 1."""
    group = db.session.scalar(db.select(Group).filter_by(name=DEFAULT_GROUP))
    if group is None:
        group = Group(name=DEFAULT_GROUP, models="*", rpm=60, tpm=0, multiplier_ppm=1_000_000)
        db.session.add(group)
        db.session.flush()
    return group


def create_user(email, password, is_admin=False, group_name=None):
    """Create a user in `group_name` (or the default group). Raises ValueError on bad input."""
    email = (email or "").strip().lower()
    if "@" not in email or len(email) > 254:
        raise ValueError(f"not an email address: {email!r}")
    if not password or len(password) < 8:
        raise ValueError("password must be at least 8 characters")
    if db.session.scalar(db.select(User).filter_by(email=email)):
        raise ValueError(f"a user with email {email} already exists")
    if group_name:
        group = db.session.scalar(db.select(Group).filter_by(name=group_name))
        if group is None:
            raise ValueError(f"no such group: {group_name}")
    else:
        group = ensure_default_group()
    user = User(email=email, is_admin=is_admin, group_id=group.id, balance_micro=0,
                reserved_micro=0)
    user.set_password(password)
    db.session.add(user)
    db.session.flush()
    return user


def ensure_starter_channel(admin):
    """On a brand-new install: a free built-in mock model and a key, so a first call works
    before any upstream is configured. Returns the starter key, or None if channels exist."""
    if db.session.scalar(db.select(Channel).limit(1)) is not None:
        return None
    channel = Channel(name="built-in mock", type="mock", base_url="", api_key="")
    channel.set_models(STARTER_MODEL)
    db.session.add(channel)
    if db.session.scalar(db.select(ModelPrice).filter_by(model=STARTER_MODEL)) is None:
        db.session.add(ModelPrice(model=STARTER_MODEL, input_micro=0, output_micro=0,
                                  per_request_micro=0))
    key, full_key = ApiKey.generate(admin, "starter key")
    db.session.add(key)
    return full_key


def bootstrap_admin(app):
    """Create the first admin if there is none.

    Returns None when an admin existed, else (email, password or None, starter key or None).
    """
    ensure_default_group()
    if db.session.scalar(db.select(User).filter_by(is_admin=True).limit(1)):
        db.session.commit()
        return None
    email = app.config["ADMIN_EMAIL"] or "admin@localhost"
    password = app.config["ADMIN_PASSWORD"] or secrets.token_urlsafe(12)
    admin = create_user(email, password, is_admin=True)
    starter_key = ensure_starter_channel(admin)
    db.session.commit()
    return email, (None if app.config["ADMIN_PASSWORD"] else password), starter_key


def reencrypt_channel_keys():
    """Store every channel's upstream key under the first encryption key (plain-text keys of
    older versions included) and commit. Returns (re-encrypted count, unreadable channel names).
    """
    changed, unreadable = 0, []
    for channel in db.session.scalars(db.select(Channel).order_by(Channel.id)):
        try:
            changed += channel.reencrypt_key()
        except SecretUnreadable:
            unreadable.append(channel.name)
    db.session.commit()
    return changed, unreadable
