"""The admin CLI (`flask --app app ...`), one module per area."""


def register(app):
    """Attach every command group to `app.cli`."""
    from cli import accounts, billing, channels, seed, setup
    for module in (setup, accounts, channels, billing, seed):
        module.register(app)
