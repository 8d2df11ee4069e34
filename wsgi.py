"""gunicorn entry point: gevent patches the standard library before anything else loads."""
import os

if not os.environ.get("FLASK_RUN_FROM_CLI"):
    from gevent import monkey

    monkey.patch_all()

from app import create_app  # noqa: E402

app = create_app()
