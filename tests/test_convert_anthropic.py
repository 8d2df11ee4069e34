"""OpenAI chat <-> Anthropic Messages conversions, on payloads recorded from the public references.

The last tests drive AnthropicAdaptor against the fake upstream process over real HTTP.
"""
import json
import os

import pytest
import requests

from blueprints.api.errors import ApiError
from blueprints.api.providers import anthropic_convert as convert
from blueprints.api.providers.anthropic import AnthropicAdaptor, parse_event
from blueprints.api.providers.base import (
    Call, Reply, StreamBroken, Target, UpstreamFailure, Usage, split_sse,
)
from blueprints.api.upstream_http import UpstreamHTTP

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


def fixture_json(name):
    with open(os.path.join(FIXTURES, name)) as fh:
        return json.load(fh)


def fixture_bytes(name):
    with open(os.path.join(FIXTURES, name), "rb") as fh:
        return fh.read()


def anthropic_events(name):
    return [parse_event(e) for e in split_sse([fixture_bytes(name)])]


def openai_chunks(stream_bytes):
    """Parsed OpenAI chunks (and the literal "[DONE]") from SSE bytes."""
    out = []
    for event in split_sse(stream_bytes if isinstance(stream_bytes, list) else [stream_bytes]):
        text = event.decode()
        assert text.startswith("data: ")
        data = text[len("data: "):]
        out.append(data if data == "[DONE]" else json.loads(data))
    return out


def anthropic_stream(chunks):
    """[(event name, data)] from Anthropic SSE byte pieces, checking name == data.type."""
    events = [parse_event(e) for e in split_sse(chunks)]
    for name, data in events:
        assert name == data["type"]
    return events


# --- OpenAI request -> Anthropic request --------------------------------------------------

def test_full_openai_request_becomes_messages_request():
    body = fixture_json("openai/chat_request_full.json")
    out = convert.openai_to_anthropic_request(body, "claude-sonnet-4-5-20250929")
    assert out["model"] == "claude-sonnet-4-5-20250929"
    assert out["system"] == "You are a weather assistant.\n\nAnswer briefly."
    assert out["max_tokens"] == 1024  # max_completion_tokens honoured
    assert out["temperature"] == 0.2 and out["top_p"] == 0.9
    assert out["stop_sequences"] == ["END"]
    assert out["stream"] is True and "stream_options" not in out
    assert out["metadata"] == {"user_id": "user-1234"}
    assert out["tool_choice"] == {"type": "any", "disable_parallel_tool_use": True}
    assert out["tools"][0] == {
        "name": "get_weather", "description": "Get the current weather in a given location",
        "input_schema": body["tools"][0]["function"]["parameters"]}

    roles = [m["role"] for m in out["messages"]]
    assert roles == ["user", "assistant", "user", "assistant", "user"]  # alternating
    first = out["messages"][0]["content"]  # two user turns merged
    assert first[0] == {"type": "text", "text": "What's the weather like in Paris?"}
    assert first[2] == {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                                    "data": "iVBORw0KGgoAAAANSUhEUg=="}}
    assert first[3] == {"type": "image", "source": {
        "type": "url",
        "url": "https://upload.wikimedia.org/wikipedia/commons/a/a7/Camponotus_flavomarginatus_ant.jpg"}}
    tool_uses = out["messages"][1]["content"]
    assert tool_uses == [
        {"type": "tool_use", "id": "call_abc123", "name": "get_weather",
         "input": {"location": "Paris, France"}},
        {"type": "tool_use", "id": "call_def456", "name": "get_time",
         "input": {"timezone": "Europe/Paris"}}]
    assert out["messages"][2]["content"] == [
        {"type": "tool_result", "tool_use_id": "call_abc123",
         "content": '{"temperature": 22, "unit": "celsius"}'},
        {"type": "tool_result", "tool_use_id": "call_def456", "content": "14:05"}]
    assert out["messages"][3]["content"] == [{"type": "text",
                                              "text": "It is 22°C and 14:05 in Paris."}]


