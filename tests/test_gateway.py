"""The /v1 gateway through the official openai SDK against a live gunicorn+gevent server.

Tests taking `gateway` run on SQLite and PostgreSQL; those taking `live` exercise
behaviour that does not depend on the database (streaming, timeouts) on SQLite only.
"""
import io
import json
import re
import time

import openai
import pytest
import requests

from blueprints.api.tokens import estimate_prompt_tokens, reserve_prompt_tokens

UPSTREAM_KEY = "sk-upstream-secret"


def client_for(gw, key):
    return openai.OpenAI(base_url=gw.base_url, api_key=key, max_retries=0, timeout=20)


def chat(client, stream=False, **kw):
    kw.setdefault("model", "gpt-4o-mini")
    kw.setdefault("messages", [{"role": "user", "content": "hello there friend"}])
    return client.chat.completions.create(stream=stream, **kw)


def upstream_requests(gw, path=None):
    return [e for e in gw.upstream.events() if e["type"] == "request"
            and (path is None or e["path"] == path)]


# --- every endpoint, stream and non-stream ---------------------------------------------------

def test_chat_non_stream_answers_and_logs_one_honest_row(gateway):
    key = gateway.member(credits=10)
    client = client_for(gateway, key)
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hello there friend"}])
    completion = raw.parse()
    assert completion.choices[0].message.content == \
        "This is a deterministic answer from the fake upstream"
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (6, 9)
    request_id = raw.headers["x-request-id"]
    [row] = gateway.wait_logs(1)
    assert row["request_id"] == request_id
    assert (row["status"], row["http_status"], row["endpoint"], row["is_stream"]) == \
        ("Success", 200, "chat", False)
    assert (row["prompt_tokens"], row["completion_tokens"], row["estimated"]) == (6, 9, False)
    assert row["channel_name"] == "fake" and row["key_name"] == "test key"
    assert row["latency_ms"] >= 0 and row["billing"] == "billed"
    # price 1 credit / 1M in, 2 / 1M out: 6 + 18 = 24 micro-credits
    assert row["credits_micro"] == 24
    [seen] = upstream_requests(gateway, "/v1/chat/completions")
    assert seen["auth"] == f"Bearer {UPSTREAM_KEY}"

    from extensions import db
    from models import ApiKey
    last_used = gateway.scalar(db.select(ApiKey.last_used_at))
    assert last_used is not None


def test_chat_stream_hides_the_usage_chunk_it_injected(gateway):
    key = gateway.member(credits=10)
    chunks = list(chat(client_for(gateway, key), stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "This is a deterministic answer from the fake upstream"
    assert all(c.usage is None for c in chunks), "client did not ask for usage"
    [seen] = upstream_requests(gateway, "/v1/chat/completions")
    assert seen["body"]["stream_options"] == {"include_usage": True}
    [row] = gateway.wait_logs(1)
    assert (row["is_stream"], row["prompt_tokens"], row["completion_tokens"]) == (True, 6, 9)
    assert row["estimated"] is False and row["ttft_ms"] is not None


def test_chat_stream_passes_usage_when_the_client_asks(live):
    key = live.member(credits=10)
    chunks = list(chat(client_for(live, key), stream=True,
                       stream_options={"include_usage": True}))
    assert chunks[-1].usage.completion_tokens == 9 and chunks[-1].choices == []


def test_unknown_request_fields_pass_through_untouched(live):
    key = live.member(credits=10)
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"location": {"type": "string"}}}}}]
    completion = chat(client_for(live, key), tools=tools, seed=7, n=1,
                      response_format={"type": "text"}, extra_body={"reasoning_effort": "low"})
    assert completion.choices[0].message.tool_calls[0].function.name == "get_weather"
    [seen] = upstream_requests(live, "/v1/chat/completions")
    assert seen["body"]["tools"] == tools and seen["body"]["seed"] == 7
    assert seen["body"]["reasoning_effort"] == "low"


def test_legacy_completions_stream_and_not(live):
    key = live.member(credits=10)
    client = client_for(live, key)
    whole = client.completions.create(model="gpt-4o-mini", prompt="say something")
    assert whole.choices[0].text.startswith("This is")
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="gpt-4o-mini", prompt="say something", stream=True) if c.choices)
    assert streamed == whole.choices[0].text
    rows = live.wait_logs(2)
    assert [r["endpoint"] for r in rows] == ["completions", "completions"]
    assert all(r["completion_tokens"] == 9 and not r["estimated"] for r in rows)


