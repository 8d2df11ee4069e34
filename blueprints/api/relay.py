"""The relay pipeline: authenticate → parse → authorize → price → admit → reserve → forward →
settle → log.

Each step is one function below; `relay(endpoint)` runs them in order. Streams
are generators whose `finally` settles and logs, so a client that hangs up or
an upstream that breaks still ends in exactly one honest log row and charge.
"""
import ipaddress
import json
import math
import time
from dataclasses import dataclass

from flask import Response, current_app, g, request, stream_with_context
from greenlet import getcurrent
from sqlalchemy.exc import SQLAlchemyError

import billing
import holds
import metrics
import rate_limits
import writer
from blueprints.api import inflight
from blueprints.api.client_watch import ClientGone, wait_for
from cache import TTLCache
from blueprints.api.errors import ApiError, stream_error_event, uses_anthropic_shape
from blueprints.api.providers import build_adaptor
from blueprints.api.providers.anthropic_convert import count_tokens as count_input_tokens
from blueprints.api.providers.anthropic_convert import messages_via_chat
from blueprints.api.providers.base import Call, StreamBroken, UpstreamFailure, Usage
from blueprints.api.routing import choose_channels, model_exists, note_failure, note_success
from blueprints.api.scrub import channel_secrets, scrub_upstream_text, storable_text
from blueprints.api.tokens import (admit_prompt_tokens, checkpoint_estimate,
                                   checkpoint_prompt_estimate, count_text,
                                   estimate_prompt_tokens, reserve_prompt_tokens)
from blueprints.api.tokens import ready as tokenizer_ready
from blueprints.api.validation import check_model_name, validate_body
from extensions import db
from models import ApiKey, Group, Setting, User, split_list, utcnow

# Fields each JSON endpoint cannot do without (besides `model`).
REQUIRED_FIELDS = {
    "chat": ("messages",), "completions": ("prompt",), "embeddings": ("input",),
    "responses": ("input",), "images": ("prompt",), "audio_speech": ("input",),
    "messages": ("messages", "max_tokens"), "messages_count_tokens": ("messages",),
}
MULTIPART_ENDPOINTS = ("audio_transcriptions", "audio_translations")
# The body fields that cap output tokens, per endpoint (the relay sends upstream exactly the
# cap it reserved for, in the field each provider honours: see Call.output_cap).
OUTPUT_CAP_FIELDS = {
    "chat": ("max_completion_tokens", "max_tokens"), "completions": ("max_tokens",),
    "responses": ("max_output_tokens",), "messages": ("max_tokens",),
}
MAX_OUTPUT_CAP = 2**31 - 1
MAX_CHOICES = 128
# Audio is reserved for as if it were 16 kbit/s (a lower bound for speech codecs): an upper
# bound of its seconds, from the upload's size alone.
AUDIO_BYTES_PER_SECOND = 2_000
# Reported usage beyond (prompt estimate + output caps) by this factor is not believed.
ABSURD_USAGE_FACTOR = 10
ABSURD_USAGE_FLOOR = 1_000

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
    prompt_estimate: int = 0  # what the hold reserved for the prompt (an upper bound)
    prompt_counted: int | None = None  # its exact count, once a reply without usage needs it
    choices: int = 1  # n (or best_of): how many outputs the cap applies to
    images: int = 0  # images asked for (reserved at the per-image price)
    seconds: int = 0  # upper bound of audio seconds (reserved at the per-second price)
    hold: object = None
    route: object = None
    reply: object = None
    ttft_ms: int | None = None
    client_ip: str | None = None
    admission: object = None  # rate_limits.Admission: TPM reservation and concurrency slots
    # Streams: what the hold keeper needs to checkpoint and, on shutdown, interrupt them.
    streaming: bool = False
    greenlet: object = None
    interrupted: str | None = None
    checkpointed: tuple = (0, 0, 0)
    counted: tuple = (0, 0)  # (output pieces counted, their tokens), counted incrementally
    finished: bool = False  # settled and logged (finish runs once)
    late: bool = False  # the sweeper settled this hold first (this worker missed its lease)

    @property
    def output_tokens_cap(self):
        """The most output tokens the request may produce, all choices together."""
        cap = self.call.output_cap if self.call is not None else None
        return (cap or 0) * self.choices


# --- the pipeline ------------------------------------------------------------------------

