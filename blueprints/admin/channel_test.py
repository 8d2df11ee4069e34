"""The console's Test button: one tiny chat request through a channel's own adaptor."""
import json
import re
import time
from urllib.parse import urlsplit

from blueprints.api.errors import ApiError
from blueprints.api.scrub import channel_secrets, scrub_upstream_text
from encryption import SecretUnreadable
from extensions import db
from models import utcnow

PING = "ping"


def test_channel(channel):
    """Send a one-token chat request through `channel`; returns (ok, latency_ms, message).

    Records the result on the channel (time, pass/fail): a success stores the latency and
    clears the failure count and cool-down, a failure stores the error, which the channel's
    health then shows. The caller commits.
    """
    # Imported here: the adaptor registry loads provider modules the console need not.
    from blueprints.api.providers import adaptor_for
    from blueprints.api.providers.base import Call, UpstreamFailure

    if not channel.model_rows:
        return _failed(channel, None, "This channel serves no models to test with.",
                           from_upstream=False)
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
        if err.kind in ("connect", "timeout"):
            return _failed(channel, _elapsed_ms(started), _transport_error(channel, err),
                           from_upstream=False)  # our own words: the host the admin set
        return _failed(channel, _elapsed_ms(started), _describe(err.message, err.status))
    except ApiError as err:
        return _failed(channel, _elapsed_ms(started), _describe(err.message, err.status))
    except Exception as err:  # noqa: BLE001 - a broken channel must not break the console
        return _failed(channel, _elapsed_ms(started), f"{type(err).__name__}: {err}")
    latency_ms = _elapsed_ms(started)
    channel.last_test_ms = latency_ms
    channel.last_test_at = utcnow()
    channel.last_test_ok = True
    channel.fail_count = 0
    channel.cooldown_until = None
    channel.last_error = None
    db.session.add(channel)
    return True, latency_ms, f"{first.public_name} answered in {latency_ms} ms."


def _elapsed_ms(started):
    return max(int((time.monotonic() - started) * 1000), 0)


def _describe(message, status):
    return f"HTTP {status}: {message}" if status else str(message)


def _failed(channel, latency_ms, message, from_upstream=True):
    if from_upstream:  # upstreams sometimes echo the key: scrubbed as the relay scrubs it
        try:
            api_key = channel.api_key
        except SecretUnreadable:  # then the adaptor never had the key to echo
            api_key = ""
        message = scrub_upstream_text(message, channel_secrets(api_key, channel.base_url))
    channel.last_test_at = utcnow()
    channel.last_test_ok = False
    channel.last_error = str(message)[:2000]
    db.session.add(channel)
    return False, latency_ms, channel.last_error


CAUSES = (  # what the socket said -> what an admin can act on
    (re.compile(r"refused", re.I), "connection refused: nothing is listening at that address"),
    (re.compile(r"Name or service not known|nodename nor servname|getaddrinfo|"
                r"Temporary failure in name resolution|NameResolution", re.I),
     "the host name does not resolve"),
    (re.compile(r"CERTIFICATE_VERIFY_FAILED|SSLError|certificate", re.I),
     "TLS failed: the certificate was not accepted"),
    (re.compile(r"timed out|Timeout", re.I), "no answer in time"),
    (re.compile(r"unreachable", re.I), "the network is unreachable"),
    (re.compile(r"reset by peer|RemoteDisconnected|aborted", re.I),
     "the upstream closed the connection"),
)


def _transport_error(channel, err):
    """'Could not connect to api.example.com:443: connection refused ...': the host the admin
    configured and the cause, from the requests exception the adaptor chained."""
    parts = urlsplit(channel.base_url or "")
    host = parts.hostname or "the upstream"
    port = parts.port or {"https": 443, "http": 80}.get(parts.scheme)
    where = f"{host}:{port}" if port else host
    original = err.__context__
    detail = f"{type(original).__name__}: {original}" if original is not None else err.message
    cause = next((text for pattern, text in CAUSES if pattern.search(detail)), None)
    if cause is None:
        cause = type(original).__name__ if original is not None else err.message
    import requests  # here, not at the top: every CLI start imports this module
    if err.kind == "timeout" or isinstance(original, requests.Timeout):
        cause = "no answer in time"
    return f"Could not connect to {where} ({channel.base_url}): {cause}."


test_channel.__test__ = False  # pytest: a function, not a test, despite its name