def test_embeddings(gateway):
    key = gateway.member(credits=10)
    result = client_for(gateway, key).embeddings.create(model="gpt-4o-mini",
                                                        input=["one two", "three"])
    assert len(result.data) == 2 and len(result.data[0].embedding) == 8
    [row] = gateway.wait_logs(1)
    assert (row["endpoint"], row["prompt_tokens"], row["credits_micro"]) == ("embeddings", 6, 6)


def test_responses_api_stream_and_not(live):
    key = live.member(credits=10)
    client = client_for(live, key)
    response = client.responses.create(model="gpt-4o-mini", input="hello")
    assert response.output_text == "This is a deterministic answer from the fake upstream"
    with client.responses.stream(model="gpt-4o-mini", input="hello") as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(deltas) == response.output_text and final.usage.output_tokens == 9
    rows = live.wait_logs(2)
    assert [(r["endpoint"], r["is_stream"], r["completion_tokens"]) for r in rows] == \
        [("responses", False, 9), ("responses", True, 9)]


def test_images_generation_is_billed_per_request(live):
    key = live.member(credits=10, models="dall-e-3", price=False)
    live.price("dall-e-3", input=0, output=0, per_request=0.04)
    images = client_for(live, key).images.generate(model="dall-e-3", prompt="a red cat", n=2)
    assert len(images.data) == 2 and images.data[0].b64_json
    [row] = live.wait_logs(1)
    assert row["endpoint"] == "images" and row["credits_micro"] == 40_000


def test_audio_speech_streams_binary_through(live):
    key = live.member(credits=10, models="tts-1")
    with client_for(live, key).audio.speech.with_streaming_response.create(
            model="tts-1", voice="alloy", input="read this aloud") as response:
        assert response.headers["content-type"] == "audio/mpeg"
        audio = b"".join(response.iter_bytes())
    assert audio.startswith(b"ID3fake-audio-0") and audio.endswith(b"4" * 100)
    assert len(audio) == 5 * (len(b"ID3fake-audio-") + 100)
    [row] = live.wait_logs(1)
    assert row["endpoint"] == "audio_speech" and row["status"] == "Success"
    assert row["estimated"] is True and row["prompt_tokens"] > 0


def test_audio_transcription_and_translation_multipart(live):
    key = live.member(credits=10, models="whisper-1=whisper-large")
    client = client_for(live, key)
    upload = ("speech.wav", io.BytesIO(b"RIFF" + b"\0" * 996), "audio/wav")
    text = client.audio.transcriptions.create(model="whisper-1", file=upload)
    assert text.text == "fake transcript of speech.wav (1000 bytes)"
    upload = ("speech.wav", io.BytesIO(b"RIFF" + b"\0" * 96), "audio/wav")
    plain = client.audio.translations.create(model="whisper-1", file=upload,
                                             response_format="text")
    assert "fake transcript of speech.wav (100 bytes)" in plain
    seen = upstream_requests(live)
    assert [s["form"]["model"] for s in seen] == ["whisper-large", "whisper-large"]
    rows = live.wait_logs(2)
    assert [r["endpoint"] for r in rows] == ["audio_transcriptions", "audio_translations"]


def test_models_lists_only_what_the_key_may_use(gateway):
    gateway.user("member@example.com", credits=1)
    gateway.channel("a", models="gpt-4o-mini,gpt-4o,pub-name=upstream-name")
    gateway.channel("off", models="hidden-model", enabled=False)
    key = gateway.key("member@example.com", models="gpt-4o-mini,pub-name")
    client = client_for(gateway, key)
    assert sorted(m.id for m in client.models.list()) == ["gpt-4o-mini", "pub-name"]
    assert client.models.retrieve("pub-name").id == "pub-name"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")


def test_alias_sends_the_upstream_name(live):
    key = live.member(credits=10, models="smart=gpt-4o-2024-08-06", price=False)
    live.price("smart")
    chat(client_for(live, key), model="smart")
    [seen] = upstream_requests(live, "/v1/chat/completions")
    assert seen["body"]["model"] == "gpt-4o-2024-08-06"
    assert live.wait_logs(1)[0]["model"] == "smart"


