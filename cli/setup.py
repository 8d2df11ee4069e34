"""init-db and bootstrap: what `make run` does before serving."""
import click
from flask import current_app
from flask_migrate import upgrade

from bootstrap import bootstrap_admin, ensure_default_group
from extensions import db


def register(app):
    @app.cli.command("init-db")
    def init_db():
        """Create or migrate the database to the latest schema (idempotent)."""
        upgrade()
        ensure_default_group()
        db.session.commit()
        click.echo("database is up to date")

    @app.cli.command("bootstrap")
    def bootstrap():
        """Migrate, then create the first admin if none exists and print its password once."""
        upgrade()
        created = bootstrap_admin(current_app)
        if created:
            email, password = created
            if password:
                click.echo(f"Created admin {email} with password: {password}")
                click.echo("This password is shown only once; change it after logging in.")
            else:
                click.echo(f"Created admin {email} (password from TOKENOPEN_ADMIN_PASSWORD)")
