"""Upstream behaviour that must never cost money or a 5xx (issue 9, adaptor side; SPEC §10).

Live: the official SDKs against gunicorn+gevent and the fake upstream process. The fake
records every request body it received, so a test can check the output cap it was sent.
"""
import json
import time

import anthropic
import openai
import pytest
import requests

from tests.support import LiveGateway

ANSWER = "This is a deterministic answer from the fake upstream"
CHANNEL_TYPES = ("openai", "anthropic", "gemini")


def openai_client(gw, key):
    return openai.OpenAI(base_url=gw.base_url, api_key=key, max_retries=0, timeout=30)


def anthropic_client(gw, key):
    return anthropic.Anthropic(base_url=gw.url, api_key=key, max_retries=0, timeout=30)


def member_with(gw, credits=10, output_price=2, **models):
    """A member and one channel per (public model -> "type:upstream name")."""
    gw.user("member@example.com", credits=credits)
    for public, spec in models.items():
        kind, upstream = spec.split(":")
        gw.channel(name=f"{public}-channel", models=f"{public}={upstream}", type=kind)
        gw.price(public, input=1, output=output_price)
    return gw.key("member@example.com")


def upstream_bodies(gw):
    return [e["body"] for e in gw.upstream.events() if e["type"] == "request"]


def sent_cap(kind, body):
    """{field: value} of every output cap in the body an upstream received."""
    if kind == "gemini":
        return {"maxOutputTokens": (body.get("generationConfig") or {}).get("maxOutputTokens")}
    return {k: v for k, v in body.items() if k in ("max_tokens", "max_completion_tokens")}


# --- 1. the cap reserved is the cap sent, in the field each provider honours ---------------

def test_messages_cap_is_reserved_and_sent_alone_to_an_openai_channel(gateway):
    """Finding 1: max_tokens 100000 + max_completion_tokens 1 held 1 token and sent 100000."""
    key = member_with(gateway, credits=0.5, output_price=10, gpt="openai:gpt-up")
    client = anthropic_client(gateway, key)
    with pytest.raises(anthropic.APIStatusError) as err:  # 100000 × 10/M = 1 credit > 0.5
        client.messages.create(model="gpt", max_tokens=100_000,
                               extra_body={"max_completion_tokens": 1},
                               messages=[{"role": "user", "content": "hello"}])
    assert err.value.status_code == 402
    assert upstream_bodies(gateway) == []  # refused before anything was sent
    message = client.messages.create(model="gpt", max_tokens=20_000,
                                     extra_body={"max_completion_tokens": 1},
                                     messages=[{"role": "user", "content": "hello"}])
    assert message.content[0].text == ANSWER
    [body] = upstream_bodies(gateway)
    assert sent_cap("openai", body) == {"max_tokens": 20_000}


@pytest.mark.parametrize("kind", CHANNEL_TYPES)
def test_messages_send_the_reserved_cap_on_every_channel_type(live, kind):
    key = member_with(live, model=f"{kind}:up-model")
    with anthropic_client(live, key).messages.stream(
            model="model", max_tokens=3, extra_body={"max_completion_tokens": 100_000},
            messages=[{"role": "user", "content": "hello"}]) as stream:
        assert "".join(stream.text_stream) == "This is a"
    [body] = upstream_bodies(live)
    expected = {"gemini": "maxOutputTokens"}.get(kind, "max_tokens")
    assert sent_cap(kind, body)[expected] == 3
    if kind == "openai":
        assert sent_cap(kind, body) == {"max_tokens": 3}


@pytest.mark.parametrize("kind", CHANNEL_TYPES)
def test_chat_sends_one_reserved_cap_on_every_channel_type(live, kind):
    key = member_with(live, model=f"{kind}:up-model")
    completion = openai_client(live, key).chat.completions.create(
        model="model", max_tokens=100_000, max_completion_tokens=2,
        messages=[{"role": "user", "content": "hello"}])
    assert completion.choices[0].message.content == "This is"
    [body] = upstream_bodies(live)
    expected = {"openai": {"max_tokens": 2}, "anthropic": {"max_tokens": 2},  # both: one kept
                "gemini": {"maxOutputTokens": 2}}[kind]
    assert sent_cap(kind, body) == expected


