"""The admin CLI (`flask --app app ...`), one module per area."""


def register(app):
    """Attach every command group to `app.cli`."""
    from cli import accounts, billing, channels, logs, seed, setup
    for module in (setup, accounts, channels, billing, seed, logs):
        module.register(app)