def relay(endpoint):
    """Serve one /v1 request end to end."""
    flight = Flight(endpoint, g.request_id, time.monotonic(), client_ip=request.remote_addr)
    metrics.request_started()
    try:
        flight.key = authenticate()
        flight.call = parse_call(endpoint, flight.request_id)
        authorize(flight.key, flight.call.model)
        flight.price = price_of(flight.call.model)
        flight.admission = admit(flight)
        flight.hold = reserve(flight)
        route, reply, first_chunk = forward(flight)
        flight.reply = reply
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
    key = authenticate()
    call = parse_call("messages_count_tokens", g.request_id)
    authorize(key, call.model)
    # Limited like every /v1 call (RPM, concurrency), but free: it leaves no tokens counted.
    admission = admit(Flight("messages_count_tokens", g.request_id, time.monotonic(), key, call))
    rate_limits.release(admission, actual_tokens=0)
    return count_input_tokens(call.body)


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
    headers = anthropic_headers(request.environ)
    if endpoint in MULTIPART_ENDPOINTS:
        return _parse_multipart(endpoint, request_id, headers)
    raw = request.get_data(cache=False)
    if len(raw) > limit:
        raise ApiError(413, "request_too_large",
                       f"Request body is larger than the {limit} bytes this gateway accepts.")
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):  # RecursionError: nested too deep to parse
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
    validate_body(endpoint, body)
    stream = body.get("stream") is True
    options = body.get("stream_options")
    wants_usage = stream and isinstance(options, dict) and options.get("include_usage") is True
    return Call(endpoint=endpoint, model=model, body=body, raw_body=raw,
                content_type=request.content_type or "application/json", stream=stream,
                wants_usage=wants_usage, request_id=request_id, headers=headers,
                output_cap=output_cap_of(endpoint, body))


def anthropic_headers(environ):
    """The client's anthropic-* headers, named as werkzeug names them ("Anthropic-Version"),
    read off the WSGI environ: request.headers rebuilds every header to iterate them."""
    return {name[5:].replace("_", "-").title(): value for name, value in environ.items()
            if name.startswith("HTTP_ANTHROPIC_")}


def output_cap_of(endpoint, body):
    """The output tokens per choice to reserve for and send: the smallest cap the client gave
    in the endpoint's fields, else the default cap; None for endpoints without output tokens."""
    fields = OUTPUT_CAP_FIELDS.get(endpoint)
    if fields is None:
        return None
    caps = [_bounded_int(body, name, 1, MAX_OUTPUT_CAP) for name in fields
            if body.get(name) is not None]
    return min(caps) if caps else _default_output_cap()


def _bounded_int(body, name, low, high):
    """body[name] as an int in [low, high], or a 400 naming the field."""
    value = body.get(name)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ApiError(400, "invalid_request_error",
                       f"'{name}' must be an integer from {low} to {high}.", param=name)
    return value


def _count_of(body, name, default=1):
    return default if body.get(name) is None else _bounded_int(body, name, 1, MAX_CHOICES)


def _parse_multipart(endpoint, request_id, headers):
    model = request.form.get("model")
    check_model_name(model)
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
    if key.tpm or key.group_tpm:  # TPM admits the prompt estimate plus the output caps
        flight.choices = measure(call)[0]
        tokens = admit_prompt_tokens(call.body) + flight.output_tokens_cap
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
    """Hold the most this request can cost: the prompt estimate, its output cap times its
    choices, its images and its audio seconds; 402 when the wallet or key cannot cover it."""
    call, key = flight.call, flight.key
    flight.prompt_estimate = reserve_prompt_tokens(call.body)
    flight.choices, flight.images, flight.seconds = measure(call)
    amount = billing.hold_micro(flight.price, flight.prompt_estimate, flight.output_tokens_cap,
                                key.multiplier_ppm, images=flight.images, seconds=flight.seconds)
    try:  # through the group-commit writer: returns once the hold is committed
        hold = writer.reserve_credits(
            key.user_id, key.id, flight.request_id, amount, holds.lease_seconds(),
            key_name=key.name, model=call.model, endpoint=flight.endpoint,
            is_stream=call.stream, client_ip=flight.client_ip)
    except holds.CreditsRefused as refused:
        raise ApiError(402, refused.code, str(refused)) from None
    if hold.held:
        inflight.register(flight)
    return hold