def test_max_tokens_default_and_plain_values():
    out = convert.openai_to_anthropic_request(
        {"messages": [{"role": "user", "content": "hi"}], "stop": "###", "max_tokens": 77},
        "claude")
    assert out["max_tokens"] == 77 and out["stop_sequences"] == ["###"]
    out = convert.openai_to_anthropic_request({"messages": [{"role": "user", "content": "hi"}]},
                                              "claude")
    assert out["max_tokens"] == 4096
    assert "system" not in out and "tools" not in out and "stream" not in out


@pytest.mark.parametrize("choice, expected", [
    ("auto", {"type": "auto"}), ("none", {"type": "none"}), ("required", {"type": "any"}),
    ({"type": "function", "function": {"name": "f"}}, {"type": "tool", "name": "f"}),
])
def test_tool_choice_mapping(choice, expected):
    body = {"messages": [{"role": "user", "content": "x"}], "tool_choice": choice,
            "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}
    assert convert.openai_to_anthropic_request(body, "m")["tool_choice"] == expected


def test_unsupported_content_part_is_a_clear_400():
    body = {"messages": [{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": "...", "format": "wav"}}]}]}
    with pytest.raises(ApiError) as err:
        convert.openai_to_anthropic_request(body, "m")
    assert err.value.status == 400 and "input_audio" in err.value.message


# --- Anthropic response -> OpenAI completion ----------------------------------------------

def test_text_response_to_completion():
    out = convert.anthropic_to_openai_response(fixture_json("anthropic/message_text.json"),
                                               "claude-sonnet-4-6")
    assert out["id"] == "chatcmpl-msg_013Zva2CMHLNnXjNJJKqJ2EF"
    assert out["object"] == "chat.completion" and out["model"] == "claude-sonnet-4-6"
    choice = out["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": "Hi! My name is Claude."}
    assert choice["finish_reason"] == "stop"
    assert out["usage"] == {"prompt_tokens": 2095, "completion_tokens": 503, "total_tokens": 2598,
                            "prompt_tokens_details": {"cached_tokens": 0}}


def test_tool_use_response_to_completion():
    out = convert.anthropic_to_openai_response(fixture_json("anthropic/message_tool_use.json"), "c")
    message = out["choices"][0]["message"]
    assert message["content"] == "I'll check the current weather in San Francisco for you."
    call = message["tool_calls"][0]
    assert call["id"] == "toolu_01A09q90qw90lq917835lq9" and call["type"] == "function"
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"location": "San Francisco, CA",
                                                         "unit": "celsius"}
    assert out["choices"][0]["finish_reason"] == "tool_calls"


def test_cache_tokens_are_part_of_prompt_and_cached():
    out = convert.anthropic_to_openai_response(fixture_json("anthropic/message_cached.json"), "c")
    assert out["usage"]["prompt_tokens"] == 21 + 188086 + 1200
    assert out["usage"]["prompt_tokens_details"]["cached_tokens"] == 1200
    assert out["usage"]["completion_tokens"] == 393
    assert out["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize("reason, finish", [
    ("end_turn", "stop"), ("stop_sequence", "stop"), ("max_tokens", "length"),
    ("tool_use", "tool_calls"), ("refusal", "content_filter")])
def test_stop_reason_mapping(reason, finish):
    message = dict(fixture_json("anthropic/message_text.json"), stop_reason=reason)
    assert convert.anthropic_to_openai_response(message, "c")["choices"][0]["finish_reason"] == finish


# --- Anthropic stream -> OpenAI chunks ----------------------------------------------------

def run_stream(name, wants_usage=True):
    usage, text = Usage(), []
    chunks = list(convert.anthropic_stream_to_openai(anthropic_events(name), "claude-sonnet-4-6",
                                                     wants_usage, usage, text))
    return openai_chunks(chunks), usage, text


def test_text_stream_to_chunks():
    chunks, usage, text = run_stream("anthropic/stream_text.sse")
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert [c["choices"][0]["delta"]["content"] for c in chunks[1:3]] == ["Hello", "!"]
    assert chunks[3]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None,
                                       "finish_reason": "stop"}
    assert chunks[4]["choices"] == [] and chunks[4]["usage"]["prompt_tokens"] == 25
    assert chunks[4]["usage"]["completion_tokens"] == 15
    assert chunks[5] == "[DONE]" and len(chunks) == 6
    assert {c["id"] for c in chunks[:-1]} == {"chatcmpl-msg_1nZdL29xx5MUA1yADyHTEsnR8uuvGzszyY"}
    assert all(c["object"] == "chat.completion.chunk" for c in chunks[:-1])
    assert (usage.prompt_tokens, usage.completion_tokens, usage.reported) == (25, 15, True)
    assert "".join(text) == "Hello!"


def test_usage_chunk_only_when_the_client_asked():
    chunks, usage, _ = run_stream("anthropic/stream_text.sse", wants_usage=False)
    assert not any(isinstance(c, dict) and c.get("usage") for c in chunks)
    assert chunks[-1] == "[DONE]"
    assert usage.completion_tokens == 15  # the relay still meters it


def test_tool_use_stream_to_tool_call_deltas():
    chunks, usage, _ = run_stream("anthropic/stream_tool_use.sse")
    deltas = [c["choices"][0]["delta"] for c in chunks if isinstance(c, dict) and c["choices"]]
    assert "".join(d.get("content", "") for d in deltas) == \
        "Okay, let's check the weather for San Francisco, CA:"
    calls = [d["tool_calls"][0] for d in deltas if "tool_calls" in d]
    assert calls[0] == {"index": 0, "id": "toolu_01T1x1fJ34qAmk2tNTrN7Up6", "type": "function",
                        "function": {"name": "get_weather", "arguments": ""}}
    arguments = "".join(c["function"]["arguments"] for c in calls[1:])
    assert json.loads(arguments) == {"location": "San Francisco, CA", "unit": "fahrenheit"}
    assert all(c["index"] == 0 and "id" not in c for c in calls[1:])
    assert chunks[-3]["choices"][0]["finish_reason"] == "tool_calls"
    # cache writes and reads count in the prompt; reads are the cached part
    assert (usage.prompt_tokens, usage.cached_tokens, usage.completion_tokens) == (622, 50, 89)
    assert chunks[-2]["usage"]["prompt_tokens_details"] == {"cached_tokens": 50}


def test_thinking_stream_becomes_reasoning_content():
    chunks, usage, _ = run_stream("anthropic/stream_thinking.sse")
    deltas = [c["choices"][0]["delta"] for c in chunks if isinstance(c, dict) and c["choices"]]
    assert deltas[1]["reasoning_content"].startswith("Let me solve this")
    assert deltas[2] == {"content": "27 * 453 = 12,231"}
    # message_delta's cumulative input counts replace message_start's
    assert (usage.prompt_tokens, usage.cached_tokens, usage.completion_tokens) == (48, 8, 120)


def test_error_event_breaks_the_stream():
    usage, text = Usage(), []
    stream = convert.anthropic_stream_to_openai(anthropic_events("anthropic/stream_error.sse"),
                                                "c", True, usage, text)
    got = []
    with pytest.raises(StreamBroken, match="Overloaded"):
        for piece in stream:
            got.append(piece)
    assert len(got) == 2 and text == ["Hel"]  # role chunk and "Hel" went out first
    assert usage.prompt_tokens == 25


def test_stream_without_message_stop_is_broken():
    events = anthropic_events("anthropic/stream_text.sse")[:-1]
    with pytest.raises(StreamBroken):
        list(convert.anthropic_stream_to_openai(events, "c", False, Usage(), []))


# --- inbound: Anthropic request -> OpenAI request -----------------------------------------

def test_full_messages_request_becomes_chat_request():
    out = convert.anthropic_to_openai_request(fixture_json("anthropic/messages_request_full.json"))
    assert out["model"] == "claude-sonnet-4-6"
    assert out["max_tokens"] == 1024 and out["temperature"] == 0.5 and out["top_p"] == 0.8
    assert "top_k" not in out
    assert out["stop"] == ["\n\nHuman:"]
    assert out["stream"] is True and out["stream_options"] == {"include_usage": True}
    assert out["user"] == "13803d75-b4b5-4c3e-b2a2-6f21399b021b"
    assert out["tool_choice"] == "required" and out["parallel_tool_calls"] is False
    assert out["tools"] == [{"type": "function", "function": {
        "name": "get_weather", "description": "Get the current weather in a given location",
        "parameters": {"type": "object", "properties": {"location": {"type": "string"}},
                       "required": ["location"]}}}]
    messages = out["messages"]
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "tool", "user",
                                             "assistant", "user"]
    assert messages[0]["content"] == "You are a helpful assistant.\n\nBe brief."
    user = messages[1]["content"]
    assert user[0] == {"type": "text", "text": "What's in this image, and the weather in SF?"}
    assert user[1] == {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,/9j/4AAQSkZJRg=="}}
    assert user[2]["image_url"]["url"].startswith("https://upload.wikimedia.org/")
    assistant = messages[2]
    assert assistant["content"] == "An ant. Let me check the weather."  # thinking dropped
    assert assistant["tool_calls"] == [{"id": "toolu_01A09q90qw90lq917835lq9", "type": "function",
                                        "function": {"name": "get_weather",
                                                     "arguments": '{"location": "San Francisco, CA"}'}}]
    assert messages[3] == {"role": "tool", "tool_call_id": "toolu_01A09q90qw90lq917835lq9",
                           "content": "15 degrees"}
    assert messages[4] == {"role": "user", "content": "And in Celsius?"}
    assert messages[6] == {"role": "user", "content": "Thanks"}


def test_system_blocks_are_joined_text():
    out = convert.anthropic_to_openai_request({"model": "m", "max_tokens": 5, "system": [
        {"type": "text", "text": "A."}, {"type": "text", "text": "B."}],
        "messages": [{"role": "user", "content": "x"}]})
    assert out["messages"][0] == {"role": "system", "content": "A.\n\nB."}
    assert "stream" not in out


def test_server_tools_are_refused_on_other_providers():
    with pytest.raises(ApiError) as err:
        convert.anthropic_to_openai_request({"model": "m", "max_tokens": 5, "messages": [],
                                             "tools": [{"type": "web_search_20250305",
                                                        "name": "web_search"}]})
    assert err.value.status == 400


def test_tool_result_errors_are_marked():
    out = convert.anthropic_to_openai_request({"model": "m", "max_tokens": 5, "messages": [
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1",
                                      "content": "boom", "is_error": True}]}]})
    assert out["messages"] == [{"role": "tool", "tool_call_id": "t1", "content": "Error: boom"}]


