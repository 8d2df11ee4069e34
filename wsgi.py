"""gunicorn entry point: gevent patches the standard library before anything else loads."""
import os

if not os.environ.get("FLASK_RUN_FROM_CLI"):
    from gevent import monkey

    monkey.patch_all()

import blueprints.api.relay  # noqa: E402,F401 - load the hot path now, not on the first request
from app import create_app  # noqa: E402

app = create_app()
