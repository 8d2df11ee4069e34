"""The OpenAI adaptor's own pieces: the output cap it sends, usage it reads, the SSE splitter,
and the stream deadline / body size cap of every adaptor (base.Adaptor).

Pure functions on recorded JSON first; the last tests drive OpenAIAdaptor against the fake
upstream process over real HTTP.
"""
import json
import time

import pytest

from blueprints.api.providers import openai as adaptor_module
from blueprints.api.providers.base import (
    Call, Limits, StreamBroken, Target, UpstreamFailure, Usage, read_capped, split_sse, sse_data,
)
from blueprints.api.providers.mock import MockAdaptor
from blueprints.api.providers.openai import OpenAIAdaptor, capped_body, read_openai_usage
from blueprints.api.upstream_http import UpstreamHTTP
from tests.test_convert_anthropic import fixture_bytes, fixture_json


# --- the output cap (SPEC §10: the cap reserved is the cap sent) ---------------------------

@pytest.mark.parametrize("sent, official, expected", [
    ({"max_tokens": 100_000}, False, "max_tokens"),
    ({"max_completion_tokens": 100_000}, False, "max_completion_tokens"),
    ({"max_tokens": 100_000}, True, "max_tokens"),
    ({"max_tokens": 100_000, "max_completion_tokens": 1}, False, "max_tokens"),
    ({"max_tokens": 100_000, "max_completion_tokens": 1}, True, "max_completion_tokens"),
    ({}, False, "max_tokens"),
    ({}, True, "max_completion_tokens"),
    ({"max_tokens": None}, True, "max_completion_tokens"),
])
def test_chat_sends_one_cap_in_the_field_the_client_used(sent, official, expected):
    body = dict(fixture_json("openai/chat_request_full.json"), n=2, **sent)
    body.pop("max_completion_tokens", None) if "max_completion_tokens" not in sent else None
    body.pop("max_tokens", None) if "max_tokens" not in sent else None
    out = capped_body(body, "chat", 77, official)
    caps = {k: v for k, v in out.items() if k in ("max_tokens", "max_completion_tokens")}
    assert caps == {expected: 77}
    assert out["n"] == 2 and out["messages"] == body["messages"]  # n passes through


@pytest.mark.parametrize("endpoint, field", [("completions", "max_tokens"),
                                             ("responses", "max_output_tokens")])
def test_other_text_endpoints_send_their_own_cap_field(endpoint, field):
    body = {"model": "m", "prompt": "x", "input": "x", field: 100_000, "best_of": 3, "n": 2}
    out = capped_body(body, endpoint, 5)
    assert out[field] == 5 and out["best_of"] == 3 and out["n"] == 2
    assert capped_body({"model": "m"}, endpoint, 5)[field] == 5  # added when absent


def test_the_mock_answers_within_the_reserved_cap():
    call = chat_call(False, max_tokens=100_000)
    call.output_cap = 2
    mock = MockAdaptor(Target(1, "m", "mock", "", "", "mock"), None, (1, 1))
    answer = json.loads(mock.send(call).body)["choices"][0]["message"]["content"]
    assert answer == "Hello! This"


def test_no_cap_or_no_output_tokens_leaves_the_body_alone():
    body = {"model": "m", "max_tokens": 9, "input": "x"}
    assert capped_body(body, "chat", None) is body
    assert capped_body(body, "embeddings", 5) is body
    assert capped_body(body, "images", 5) is body


# --- usage beyond plain tokens, and garbage -----------------------------------------------

def test_whisper_duration_usage_becomes_seconds_rounded_up():
    usage = Usage()
    read_openai_usage({"type": "duration", "seconds": 9.2}, usage)
    assert (usage.seconds, usage.prompt_tokens, usage.completion_tokens) == (10, 0, 0)
    assert usage.reported


def test_transcribe_token_usage_becomes_tokens():
    usage = Usage()
    read_openai_usage({"type": "tokens", "input_tokens": 14, "output_tokens": 45,
                       "total_tokens": 59,
                       "input_token_details": {"text_tokens": 0, "audio_tokens": 14}}, usage)
    assert (usage.prompt_tokens, usage.completion_tokens, usage.seconds) == (14, 45, 0)


def test_cached_tokens_from_chat_and_responses_usage():
    chat = Usage()
    read_openai_usage({"prompt_tokens": 2006, "completion_tokens": 300, "total_tokens": 2306,
                       "prompt_tokens_details": {"cached_tokens": 1920}}, chat)
    responses = Usage()
    read_openai_usage({"input_tokens": 2006, "output_tokens": 300, "total_tokens": 2306,
                       "input_tokens_details": {"cached_tokens": 1920},
                       "output_tokens_details": {"reasoning_tokens": 120}}, responses)
    for usage in (chat, responses):
        assert (usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens) == \
            (2006, 300, 1920)


