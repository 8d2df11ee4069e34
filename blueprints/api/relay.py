"""The relay pipeline: authenticate → parse → authorize → price → admit → reserve → forward →
settle → log.

Each step is one function below; `relay(endpoint)` runs them in order. Streams
are generators whose `finally` settles and logs, so a client that hangs up or
an upstream that breaks still ends in exactly one honest log row and charge.
"""
import ipaddress
import json
import time
from dataclasses import dataclass

from flask import Response, current_app, g, request, stream_with_context
from sqlalchemy import update

from blueprints.api import billing
from cache import TTLCache
from blueprints.api.client_watch import ClientGone, wait_for
from blueprints.api.errors import ApiError, stream_error_event, uses_anthropic_shape
import metrics
import rate_limits
from blueprints.api.providers import build_adaptor
from blueprints.api.providers.base import Call, StreamBroken, UpstreamFailure, Usage
from blueprints.api.request_log import add_request_log
from blueprints.api.routing import choose_channels, model_exists, note_failure, note_success
from blueprints.api.tokens import count_text, estimate_prompt_tokens, requested_output_cap
from extensions import db
from models import ApiKey, Group, Setting, User, split_list, utcnow

# Fields each JSON endpoint cannot do without (besides `model`).
REQUIRED_FIELDS = {
    "chat": ("messages",), "completions": ("prompt",), "embeddings": ("input",),
    "responses": ("input",), "images": ("prompt",), "audio_speech": ("input",),
    "messages": ("messages", "max_tokens"), "messages_count_tokens": ("messages",),
}
MULTIPART_ENDPOINTS = ("audio_transcriptions", "audio_translations")
# Endpoints whose answer is generated tokens (TPM admits their output cap too).
OUTPUT_ENDPOINTS = ("chat", "completions", "responses", "messages")

LAST_USED_RESOLUTION = 60  # seconds
_last_used_written = {}  # key hash -> monotonic time this worker last wrote last_used_at
_keys_by_hash = TTLCache(depends_on=(ApiKey, User, Group))
_settings = TTLCache(depends_on=(Setting,))


@dataclass(frozen=True)
class KeyInfo:
    """What the hot path needs to know about a key, its owner and their group."""
    id: int
    hash: str
    name: str
    user_id: int
    disabled: bool
    expires_at: object
    models: tuple
    networks: tuple
    rpm: int
    tpm: int
    concurrency: int
    user_disabled: bool
    group_models: str
    group_rpm: int
    group_tpm: int
    group_concurrency: int
    multiplier_ppm: int

    def may_use(self, model):
        group_ok = self.group_models.strip() == "*" or model in split_list(self.group_models)
        return group_ok and (not self.models or model in self.models)


@dataclass
class Flight:
    """Everything known about one request as it moves through the pipeline."""
    endpoint: str
    request_id: str
    started: float
    key: KeyInfo | None = None
    call: Call | None = None
    price: object = None
    prompt_estimate: int = 0
    hold: object = None
    route: object = None
    ttft_ms: int | None = None
    admission: object = None  # rate_limits.Admission: TPM reservation and concurrency slots


# --- the pipeline ------------------------------------------------------------------------

def relay(endpoint):
    """Serve one /v1 request end to end."""
    flight = Flight(endpoint, g.request_id, time.monotonic())
    metrics.request_started()
    try:
        flight.key = authenticate()
        flight.call = parse_call(endpoint, flight.request_id)
        authorize(flight.key, flight.call.model)
        flight.price = price_of(flight.call.model)
        flight.admission = admit(flight)
        flight.hold = reserve(flight)
        route, reply, first_chunk = forward(flight)
    except ApiError as err:
        finish(flight, None, status=_status_for(err.status), http_status=err.status,
               error=err.message)
        raise
    except Exception:
        finish(flight, None, status="Failed", http_status=500, error="internal gateway error")
        raise  # the app's error handler answers a 500 in the route's shape
    flight.route = route
    if reply.is_stream:
        return deliver_stream(flight, reply, first_chunk)
    return deliver_whole(flight, reply)