def measure(call):
    """(choices, images, audio seconds) the request may produce, for its hold."""
    body = call.body or {}
    if call.endpoint in ("chat", "completions"):
        choices = _count_of(body, "n")
        if call.endpoint == "completions":  # best_of completions are generated and billed
            choices = max(choices, _count_of(body, "best_of"))
        return choices, 0, 0
    if call.endpoint == "images":
        return 1, _count_of(body, "n"), 0
    if call.endpoint in MULTIPART_ENDPOINTS:
        size = sum(len(content) for _, _, content, _ in call.files)
        return 1, 0, max(1, math.ceil(size / AUDIO_BYTES_PER_SECOND))
    return 1, 0, 0


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
            reply = wait_for(lambda: send_call(adaptor, flight.call), renew)
            first_chunk = wait_for(lambda: next(reply.chunks(), b""), renew) \
                if reply.is_stream else None
        except ClientGone:  # nobody to answer: stop waiting, close the upstream, log 499
            if reply is not None:
                reply.close()
            raise ApiError(499, "client_closed_request",
                           "The client closed the connection before the first byte.") from None
        except UpstreamFailure as failure:
            _scrub_failure(failure, route.target)
            if not failure.retryable and failure.status not in (401, 403):
                raise _client_error(failure) from None  # the request's own fault: pass it through
            note_failure(route.target, failure.message)
            failures.append(failure)
            continue
        except StreamBroken as err:  # broke before the first byte: still safe to retry
            reply.close()
            message = _scrubbed(err, route.target)
            note_failure(route.target, message)
            failures.append(UpstreamFailure("bad_response", message))
            continue
        flight.ttft_ms = _elapsed_ms(flight)
        note_success(route)
        return route, reply, first_chunk
    raise _no_channel_answered(flight.call.model, failures)


def send_call(adaptor, call):
    """Send `call` through `adaptor`: Anthropic Messages go natively to adaptors that speak
    them, and through the adaptor's chat (converted both ways) to the others."""
    if call.endpoint == "messages" and not hasattr(adaptor, "send_messages"):
        return messages_via_chat(adaptor, call)
    return adaptor.send(call)


def _scrubbed(text, target):
    """Upstream text without the channel's key(s) and host, or anything key/address-shaped."""
    return scrub_upstream_text(text, channel_secrets(target.api_key, target.base_url))


def _scrub_failure(failure, target):
    failure.message = _scrubbed(failure.message, target)
    failure.args = (failure.message,)


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
    """A whole body: settled and logged first (one transaction), then handed to the client,
    so a worker that dies while sending has already billed what the upstream produced."""
    finish(flight, reply, status="Success", http_status=reply.status)
    response = Response(reply.body, status=reply.status, content_type=reply.content_type)
    response.headers.update(reply.headers)
    return response


def deliver_stream(flight, reply, first_chunk):
    """Forward each event the moment it arrives; settle and log in the generator's finally.
    While it runs, the hold keeper checkpoints what it has delivered (inflight.py)."""
    anthropic = uses_anthropic_shape()

    def events():
        flight.greenlet = getcurrent()
        flight.streaming = True
        outcome = {"status": "Success", "http_status": 200, "error": None}
        try:
            if first_chunk:
                yield first_chunk
            for chunk in reply.chunks():
                if ends_stream(chunk):  # bill before the client sees the stream complete
                    finish(flight, reply, **outcome)
                yield chunk
                rate_limits.renew(flight.admission)  # at most every few seconds
        except (StreamBroken, inflight.StreamInterrupted) as err:
            reason = flight.interrupted or _scrubbed(err, flight.route.target)
            timed_out = getattr(err, "timeout", False) and not flight.interrupted
            outcome.update(status="Timeout" if timed_out else "Failed", error=reason)
            message = reason if flight.interrupted else f"The upstream stream broke: {reason}"
            yield stream_error_event(message, anthropic)
        except GeneratorExit:
            outcome.update(status="Failed", http_status=499,
                           error=flight.interrupted or "client closed the connection")
            raise
        except Exception:  # a bug must still end the stream cleanly, billed and logged
            current_app.logger.exception("stream %s failed", flight.request_id)
            outcome.update(status="Failed", error="internal gateway error")
            yield stream_error_event("The gateway failed while streaming.", anthropic,
                                     code="internal_error")
        finally:
            flight.streaming = False
            reply.close()
            finish(flight, reply, **outcome)

    response = Response(stream_with_context(events()), status=reply.status,
                        content_type=reply.content_type)
    response.headers.update(reply.headers)
    response.headers["Cache-Control"] = "no-cache"
    response.headers["X-Accel-Buffering"] = "no"
    return response