@pytest.mark.parametrize("value, kept", [
    (-50, -50), (12.0, 12), (2**60, 2**60), (1e30, None), (12.7, None), ("42", None),
    ("lots", None), (float("inf"), None), (float("nan"), None), (True, None), ([3], None),
    ({"n": 1}, None),
])
def test_garbage_usage_numbers_never_raise(value, kept):
    usage = Usage()
    read_openai_usage({"prompt_tokens": value, "completion_tokens": 3,
                       "prompt_tokens_details": "garbage"}, usage)
    assert usage.completion_tokens == 3 and usage.reported
    if kept is None:  # not a count: 0 and garbled, so the relay counts locally
        assert usage.garbled is True and usage.prompt_tokens == 0
    else:  # a count, even an absurd one, is kept raw: the relay judges it
        assert usage.garbled is False and usage.prompt_tokens == kept


def test_reasoning_refusal_and_tool_text_are_collected():
    chunk = {"choices": [{"index": 0, "delta": {
        "reasoning_content": "thinking", "content": "Hi", "refusal": None,
        "tool_calls": [{"index": 0, "function": {"name": "f", "arguments": "{\"a\""}}]}},
        {"index": 1, "delta": "garbage"}, "garbage"]}
    assert list(adaptor_module.chat_delta_texts(chunk)) == ["Hi", "thinking", "f", "{\"a\""]
    assert list(adaptor_module.chat_delta_texts({"choices": "garbage"})) == []
    payload = {"output": [{"type": "reasoning", "summary": [{"type": "summary_text",
                                                             "text": "why"}]},
                          {"type": "function_call", "arguments": "{}"},
                          {"type": "message", "content": [{"type": "output_text",
                                                           "text": "done"}]}]}
    assert list(adaptor_module.responses_texts(payload)) == ["why", "{}", "done"]


# --- SSE: comment lines are valid and ignored ----------------------------------------------

def test_comment_lines_and_data_less_events_are_dropped():
    raw = (b": OPENROUTER PROCESSING\n\n"
           b"data: {\"a\": 1}\n\n"
           b": keep-alive\r\n\r\n"
           b": inside\nevent: x\ndata: {\"b\": 2}\n\n"
           b"event: lonely\n\n"
           b"id: 7\nretry: 100\n\n"
           b"data: [DONE]\n\n")
    for pieces in ([raw], [bytes([b]) for b in raw]):  # whole, and split at every byte
        events = list(split_sse(pieces))
        assert events == [b"data: {\"a\": 1}", b"event: x\ndata: {\"b\": 2}", b"data: [DONE]"]
    assert sse_data(events[1]) == ("x", "{\"b\": 2}")


def test_recorded_streams_split_the_same_with_comments_between_events():
    raw = fixture_bytes("openai/chat_stream_tool.sse")
    plain = list(split_sse([raw]))
    noisy = raw.replace(b"\n\n", b"\n\n: keep-alive\n\n")
    assert list(split_sse([b": OPENROUTER PROCESSING\n\n", noisy])) == plain


# --- body size cap and stream deadline (every adaptor, base.Adaptor) ----------------------

class FakeResponse:
    """Just what read_capped / stream_pieces use of an upstream_http.UpstreamResponse."""

    def __init__(self, pieces, headers=None, delay=0):
        self._pieces, self.headers, self.delay, self.closed = pieces, headers or {}, delay, False

    def header(self, name, default=None):
        return self.headers.get(name, default)

    def pieces(self):
        for piece in self._pieces:
            time.sleep(self.delay)
            yield piece

    def close(self):
        self.closed = True


def test_a_body_over_the_cap_is_refused_without_reading_it_whole():
    read = []

    def endless():
        while True:
            read.append(1)
            yield b"x" * 1000
    response = FakeResponse(endless())
    with pytest.raises(UpstreamFailure) as err:
        read_capped(response, 10_000)
    assert err.value.kind == "bad_response" and err.value.message == "upstream response too large"
    assert len(read) == 11 and response.closed  # stopped at cap + 1 piece
    declared = FakeResponse(iter([b"{}"]), headers={"Content-Length": "20000"})
    with pytest.raises(UpstreamFailure):
        read_capped(declared, 10_000)
    assert declared.closed
    small = FakeResponse(iter([b'{"a":', b' 1}']))
    assert read_capped(small, 10_000) == b'{"a": 1}'
    dripping = FakeResponse([b"{"] * 10, delay=0.05)
    with pytest.raises(UpstreamFailure) as err:
        read_capped(dripping, 10_000, deadline=time.monotonic() + 0.2)
    assert err.value.kind == "timeout" and dripping.closed


def make_adaptor(url="http://127.0.0.1:9", model="gpt-up", limits=None):
    target = Target(channel_id=1, channel_name="o", type="openai", base_url=url,
                    api_key="sk-up", upstream_model=model)
    return OpenAIAdaptor(target, UpstreamHTTP(), (2, 5), limits)


