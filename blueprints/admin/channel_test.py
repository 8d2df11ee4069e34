"""The console's Test button: one tiny chat request through a channel's own adaptor."""
import json
import time

from blueprints.api.errors import ApiError
from encryption import SecretUnreadable
from extensions import db

PING = "ping"


def test_channel(channel):
    """Send a one-token chat request through `channel`; returns (ok, latency_ms, message).

    Records the result on the channel: a success stores the latency and clears the
    failure count and cool-down, a failure stores the error. The caller commits.
    """
    # Imported here: the adaptor registry loads provider modules the console need not.
    from blueprints.api.providers import adaptor_for
    from blueprints.api.providers.base import Call, UpstreamFailure

    if not channel.model_rows:
        return _failed(channel, None, "This channel serves no models to test with.")
    first = channel.model_rows[0]
    body = {"model": first.upstream_name, "messages": [{"role": "user", "content": PING}],
            "max_tokens": 1}
    # raw_body too: adaptors forward it untouched when no field needs rewriting.
    call = Call(endpoint="chat", model=first.public_name, body=body,
                raw_body=json.dumps(body).encode(), content_type="application/json",
                request_id="channel-test")
    started = time.monotonic()
    try:
        reply = adaptor_for(channel).send(call)
        try:
            if reply.is_stream:  # an adaptor may stream anyway; drain it to time the whole call
                for _ in reply.chunks():
                    pass
        finally:
            reply.close()
    except UpstreamFailure as err:
        return _failed(channel, _elapsed_ms(started), _describe(err.message, err.status))
    except ApiError as err:
        return _failed(channel, _elapsed_ms(started), _describe(err.message, err.status))
    except Exception as err:  # noqa: BLE001 - a broken channel must not break the console
        return _failed(channel, _elapsed_ms(started), f"{type(err).__name__}: {err}")
    latency_ms = _elapsed_ms(started)
    channel.last_test_ms = latency_ms
    channel.fail_count = 0
    channel.cooldown_until = None
    channel.last_error = None
    db.session.add(channel)
    return True, latency_ms, f"{first.public_name} answered in {latency_ms} ms."


def _elapsed_ms(started):
    return max(int((time.monotonic() - started) * 1000), 0)


def _describe(message, status):
    return f"HTTP {status}: {message}" if status else str(message)


def _failed(channel, latency_ms, message):
    try:
        api_key = channel.api_key
    except SecretUnreadable:  # then the adaptor never had the key to echo
        api_key = ""
    channel.last_error = _without_key(message, api_key)[:2000]
    db.session.add(channel)
    return False, latency_ms, channel.last_error


def _without_key(text, api_key):
    """Upstreams sometimes echo the key in an error; never show it in the console."""
    text = str(text)
    return text.replace(api_key, "[upstream key]") if api_key and len(api_key) >= 4 else text


test_channel.__test__ = False  # pytest: a function, not a test, despite its name