# --- errors: the SDK raises the right class, the body has OpenAI's shape -----------------------

def _error_json(gw, key, payload=None, path="/chat/completions", headers=None, data=None):
    send_headers = {"Authorization": f"Bearer {key}"} if key else {}
    send_headers.update(headers or {})
    if data is None:
        response = requests.post(gw.base_url + path, json=payload, headers=send_headers,
                                 timeout=20)
    else:
        response = requests.post(gw.base_url + path, data=data, headers=send_headers,
                                 timeout=20)
    return response.status_code, response.json(), response.headers


def test_authentication_errors(gateway):
    gateway.member(credits=10)
    for key in (None, "sk-not-a-real-key"):
        status, body, headers = _error_json(gateway, key, {"model": "gpt-4o-mini"})
        assert status == 401 and body["error"]["code"] == "invalid_api_key"
        assert body["error"]["type"] == "authentication_error" and "x-request-id" in headers
    with pytest.raises(openai.AuthenticationError):
        chat(client_for(gateway, "sk-wrong"))


def test_disabled_expired_and_disabled_owner_keys_are_refused(gateway):
    from datetime import datetime, timedelta

    from extensions import db
    from models import User
    gateway.member(credits=10)
    disabled = gateway.key(name="off", disabled=True)
    expired = gateway.key(name="old", expires_at=datetime(2020, 1, 1))
    fine = gateway.key(name="ok", expires_at=datetime.utcnow() + timedelta(days=1))
    for key in (disabled, expired):
        with pytest.raises(openai.AuthenticationError) as caught:
            chat(client_for(gateway, key))
        assert caught.value.code == "invalid_api_key"
    chat(client_for(gateway, fine))

    def disable_owner():
        db.session.scalar(db.select(User).filter_by(email="member@example.com")).disabled = True
        db.session.commit()
    gateway.run(disable_owner)
    with pytest.raises(openai.AuthenticationError, match="disabled"):
        chat(client_for(gateway, fine))


def test_x_api_key_header_authenticates(live):
    key = live.member(credits=10)
    response = requests.post(live.base_url + "/chat/completions", headers={"x-api-key": key},
                             json={"model": "gpt-4o-mini",
                                   "messages": [{"role": "user", "content": "hi"}]}, timeout=20)
    assert response.status_code == 200


def test_bad_requests_get_400(gateway):
    key = gateway.member(credits=10)
    status, body, _ = _error_json(gateway, key, data=b"{not json",
                                  headers={"Content-Type": "application/json"})
    assert status == 400 and body["error"]["type"] == "invalid_request_error"
    status, body, _ = _error_json(gateway, key, {"messages": [{"role": "user", "content": "x"}]})
    assert status == 400 and body["error"]["param"] == "model"
    with pytest.raises(openai.BadRequestError) as caught:
        client_for(gateway, key).chat.completions.create(model="gpt-4o-mini", messages=[])
    assert caught.value.body["param"] == "messages"
    assert upstream_requests(gateway) == []
    rows = gateway.wait_logs(3)
    assert [r["http_status"] for r in rows] == [400, 400, 400]
    assert all(r["credits_micro"] == 0 and r["billing"] == "void" for r in rows)


def test_model_errors_403_404_and_unpriced(gateway):
    gateway.user("member@example.com", credits=10)
    gateway.channel("a", models="gpt-4o-mini,gpt-4o,unpriced")
    gateway.price("gpt-4o-mini")
    gateway.price("gpt-4o")
    key = gateway.key(models="gpt-4o-mini,unpriced")
    client = client_for(gateway, key)
    with pytest.raises(openai.NotFoundError) as caught:
        chat(client, model="no-such-model")
    assert caught.value.code == "model_not_found"
    with pytest.raises(openai.PermissionDeniedError) as caught:
        chat(client, model="gpt-4o")
    assert caught.value.code == "model_not_allowed"
    assert caught.value.body["type"] == "permission_error"
    with pytest.raises(openai.BadRequestError) as caught:
        chat(client, model="unpriced")
    assert caught.value.code == "model_price_missing"