def count_message_tokens():
    """POST /v1/messages/count_tokens: a local, free count; nothing is reserved or logged."""
    from blueprints.api.providers.anthropic_convert import count_tokens
    key = authenticate()
    call = parse_call("messages_count_tokens", g.request_id)
    authorize(key, call.model)
    admission = admit(Flight("messages_count_tokens", g.request_id, time.monotonic(), key, call))
    rate_limits.release(admission)
    return count_tokens(call.body)


def authenticate():
    """The caller's key from `Authorization: Bearer` or `x-api-key`; 401 otherwise."""
    header = request.headers.get("Authorization", "")
    token = header[7:].strip() if header[:7].lower() == "bearer " else ""
    token = token or request.headers.get("x-api-key", "").strip()
    if not token:
        raise ApiError(401, "invalid_api_key",
                       "Missing API key: send `Authorization: Bearer sk-...` or `x-api-key`.")
    key = _keys_by_hash.get(ApiKey.hash_key(token), lambda: _load_key(ApiKey.hash_key(token)))
    if key is None:
        raise ApiError(401, "invalid_api_key", "Invalid API key.")
    if key.disabled:
        raise ApiError(401, "invalid_api_key", "This API key is disabled.")
    if key.user_disabled:
        raise ApiError(401, "invalid_api_key", "The account that owns this API key is disabled.")
    if key.expires_at is not None and key.expires_at <= utcnow():
        raise ApiError(401, "invalid_api_key", "This API key has expired.")
    return key


def _load_key(key_hash):
    row = db.session.scalar(db.select(ApiKey).filter_by(key_hash=key_hash))
    if row is None:
        return None
    user, group = row.user, row.user.group
    networks = []
    for cidr in row.ip_list:
        try:
            networks.append(ipaddress.ip_network(cidr, strict=False))
        except ValueError:
            current_app.logger.warning("key %s has a bad IP range %r", row.id, cidr)
    return KeyInfo(id=row.id, hash=key_hash, name=row.name, user_id=user.id, disabled=row.disabled,
                   expires_at=row.expires_at, models=tuple(row.model_list),
                   networks=tuple(networks), rpm=row.rpm or 0, tpm=row.tpm or 0,
                   concurrency=row.concurrency or 0,
                   user_disabled=user.disabled, group_models=group.models,
                   group_rpm=group.rpm or 0, group_tpm=group.tpm or 0,
                   group_concurrency=group.concurrency or 0,
                   multiplier_ppm=group.multiplier_ppm)


def parse_call(endpoint, request_id):
    """The request as a Call: 413 when too large, 400 when malformed or incomplete."""
    limit = current_app.config["MAX_BODY_BYTES"]
    if request.content_length is not None and request.content_length > limit:
        raise ApiError(413, "request_too_large",
                       f"Request body is larger than the {limit} bytes this gateway accepts.")
    headers = {name: value for name, value in request.headers.items()
               if name.lower().startswith("anthropic-")}
    if endpoint in MULTIPART_ENDPOINTS:
        return _parse_multipart(endpoint, request_id, headers)
    raw = request.get_data(cache=False)
    if len(raw) > limit:
        raise ApiError(413, "request_too_large",
                       f"Request body is larger than the {limit} bytes this gateway accepts.")
    try:
        body = json.loads(raw)
    except ValueError:
        raise ApiError(400, "invalid_request_error",
                       "We could not parse the JSON body of your request.") from None
    if not isinstance(body, dict):
        raise ApiError(400, "invalid_request_error", "The request body must be a JSON object.")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "invalid_request_error", "you must provide a model parameter",
                       param="model")
    for name in REQUIRED_FIELDS.get(endpoint, ()):
        if body.get(name) in (None, "", []):
            raise ApiError(400, "invalid_request_error", f"Missing required parameter: '{name}'.",
                           param=name)
    if endpoint in ("chat", "messages") and not isinstance(body["messages"], list):
        raise ApiError(400, "invalid_request_error", "'messages' must be an array.",
                       param="messages")
    stream = body.get("stream") is True
    options = body.get("stream_options")
    wants_usage = stream and isinstance(options, dict) and options.get("include_usage") is True
    return Call(endpoint=endpoint, model=model, body=body, raw_body=raw,
                content_type=request.content_type or "application/json", stream=stream,
                wants_usage=wants_usage, request_id=request_id, headers=headers)


