"""prices, credits, codes and billing commands."""


def register(app):
    pass