def test_group_model_access(gateway):
    from extensions import db
    from models import Group

    def make_group():
        db.session.add(Group(name="small", models="gpt-4o-mini", rpm=0))
        db.session.commit()
    gateway.run(make_group)
    gateway.user("member@example.com", credits=10, group="small")
    gateway.channel("a", models="gpt-4o-mini,gpt-4o")
    gateway.price("gpt-4o-mini")
    gateway.price("gpt-4o")
    client = client_for(gateway, gateway.key())
    chat(client, model="gpt-4o-mini")
    with pytest.raises(openai.PermissionDeniedError):
        chat(client, model="gpt-4o")
    assert [m.id for m in client.models.list()] == ["gpt-4o-mini"]


def test_ip_allowlist(live):
    key_ok = live.member(credits=10, allowed_ips="127.0.0.0/8")
    key_blocked = live.key(name="far", allowed_ips="10.0.0.0/8,192.168.1.0/24")
    chat(client_for(live, key_ok))
    with pytest.raises(openai.PermissionDeniedError) as caught:
        chat(client_for(live, key_blocked))
    assert caught.value.code == "ip_not_allowed"


def test_body_over_the_limit_gets_413(live):
    key = live.member(credits=10)
    big = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x" * (33 << 20)}]}
    status, body, _ = _error_json(live, key, big)
    assert status == 413 and body["error"]["code"] == "request_too_large"
    assert body["error"]["type"] == "invalid_request_error"


def test_insufficient_credits_402(gateway):
    key = gateway.member(credits=0.000001)
    with pytest.raises(openai.APIStatusError) as caught:
        chat(client_for(gateway, key))
    assert caught.value.status_code == 402
    assert caught.value.code == "insufficient_credits"
    assert caught.value.body["type"] == "insufficient_quota"
    assert upstream_requests(gateway) == []


def test_key_credit_limit_402(gateway):
    # 100 credits in the wallet, but this key may spend at most 0.001 credits in total;
    # the reservation (prompt + 4,096 default output tokens at 2 / 1M) is larger than that.
    key = gateway.member(credits=100, credit_limit_micro=1_000)
    with pytest.raises(openai.APIStatusError) as caught:
        chat(client_for(gateway, key))
    assert caught.value.status_code == 402 and caught.value.code == "key_credit_limit"
    assert caught.value.body["type"] == "insufficient_quota"
    # with max_tokens small enough the hold fits the limit, and the call goes through
    assert chat(client_for(gateway, key), max_tokens=5).choices
    assert len(upstream_requests(gateway)) == 1


def test_rate_limits_per_user_and_per_key(gateway):
    from extensions import db
    from models import Group

    def make_group():
        db.session.add(Group(name="slow", models="*", rpm=3))
        db.session.commit()
    gateway.run(make_group)
    gateway.user("slow@example.com", credits=10, group="slow")
    gateway.channel("a")
    gateway.price("gpt-4o-mini")
    first, second = gateway.key("slow@example.com", name="k1"), \
        gateway.key("slow@example.com", name="k2")
    for key in (first, second, first):
        chat(client_for(gateway, key))
    with pytest.raises(openai.RateLimitError) as caught:
        chat(client_for(gateway, second))  # the group's RPM is per user: all keys together
    assert caught.value.code == "rate_limit_exceeded"
    assert int(caught.value.response.headers["Retry-After"]) >= 1
    # a key's own RPM
    gateway.user("fast@example.com", credits=10)
    limited = gateway.key("fast@example.com", name="k3", rpm=2)
    chat(client_for(gateway, limited))
    chat(client_for(gateway, limited))
    with pytest.raises(openai.RateLimitError):
        chat(client_for(gateway, limited))


def test_group_tokens_per_minute(gateway):
    """TPM admits the prompt estimate plus the output cap and never overshoots the minute."""
    from extensions import db
    from models import Group

    def make_group():
        db.session.add(Group(name="tpm", models="*", rpm=0, tpm=40))
        db.session.commit()
    gateway.run(make_group)
    gateway.user("tpm@example.com", credits=10, group="tpm")
    gateway.channel()
    gateway.price("gpt-4o-mini")
    client = client_for(gateway, gateway.key("tpm@example.com"))
    with pytest.raises(openai.RateLimitError) as caught:
        chat(client)  # the default output cap (4,096) alone is more than the minute allows
    assert "lower max_tokens" in caught.value.message
    first = client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hello there friend"}],
        max_tokens=10)
    assert first.headers["x-ratelimit-limit-tokens"] == "40"
    chat(client, max_tokens=10)  # reserved ~20, corrected to the 15 it used
    with pytest.raises(openai.RateLimitError) as caught:
        chat(client, max_tokens=10)  # 30 used + ~20 reserved would pass 40: refused up front
    assert "tokens per minute" in caught.value.message
    assert int(caught.value.response.headers["Retry-After"]) >= 1
    assert len(upstream_requests(gateway)) == 2