# The events that tell a client a stream is complete, in each wire format we answer in.
TERMINAL_EVENTS = (b"event: message_stop", b"event:message_stop",
                   b"event: response.completed", b"event:response.completed")


def ends_stream(chunk):
    """True for the event that completes a stream (the relay settles before sending it)."""
    if chunk[:5] == b"data:":
        return chunk[5:].lstrip().startswith(b"[DONE]")
    return chunk.startswith(TERMINAL_EVENTS)


def finish(flight, reply, status, http_status, error=None):
    """Settle the credits and write the log row in one transaction. Never raises and never
    loses a charge: on a database error the settlement is retried by the hold keeper (which
    keeps the lease alive meanwhile); on any other failure the hold is left to its lease,
    and the sweeper settles it at its last checkpoint."""
    if flight.finished:
        return
    flight.finished = True
    usage, tally = Usage(), {"charged": 0}
    try:
        usage, estimated = metered_usage(flight, reply)
        cost = _cost(flight, usage) if reply is not None else 0
        unit = settlement(flight, reply, usage, cost, estimated, status, http_status, error)
    except Exception:  # noqa: BLE001
        current_app.logger.exception("could not meter request %s", flight.request_id)
        inflight.forget(flight)
        release_limits(flight, usage)
        metrics.observe_request(flight, usage, 0, http_status)
        return

    def settle_and_log():  # returns once committed, batched with other requests' (writer.py)
        charged, _, flight.late = writer.settle(unit)
        tally["charged"] = charged

    try:
        settle_and_log()
    except SQLAlchemyError as err:
        if flight.hold is not None and flight.hold.held:  # money: retried until it lands
            current_app.logger.error("settling %s failed (%s); the hold keeper will retry",
                                     flight.request_id, type(err).__name__)
            inflight.defer(flight, settle_and_log)
        else:  # nothing held: only the log row of a refused request is lost
            current_app.logger.error("could not log request %s: database unavailable (%s)",
                                     flight.request_id, type(err).__name__)
    except Exception:  # noqa: BLE001
        current_app.logger.exception("could not settle/log request %s", flight.request_id)
    finally:
        inflight.forget(flight)
        release_limits(flight, usage)
        metrics.observe_request(flight, usage, tally["charged"], http_status)


def release_limits(flight, usage):
    """Give back the concurrency slots and correct the TPM reservation to the actual tokens."""
    try:
        rate_limits.release(flight.admission, usage.prompt_tokens + usage.completion_tokens)
    except Exception:  # noqa: BLE001 - the response is out; a lapsed lease frees the slots
        current_app.logger.exception("could not release the limits of %s", flight.request_id)


def _cost(flight, usage):
    return billing.usage_cost_micro(flight.price, usage, flight.key.multiplier_ppm)


def delivered_so_far(flight):
    """(usage, cost) of what a live stream has delivered: the hold keeper's checkpoint."""
    reply = flight.reply
    usage = reply.usage
    if not usage.reported:
        pieces, tokens = flight.counted
        new = reply.output_text[pieces:]
        if not tokenizer_ready():  # estimates now, not the keeper waiting for the tables
            prompt = checkpoint_prompt_estimate(flight.call.body) if flight.call else 0
            usage = _estimated_usage(flight, reply, tokens + checkpoint_estimate("".join(new)),
                                     prompt=prompt)
        else:
            if new:
                tokens += count_text("".join(new))
                flight.counted = (pieces + len(new), tokens)
            usage = _estimated_usage(flight, reply, tokens)
    return usage, _cost(flight, usage)


