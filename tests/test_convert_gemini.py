"""OpenAI chat/embeddings <-> Gemini conversions, on payloads recorded from the public reference.

The last tests drive GeminiAdaptor against the fake upstream process over real HTTP.
"""
import base64
import json
import struct

import pytest

from blueprints.api.errors import ApiError
from blueprints.api.providers import gemini_convert as convert
from blueprints.api.providers.anthropic import parse_event
from blueprints.api.providers.base import split_sse
from blueprints.api.providers.base import Call, StreamBroken, Target, UpstreamFailure, Usage
from blueprints.api.providers.gemini import GeminiAdaptor
from blueprints.api.upstream_http import UpstreamHTTP
from tests.test_convert_anthropic import fixture_bytes, fixture_json, openai_chunks


def gemini_events(name):
    return [parse_event(e)[1] for e in split_sse([fixture_bytes(name)])]


# --- request -------------------------------------------------------------------------------

def test_full_openai_request_becomes_generate_content():
    body = fixture_json("openai/chat_request_full.json")
    out = convert.openai_to_gemini_request(body)
    assert out["systemInstruction"] == {"parts": [{"text": "You are a weather assistant."},
                                                  {"text": "Answer briefly."}]}
    assert out["generationConfig"] == {"maxOutputTokens": 1024, "temperature": 0.2, "topP": 0.9,
                                       "stopSequences": ["END"]}
    roles = [c["role"] for c in out["contents"]]
    assert roles == ["user", "model", "user", "model", "user"]
    first = out["contents"][0]["parts"]
    assert first[0] == {"text": "What's the weather like in Paris?"}
    assert first[2] == {"inlineData": {"mimeType": "image/png", "data": "iVBORw0KGgoAAAANSUhEUg=="}}
    assert first[3] == {"fileData": {
        "mimeType": "image/jpeg",
        "fileUri": "https://upload.wikimedia.org/wikipedia/commons/a/a7/Camponotus_flavomarginatus_ant.jpg"}}
    calls = out["contents"][1]["parts"]
    assert calls[0] == {"functionCall": {"name": "get_weather", "args": {"location": "Paris, France"}},
                        "thoughtSignature": "skip_thought_signature_validator"}
    assert calls[1] == {"functionCall": {"name": "get_time", "args": {"timezone": "Europe/Paris"}}}
    # both tool results in one user turn, named after the calls they answer
    assert out["contents"][2]["parts"] == [
        {"functionResponse": {"name": "get_weather",
                              "response": {"temperature": 22, "unit": "celsius"}}},
        {"functionResponse": {"name": "get_time", "response": {"content": "14:05"}}}]
    assert out["contents"][3]["parts"] == [{"text": "It is 22°C and 14:05 in Paris."}]
    declarations = out["tools"][0]["functionDeclarations"]
    assert declarations[0] == {"name": "get_weather",
                               "description": "Get the current weather in a given location",
                               "parametersJsonSchema": body["tools"][0]["function"]["parameters"]}
    assert out["toolConfig"] == {"functionCallingConfig": {"mode": "ANY"}}


@pytest.mark.parametrize("response_format, expected", [
    ({"type": "json_object"}, {"responseMimeType": "application/json"}),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}},
     {"responseMimeType": "application/json", "responseJsonSchema": {"type": "object"}}),
])
def test_response_format_becomes_response_mime_type(response_format, expected):
    out = convert.openai_to_gemini_request({"messages": [{"role": "user", "content": "x"}],
                                            "response_format": response_format})
    assert out["generationConfig"] == expected


def test_named_tool_choice_and_none():
    tools = [{"type": "function", "function": {"name": "f"}}]
    out = convert.openai_to_gemini_request({"messages": [{"role": "user", "content": "x"}],
                                            "tools": tools, "tool_choice": {
                                                "type": "function", "function": {"name": "f"}}})
    assert out["toolConfig"] == {"functionCallingConfig": {"mode": "ANY",
                                                           "allowedFunctionNames": ["f"]}}
    assert out["tools"] == [{"functionDeclarations": [{"name": "f", "description": ""}]}]
    out = convert.openai_to_gemini_request({"messages": [{"role": "user", "content": "x"}],
                                            "tools": tools, "tool_choice": "none"})
    assert out["toolConfig"]["functionCallingConfig"]["mode"] == "NONE"


def test_unknown_role_is_a_clear_400():
    with pytest.raises(ApiError) as err:
        convert.openai_to_gemini_request({"messages": [{"role": "wizard", "content": "x"}]})
    assert err.value.status == 400


# --- response ------------------------------------------------------------------------------