def test_flask_404_and_405_under_v1_are_openai_shaped(live):
    response = requests.get(live.base_url + "/no/such/thing", timeout=5)
    assert response.status_code == 404
    assert response.json()["error"]["type"] == "invalid_request_error"
    response = requests.get(live.base_url + "/chat/completions", timeout=5)
    assert response.status_code == 405 and "error" in response.json()
    assert response.headers["x-request-id"].startswith("req_")


def test_request_ids_are_unique_and_sort_in_the_order_they_were_issued(live):
    # Time-ordered ids append to the logs' and ledger's request_id indexes (request_log.py).
    ids = []
    for _ in range(8):  # uuid4's would come out sorted once in 40,320 runs
        response = requests.get(live.base_url + "/chat/completions", timeout=5)
        ids.append(response.headers["x-request-id"])
        time.sleep(0.002)
    assert all(re.fullmatch(r"req_[0-9a-f]{32}", rid) for rid in ids)
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    from request_log import new_request_id
    assert len({new_request_id() for _ in range(10_000)}) == 10_000  # same millisecond: random


def test_upstream_request_errors_pass_through_with_their_message(live):
    key = live.member(credits=10, models="gpt-4o-mini=fault-400", price=False)
    live.price("gpt-4o-mini")
    with pytest.raises(openai.BadRequestError, match="bad parameter"):
        chat(client_for(live, key))
    [row] = live.wait_logs(1)
    assert row["status"] == "Failed" and row["http_status"] == 400


# --- routing, failover, cool-down ----------------------------------------------------------

def test_failover_to_the_next_channel_before_the_first_byte(gateway):
    gateway.user("member@example.com", credits=10)
    gateway.channel("broken", models="gpt-4o-mini=fault-500", priority=10)
    gateway.channel("good", models="gpt-4o-mini", priority=1)
    gateway.price("gpt-4o-mini")
    client = client_for(gateway, gateway.key())
    assert chat(client).choices[0].message.content.startswith("This is")
    assert "".join(c.choices[0].delta.content or "" for c in chat(client, stream=True)
                   if c.choices).startswith("This is")
    models_tried = [r["body"]["model"] for r in upstream_requests(gateway)]
    assert models_tried == ["fault-500", "gpt-4o-mini", "fault-500", "gpt-4o-mini"]
    rows = gateway.wait_logs(2)
    assert all(r["status"] == "Success" and r["channel_name"] == "good" for r in rows)


@pytest.mark.parametrize("fault,status,code", [
    ("fault-500", 502, "upstream_error"), ("fault-malformed", 502, "upstream_error"),
    ("fault-429", 429, "rate_limit_exceeded"), ("fault-401", 502, "upstream_error"),
])
def test_every_channel_failing(live, fault, status, code):
    live.user("member@example.com", credits=10)
    live.channel("one", models=f"gpt-4o-mini={fault}")
    live.channel("two", models=f"gpt-4o-mini={fault}")
    live.price("gpt-4o-mini")
    key = live.key()
    with pytest.raises(openai.APIStatusError) as caught:
        chat(client_for(live, key))
    assert caught.value.status_code == status and caught.value.code == code
    if status == 429:
        assert caught.value.response.headers["Retry-After"] == "7"
    assert len(upstream_requests(live)) == 2
    [row] = live.wait_logs(1)
    assert row["status"] == "Failed" and row["credits_micro"] == 0
    assert UPSTREAM_KEY not in json.dumps(caught.value.body)
    assert "sk-ups" not in json.dumps(caught.value.body)


