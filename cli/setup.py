"""init-db and bootstrap: what `make run` does before serving."""
import os

import click
from flask import current_app
from flask_migrate import upgrade

from bootstrap import STARTER_MODEL, bootstrap_admin, ensure_default_group, reencrypt_channel_keys
from extensions import db


def register(app):
    @app.cli.command("init-db")
    def init_db():
        """Create or migrate the database to the latest schema (idempotent)."""
        upgrade()
        ensure_default_group()
        db.session.commit()
        _encrypt_channel_keys()
        click.echo("database is up to date")

    @app.cli.command("bootstrap")
    def bootstrap():
        """Migrate, then create the first admin if none exists and print its password once."""
        upgrade()
        created = bootstrap_admin(current_app)
        _encrypt_channel_keys()
        if created:
            email, password, starter_key = created
            if password:
                click.echo(f"Created admin {email} with password: {password}")
                click.echo("This password is shown only once; change it after logging in.")
            else:
                click.echo(f"Created admin {email} (password from TOKENOPEN_ADMIN_PASSWORD)")
            if starter_key:
                click.echo(_first_call(starter_key))


def _encrypt_channel_keys():
    """Upgrading installs: channel keys stored in plain text (or under a retired encryption
    key) are re-encrypted under the current one on every start."""
    changed, unreadable = reencrypt_channel_keys()
    if changed:
        click.echo(f"encrypted the upstream keys of {changed} channel(s)")
    for name in unreadable:
        click.echo(f"warning: the API key of channel {name} cannot be decrypted with "
                   f"TOKENOPEN_ENCRYPTION_KEY or the secret key; it is not routed", err=True)


def _first_call(key):
    """A curl line that works right away against the built-in mock model."""
    base = current_app.config["PUBLIC_URL"] or \
        f"http://{os.environ.get('HOST', '127.0.0.1')}:{os.environ.get('PORT', '8000')}"
    return (f"\nTry it (built-in mock model, free; this key is shown only once):\n"
            f"  curl {base}/v1/chat/completions \\\n"
            f"    -H 'Authorization: Bearer {key}' -H 'Content-Type: application/json' \\\n"
            f"    -d '{{\"model\": \"{STARTER_MODEL}\", "
            f"\"messages\": [{{\"role\": \"user\", \"content\": \"Hello\"}}]}}'\n")