def _parse_multipart(endpoint, request_id, headers):
    model = request.form.get("model")
    if not model:
        raise ApiError(400, "invalid_request_error", "you must provide a model parameter",
                       param="model")
    upload = request.files.get("file")
    if upload is None:
        raise ApiError(400, "invalid_request_error", "Missing required parameter: 'file'.",
                       param="file")
    files = [(name, f.filename or name, f.read(), f.mimetype or "application/octet-stream")
             for name, f in request.files.items(multi=True)]
    return Call(endpoint=endpoint, model=model, body={"model": model, **request.form.to_dict()},
                raw_body=b"", content_type=request.content_type, request_id=request_id,
                headers=headers, form=request.form.to_dict(), files=files)


def authorize(key, model):
    """IP allowlist, then the model: 404 when nothing serves it, 403 when not allowed."""
    if key.networks:
        try:
            address = ipaddress.ip_address(request.remote_addr or "")
        except ValueError:
            address = None
        if address is None or not any(address in net for net in key.networks):
            raise ApiError(403, "ip_not_allowed",
                           f"This API key may not be used from {request.remote_addr}.")
    if not model_exists(model):
        raise ApiError(404, "model_not_found",
                       f"The model `{model}` does not exist or is not served by this gateway.",
                       param="model")
    if not key.may_use(model):
        raise ApiError(403, "model_not_allowed",
                       f"This key or its group may not use the model `{model}`.", param="model")


def price_of(model):
    """The model's price; a model with no price row is refused (price 0 makes it free)."""
    price = billing.price_for(model)
    if price is None:
        raise ApiError(400, "model_price_missing",
                       f"The model `{model}` has no price set yet; ask an admin to set one.",
                       param="model")
    return price


def admit(flight):
    """429 unless the key's, then the user's RPM, TPM and concurrency limits all let the
    request in (it is then counted against all of them; a refused one against none)."""
    key, call = flight.key, flight.call
    tokens = 0
    if key.tpm or key.group_tpm:  # TPM admits the prompt estimate plus the output cap
        flight.prompt_estimate = estimate_prompt_tokens(call.body)
        cap = requested_output_cap(call.body, _default_output_cap()) \
            if flight.endpoint in OUTPUT_ENDPOINTS else 0
        tokens = flight.prompt_estimate + cap
    parties = (rate_limits.Party("key", key.id, key.rpm, key.tpm, key.concurrency, "this key"),
               rate_limits.Party("user", key.user_id, key.group_rpm, key.group_tpm,
                                 key.group_concurrency, "your group"))
    try:
        admission = rate_limits.admit(flight.request_id, parties, tokens)
    except rate_limits.RateLimited as refused:
        g.rate_limit_headers = refused.headers
        raise ApiError(429, refused.code, refused.message,
                       headers={"Retry-After": str(refused.retry_after)}) from None
    g.rate_limit_headers = rate_limits.headers(admission)
    return admission


def reserve(flight):
    """Hold the most this request can cost: prompt estimate + its output cap."""
    call = flight.call
    flight.prompt_estimate = estimate_prompt_tokens(call.body)
    cap = requested_output_cap(call.body, _default_output_cap())
    amount = billing.hold_estimate_micro(flight.price, flight.prompt_estimate, cap,
                                         flight.key.multiplier_ppm)
    return billing.reserve_credits(flight.key.user_id, flight.key.id, flight.request_id, amount)


def _default_output_cap():
    """The admin's setting if there is one, else TOKENOPEN_DEFAULT_OUTPUT_CAP."""
    override = _settings.get("default_output_cap", lambda: Setting.get("default_output_cap"))
    try:
        return int(override) if override else current_app.config["DEFAULT_OUTPUT_CAP"]
    except ValueError:
        return current_app.config["DEFAULT_OUTPUT_CAP"]