def test_unreachable_upstream_503_and_timeout_504(live):
    live.user("member@example.com", credits=10)
    live.channel("dead", models="gpt-4o-mini", base_url="http://127.0.0.1:9")
    live.price("gpt-4o-mini")
    key = live.key()
    with pytest.raises(openai.APIStatusError) as caught:
        chat(client_for(live, key))
    assert caught.value.status_code == 503
    live.reset()
    key = live.member(credits=10, models="gpt-4o-mini=fault-timeout", price=False)
    live.price("gpt-4o-mini")
    started = time.time()
    with pytest.raises(openai.APIStatusError) as caught:
        chat(client_for(live, key))
    assert caught.value.status_code == 504 and caught.value.code == "upstream_timeout"
    assert time.time() - started < 8
    [row] = live.wait_logs(1)
    assert row["status"] == "Timeout"


def test_a_channel_that_keeps_failing_cools_down(gateway):
    from extensions import db
    from models import Channel
    gateway.user("member@example.com", credits=10)
    gateway.channel("flaky", models="gpt-4o-mini=fault-500", priority=10)
    gateway.channel("steady", models="gpt-4o-mini", priority=1)
    gateway.price("gpt-4o-mini")
    client = client_for(gateway, gateway.key())
    for _ in range(5):
        chat(client)
    tried = [r["body"]["model"] for r in upstream_requests(gateway)]
    # three failures in a row put it in cool-down; after that only the healthy channel is tried
    assert tried.count("fault-500") == 3 and tried.count("gpt-4o-mini") == 5

    def health():
        return {c.name: c.health() for c in db.session.scalars(db.select(Channel))}
    assert gateway.run(health) == {"flaky": "cooldown", "steady": "healthy"}


def test_priority_then_weight(live):
    live.user("member@example.com", credits=10)
    live.channel("heavy", models="gpt-4o-mini=heavy", priority=5, weight=9)
    live.channel("light", models="gpt-4o-mini=light", priority=5, weight=1)
    live.channel("backup", models="gpt-4o-mini=backup", priority=0, weight=100)
    live.price("gpt-4o-mini")
    client = client_for(live, live.key())
    for _ in range(40):
        chat(client, max_tokens=1)
    tried = [r["body"]["model"] for r in upstream_requests(live)]
    assert "backup" not in tried
    assert tried.count("heavy") > tried.count("light")


# --- streaming: no buffering, disconnects, breaks ------------------------------------------

def test_stream_is_not_buffered(live):
    key = live.member(credits=10, models="gpt-4o-mini=fault-slow", price=False)
    live.price("gpt-4o-mini")
    started = time.time()
    arrivals = []
    response = requests.post(live.base_url + "/chat/completions", stream=True, timeout=20,
                             headers={"Authorization": f"Bearer {key}"},
                             json={"model": "gpt-4o-mini", "stream": True,
                                   "messages": [{"role": "user", "content": "hi"}]})
    assert response.headers["X-Accel-Buffering"] == "no"
    for line in response.iter_lines():
        if line.startswith(b"data:"):
            arrivals.append(time.time() - started)
    # 11 events, 0.3 s apart upstream: the first must arrive long before the last
    assert len(arrivals) >= 10
    assert arrivals[-1] - arrivals[0] > 2.0
    assert arrivals[0] < arrivals[-1] / 3


def test_client_disconnect_closes_upstream_and_bills_what_was_generated(gateway):
    key = gateway.member(credits=10, models="gpt-4o-mini=fault-long", price=False)
    gateway.price("gpt-4o-mini", input=1000, output=1000)
    response = requests.post(gateway.base_url + "/chat/completions", stream=True, timeout=20,
                             headers={"Authorization": f"Bearer {key}"},
                             json={"model": "gpt-4o-mini", "stream": True,
                                   "messages": [{"role": "user", "content": "hi"}]})
    lines = response.iter_lines()
    received = [next(lines) for _ in range(6)]
    assert any(b"content" in line for line in received)
    response.close()
    deadline = time.time() + 10
    while time.time() < deadline and not any(
            e["type"] == "closed" for e in gateway.upstream.events()):
        time.sleep(0.1)
    assert any(e["type"] == "closed" for e in gateway.upstream.events()), \
        "the upstream connection was not closed"
    [row] = gateway.wait_logs(1, timeout=10)
    assert row["status"] == "Failed" and row["http_status"] == 499
    assert 0 < row["completion_tokens"] < 40 and row["estimated"] is True
    assert row["credits_micro"] > 0 and row["billing"] == "estimated"