# --- inbound: OpenAI completion / chunks -> Anthropic -------------------------------------

def test_completion_to_message():
    out = convert.openai_to_anthropic_response(fixture_json("openai/chat_completion_tool.json"),
                                               "claude-sonnet-4-6")
    assert out["id"] == "msg_B9MHDbslfkBeAs8l4bebGdFOJ6PeG"
    assert out["type"] == "message" and out["role"] == "assistant"
    assert out["model"] == "claude-sonnet-4-6"
    assert out["content"] == [
        {"type": "text", "text": "Let me look that up."},
        {"type": "tool_use", "id": "call_abc123", "name": "get_current_weather",
         "input": {"location": "Boston, MA"}}]
    assert out["stop_reason"] == "tool_use" and out["stop_sequence"] is None
    assert out["usage"] == {"input_tokens": 18, "output_tokens": 17,
                            "cache_creation_input_tokens": 0, "cache_read_input_tokens": 64}


def test_chunk_stream_to_anthropic_events_in_order():
    usage = Usage()
    pieces = list(convert.openai_stream_to_anthropic(
        [fixture_bytes("openai/chat_stream_tool.sse")], "claude-sonnet-4-6", 99, usage))
    events = anthropic_stream(pieces)
    kinds = [data["type"] for _, data in events]
    assert kinds == [
        "message_start",
        "content_block_start", "content_block_delta", "content_block_delta", "content_block_stop",
        "content_block_start", "content_block_delta", "content_block_delta", "content_block_stop",
        "content_block_start", "content_block_delta", "content_block_stop",
        "message_delta", "message_stop"]
    start = events[0][1]["message"]
    assert start["role"] == "assistant" and start["content"] == [] and start["id"].startswith("msg_")
    assert start["usage"]["input_tokens"] == 99  # the local estimate, before the real count
    assert events[1][1] == {"type": "content_block_start", "index": 0,
                            "content_block": {"type": "text", "text": ""}}
    assert events[2][1]["delta"] == {"type": "text_delta", "text": "Checking"}
    assert events[5][1]["content_block"] == {"type": "tool_use",
                                             "id": "call_DdmO9pD3xa9XTPNJ32zg2hcA",
                                             "name": "get_weather", "input": {}}
    assert events[6][1] == {"type": "content_block_delta", "index": 1,
                            "delta": {"type": "input_json_delta", "partial_json": '{"location"'}}
    assert events[9][1]["content_block"]["name"] == "get_time"
    assert events[10][1]["index"] == 2
    final = events[12][1]
    assert final["delta"] == {"stop_reason": "tool_use", "stop_sequence": None}
    assert final["usage"] == {"input_tokens": 20, "output_tokens": 31,
                              "cache_creation_input_tokens": 0, "cache_read_input_tokens": 100}


