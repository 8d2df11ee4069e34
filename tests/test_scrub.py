"""Upstream secrets never reach a member (issue 10, findings 1 and 2).

Unit tests of blueprints/api/scrub.py, then the live gateway against a fake upstream that
quotes the key it was sent (fault-leak-key*) or names an internal host (fault-leak-host):
the key and the addresses are absent from the /v1 answer, the 502 detail, the stream's error
event, request_logs.error, the channel's last error, the member's /logs page and /logs.csv.
"""
import re

import anthropic
import openai
import pytest
import requests

from blueprints.api.providers.base import Adaptor, StreamBroken, Target, UpstreamFailure
from blueprints.api.upstream_http import ConnectFailed, ConnectionBroken, UpstreamHTTP
from blueprints.api.scrub import channel_secrets, scrub_upstream_text, storable_text
from tests.support import free_port

UPSTREAM_KEY = "sk-UPSTREAM-3f9c2a7b1e5d4c8a9b0f"


# --- unit: the scrubber --------------------------------------------------------------------

@pytest.mark.parametrize("text, gone, kept", [
    (f"Incorrect API key provided: Bearer {UPSTREAM_KEY}. See https://platform.openai.com/"
     f"account/api-keys?key={UPSTREAM_KEY}", [UPSTREAM_KEY, "platform.openai.com"],
     ["Incorrect API key provided"]),
    ("Incorrect API key provided: sk-ups***cret.", ["sk-ups", "cret"],
     ["Incorrect API key provided"]),
    ("invalid x-api-key: sk-ant-api03-AbCdEf123456", ["sk-ant", "AbCdEf123456"],
     ["invalid x-api-key"]),
    ("API key not valid: AIzaSyA1234567890abcdefghijklmnopqrstu", ["AIzaSyA1234567890"],
     ["API key not valid"]),
    ('sent headers {"Authorization": "Basic dXNlcjpwYXNz", "x-goog-api-key": "g00gle"}',
     ["dXNlcjpwYXNz", "g00gle"], ["sent headers"]),
    ("GET /models?alt=sse&key=plainsecret&x=1 failed", ["plainsecret"], ["failed"]),
    ("HTTPConnectionPool(host='127.0.0.1', port=8081): Max retries exceeded with url: "
     "/v1/chat/completions (Caused by NewConnectionError('<urllib3.connection.HTTPConnection "
     "object at 0x7f3a2c1b5d10>: Failed to establish a new connection'))",
     ["127.0.0.1", "8081", "/v1/chat/completions", "0x7f3a2c1b5d10", "HTTPConnectionPool"],
     ["Max retries exceeded", "Failed to establish a new connection"]),
    ("connect to 10.0.0.5:8000, [::1]:9000 and localhost:8080 refused",
     ["10.0.0.5", "8000", "::1", "localhost"], ["refused"]),
    ("The model `gpt-5` does not exist or you do not have access to it.", [],
     ["The model `gpt-5` does not exist or you do not have access to it."]),
])
def test_scrub_removes_credentials_and_addresses_keeps_the_meaning(text, gone, kept):
    clean = scrub_upstream_text(text)
    for secret in gone:
        assert secret not in clean
    for meaning in kept:
        assert meaning in clean


def test_scrub_removes_the_channels_own_keys_and_host_whatever_their_shape():
    secrets = channel_secrets("local-vllm-secret, second-key-2", "http://gpu-box.lan:8000/")
    assert secrets == ("local-vllm-secret", "second-key-2", "gpu-box.lan")
    text = "token local-vllm-secret refused by gpu-box.lan (also second-key-2)"
    assert scrub_upstream_text(text, secrets) == "token [redacted] refused by [redacted] " \
                                                 "(also [redacted])"
    assert scrub_upstream_text(None) is None


def test_storable_text_drops_what_a_database_cannot_store():
    assert storable_text("model \ud800 and \x00nul") == "model ? and nul"
    assert storable_text("x" * 50, 10) == "x" * 10


def test_upstream_failures_and_stream_breaks_are_scrubbed_when_made():
    failure = UpstreamFailure("status", f"bad key Bearer {UPSTREAM_KEY}", status=400)
    assert UPSTREAM_KEY not in failure.message and UPSTREAM_KEY not in str(failure)
    assert UPSTREAM_KEY not in str(StreamBroken(f"auth failed: {UPSTREAM_KEY}"))