def test_text_response_to_completion():
    out = convert.gemini_to_openai_response(fixture_json("gemini/generate_text.json"),
                                            "gemini-3.5-flash")
    assert out["id"] == "chatcmpl-mAitaLmkHPPlz7IPvtfUqQ4" and out["model"] == "gemini-3.5-flash"
    choice = out["choices"][0]
    assert choice["message"] == {"role": "assistant",
                                 "content": "AI learns patterns from data to make predictions."}
    assert choice["finish_reason"] == "stop"
    # thinking tokens are billed as output; cached content is part of the prompt
    assert out["usage"] == {"prompt_tokens": 8, "completion_tokens": 309, "total_tokens": 317,
                            "prompt_tokens_details": {"cached_tokens": 4}}


def test_function_call_response_to_tool_calls():
    out = convert.gemini_to_openai_response(fixture_json("gemini/generate_function_call.json"), "g")
    choice = out["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] is None
    call = choice["message"]["tool_calls"][0]
    assert call["id"].startswith("call_") and call["type"] == "function"
    assert call["function"]["name"] == "find_theaters"
    assert json.loads(call["function"]["arguments"]) == {"movie": "Barbie",
                                                         "location": "Mountain View, CA"}


def test_thoughts_and_max_tokens():
    out = convert.gemini_to_openai_response(
        fixture_json("gemini/generate_thought_max_tokens.json"), "g")
    message = out["choices"][0]["message"]
    assert message["content"] == "The answer is"
    assert message["reasoning_content"].startswith("**Considering")
    assert out["choices"][0]["finish_reason"] == "length"
    assert out["usage"]["completion_tokens"] == 53


def test_blocked_prompt_is_a_clear_non_retryable_400():
    with pytest.raises(UpstreamFailure) as err:
        convert.gemini_to_openai_response(fixture_json("gemini/generate_blocked.json"), "g")
    failure = err.value
    assert (failure.kind, failure.status) == ("status", 400)
    assert failure.message == "Gemini blocked the prompt: SAFETY"
    assert failure.error_type == "invalid_request_error" and not failure.retryable


def test_safety_finish_reason_is_content_filter():
    response = fixture_json("gemini/generate_text.json")
    response["candidates"][0]["finishReason"] = "SAFETY"
    out = convert.gemini_to_openai_response(response, "g")
    assert out["choices"][0]["finish_reason"] == "content_filter"


# --- stream --------------------------------------------------------------------------------

def run_stream(name, wants_usage=True):
    usage, text = Usage(), []
    chunks = list(convert.gemini_stream_to_openai(gemini_events(name), "gemini-3.5-flash",
                                                  wants_usage, usage, text))
    return openai_chunks(chunks), usage, text


def test_text_stream_to_chunks():
    chunks, usage, text = run_stream("gemini/stream_text.sse")
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert [c["choices"][0]["delta"]["content"] for c in chunks[1:4]] == \
        ["The", " quick brown fox", " jumps."]
    assert chunks[4]["choices"][0]["finish_reason"] == "stop"
    assert chunks[5]["usage"] == {"prompt_tokens": 6, "completion_tokens": 34, "total_tokens": 40,
                                  "prompt_tokens_details": {"cached_tokens": 2}}
    assert chunks[6] == "[DONE]"
    assert (usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens) == (6, 34, 2)
    assert "".join(text) == "The quick brown fox jumps."


def test_function_call_stream_to_tool_call_deltas():
    chunks, usage, _ = run_stream("gemini/stream_function_call.sse", wants_usage=False)
    deltas = [c["choices"][0]["delta"] for c in chunks if isinstance(c, dict)]
    assert deltas[1] == {"content": "Let me check."}
    first, second = deltas[2]["tool_calls"][0], deltas[3]["tool_calls"][0]
    assert (first["index"], first["function"]["name"]) == (0, "get_weather")
    assert json.loads(first["function"]["arguments"]) == {"location": "Paris"}
    assert (second["index"], second["function"]["name"]) == (1, "get_time")
    assert first["id"] != second["id"]
    assert chunks[-2]["choices"][0]["finish_reason"] == "tool_calls"
    assert usage.completion_tokens == 20


def test_error_event_breaks_the_stream():
    stream = convert.gemini_stream_to_openai(gemini_events("gemini/stream_error.sse"), "g", True,
                                             Usage(), [])
    with pytest.raises(StreamBroken, match="overloaded"):
        list(stream)


def test_stream_ending_without_finish_reason_is_broken():
    with pytest.raises(StreamBroken):
        list(convert.gemini_stream_to_openai(gemini_events("gemini/stream_text.sse")[:2], "g",
                                             False, Usage(), []))


# --- embeddings ----------------------------------------------------------------------------

def test_one_input_uses_embed_content():
    method, body = convert.openai_to_gemini_embeddings(
        {"model": "text-embedding", "input": "Hello world", "dimensions": 256}, "gemini-embedding-001")
    assert method == "embedContent"
    assert body == {"content": {"parts": [{"text": "Hello world"}]}, "outputDimensionality": 256}
    out = convert.gemini_to_openai_embeddings(fixture_json("gemini/embed_content.json"), "emb",
                                              "float", 2)
    assert out["object"] == "list" and out["model"] == "emb"
    assert out["data"] == [{"object": "embedding", "index": 0, "embedding": [
        0.013168523, -0.008711934, -0.046782676, 0.00069968984, -0.009518873]}]
    assert out["usage"] == {"prompt_tokens": 2, "total_tokens": 2}


def test_many_inputs_use_batch_embed_contents_and_base64():
    method, body = convert.openai_to_gemini_embeddings({"input": ["a", "b"]}, "gemini-embedding-001")
    assert method == "batchEmbedContents"
    assert body == {"requests": [
        {"content": {"parts": [{"text": "a"}]}, "model": "models/gemini-embedding-001"},
        {"content": {"parts": [{"text": "b"}]}, "model": "models/gemini-embedding-001"}]}
    out = convert.gemini_to_openai_embeddings(fixture_json("gemini/batch_embed_contents.json"),
                                              "emb", "base64", 2)
    assert [d["index"] for d in out["data"]] == [0, 1]
    decoded = struct.unpack("<3f", base64.b64decode(out["data"][1]["embedding"]))
    assert decoded == (0.5, 0.25, -0.125)


def test_token_inputs_are_refused():
    with pytest.raises(ApiError):
        convert.openai_to_gemini_embeddings({"input": [[1, 2, 3]]}, "m")


# --- GeminiAdaptor over HTTP against the fake upstream ------------------------------------

def adaptor(fake_upstream, model="gemini-up", base_suffix=""):
    target = Target(channel_id=1, channel_name="g", type="gemini",
                    base_url=fake_upstream.url + base_suffix, api_key="gm-secret",
                    upstream_model=model)
    return GeminiAdaptor(target, UpstreamHTTP(), (2, 5))


def chat_call(stream, tools=False, wants_usage=True):
    body = {"model": "gemini-3.5-flash", "stream": stream,
            "messages": [{"role": "user", "content": "hello there"}]}
    if tools:
        body["tools"] = [{"type": "function", "function": {"name": "get_weather",
                                                           "parameters": {"type": "object"}}}]
    return Call(endpoint="chat", model="gemini-3.5-flash", body=body,
                raw_body=json.dumps(body).encode(), content_type="application/json",
                stream=stream, wants_usage=wants_usage)


def test_adaptor_chat_non_stream(fake_upstream):
    fake_upstream.clear()
    reply = adaptor(fake_upstream, base_suffix="/v1beta").send(chat_call(False, tools=True))
    completion = json.loads(reply.body)
    call = completion["choices"][0]["message"]["tool_calls"][0]
    assert json.loads(call["function"]["arguments"]) == {"location": "Paris"}
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (5, 5)
    seen = [e for e in fake_upstream.events() if e["type"] == "request"][-1]
    assert seen["path"] == "/v1beta/models/gemini-up:generateContent"
    assert seen["api_key"] == "gm-secret" and seen["auth"] is None


def test_adaptor_chat_stream(fake_upstream):
    reply = adaptor(fake_upstream).send(chat_call(True))
    chunks = openai_chunks(list(reply.chunks()))
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks
                   if isinstance(c, dict) and c["choices"])
    assert text == "This is a deterministic answer from the fake upstream"
    assert chunks[-2]["usage"]["completion_tokens"] == 9 and reply.usage.prompt_tokens == 5
    reply.close()