def test_chunk_stream_falls_back_to_inner_usage_and_propagates_breaks():
    usage = Usage()
    usage.add_reported(10, 4, 0)
    text_only = (b'data: {"choices":[{"index":0,"delta":{"content":"Hi"},"finish_reason":null}]}\n\n'
                 b'data: {"choices":[{"index":0,"delta":{},"finish_reason":"length"}]}\n\n'
                 b"data: [DONE]\n\n")
    events = anthropic_stream(list(convert.openai_stream_to_anthropic([text_only], "m", 3, usage)))
    assert events[-2][1]["delta"]["stop_reason"] == "max_tokens"
    assert events[-2][1]["usage"]["input_tokens"] == 10 and events[-2][1]["usage"]["output_tokens"] == 4

    def broken():
        yield b'data: {"choices":[{"index":0,"delta":{"content":"Hi"}}]}\n\n'
        raise StreamBroken("upstream connection broke")
    stream = convert.openai_stream_to_anthropic(broken(), "m", 3, Usage())
    with pytest.raises(StreamBroken):
        list(stream)


class ChatOnly:
    """A stand-in adaptor whose send_chat returns canned OpenAI replies (no network)."""

    def __init__(self, body=None, chunks=None):
        self.body, self.chunks, self.calls, self.closed = body, chunks, [], False

    def send_chat(self, call):
        self.calls.append(call)
        reply = Reply(body=self.body, chunks=iter(self.chunks) if self.chunks else None,
                      close=lambda: setattr(self, "closed", True))
        reply.usage.add_reported(120, 31, 100)
        reply.output_text.append("Checking now.")
        return reply


