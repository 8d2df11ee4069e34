"""users, keys and groups commands."""


def register(app):
    pass