def forward(flight):
    """Try channels in order until one answers; retry only before the first byte."""
    failures = []
    for route in choose_channels(flight.call.model):
        adaptor = build_adaptor(route.target)
        reply = None
        renew = lambda: rate_limits.renew(flight.admission)  # noqa: E731
        try:
            reply = wait_for(lambda: adaptor.send(flight.call), renew)
            first_chunk = wait_for(lambda: next(reply.chunks(), b""), renew) \
                if reply.is_stream else None
        except ClientGone:  # nobody to answer: stop waiting, close the upstream, log 499
            if reply is not None:
                reply.close()
            raise ApiError(499, "client_closed_request",
                           "The client closed the connection before the first byte.") from None
        except UpstreamFailure as failure:
            if not failure.retryable and failure.status not in (401, 403):
                raise _client_error(failure) from None  # the request's own fault: pass it through
            note_failure(route.target, failure.message)
            failures.append(failure)
            continue
        except StreamBroken as err:  # broke before the first byte: still safe to retry
            reply.close()
            note_failure(route.target, str(err))
            failures.append(UpstreamFailure("bad_response", str(err)))
            continue
        flight.ttft_ms = _elapsed_ms(flight)
        note_success(route)
        return route, reply, first_chunk
    raise _no_channel_answered(flight.call.model, failures)


def _client_error(failure):
    """An upstream 4xx caused by the request itself goes back with its message."""
    return ApiError(failure.status, failure.error_code or "upstream_rejected", failure.message,
                    error_type=failure.error_type)


def _no_channel_answered(model, failures):
    """429 if every channel was rate-limited; else 504 (timeouts), 503 (unreachable) or 502."""
    if not failures:
        return ApiError(503, "upstream_error", f"No channel for `{model}` is available.")
    statuses = {f.status for f in failures}
    kinds = {f.kind for f in failures}
    tried = len(failures)
    if statuses == {429}:
        retry_after = max((int(f.retry_after) for f in failures
                           if str(f.retry_after or "").isdigit()), default=1)
        return ApiError(429, "rate_limit_exceeded",
                        f"Every upstream for `{model}` is rate-limited; retry shortly.",
                        headers={"Retry-After": str(retry_after)})
    if kinds <= {"timeout", "connect"} and "timeout" in kinds:
        return ApiError(504, "upstream_timeout",
                        f"The upstream for `{model}` did not answer in time ({tried} tried).")
    if kinds == {"connect"}:
        return ApiError(503, "upstream_error",
                        f"No upstream for `{model}` could be reached ({tried} tried).")
    last = failures[-1]
    detail = last.message if last.status not in (401, 403) else "the upstream refused the channel"
    return ApiError(502, "upstream_error",
                    f"The upstream for `{model}` failed ({tried} tried): {detail}")


def deliver_whole(flight, reply):
    """A whole body; settling and logging run after the bytes are handed to the server."""
    body = reply.body

    def send_then_settle():
        try:
            yield body
        finally:
            finish(flight, reply, status="Success", http_status=reply.status)

    response = Response(stream_with_context(send_then_settle()), status=reply.status,
                        content_type=reply.content_type)
    response.headers["Content-Length"] = str(len(body))
    return response


def deliver_stream(flight, reply, first_chunk):
    """Forward each event the moment it arrives; settle and log in the generator's finally."""
    anthropic = uses_anthropic_shape()

    def events():
        outcome = {"status": "Success", "http_status": 200, "error": None}
        try:
            if first_chunk:
                yield first_chunk
            for chunk in reply.chunks():
                yield chunk
                rate_limits.renew(flight.admission)  # at most every few seconds
        except StreamBroken as err:
            outcome.update(status="Timeout" if err.timeout else "Failed", error=str(err))
            yield stream_error_event(f"The upstream stream broke: {err}", anthropic)
        except GeneratorExit:
            outcome.update(status="Failed", http_status=499,
                           error="client closed the connection")
            raise
        except Exception:  # a bug must still end the stream cleanly, billed and logged
            current_app.logger.exception("stream %s failed", flight.request_id)
            outcome.update(status="Failed", error="internal gateway error")
            yield stream_error_event("The gateway failed while streaming.", anthropic,
                                     code="internal_error")
        finally:
            reply.close()
            finish(flight, reply, **outcome)

    response = Response(stream_with_context(events()), status=reply.status,
                        content_type=reply.content_type)
    response.headers["Cache-Control"] = "no-cache"
    response.headers["X-Accel-Buffering"] = "no"
    return response