def messages_call(stream):
    body = {"model": "claude-sonnet-4-6", "max_tokens": 50, "stream": stream,
            "messages": [{"role": "user", "content": "Weather in Paris?"}]}
    return Call(endpoint="messages", model="claude-sonnet-4-6", body=body,
                raw_body=json.dumps(body).encode(), content_type="application/json",
                stream=stream, request_id="req-1", headers={"anthropic-beta": "x"})


def test_messages_via_chat_non_stream():
    inner = ChatOnly(body=fixture_bytes("openai/chat_completion_tool.json"))
    reply = convert.messages_via_chat(inner, messages_call(False))
    chat_call = inner.calls[0]
    assert chat_call.endpoint == "chat" and chat_call.wants_usage and not chat_call.stream
    assert chat_call.body["messages"] == [{"role": "user", "content": "Weather in Paris?"}]
    assert json.loads(chat_call.raw_body) == chat_call.body
    message = json.loads(reply.body)
    assert message["type"] == "message" and message["content"][1]["type"] == "tool_use"
    assert (reply.usage.prompt_tokens, reply.usage.cached_tokens) == (120, 100)
    assert reply.output_text == ["Checking now."]
    reply.close()
    assert inner.closed


def test_messages_via_chat_stream():
    inner = ChatOnly(chunks=[fixture_bytes("openai/chat_stream_tool.sse")])
    reply = convert.messages_via_chat(inner, messages_call(True))
    assert inner.calls[0].stream and inner.calls[0].body["stream_options"] == {"include_usage": True}
    assert reply.is_stream and reply.content_type == "text/event-stream"
    events = anthropic_stream(list(reply.chunks()))
    assert events[0][0] == "message_start" and events[-1][0] == "message_stop"
    assert reply.usage.completion_tokens == 31


