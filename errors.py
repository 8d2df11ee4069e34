"""One place that decides how errors look: API shapes under /v1, HTML pages elsewhere."""
from flask import render_template, request
from jinja2 import TemplateNotFound
from sqlalchemy import exc as sa_exc
from werkzeug.exceptions import HTTPException

from blueprints.api.errors import ApiError, error_response
from extensions import db

# What SQLAlchemy raises when the database cannot be reached (or the pool cannot connect).
DATABASE_DOWN = (sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.DisconnectionError,
                 sa_exc.TimeoutError)
DATABASE_DOWN_MESSAGE = ("The gateway cannot reach its database right now; nothing was charged. "
                         "Retry in a few seconds.")

API_CODES = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large",
             400: "invalid_request_error", 429: "rate_limit_exceeded"}


def _is_api():
    return request.path.startswith("/v1/") or request.path == "/v1"


def _html(status, title, message):
    try:
        return render_template(f"errors/{status}.html", title=title, message=message), status
    except TemplateNotFound:
        return render_template("errors/generic.html", status=status, title=title,
                               message=message), status


def register(app):
    """Attach the error handlers to `app`."""

    @app.errorhandler(ApiError)
    def api_error(err):
        return error_response(err)

    @app.errorhandler(HTTPException)
    def http_error(err):
        if _is_api():
            message = err.description or err.name
            if err.code == 404:
                message = f"Unknown endpoint: {request.method} {request.path}"
            elif err.code == 413:
                message = "Request body is larger than this gateway accepts."
            return error_response(ApiError(err.code, API_CODES.get(err.code, err.name.lower()),
                                           message))
        return _html(err.code, err.name, err.description)

    @app.errorhandler(Exception)
    def server_error(err):
        try:
            db.session.rollback()
        except Exception:  # noqa: BLE001 - the database may be what failed
            pass
        if isinstance(err, DATABASE_DOWN):
            return database_unavailable(app, err)
        app.logger.exception("unhandled error on %s %s", request.method, request.path)
        if _is_api():
            return error_response(ApiError(500, "internal_error", "Internal gateway error."))
        return _html(500, "Internal Server Error", "Something went wrong on our side.")


def database_unavailable(app, err):
    """503 service_unavailable (type api_error) in the route's shape, or a 503 page."""
    app.logger.error("database unreachable on %s %s: %s", request.method, request.path,
                     str(err).splitlines()[0] if str(err) else err.__class__.__name__)
    if _is_api():
        response = error_response(ApiError(503, "service_unavailable", DATABASE_DOWN_MESSAGE,
                                           error_type="api_error"))
        response.headers["Retry-After"] = "5"
        return response
    return render_template("errors/503.html", message=DATABASE_DOWN_MESSAGE), 503, \
        {"Retry-After": "5"}
