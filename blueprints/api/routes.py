"""The /v1 gateway endpoints. Thin: each hands its endpoint name to the relay."""
import time
from datetime import datetime, timezone

from flask import Blueprint, g, jsonify, request

import billing
from cache import answering
from blueprints.api.errors import ApiError, uses_anthropic_shape
from blueprints.api.openapi import openapi_document
from extensions import db
from models import ApiKey, Channel, ChannelModel
from request_log import new_request_id

bp = Blueprint("api", __name__, url_prefix="/v1")


# The relay and its upstream clients are imported on first use, so the admin CLI builds the
# app without them; wsgi.py imports them up front, before a worker's first request.
def relay(endpoint):
    """Run the relay pipeline for `endpoint`. Cached values are not reloaded ahead until it
    has its answer (a stream: its first chunk), so no reload holds that answer back."""
    from blueprints.api.relay import relay as run
    with answering():
        return run(endpoint)


def authenticate():
    """The request's API key (401 otherwise)."""
    from blueprints.api.relay import authenticate as check
    return check()


def count_message_tokens():
    """The /v1/messages/count_tokens answer."""
    from blueprints.api.relay import count_message_tokens as count
    return count()


@bp.before_app_request
def assign_request_id():
    """Every response carries x-request-id; the log row stores the same id."""
    if request.path.startswith("/v1"):
        g.request_id = new_request_id()


@bp.after_app_request
def expose_request_id(response):
    request_id = g.get("request_id")
    if request_id:
        response.headers["x-request-id"] = request_id
        # OpenAI's x-ratelimit-* headers, when a limit applies to this request (rate_limits.py)
        response.headers.update(g.get("rate_limit_headers") or {})
    return response


@bp.post("/chat/completions")
def chat_completions():
    return relay("chat")


@bp.post("/completions")
def completions():
    return relay("completions")


@bp.post("/embeddings")
def embeddings():
    return relay("embeddings")


@bp.post("/responses")
def responses():
    return relay("responses")


@bp.post("/images/generations")
def images_generations():
    return relay("images")


@bp.post("/audio/speech")
def audio_speech():
    return relay("audio_speech")


@bp.post("/audio/transcriptions")
def audio_transcriptions():
    return relay("audio_transcriptions")


@bp.post("/audio/translations")
def audio_translations():
    return relay("audio_translations")


@bp.post("/messages")
def messages():
    return relay("messages")


@bp.post("/messages/count_tokens")
def messages_count_tokens():
    return jsonify(count_message_tokens())


@bp.get("/openapi.json")
def openapi_json():
    """The OpenAPI 3 description of these routes (no key needed: it holds no secrets)."""
    return jsonify(openapi_document())


# --- models -------------------------------------------------------------------------------

def _model_object(name, created):
    """A model as OpenAI lists it, or as Anthropic does for Anthropic SDK clients."""
    if uses_anthropic_shape():
        when = datetime.fromtimestamp(created, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        return {"type": "model", "id": name, "display_name": name, "created_at": when}
    return {"id": name, "object": "model", "created": created, "owned_by": "tokenopen"}


def _usable_models(key):
    rows = db.session.execute(
        db.select(ChannelModel.public_name, db.func.min(Channel.created_at))
        .join(Channel, Channel.id == ChannelModel.channel_id)
        .where(Channel.enabled.is_(True)).group_by(ChannelModel.public_name)
        .order_by(ChannelModel.public_name)).all()
    return [(name, int(created.timestamp()) if created else int(time.time()))
            for name, created in rows if key.may_use(name)]


@bp.get("/models")
def list_models():
    """Only the models this key may use."""
    key = authenticate()
    data = [_model_object(name, created) for name, created in _usable_models(key)]
    if uses_anthropic_shape():
        return jsonify(data=data, has_more=False, first_id=data[0]["id"] if data else None,
                       last_id=data[-1]["id"] if data else None)
    return jsonify(object="list", data=data)


@bp.get("/models/<path:model_id>")
def retrieve_model(model_id):
    key = authenticate()
    for name, created in _usable_models(key):
        if name == model_id:
            return jsonify(_model_object(name, created))
    raise ApiError(404, "model_not_found", f"The model `{model_id}` does not exist.",
                   param="model")


# --- the legacy billing endpoints chat front-ends poll --------------------------------------

def _key_and_user():
    key = db.session.get(ApiKey, authenticate().id)
    return key, key.user


@bp.get("/dashboard/billing/subscription")
def billing_subscription():
    key, user = _key_and_user()
    return jsonify(billing.subscription_summary(user, key))


@bp.get("/dashboard/billing/usage")
def billing_usage():
    key, user = _key_and_user()
    try:
        body = billing.usage_total(user, key, request.args.get("start_date"),
                                   request.args.get("end_date"))
    except ValueError as err:
        raise ApiError(400, "invalid_request_error", str(err)) from None
    return jsonify(body)