def test_upstream_break_mid_stream_ends_with_an_error_event(gateway):
    key = gateway.member(credits=10, models="gpt-4o-mini=fault-break", price=False)
    gateway.price("gpt-4o-mini")
    response = requests.post(gateway.base_url + "/chat/completions", stream=True, timeout=20,
                             headers={"Authorization": f"Bearer {key}"},
                             json={"model": "gpt-4o-mini", "stream": True,
                                   "messages": [{"role": "user", "content": "hi"}]})
    events = [line for line in response.iter_lines() if line.startswith(b"data:")]
    last = json.loads(events[-1][5:])
    assert last["error"]["code"] == "stream_interrupted"
    assert last["error"]["type"] == "upstream_error"
    assert len(events) == 4  # three forwarded events, then our error event
    [row] = gateway.wait_logs(1)
    assert row["status"] == "Failed" and row["completion_tokens"] == 2
    assert row["billing"] == "estimated" and row["credits_micro"] > 0
    # the SDK surfaces the error event as an exception
    with pytest.raises(openai.APIError):
        list(chat(client_for(gateway, key), stream=True))


def test_upstream_going_quiet_mid_stream_is_logged_as_timeout(live):
    key = live.member(credits=10, models="gpt-4o-mini=fault-stall", price=False)
    live.price("gpt-4o-mini")
    response = requests.post(live.base_url + "/chat/completions", stream=True, timeout=20,
                             headers={"Authorization": f"Bearer {key}"},
                             json={"model": "gpt-4o-mini", "stream": True,
                                   "messages": [{"role": "user", "content": "hi"}]})
    events = [line for line in response.iter_lines() if line.startswith(b"data:")]
    assert json.loads(events[-1][5:])["error"]["code"] == "stream_interrupted"
    [row] = live.wait_logs(1)
    assert row["status"] == "Timeout" and "quiet" in row["error"]
    assert row["completion_tokens"] == 2 and row["billing"] == "estimated"


def test_missing_usage_is_counted_locally_and_marked_estimated(live):
    key = live.member(credits=10, models="gpt-4o-mini=fault-nousage", price=False)
    live.price("gpt-4o-mini")
    chat(client_for(live, key))
    list(chat(client_for(live, key), stream=True))
    rows = live.wait_logs(2)
    for row in rows:
        assert row["estimated"] is True and row["billing"] == "estimated"
        assert row["completion_tokens"] == 9  # o200k counts these nine words as nine tokens
        # billed at the prompt's exact count, not the hold's per-byte bound of a short prompt
        body = {"messages": [{"role": "user", "content": "hello there friend"}]}
        assert row["prompt_tokens"] == estimate_prompt_tokens(body) \
            < reserve_prompt_tokens(body)


def test_upstream_key_never_reaches_a_response_or_log(live):
    key = live.member(credits=10, models="gpt-4o-mini=fault-401", price=False)
    live.price("gpt-4o-mini")
    response = requests.post(live.base_url + "/chat/completions", timeout=20,
                             headers={"Authorization": f"Bearer {key}"},
                             json={"model": "gpt-4o-mini",
                                   "messages": [{"role": "user", "content": "hi"}]})
    assert UPSTREAM_KEY not in response.text and "sk-ups" not in response.text
    rows = live.wait_logs(1)
    assert UPSTREAM_KEY not in json.dumps(rows, default=str)
    assert "sk-ups" not in json.dumps(rows, default=str)
    assert UPSTREAM_KEY not in live.gunicorn_log()
    assert key not in json.dumps(rows, default=str) and key not in live.gunicorn_log()


def test_mock_channel_works_without_any_upstream(live):
    key = live.member(credits=10, models=None)
    live.channel("builtin", type="mock", base_url="", models="mock-model")
    live.price("mock-model")
    client = client_for(live, key)
    text = chat(client, model="mock-model").choices[0].message.content
    assert "mock" in text
    streamed = "".join(c.choices[0].delta.content or "" for c in
                       chat(client, model="mock-model", stream=True) if c.choices)
    assert streamed == text
    rows = live.wait_logs(2)
    assert all(r["completion_tokens"] > 0 and r["status"] == "Success" for r in rows)
