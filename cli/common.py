"""Helpers shared by the CLI modules: look-ups and parsing that fail cleanly (non-zero exit)."""
import json
from datetime import datetime

import click

from extensions import db
from models import Channel, Group, User
from money import parse_credits

MIN_PASSWORD = 8  # the same rule bootstrap.create_user applies


def fail(message):
    """Print `message` to stderr and exit 1 without a traceback (nothing is committed)."""
    raise click.ClickException(message)


def user_or_fail(email):
    """The user with `email` (case-insensitive), or a clean failure."""
    user = db.session.scalar(db.select(User).filter_by(email=(email or "").strip().lower()))
    if user is None:
        fail(f"no user with email {email}")
    return user


def group_or_fail(name):
    """The group called `name`, or a clean failure."""
    group = db.session.scalar(db.select(Group).filter_by(name=name))
    if group is None:
        fail(f"no group named {name}")
    return group


def channel_or_fail(name):
    """The channel called `name`, or a clean failure."""
    channel = db.session.scalar(db.select(Channel).filter_by(name=name))
    if channel is None:
        fail(f"no channel named {name}")
    return channel


def credits_or_fail(text, allow_negative=False):
    """Credits as typed ('1.5') -> micro-credits, or a usage error (exit 2) saying why."""
    try:
        return parse_credits(text, allow_negative=allow_negative)
    except ValueError as err:
        raise click.BadParameter(str(err)) from None


def password_or_fail(password):
    """Refuse passwords shorter than the console accepts."""
    if not password or len(password) < MIN_PASSWORD:
        fail(f"password must be at least {MIN_PASSWORD} characters")
    return password


def iso(moment):
    """A datetime as ISO 8601 text for JSON output; None stays None."""
    return moment.isoformat(timespec="seconds") if isinstance(moment, datetime) else None


def echo_json(data):
    """Print `data` as indented JSON on stdout."""
    click.echo(json.dumps(data, indent=2))
