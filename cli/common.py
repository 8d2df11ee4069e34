"""Helpers shared by the CLI modules: clean failures with a non-zero exit."""
import click

from extensions import db
from models import User
from money import parse_credits


def fail(message):
    """Print `message` to stderr and exit 2 (bad arguments) without a traceback."""
    raise click.ClickException(message)


def user_or_fail(email):
    user = db.session.scalar(db.select(User).filter_by(email=(email or "").strip().lower()))
    if user is None:
        fail(f"no user with email {email}")
    return user


def credits_or_fail(text, allow_negative=False):
    try:
        return parse_credits(text, allow_negative=allow_negative)
    except ValueError as err:
        fail(str(err))