def test_responses_and_completions_send_the_reserved_cap(live):
    key = member_with(live, gpt="openai:gpt-up")
    client = openai_client(live, key)
    response = client.responses.create(model="gpt", input="hello", max_output_tokens=4)
    assert response.output_text == "This is a deterministic"
    client.completions.create(model="gpt", prompt="hello", max_tokens=2)
    responses_body, completions_body = upstream_bodies(live)
    assert responses_body["max_output_tokens"] == 4 and completions_body["max_tokens"] == 2
    without = requests.post(live.base_url + "/chat/completions", timeout=20,
                            headers={"Authorization": f"Bearer {key}"},
                            json={"model": "gpt", "messages": [{"role": "user", "content": "x"}]})
    assert without.status_code == 200
    # no cap asked: the default cap the relay reserved for is sent all the same
    assert sent_cap("openai", upstream_bodies(live)[-1]) == {"max_tokens": 4096}


# --- 2. an Anthropic stream cut by the client is billed for what it delivered ---------------

@pytest.mark.parametrize("kind", ["anthropic", "gemini"])
def test_stream_cut_after_a_few_events_bills_the_delivered_text(live, kind):
    """Finding 3: the start event's usage (output_tokens 1) was taken as final."""
    key = member_with(live, model=f"{kind}:fault-long")
    received = []
    with anthropic_client(live, key).messages.stream(
            model="model", max_tokens=100,
            messages=[{"role": "user", "content": "hello"}]) as stream:
        for text in stream.text_stream:
            received.append(text)
            if len(received) == 6:
                break
    [row] = live.wait_logs(1)
    assert row["http_status"] == 499 and row["estimated"] is True
    assert 6 <= row["completion_tokens"] < 40  # counted from the text, not 1
    assert row["credits_micro"] >= row["prompt_tokens"] + 2 * 6


# --- 3. usage that is not plain tokens --------------------------------------------------------

def test_gemini_thoughts_and_tool_use_prompt_tokens_are_counted(live):
    key = member_with(live, gem="gemini:gemini-thinking")
    completion = openai_client(live, key).chat.completions.create(
        model="gem", messages=[{"role": "user", "content": "hello there"}])
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (10, 13)
    [row] = live.wait_logs(1)
    assert (row["prompt_tokens"], row["completion_tokens"], row["estimated"]) == (10, 13, False)


def test_anthropic_cache_writes_reach_an_anthropic_client_in_its_shape(live):
    key = member_with(live, claude="anthropic:claude-up")
    message = anthropic_client(live, key).messages.create(
        model="claude", max_tokens=50, extra_body={"fake_cached": 1, "fake_cache_write": 2},
        messages=[{"role": "user", "content": "hello there friend"}])
    assert (message.usage.input_tokens, message.usage.cache_creation_input_tokens,
            message.usage.cache_read_input_tokens) == (3, 2, 1)
    [row] = live.wait_logs(1)
    assert (row["prompt_tokens"], row["cached_tokens"]) == (6, 1)


# --- 4. SSE comment lines are valid and ignored -----------------------------------------------

@pytest.mark.parametrize("kind", CHANNEL_TYPES)
def test_sse_comments_at_the_start_and_mid_stream(live, kind):
    """Finding 9: `: OPENROUTER PROCESSING` first gave a 502, `: keep-alive` later a break."""
    key = member_with(live, model=f"{kind}:fault-comments")
    chunks = list(openai_client(live, key).chat.completions.create(
        model="model", stream=True, stream_options={"include_usage": True},
        messages=[{"role": "user", "content": "hello"}]))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ANSWER
    assert chunks[-1].usage.completion_tokens == 9
    with anthropic_client(live, key).messages.stream(
            model="model", max_tokens=100,
            messages=[{"role": "user", "content": "hello"}]) as stream:
        assert "".join(stream.text_stream) == ANSWER
    rows = live.wait_logs(2)
    assert [(r["status"], r["completion_tokens"], r["estimated"]) for r in rows] == \
        [("Success", 9, False)] * 2


# --- 5. the tokenizer never fails a request ---------------------------------------------------

def test_a_two_million_character_prompt_is_served(live):
    """Finding 10: bpe-openai raised on long input: 500 on chat and count_tokens."""
    key = member_with(live, gpt="openai:gpt-up", claude="anthropic:claude-up")
    prompt = "word " * 400_000
    completion = openai_client(live, key).chat.completions.create(
        model="gpt", messages=[{"role": "user", "content": prompt}])
    assert completion.usage.prompt_tokens == 400_003
    counted = anthropic_client(live, key).messages.count_tokens(
        model="claude", messages=[{"role": "user", "content": prompt}])
    assert counted.input_tokens >= 400_000  # a byte estimate: never below the real count
    [row] = live.wait_logs(1)
    assert row["status"] == "Success" and row["prompt_tokens"] == 400_003


