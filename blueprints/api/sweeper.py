"""Releases reservations stranded by a dead worker: once at worker start, then periodically."""
import threading
import time

from blueprints.api.billing import sweep_reservations


def sweep_once(app):
    """One sweep inside an app context; failures are logged, never raised."""
    with app.app_context():
        try:
            released = sweep_reservations()
            if released:
                app.logger.warning("released %d stale credit reservation(s)", released)
        except Exception:  # noqa: BLE001 - a sweep must never take the worker down
            app.logger.exception("reservation sweep failed")


def start_sweeper(app):
    """Sweep now and every SWEEP_INTERVAL seconds in a daemon thread (a greenlet under gevent)."""
    interval = app.config["SWEEP_INTERVAL"]

    def loop():
        sweep_once(app)
        while interval > 0:
            time.sleep(interval)
            sweep_once(app)

    threading.Thread(target=loop, name="reservation-sweeper", daemon=True).start()
