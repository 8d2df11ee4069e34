"""OpenAI- and Anthropic-shaped error bodies for the /v1 routes."""
import json

from flask import jsonify, request

OPENAI_TYPES = {
    400: "invalid_request_error", 404: "invalid_request_error", 405: "invalid_request_error",
    413: "invalid_request_error", 401: "authentication_error", 402: "insufficient_quota",
    403: "permission_error", 429: "rate_limit_error",
}
ANTHROPIC_TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 402: "billing_error",
    403: "permission_error", 404: "not_found_error", 405: "invalid_request_error",
    413: "request_too_large", 429: "rate_limit_error", 503: "overloaded_error",
    529: "overloaded_error",
}


class ApiError(Exception):
    """An error the gateway answers with; `code` is SPEC §5's specific code."""

    def __init__(self, status, code, message, param=None, headers=None, error_type=None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.param = param
        self.headers = headers or {}
        self.error_type = error_type  # set when passing an upstream's own type through


def uses_anthropic_shape(path=None):
    """Anthropic's shape for the Messages routes, and for the model list when an Anthropic
    SDK asks (it always sends `anthropic-version`)."""
    path = path if path is not None else request.path
    if path.startswith("/v1/messages"):
        return True
    return path.startswith("/v1/models") and "anthropic-version" in request.headers


def openai_error_body(status, code, message, param=None, error_type=None):
    return {"error": {"message": message,
                      "type": error_type or OPENAI_TYPES.get(status, "upstream_error"),
                      "param": param, "code": code}}


def anthropic_error_body(status, message, error_type=None):
    return {"type": "error",
            "error": {"type": error_type or ANTHROPIC_TYPES.get(status, "api_error"),
                      "message": message}}


def error_body(err, anthropic=None):
    """The JSON body for `err` in the shape of the current route."""
    if anthropic is None:
        anthropic = uses_anthropic_shape()
    if anthropic:
        return anthropic_error_body(err.status, err.message, _anthropic_type(err))
    return openai_error_body(err.status, err.code, err.message, err.param, err.error_type)


def _anthropic_type(err):
    # Anthropic's own type names differ from OpenAI's; only pass through ones it defines.
    if err.error_type in set(ANTHROPIC_TYPES.values()) | {"api_error"}:
        return err.error_type
    return None


def error_response(err, anthropic=None):
    """A Flask response for an ApiError."""
    response = jsonify(error_body(err, anthropic))
    response.status_code = err.status
    for name, value in err.headers.items():
        response.headers[name] = value
    return response


def stream_error_event(message, anthropic, code="stream_interrupted"):
    """The one SSE event that ends a stream the upstream broke (SPEC §9)."""
    if anthropic:
        body = {"type": "error", "error": {"type": "api_error", "message": message}}
        return b"event: error\ndata: " + json.dumps(body).encode() + b"\n\n"
    body = {"error": {"message": message, "type": "upstream_error", "code": code}}
    return b"data: " + json.dumps(body).encode() + b"\n\n"