def test_adaptor_blocked_prompt_fails_before_first_byte(fake_upstream):
    for stream in (False, True):
        with pytest.raises(UpstreamFailure) as err:
            adaptor(fake_upstream, "fault-blocked").send(chat_call(stream))
        assert err.value.message == "Gemini blocked the prompt: SAFETY"
        assert err.value.status == 400 and not err.value.retryable


@pytest.mark.parametrize("model, status, error_type", [
    ("fault-500", 500, None), ("fault-429", 429, "rate_limit_error"),
    ("fault-400", 400, "invalid_request_error"), ("fault-401", 401, "authentication_error")])
def test_adaptor_maps_upstream_errors(fake_upstream, model, status, error_type):
    with pytest.raises(UpstreamFailure) as err:
        adaptor(fake_upstream, model).send(chat_call(False))
    assert (err.value.status, err.value.error_type) == (status, error_type)
    assert err.value.retryable == (status >= 429 and status != 401)


def test_adaptor_stream_breaks(fake_upstream):
    for model in ("fault-stream-error", "fault-break", "fault-malformed"):
        reply = adaptor(fake_upstream, model).send(chat_call(True))
        with pytest.raises(StreamBroken):
            list(reply.chunks())
        reply.close()


def test_adaptor_embeddings(fake_upstream):
    body = {"model": "text-embedding-004", "input": ["one two", "three"]}
    call = Call(endpoint="embeddings", model="text-embedding-004", body=body,
                raw_body=json.dumps(body).encode(), content_type="application/json")
    reply = adaptor(fake_upstream).send(call)
    out = json.loads(reply.body)
    assert [d["embedding"][0] for d in out["data"]] == [0.1, 0.2]
    assert out["usage"]["prompt_tokens"] > 0
    assert not reply.usage.reported  # Gemini does not report it: the relay counts locally
    one = dict(body, input="solo")
    call = Call(endpoint="embeddings", model="m", body=one, raw_body=json.dumps(one).encode(),
                content_type="application/json")
    assert len(json.loads(adaptor(fake_upstream).send(call).body)["data"]) == 1