class RaisingClient:
    """An upstream_http.UpstreamHTTP stand-in whose post raises a transport error chained to
    a socket error that names the host, as a resolver or proxy may."""

    def __init__(self, error):
        self.error = error

    def post(self, url, body, headers, timeout):
        raise self.error from OSError("[Errno 111] Connection refused: 10.9.8.7:8443")


@pytest.mark.parametrize("error", [
    ConnectFailed("connect timeout", timed_out=True), ConnectFailed("ConnectionRefusedError"),
    ConnectionBroken("ConnectionResetError"),
])
def test_transport_errors_do_not_name_the_upstream(error):
    target = Target(1, "c", "openai", "http://10.9.8.7:8443", UPSTREAM_KEY, "m")
    adaptor = Adaptor(target, RaisingClient(error), (1, 1))
    with pytest.raises(UpstreamFailure) as caught:
        adaptor.http_post("http://10.9.8.7:8443/v1/chat/completions", b"{}", {})
    assert caught.value.kind == "connect"
    for leak in ("10.9.8.7", "8443", "/v1/chat"):
        assert leak not in caught.value.message


def test_a_refused_connection_does_not_name_the_upstream():
    """The real client against a port nobody listens on."""
    port = free_port()
    target = Target(1, "c", "openai", f"http://127.0.0.1:{port}", UPSTREAM_KEY, "m")
    adaptor = Adaptor(target, UpstreamHTTP(), (1, 1))
    with pytest.raises(UpstreamFailure) as caught:
        adaptor.http_post(f"http://127.0.0.1:{port}/v1/chat/completions", b"{}", {})
    assert caught.value.kind == "connect"
    assert "127.0.0.1" not in caught.value.message and str(port) not in caught.value.message


def test_admin_channel_test_uses_the_same_scrubber(app, fake_upstream):
    from blueprints.admin.channel_test import test_channel
    from extensions import db
    from models import Channel
    from tests.support import make_channel
    with app.app_context():
        channel_id = make_channel("leaky", base_url=fake_upstream.url, api_key=UPSTREAM_KEY,
                                  models="gpt-4o-mini=fault-leak-key")
        channel = db.session.get(Channel, channel_id)
        ok, _, message = test_channel(channel)
        assert not ok and "Incorrect API key provided" in message
        assert UPSTREAM_KEY not in message and UPSTREAM_KEY not in channel.last_error
        assert "127.0.0.1" not in message


# --- live: what a member meets -------------------------------------------------------------

def leaky_member(gw, models, channel_type="openai", **channel):
    """A member whose model is served by a channel with UPSTREAM_KEY on the fake upstream."""
    gw.user("member@example.com", credits=100)
    gw.user("member-pw@example.com", credits=0)
    for public, upstream in models:
        gw.channel(name=f"ch-{upstream}", models=f"{public}={upstream}", type=channel_type,
                   api_key=UPSTREAM_KEY, **channel)
        gw.price(public)
    return gw.key("member@example.com")


def console_session(gw, email="member@example.com", password="password123"):
    """A logged-in browser-like session on the live console (CSRF token from the form)."""
    session = requests.Session()
    page = session.get(gw.url + "/login", timeout=10).text
    token = re.search(r'name="csrf_token"[^>]*value="([^"]+)"', page).group(1)
    response = session.post(gw.url + "/login", timeout=10, allow_redirects=False,
                            data={"email": email, "password": password, "csrf_token": token})
    assert response.status_code == 302
    return session


def assert_nowhere(gw, secrets, responses=()):
    """None of `secrets` in the responses, the log rows, the channels, /logs or /logs.csv."""
    rows = gw.wait_logs(1)
    session = console_session(gw)
    logs_page = session.get(gw.url + "/logs", timeout=10)
    csv_page = session.get(gw.url + "/logs.csv", timeout=10)
    assert logs_page.status_code == 200 and csv_page.status_code == 200
    from models import Channel
    from extensions import db
    channel_errors = gw.run(lambda: [c.last_error or "" for c in
                                     db.session.scalars(db.select(Channel))])
    places = {"log rows": " ".join(r["error"] or "" for r in rows),
              "/logs": logs_page.text, "/logs.csv": csv_page.text,
              "channels.last_error": " ".join(channel_errors)}
    places.update({f"response {i}": text for i, text in enumerate(responses)})
    for where, text in places.items():
        for secret in secrets:
            assert secret not in text, f"{secret!r} leaked into {where}"
    return rows


