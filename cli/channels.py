"""channels commands."""


def register(app):
    pass