def finish(flight, reply, status, http_status, error=None):
    """Settle the credits, write the log row and count tokens. Never raises: the response
    is already out, and a hold left behind by a failure here is released by the sweeper."""
    usage, charged = Usage(), 0
    try:
        usage, estimated = _metered_usage(flight, reply)
        charged, state = settle(flight, reply, usage, estimated)
        write_log(flight, usage, charged, state, estimated, status, http_status, error)
        db.session.commit()
    except Exception:  # noqa: BLE001
        db.session.rollback()
        current_app.logger.exception("could not settle/log request %s", flight.request_id)
    finally:
        release_limits(flight, usage)
        metrics.observe_request(flight, usage, charged, http_status)


def release_limits(flight, usage):
    """Give back the concurrency slots and correct the TPM reservation to the actual tokens."""
    try:
        rate_limits.release(flight.admission, usage.prompt_tokens + usage.completion_tokens)
    except Exception:  # noqa: BLE001 - the response is out; a lapsed lease frees the slots
        current_app.logger.exception("could not release the limits of %s", flight.request_id)


def settle(flight, reply, usage, estimated):
    """(charged micro-credits, billing state). Every request ends billed, estimated or void:
    void when nothing was generated (the hold goes back whole), else charged for the usage
    in the caller's transaction, so the charge and its log row commit together."""
    if flight.hold is None:
        return 0, "void"
    if reply is None or not (usage.prompt_tokens or usage.completion_tokens):
        billing.release_credits(flight.hold)
        return 0, "void"
    cost = billing.cost_micro(flight.price, usage.prompt_tokens, usage.completion_tokens,
                              usage.cached_tokens, flight.key.multiplier_ppm)
    charged = billing.settle_credits(flight.hold, cost, note=flight.call.model)
    return charged, "estimated" if estimated else "billed"


def write_log(flight, usage, charged, state, estimated, status, http_status, error):
    """The request's one RequestLog row (and its rollup), in the caller's transaction."""
    key, call, route = flight.key, flight.call, flight.route
    if key is not None and _last_used_is_stale(key.hash):
        # Lock order on every path: users -> api_keys -> usage_daily (no deadlocks on PG).
        db.session.execute(update(ApiKey).where(ApiKey.id == key.id)
                           .values(last_used_at=utcnow()))
    add_request_log(
        request_id=flight.request_id, user_id=key.user_id if key else None,
        key_id=key.id if key else None, key_name=key.name if key else None,
        model=call.model if call else None,
        channel_id=route.target.channel_id if route else None,
        channel_name=route.target.channel_name if route else None,
        endpoint=flight.endpoint, is_stream=bool(call and call.stream),
        prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens,
        cached_tokens=usage.cached_tokens, credits_micro=charged, status=status,
        http_status=http_status, latency_ms=_elapsed_ms(flight), ttft_ms=flight.ttft_ms,
        estimated=estimated, billing=state, error=error, client_ip=request.remote_addr)


def _last_used_is_stale(key_hash):
    """`last_used_at` is kept to the minute: one write per key per minute per worker."""
    now = time.monotonic()
    if now - _last_used_written.get(key_hash, -LAST_USED_RESOLUTION) < LAST_USED_RESOLUTION:
        return False
    if len(_last_used_written) > 100_000:
        _last_used_written.clear()
    _last_used_written[key_hash] = now
    return True


def _metered_usage(flight, reply):
    """Upstream usage when reported; otherwise counted locally and marked estimated."""
    if reply is None:
        return Usage(), False
    usage = reply.usage
    if usage.reported:
        return usage, False
    estimate = Usage(prompt_tokens=flight.prompt_estimate,
                     completion_tokens=count_text("".join(reply.output_text)))
    return estimate, True


def _status_for(http_status):
    return "Timeout" if http_status == 504 else "Failed"


def _elapsed_ms(flight):
    return int((time.monotonic() - flight.started) * 1000)