# --- the output cap the relay reserved for, and usage beyond plain tokens (SPEC §10) -------

def test_output_cap_becomes_max_output_tokens_and_n_passes_through():
    body = fixture_json("openai/chat_request_full.json")
    body.update(max_tokens=100_000, max_completion_tokens=1, n=3)
    config = convert.openai_to_gemini_request(body, output_cap=64)["generationConfig"]
    assert config["maxOutputTokens"] == 64 and config["candidateCount"] == 3
    assert convert.openai_to_gemini_request(body)["generationConfig"]["maxOutputTokens"] == 1


def test_thought_and_tool_use_prompt_tokens_are_billed():
    response = fixture_json("gemini/generate_thought_max_tokens.json")
    response["usageMetadata"].update(toolUsePromptTokenCount=7, cachedContentTokenCount=4)
    usage = convert.gemini_usage(response["usageMetadata"])
    # tool-use prompt tokens are input; thoughts are output; the cached part is reported
    assert (usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens) == (19, 53, 4)
    assert convert.gemini_to_openai_response(response, "g")["usage"] == {
        "prompt_tokens": 19, "completion_tokens": 53, "total_tokens": 72,
        "prompt_tokens_details": {"cached_tokens": 4}}


def test_stream_usage_is_final_only_once_a_candidate_finished():
    events = gemini_events("gemini/stream_text.sse")
    usage, text = Usage(), []
    with pytest.raises(StreamBroken):
        list(convert.gemini_stream_to_openai(iter(events[:2]), "g", True, usage, text))
    assert usage.reported is False and "".join(text) == "The quick brown fox"
    _, usage, _ = run_stream("gemini/stream_text.sse")
    assert usage.reported is True


@pytest.mark.parametrize("garbage", [1e30, -3, "many", float("nan"), [1]])
def test_garbage_usage_metadata_never_raises(garbage):
    response = fixture_json("gemini/generate_text.json")
    response["usageMetadata"] = {"promptTokenCount": garbage, "candidatesTokenCount": 2}
    usage = convert.gemini_usage(response["usageMetadata"])
    assert usage.reported and usage.completion_tokens == 2
    if garbage == -3:
        assert not usage.garbled and usage.prompt_tokens == -3  # kept raw: the relay judges
    else:
        assert usage.garbled and usage.prompt_tokens == 0
    json.dumps(convert.gemini_to_openai_response(response, "g"), allow_nan=False)


def test_adaptor_sends_the_reserved_cap(fake_upstream):
    fake_upstream.clear()
    call = chat_call(False)
    call.body.update(max_tokens=100_000, max_completion_tokens=1)
    call.output_cap = 4
    reply = adaptor(fake_upstream).send(call)
    assert json.loads(reply.body)["choices"][0]["message"]["content"] == "This is a deterministic"
    seen = [e for e in fake_upstream.events() if e["type"] == "request"][-1]
    assert seen["body"]["generationConfig"]["maxOutputTokens"] == 4
    assert "max_tokens" not in json.dumps(seen["body"])


def test_adaptor_thinking_model_usage(fake_upstream):
    reply = adaptor(fake_upstream, model="gemini-thinking").send(chat_call(True))
    list(reply.chunks())
    # fake: prompt 3 + 2 words, +5 tool-use prompt; 9 answer words + 4 thought tokens
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (10, 13)
    assert reply.usage.reported