def test_upstream_400_quoting_the_key_reaches_the_member_without_it(live):
    key = leaky_member(live, [("gpt-4o-mini", "fault-leak-key")])
    client = openai.OpenAI(base_url=live.base_url, api_key=key, max_retries=0, timeout=20)
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="gpt-4o-mini",
                                       messages=[{"role": "user", "content": "hi"}])
    body = caught.value.response.text
    assert "Incorrect API key provided" in caught.value.message  # the meaning survives
    [row] = assert_nowhere(live, [UPSTREAM_KEY, "UPSTREAM", "127.0.0.1"], [body])
    assert row["http_status"] == 400 and "Incorrect API key provided" in row["error"]
    # the fake really was sent the key and really quoted it
    [seen] = [e for e in live.upstream.events() if e["type"] == "request"]
    assert seen["auth"] == f"Bearer {UPSTREAM_KEY}"


def test_upstream_500_quoting_the_key_leaves_it_out_of_the_502_detail(live):
    key = leaky_member(live, [("gpt-4o-mini", "fault-leak-key-500")])
    response = requests.post(live.base_url + "/chat/completions", timeout=20,
                             headers={"Authorization": f"Bearer {key}"},
                             json={"model": "gpt-4o-mini",
                                   "messages": [{"role": "user", "content": "hi"}]})
    assert response.status_code == 502
    assert "Incorrect API key provided" in response.json()["error"]["message"]
    [row] = assert_nowhere(live, [UPSTREAM_KEY, "UPSTREAM"], [response.text])
    assert row["http_status"] == 502


def test_a_stream_error_quoting_the_key_is_scrubbed(live):
    key = leaky_member(live, [("gpt-4o-mini", "fault-leak-stream")])
    response = requests.post(live.base_url + "/chat/completions", timeout=20, stream=True,
                             headers={"Authorization": f"Bearer {key}"},
                             json={"model": "gpt-4o-mini", "stream": True,
                                   "messages": [{"role": "user", "content": "hi"}]})
    text = response.content.decode()
    assert "stream_interrupted" in text and "upstream auth failed" in text
    [row] = assert_nowhere(live, [UPSTREAM_KEY, "UPSTREAM"], [text])
    assert row["status"] == "Failed" and "upstream auth failed" in row["error"]


def test_anthropic_channel_quoting_x_api_key_is_scrubbed_on_v1_messages(live):
    key = leaky_member(live, [("claude-sonnet-4-6", "fault-leak-key")],
                       channel_type="anthropic")
    client = anthropic.Anthropic(base_url=live.url, api_key=key, max_retries=0, timeout=20)
    with pytest.raises(anthropic.BadRequestError) as caught:
        client.messages.create(model="claude-sonnet-4-6", max_tokens=10,
                               messages=[{"role": "user", "content": "hi"}])
    assert "invalid x-api-key" in caught.value.message
    assert_nowhere(live, [UPSTREAM_KEY, "UPSTREAM"], [caught.value.response.text])


def test_mixed_failures_do_not_leak_internal_addresses(live):
    """Finding 2: a dead channel and a proxy channel whose 500 names its internal host."""
    key = leaky_member(live, [("gpt-4o-mini", "fault-leak-host")], priority=0)
    dead = f"http://127.0.0.1:{free_closed_port()}"
    live.channel(name="dead", models="gpt-4o-mini", base_url=dead, api_key=UPSTREAM_KEY,
                 priority=10)  # tried first: connect refused; the leaky 500 comes last
    client = openai.OpenAI(base_url=live.base_url, api_key=key, max_retries=0, timeout=20)
    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(model="gpt-4o-mini",
                                       messages=[{"role": "user", "content": "hi"}])
    assert caught.value.status_code == 502
    message = caught.value.message
    assert "Max retries exceeded" in message  # the upstream's meaning is kept
    leaks = ["10.1.2.3", "8081", "127.0.0.1", "4000", "/v1/chat/completions", "0x7f3a2c1b5d10",
             "HTTPConnectionPool", dead.split(":")[-1], UPSTREAM_KEY]
    assert_nowhere(live, leaks, [caught.value.response.text])


def free_closed_port():
    from tests.support import free_port
    return free_port()  # bound then released: nothing listens there