def test_a_stream_past_its_deadline_or_size_breaks():
    slow = make_adaptor(limits=Limits(stream_seconds=0.2, response_bytes=10_000))
    slow.started = time.monotonic()
    pieces = slow.stream_pieces(FakeResponse([b"data: 1\n\n"] * 10, delay=0.1))
    with pytest.raises(StreamBroken) as err:
        list(pieces)
    assert err.value.timeout and "stream exceeded 0.2 seconds" in str(err.value)
    big = make_adaptor(limits=Limits(stream_seconds=60, response_bytes=10_000))
    big.started = time.monotonic()
    got = []
    with pytest.raises(StreamBroken) as err:
        for piece in big.stream_pieces(FakeResponse([b"x" * 3000] * 10)):
            got.append(piece)
    assert len(got) == 3 and not err.value.timeout and "10000 bytes" in str(err.value)


# --- OpenAIAdaptor over HTTP against the fake upstream ------------------------------------

def chat_call(stream, model="gpt-4o-mini", **fields):
    body = dict({"model": model, "stream": stream,
                 "messages": [{"role": "user", "content": "hello there"}]}, **fields)
    return Call(endpoint="chat", model=model, body=body, raw_body=json.dumps(body).encode(),
                content_type="application/json", stream=stream)


def last_request(fake_upstream):
    return [e for e in fake_upstream.events() if e["type"] == "request"][-1]


def test_adaptor_sends_the_reserved_cap_only(fake_upstream):
    call = chat_call(False, max_tokens=100_000, max_completion_tokens=1)
    call.output_cap = 3
    reply = make_adaptor(fake_upstream.url).send(call)
    assert json.loads(reply.body)["choices"][0]["message"]["content"] == "This is a"
    body = last_request(fake_upstream)["body"]
    assert body["max_tokens"] == 3 and "max_completion_tokens" not in body
    untouched = chat_call(False, max_tokens=3)
    untouched.output_cap = 3
    make_adaptor(fake_upstream.url, model="gpt-4o-mini").send(untouched)
    assert last_request(fake_upstream)["body"] == untouched.body  # sent as received


@pytest.mark.parametrize("stream", [False, True])
def test_adaptor_ignores_sse_comments(fake_upstream, stream):
    call = chat_call(stream)
    call.wants_usage = True
    reply = make_adaptor(fake_upstream.url, model="fault-comments").send(call)
    if stream:
        events = list(split_sse(reply.chunks()))
        assert not any(e.startswith(b":") or b"\n:" in e for e in events)
        assert events[-1] == b"data: [DONE]"
    assert reply.usage.reported and reply.usage.completion_tokens == 9


def test_adaptor_reads_transcription_usage_and_image_counts(fake_upstream):
    adaptor = make_adaptor(fake_upstream.url, model="whisper-1")
    upload = Call(endpoint="audio_transcriptions", model="whisper-1", body={}, raw_body=b"",
                  content_type="multipart/form-data", form={"model": "whisper-1"},
                  files=[("file", "a.wav", b"RIFF" + b"\0" * 50, "audio/wav")])
    reply = adaptor.send(upload)
    assert reply.usage.seconds == 3 and reply.usage.reported  # 2.4 s rounded up
    tokens = make_adaptor(fake_upstream.url, model="gpt-4o-transcribe").send(upload)
    assert (tokens.usage.prompt_tokens, tokens.usage.completion_tokens) == (14, 6)
    for model, reported in (("dall-e-3", False), ("gpt-image-1", True)):
        body = {"model": "img", "prompt": "a red cat", "n": 3}
        images = make_adaptor(fake_upstream.url, model=model).send(
            Call(endpoint="images", model="img", body=body, raw_body=json.dumps(body).encode(),
                 content_type="application/json", output_cap=4096))
        assert images.usage.images == 3 and images.usage.reported is reported
        assert last_request(fake_upstream)["body"]["n"] == 3  # n passes through
        assert "max_tokens" not in last_request(fake_upstream)["body"]
    assert images.usage.completion_tokens == 3 * 272


def test_adaptor_refuses_a_huge_body_and_breaks_a_huge_stream(fake_upstream):
    limits = Limits(stream_seconds=60, response_bytes=1_000_000)
    with pytest.raises(UpstreamFailure, match="too large"):
        make_adaptor(fake_upstream.url, model="fault-huge", limits=limits).send(chat_call(False))
    reply = make_adaptor(fake_upstream.url, model="fault-huge", limits=limits).send(
        chat_call(True))
    got = 0
    with pytest.raises(StreamBroken, match="exceeded 1000000 bytes"):
        for chunk in reply.chunks():
            got += len(chunk)
    assert 900_000 < got <= 1_000_000
    reply.close()