def settlement(flight, reply, usage, cost, estimated, status, http_status, error):
    """The request's settlement and log row, as one unit for the group-commit writer: the
    hold released and the actual cost charged (void, the hold back whole, only when nothing
    came back upstream; a hold the sweeper settled first is charged the rest late and its
    log row corrected), plus the request's one RequestLog row and its rollup."""
    key, call, route = flight.key, flight.call, flight.route
    return writer.Settle(
        hold=flight.hold, cost=cost, note=call.model if call else None,
        delivered=reply is not None, estimated=estimated,
        touch_key=key.id if key is not None and _last_used_is_stale(key.hash) else None,
        log=dict(
            request_id=flight.request_id, user_id=key.user_id if key else None,
            key_id=key.id if key else None, key_name=key.name if key else None,
            model=call.model if call else None,
            channel_id=route.target.channel_id if route else None,
            channel_name=route.target.channel_name if route else None,
            endpoint=flight.endpoint, is_stream=bool(call and call.stream),
            prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens,
            cached_tokens=usage.cached_tokens, status=status, http_status=http_status,
            latency_ms=_elapsed_ms(flight), ttft_ms=flight.ttft_ms, estimated=estimated,
            error=storable_text(error, 2000), client_ip=flight.client_ip))


def _last_used_is_stale(key_hash):
    """`last_used_at` is kept to the minute: one write per key per minute per worker."""
    now = time.monotonic()
    if now - _last_used_written.get(key_hash, -LAST_USED_RESOLUTION) < LAST_USED_RESOLUTION:
        return False
    if len(_last_used_written) > 100_000:
        _last_used_written.clear()
    _last_used_written[key_hash] = now
    return True


def metered_usage(flight, reply):
    """(usage, estimated): the upstream's final usage when it reported a believable one;
    otherwise what was delivered, counted locally, and marked estimated."""
    if reply is None:
        return Usage(), False
    usage = reply.usage
    if usage.reported and _believable(flight, usage):
        return usage, False
    return _estimated_usage(flight, reply, count_text("".join(reply.output_text))), True


def _believable(flight, usage):
    """Whole non-negative numbers within 10x of what the request could produce (SPEC §10)."""
    fields = (usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens,
              usage.cache_write_tokens, usage.images, usage.seconds)
    if getattr(usage, "garbled", False) or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in fields):
        return False
    bound = _absurd_bound(flight)
    return (usage.prompt_tokens + usage.completion_tokens <= bound
            and usage.cached_tokens + usage.cache_write_tokens <= usage.prompt_tokens
            and usage.images <= ABSURD_USAGE_FACTOR * max(flight.images, 1)
            and usage.seconds <= ABSURD_USAGE_FACTOR * max(flight.seconds, 1) + 60)


def _absurd_bound(flight):
    return ABSURD_USAGE_FACTOR * (flight.prompt_estimate + flight.output_tokens_cap) \
        + ABSURD_USAGE_FLOOR


def _estimated_usage(flight, reply, counted_output, prompt=None):
    """Usage from what we know: believable partial numbers, else the local counts (`prompt`:
    the prompt's count when the caller has one, else it is counted here)."""
    reported = reply.usage
    bound = _absurd_bound(flight)

    def sane(value, limit=bound):
        ok = isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= limit
        return value if ok else 0

    prompt = sane(reported.prompt_tokens) or (_counted_prompt(flight) if prompt is None
                                              else prompt)
    cached = sane(reported.cached_tokens, prompt)
    # Images and audio seconds nobody reported are taken at what was asked / reserved for.
    images = sane(reported.images, ABSURD_USAGE_FACTOR * max(flight.images, 1)) or flight.images
    seconds = sane(reported.seconds, ABSURD_USAGE_FACTOR * max(flight.seconds, 1)) \
        or flight.seconds
    return Usage(prompt_tokens=prompt,
                 completion_tokens=max(sane(reported.completion_tokens), counted_output),
                 cached_tokens=cached,
                 cache_write_tokens=sane(reported.cache_write_tokens, prompt - cached),
                 images=images, seconds=seconds)


def _counted_prompt(flight):
    """The prompt's exact count, for billing a reply without usage: the hold's estimate of a
    short prompt is an upper bound (a token per byte), too much to charge."""
    if flight.prompt_counted is None:
        flight.prompt_counted = estimate_prompt_tokens(flight.call.body) if flight.call else 0
    return flight.prompt_counted


def _status_for(http_status):
    return "Timeout" if http_status == 504 else "Failed"


def _elapsed_ms(flight):
    return int((time.monotonic() - flight.started) * 1000)