def test_bad_inner_body_is_a_bad_response():
    with pytest.raises(UpstreamFailure) as err:
        convert.messages_via_chat(ChatOnly(body=b"not json"), messages_call(False))
    assert err.value.kind == "bad_response" and err.value.retryable


# --- AnthropicAdaptor over HTTP against the fake upstream ---------------------------------

def adaptor(fake_upstream, model="claude-up", base_suffix=""):
    target = Target(channel_id=1, channel_name="a", type="anthropic",
                    base_url=fake_upstream.url + base_suffix, api_key="sk-ant-secret",
                    upstream_model=model)
    return AnthropicAdaptor(target, UpstreamHTTP(), (2, 5))


def chat_call(stream, tools=False, wants_usage=False):
    body = {"model": "claude-sonnet-4-6", "stream": stream,
            "messages": [{"role": "system", "content": "Be brief."},
                         {"role": "user", "content": "hello there"}]}
    if tools:
        body["tools"] = [{"type": "function", "function": {"name": "get_weather",
                                                           "parameters": {"type": "object"}}}]
    return Call(endpoint="chat", model="claude-sonnet-4-6", body=body,
                raw_body=json.dumps(body).encode(), content_type="application/json",
                stream=stream, wants_usage=wants_usage,
                headers={"Anthropic-Beta": "prompt-caching-2024-07-31"})


def test_adaptor_chat_non_stream_sends_anthropic_headers(fake_upstream):
    fake_upstream.clear()
    reply = adaptor(fake_upstream, base_suffix="/v1").send(chat_call(False))
    completion = json.loads(reply.body)
    assert completion["choices"][0]["message"]["content"].startswith("This is a deterministic")
    assert reply.usage.reported and reply.usage.completion_tokens == 9
    seen = [e for e in fake_upstream.events() if e["type"] == "request"][-1]
    assert seen["path"] == "/v1/messages" and seen["api_key"] == "sk-ant-secret"
    assert seen["body"]["model"] == "claude-up" and seen["body"]["system"] == "Be brief."
    assert seen["body"]["max_tokens"] == 4096


def test_adaptor_chat_stream_with_tools(fake_upstream):
    reply = adaptor(fake_upstream).send(chat_call(True, tools=True, wants_usage=True))
    chunks = openai_chunks(list(reply.chunks()))
    calls = [c["choices"][0]["delta"]["tool_calls"][0] for c in chunks
             if isinstance(c, dict) and c["choices"] and "tool_calls" in c["choices"][0]["delta"]]
    assert calls[0]["id"] == "toolu_fake_1" and calls[0]["function"]["name"] == "get_weather"
    assert json.loads("".join(c["function"]["arguments"] for c in calls)) == {"location": "Paris"}
    assert chunks[-2]["usage"]["completion_tokens"] == 5
    reply.close()


def test_adaptor_passes_messages_through_unchanged(fake_upstream):
    body = {"model": "claude-sonnet-4-6", "max_tokens": 3, "stream": True,
            "messages": [{"role": "user", "content": "hello there"}]}
    call = Call(endpoint="messages", model="claude-sonnet-4-6", body=body,
                raw_body=json.dumps(body).encode(), content_type="application/json", stream=True)
    reply = adaptor(fake_upstream).send(call)
    pieces = list(reply.chunks())
    direct = requests.post(fake_upstream.url + "/v1/messages",
                           json=dict(body, model="claude-up")).content
    assert b"".join(pieces) == direct  # byte for byte, event by event
    assert all(p.endswith(b"\n\n") for p in pieces)
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (5, 3)
    assert "".join(reply.output_text) == "This is a"


@pytest.mark.parametrize("model, kind, status, retryable", [
    ("fault-500", "status", 500, True), ("fault-429", "status", 429, True),
    ("fault-400", "status", 400, False), ("fault-401", "status", 401, False),
])
def test_adaptor_maps_upstream_errors(fake_upstream, model, kind, status, retryable):
    with pytest.raises(UpstreamFailure) as err:
        adaptor(fake_upstream, model).send(chat_call(False))
    assert (err.value.kind, err.value.status, err.value.retryable) == (kind, status, retryable)
    if model == "fault-400":
        assert err.value.message == "The fake upstream rejected this request: bad parameter."
        assert err.value.error_type == "invalid_request_error"
    if model == "fault-429":
        assert err.value.retry_after == "7"


