"""Hostile /v1 input gets a 400 in the route's shape and keeps its log row (issue 10, finding 7).

Unit tests of blueprints/api/validation.py, then the bodies the fuzz found giving 500s, sent
raw to a live gateway on both databases (2^63 overflowed PostgreSQL's BIGINT; a lone
surrogate could not be stored in the log row at all).
"""
import json

import pytest
import requests

from blueprints.api.errors import ApiError
from blueprints.api.validation import validate_body

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
MESSAGES = {"model": "gpt-4o-mini", "max_tokens": 10,
            "messages": [{"role": "user", "content": "hi"}]}


def nested(depth):
    return "[" * depth + "]" * depth


@pytest.mark.parametrize("endpoint, body, param", [
    ("chat", dict(CHAT, model="\ud800"), "model"),
    ("chat", dict(CHAT, model="gpt\x00"), "model"),
    ("chat", dict(CHAT, model="gpt\u202e"), "model"),
    ("chat", dict(CHAT, model="m" * 201), "model"),
    ("chat", dict(CHAT, messages=[1]), "messages"),
    ("chat", dict(CHAT, messages=[{"content": "no role"}]), "messages"),
    ("chat", dict(CHAT, messages=[{"role": "user", "content": [1]}]), "messages"),
    ("chat", dict(CHAT, tools="x"), "tools"),
    ("chat", dict(CHAT, tools=[{"type": "function"}]), "tools"),
    ("chat", dict(CHAT, tool_choice={"type": "function"}), "tool_choice"),
    ("chat", dict(CHAT, stop=[1]), "stop"),
    ("messages", dict(MESSAGES, messages=[1, "x"]), "messages"),
    ("messages", dict(MESSAGES, messages=[{"role": "user", "content": None}]), "messages"),
    ("messages", dict(MESSAGES, messages=[{"role": "system", "content": "x"}]), "messages"),
    ("messages", dict(MESSAGES, messages=[{"role": "user", "content": [{"text": "x"}]}]),
     "messages"),
    ("messages", dict(MESSAGES, tools="x"), "tools"),
    ("messages", dict(MESSAGES, tool_choice="auto"), "tool_choice"),
    ("messages", dict(MESSAGES, system=[1]), "system"),
    ("messages", dict(MESSAGES, stop_sequences="x"), "stop_sequences"),
    ("messages_count_tokens", dict(MESSAGES, metadata=[]), "metadata"),
    ("completions", {"model": "m", "prompt": "hi", "stream": "yes"}, "stream"),
    ("responses", {"model": "m", "input": "hi", "stream": [None, {}]}, "stream"),
    ("messages", dict(MESSAGES, stream=1), "stream"),
    ("chat", dict(CHAT, stream=True, stream_options="include_usage"), "stream_options"),
])
def test_invalid_bodies_are_400_naming_the_field(endpoint, body, param):
    with pytest.raises(ApiError) as caught:
        validate_body(endpoint, body)
    assert (caught.value.status, caught.value.code, caught.value.param) == \
        (400, "invalid_request_error", param)


def test_deep_nesting_is_400_without_recursion():
    with pytest.raises(ApiError):
        validate_body("chat", dict(CHAT, extra=json.loads(nested(65))))
    validate_body("chat", dict(CHAT, extra=json.loads(nested(60))))