def test_a_long_output_without_usage_is_counted(live):
    """Counting 2 MB of delivered text (no usage reported) neither fails nor bills nothing."""
    key = member_with(live, huge="openai:fault-huge")
    chunks = list(openai_client(live, key).chat.completions.create(
        model="huge", stream=True, messages=[{"role": "user", "content": "hi"}]))
    delivered = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(delivered) == 2_000_000
    [row] = live.wait_logs(1)
    assert (row["status"], row["estimated"]) == ("Success", True)
    assert row["completion_tokens"] == 2_000_000 // 3 + 1  # past the exact limit: bytes / 3


# --- 7. garbage usage numbers never give a 5xx ------------------------------------------------

@pytest.mark.parametrize("kind", CHANNEL_TYPES)
def test_unparseable_usage_is_counted_locally(live, kind):
    key = member_with(live, model=f"{kind}:fault-usage-string")
    completion = openai_client(live, key).chat.completions.create(
        model="model", messages=[{"role": "user", "content": "hello"}])
    assert completion.choices[0].message.content == ANSWER
    chunks = list(openai_client(live, key).chat.completions.create(
        model="model", stream=True, messages=[{"role": "user", "content": "hello"}]))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ANSWER
    rows = live.wait_logs(2)
    assert [(r["status"], r["estimated"], r["completion_tokens"]) for r in rows] == \
        [("Success", True, 9)] * 2


# --- 6. overall stream deadline and response size cap -----------------------------------------

@pytest.fixture(scope="module")
def limited(tmp_path_factory, fake_upstream):
    """A gateway with a 3-second stream deadline and a 1 MB upstream body cap."""
    path = tmp_path_factory.mktemp("gw-limited")
    gw = LiveGateway(f"sqlite:///{path}/gw.db", str(path), fake_upstream,
                     extra_env={"TOKENOPEN_STREAM_MAX_SECONDS": "3",
                                "TOKENOPEN_MAX_RESPONSE_BYTES": "1000000"})
    gw.start()
    yield gw
    gw.stop()


def raw_stream(gw, key, model):
    response = requests.post(gw.base_url + "/chat/completions", stream=True, timeout=30,
                             headers={"Authorization": f"Bearer {key}"},
                             json={"model": model, "stream": True,
                                   "messages": [{"role": "user", "content": "hi"}]})
    assert response.status_code == 200
    return [json.loads(line[6:]) for line in response.iter_lines()
            if line.startswith(b"data: {")]


def test_a_dripping_stream_ends_at_the_deadline(limited):
    """Finding 11: a chunk a second streamed on for 70 s past an 8 s read timeout."""
    limited.reset()
    key = member_with(limited, drip="openai:fault-drip")
    started = time.monotonic()
    events = raw_stream(limited, key, "drip")
    elapsed = time.monotonic() - started
    assert 3 <= elapsed < 6  # the deadline, not the 40 s the upstream would have dripped
    assert events[-1]["error"]["code"] == "stream_interrupted"
    assert "stream exceeded 3 seconds" in events[-1]["error"]["message"]
    delivered = [e for e in events[:-1] if e["choices"] and e["choices"][0]["delta"].get("content")]
    assert 2 <= len(delivered) <= 4
    [row] = limited.wait_logs(1)
    assert row["status"] == "Timeout" and row["completion_tokens"] >= len(delivered)
    assert row["credits_micro"] > 0


def test_a_huge_upstream_body_is_a_502_and_a_huge_stream_breaks(limited):
    """Finding 11: a 50 MB upstream body was buffered whole."""
    limited.reset()
    key = member_with(limited, huge="openai:fault-huge")
    with pytest.raises(openai.APIStatusError) as err:
        openai_client(limited, key).chat.completions.create(
            model="huge", messages=[{"role": "user", "content": "hi"}])
    assert err.value.status_code == 502 and err.value.body["code"] == "upstream_error"
    assert "too large" in err.value.body["message"]
    events = raw_stream(limited, key, "huge")
    assert events[-1]["error"]["code"] == "stream_interrupted"
    assert "exceeded 1000000 bytes" in events[-1]["error"]["message"]
    delivered = sum(len(e["choices"][0]["delta"].get("content") or "")
                    for e in events[:-1] if e["choices"])
    assert 900_000 < delivered < 1_000_000
    rows = limited.wait_logs(2)
    assert [(r["http_status"], r["status"]) for r in rows] == [(502, "Failed"), (200, "Failed")]
    assert rows[1]["completion_tokens"] > 0