def test_adaptor_connect_timeout_and_garbage(fake_upstream):
    dead = Target(1, "a", "anthropic", "http://127.0.0.1:9", "k", "m")
    with pytest.raises(UpstreamFailure) as err:
        AnthropicAdaptor(dead, UpstreamHTTP(), (1, 1)).send(chat_call(False))
    assert err.value.kind == "connect"
    slow = adaptor(fake_upstream, "fault-timeout")
    slow.timeout = (2, 0.5)
    with pytest.raises(UpstreamFailure) as err:
        slow.send(chat_call(False))
    assert err.value.kind == "timeout"
    with pytest.raises(UpstreamFailure) as err:
        adaptor(fake_upstream, "fault-malformed").send(chat_call(False))
    assert err.value.kind == "bad_response"


def test_adaptor_stream_faults(fake_upstream):
    with pytest.raises(UpstreamFailure) as err:  # error as first event: still retryable
        adaptor(fake_upstream, "fault-overloaded").send(chat_call(True))
    assert err.value.status == 529 and err.value.retryable
    for model in ("fault-stream-error", "fault-break"):
        reply = adaptor(fake_upstream, model).send(chat_call(True))
        with pytest.raises(StreamBroken):
            list(reply.chunks())
        reply.close()


# --- the output cap the relay reserved for (SPEC §10) -------------------------------------

def test_output_cap_replaces_whatever_the_client_asked():
    body = fixture_json("openai/chat_request_full.json")
    body.update(max_tokens=100_000, max_completion_tokens=1, n=1)
    out = convert.openai_to_anthropic_request(body, "claude-up", output_cap=256)
    assert out["max_tokens"] == 256 and "max_completion_tokens" not in out
    # without a cap (a caller that reserved nothing) the client's limit still goes through
    assert convert.openai_to_anthropic_request(body, "claude-up")["max_tokens"] == 1


def test_messages_via_chat_hands_the_cap_to_the_inner_adaptor():
    inner = ChatOnly(body=fixture_bytes("openai/chat_completion_tool.json"))
    call = messages_call(False)
    call.body["max_completion_tokens"] = 1  # a stray OpenAI field on an Anthropic request
    call.output_cap = 50
    convert.messages_via_chat(inner, call)
    chat_call = inner.calls[0]
    assert chat_call.output_cap == 50
    # the inner adaptor picks the field its channel honours: no cap field is pre-set for it
    assert "max_tokens" not in chat_call.body and "max_completion_tokens" not in chat_call.body


def test_native_messages_send_exactly_the_reserved_cap(fake_upstream):
    fake_upstream.clear()
    body = {"model": "claude-sonnet-4-6", "max_tokens": 100_000, "max_completion_tokens": 1,
            "messages": [{"role": "user", "content": "hello"}]}
    call = Call(endpoint="messages", model="claude-sonnet-4-6", body=body,
                raw_body=json.dumps(body).encode(), content_type="application/json",
                output_cap=3)
    reply = adaptor(fake_upstream).send(call)
    assert json.loads(reply.body)["content"][0]["text"] == "This is a"
    seen = [e for e in fake_upstream.events() if e["type"] == "request"][-1]
    assert seen["body"]["max_tokens"] == 3
    chat = chat_call(False)
    chat.body.update(max_tokens=100_000)
    chat.output_cap = 2
    adaptor(fake_upstream).send(chat)
    seen = [e for e in fake_upstream.events() if e["type"] == "request"][-1]
    assert seen["body"]["max_tokens"] == 2


# --- usage: cache writes, streams cut short, garbage numbers ------------------------------

def test_cache_writes_and_reads_are_kept_apart():
    usage = Usage()
    convert.AnthropicUsageTracker(usage).update(
        fixture_json("anthropic/message_cached.json")["usage"])
    raw = fixture_json("anthropic/message_cached.json")["usage"]
    assert usage.cache_write_tokens == raw.get("cache_creation_input_tokens", 0)
    assert usage.cached_tokens == raw["cache_read_input_tokens"]
    assert usage.prompt_tokens == (raw["input_tokens"] + raw["cache_read_input_tokens"]
                                   + raw.get("cache_creation_input_tokens", 0))
    body = convert.anthropic_usage_of(usage)  # an Anthropic client sees them in its own shape
    assert body["input_tokens"] == raw["input_tokens"]
    assert body["cache_creation_input_tokens"] == raw.get("cache_creation_input_tokens", 0)