@pytest.mark.parametrize("endpoint, body", [
    ("chat", dict(CHAT, max_tokens=None, n=2,
                  tools=[{"type": "function", "function": {"name": "f"}}],
                  tool_choice={"type": "function", "function": {"name": "f"}},
                  stop=["x"], response_format={"type": "json_object"})),
    ("chat", dict(CHAT, messages=[{"role": "user", "content": [
        {"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {"url": "x"}}]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}])),
    ("chat", dict(CHAT, model="claude-3.5/sonnet:beta@2024 ü")),
    ("messages", dict(MESSAGES, system=[{"type": "text", "text": "s"}], tools=[{"name": "t"}],
                      tool_choice={"type": "auto"}, stop_sequences=["x"],
                      metadata={"user_id": "u"}, messages=[
                          {"role": "user", "content": [{"type": "text", "text": "hi"}]},
                          {"role": "assistant", "content": [{"type": "tool_use", "id": "t",
                                                             "name": "t", "input": {}}]},
                          {"role": "user", "content": [{"type": "tool_result",
                                                        "tool_use_id": "t",
                                                        "content": [{"type": "text",
                                                                     "text": "ok"}]}]}])),
])
def test_valid_bodies_pass(endpoint, body):
    validate_body(endpoint, body)


# --- live: the fuzz's 500s are 400s now, each with its log row ------------------------------

MAX_TOKENS_2_63 = '{"model":"gpt-4o-mini","max_tokens":9223372036854775808,' \
                  '"messages":[{"role":"user","content":"hi"}]}'
HOSTILE = [  # (path, raw body, the param the 400 names)
    ("/v1/chat/completions", '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]'
     ',"x":' + nested(1000) + "}", None),
    ("/v1/chat/completions", '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]'
     ',"x":' + nested(500) + "}", None),
    ("/v1/chat/completions", MAX_TOKENS_2_63, "max_tokens"),
    ("/v1/responses", '{"model":"gpt-4o-mini","input":"hi","max_output_tokens":1e30}',
     "max_output_tokens"),
    ("/v1/chat/completions", '{"model":"gpt-4o-mini","max_completion_tokens":true,'
     '"messages":[{"role":"user","content":"hi"}]}', "max_completion_tokens"),
    ("/v1/completions", '{"model":"gpt-4o-mini","prompt":"hi","max_tokens":"100"}', "max_tokens"),
    ("/v1/chat/completions", '{"model":"gpt-4o-mini","n":1000,'
     '"messages":[{"role":"user","content":"hi"}]}', "n"),
    ("/v1/images/generations", '{"model":"gpt-4o-mini","prompt":"a cat","n":-1}', "n"),
    ("/v1/chat/completions", '{"model":"\\ud800","messages":[{"role":"user","content":"hi"}]}',
     "model"),
    ("/v1/embeddings", '{"model":"gpt\\u0000","input":"hi"}', "model"),
    ("/v1/messages", '{"model":"gpt-4o-mini","max_tokens":10,"messages":[1,"x"]}', "messages"),
    ("/v1/messages", '{"model":"gpt-4o-mini","max_tokens":10,'
     '"messages":[{"role":"user","content":null}]}', "messages"),
    ("/v1/messages", '{"model":"gpt-4o-mini","max_tokens":10,"tools":"x",'
     '"messages":[{"role":"user","content":"hi"}]}', "tools"),
    ("/v1/messages", '{"model":"gpt-4o-mini","max_tokens":9223372036854775808,'
     '"messages":[{"role":"user","content":"hi"}]}', None),
    # a truthy non-boolean `stream` made the upstream stream an answer we expected whole (502)
    ("/v1/completions", '{"model":"gpt-4o-mini","prompt":[1e305],"stream":"R\\u00d0v"}',
     "stream"),
    ("/v1/responses", '{"model":"gpt-4o-mini","input":"x","stream":[null,["?E"]]}', "stream"),
]


def assert_route_shape(path, response):
    """A 400 typed invalid_request_error in the OpenAI or Anthropic shape of `path`."""
    assert response.status_code == 400, response.text
    body = response.json()
    if path.startswith("/v1/messages"):
        assert body["type"] == "error"
        assert set(body["error"]) == {"type", "message"}
        assert body["error"]["type"] == "invalid_request_error"
    else:
        assert set(body["error"]) == {"message", "type", "param", "code"}
        assert body["error"]["type"] == "invalid_request_error"
    assert "Traceback" not in response.text
    return body


@pytest.mark.parametrize("path, raw, param", HOSTILE)
def test_hostile_bodies_are_400_with_a_log_row(gateway, path, raw, param):
    key = gateway.member(credits=1000)
    response = requests.post(gateway.url + path, data=raw.encode(), timeout=20,
                             headers={"Authorization": f"Bearer {key}",
                                      "Content-Type": "application/json"})
    body = assert_route_shape(path, response)
    if param and not path.startswith("/v1/messages"):
        assert body["error"]["param"] == param
    [row] = gateway.wait_logs(1, request_id=response.headers["x-request-id"])
    assert (row["http_status"], row["status"]) == (400, "Failed")
    assert row["error"]
    assert gateway.upstream.events() == []  # nothing reached the upstream


def test_openai_sdk_gets_a_400_for_an_absurd_max_tokens(gateway):
    import openai
    key = gateway.member(credits=1000)
    client = openai.OpenAI(base_url=gateway.base_url, api_key=key, max_retries=0, timeout=20)
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="gpt-4o-mini", max_tokens=2**63,
                                       messages=[{"role": "user", "content": "hi"}])
    assert caught.value.body["param"] == "max_tokens"
    assert gateway.wait_logs(1)[0]["http_status"] == 400


def test_anthropic_sdk_gets_a_400_for_non_object_messages(gateway):
    import anthropic
    key = gateway.member(credits=1000)
    client = anthropic.Anthropic(base_url=gateway.url, api_key=key, max_retries=0, timeout=20)
    with pytest.raises(anthropic.BadRequestError) as caught:
        client.messages.create(model="gpt-4o-mini", max_tokens=10, messages=["hi"],
                               tools="x")
    assert caught.value.body["error"]["type"] == "invalid_request_error"
    assert gateway.wait_logs(1)[0]["http_status"] == 400