def test_message_start_usage_is_not_final():
    """A stream cut after message_start is counted from its text, not billed 1 token."""
    events = anthropic_events("anthropic/stream_text.sse")
    for cut in range(1, 6):  # message_start ... the second text delta
        usage, text = Usage(), []
        stream = convert.anthropic_stream_to_openai(iter(events[:cut]), "c", True, usage, text)
        with pytest.raises(StreamBroken):
            list(stream)
        assert usage.reported is False
        assert usage.prompt_tokens == 25  # stored: the relay may use the exact prompt
        assert "".join(text) == "".join(["", "", "", "Hello", "Hello!"][cut - 1])


def test_pass_through_stream_cut_short_counts_what_was_delivered():
    raw = fixture_bytes("anthropic/stream_tool_use.sse")
    events = list(split_sse([raw]))
    reply = Reply(chunks=iter(()))
    piped = AnthropicAdaptor._pass_through(None, iter(events[:-3]), reply)
    forwarded = list(piped_until_broken(piped))
    assert len(forwarded) == len(events) - 3
    assert reply.usage.reported is False
    text = "".join(reply.output_text)
    assert "Okay, let's check the weather" in text and "get_weather" in text
    assert '"San Francisco, CA"' in text  # tool-call argument deltas count too
    whole = Reply(chunks=iter(()))
    list(AnthropicAdaptor._pass_through(None, iter(events), whole))
    assert whole.usage.reported is True and whole.usage.completion_tokens == 89


def piped_until_broken(stream):
    try:
        yield from stream
    except StreamBroken:
        return


@pytest.mark.parametrize("garbage", [1e30, -5, "lots", 12.7, None, [], {"a": 1}, True])
def test_garbage_usage_never_raises(garbage):
    usage = Usage()
    convert.AnthropicUsageTracker(usage).update({"input_tokens": garbage, "output_tokens": 7})
    assert usage.reported and usage.completion_tokens == 7
    if garbage == -5:
        assert not usage.garbled and usage.prompt_tokens == -5  # kept raw: the relay judges
    elif garbage is None:  # absent: 0
        assert not usage.garbled and usage.prompt_tokens == 0
    else:
        assert usage.garbled and usage.prompt_tokens == 0
    message = dict(fixture_json("anthropic/message_text.json"),
                   usage={"input_tokens": garbage, "output_tokens": garbage})
    json.dumps(convert.anthropic_to_openai_response(message, "c"), allow_nan=False)


def test_native_messages_go_out_byte_for_byte_when_nothing_changes():
    """Same model name upstream, the cap the client asked for: the body is not re-encoded."""
    from tests.test_upstream_http import ScriptedUpstream, answer
    message = {"id": "msg_1", "type": "message", "role": "assistant", "model": "claude-up",
               "content": [{"type": "text", "text": "Hi"}], "stop_reason": "end_turn",
               "usage": {"input_tokens": 3, "output_tokens": 1}}
    server = ScriptedUpstream(lambda n, head: (answer(json.dumps(message).encode()), "keep"))
    try:
        target = Target(1, "a", "anthropic", server.url(""), "sk-ant-secret", "claude-up")
        raw = b'{"model":"claude-up",  "max_tokens":5,"messages":[{"role":"user","content":"hi"}]}'
        call = Call(endpoint="messages", model="claude-up", body=json.loads(raw), raw_body=raw,
                    content_type="application/json", output_cap=5)
        reply = AnthropicAdaptor(target, UpstreamHTTP(), (2, 5)).send(call)
        assert reply.usage.completion_tokens == 1
        call.output_cap = 4  # a smaller cap reserved: the body changes
        AnthropicAdaptor(target, UpstreamHTTP(), (2, 5)).send(call)
        first, second = [body for _, _, body in server.requests]
        assert first == raw and json.loads(second)["max_tokens"] == 4
    finally:
        server.close()
