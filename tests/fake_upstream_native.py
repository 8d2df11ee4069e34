"""Anthropic and Gemini endpoints of the fake upstream (mounted by tests/fake_upstream.py).

Same conventions as the OpenAI endpoints: deterministic answers, usage = 3 + words in the
request's text for the prompt and one token per answered word; faults chosen by the
UPSTREAM model name (fault-500, fault-429, fault-400, fault-401, fault-timeout, fault-slow,
fault-break, fault-malformed, fault-nousage, fault-long), plus:
  fault-stream-error  Anthropic: an `event: error` after three events;
                      Gemini: an {"error": ...} event after three events
  fault-overloaded    Anthropic: a stream whose first event is an overloaded `error`
  fault-blocked       Gemini: promptFeedback.blockReason SAFETY and no candidates
Anthropic: `fake_cached: N` / `fake_cache_write: M` in the body report N cache-read and
M cache-write tokens (out of the same prompt total). Gemini: a top-level `fake_cached`
reports cachedContentTokenCount (the gateway never sends it; for direct posts only).
Garbage usage (fault-usage-huge/-negative/-string/-float, as in fake_upstream.py) replaces
every count. A Gemini model whose name contains "thinking" also reports
thoughtsTokenCount 4 and toolUsePromptTokenCount 5.
A tool call ({"location": "Paris"} to the first declared tool) is answered whenever tools
are declared, the tool choice does not forbid it, and the last turn is not a tool result.

Shapes follow the public API references: Anthropic Messages (message_start,
content_block_start/delta/stop, message_delta, message_stop, ping, error) and Gemini
generateContent / streamGenerateContent?alt=sse / embedContent / batchEmbedContents.
"""
import json
import time

from flask import Response, jsonify, request

from fake_common import ANSWER, TOOL_ARGS, answer_words, count_words  # noqa: E402

GARBAGE_USAGE = {"fault-usage-huge": 1e30, "fault-usage-negative": -50,
                 "fault-usage-string": "lots", "fault-usage-float": 12.7}


def _event(name, data):
    return f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()


def _data(data):
    return f"data: {json.dumps(data)}\n\n".encode()


# --- Anthropic ----------------------------------------------------------------------------

def _anthropic_error(status, kind, message, headers=None):
    response = jsonify(type="error", error={"type": kind, "message": message})
    response.status_code = status
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response


def _anthropic_fault(model):
    if model == "fault-500":
        return _anthropic_error(500, "api_error", "The fake upstream had an internal error.")
    if model == "fault-429":
        return _anthropic_error(429, "rate_limit_error", "Rate limit reached on the fake upstream.",
                                {"retry-after": "7"})
    if model == "fault-400":
        return _anthropic_error(400, "invalid_request_error",
                                "The fake upstream rejected this request: bad parameter.")
    if model == "fault-401":
        return _anthropic_error(401, "authentication_error", "invalid x-api-key")
    if model == "fault-timeout":
        time.sleep(10)
    return None


def _wants_tool(body):
    tools = body.get("tools")
    if not tools or (body.get("tool_choice") or {}).get("type") == "none":
        return None
    last = (body.get("messages") or [{}])[-1]
    content = last.get("content")
    if isinstance(content, list) and any(b.get("type") == "tool_result" for b in content):
        return None
    return tools[0].get("name", "tool")


def anthropic_usage(body, output_tokens):
    """The usage the fake reports: 3 + prompt words in total, split into cache read/write."""
    prompt = 3 + count_words(body.get("messages")) + count_words(body.get("system"))
    cached = int(body.get("fake_cached") or 0)
    written = int(body.get("fake_cache_write") or 0)
    usage = {"input_tokens": prompt - cached - written, "output_tokens": output_tokens,
             "cache_creation_input_tokens": written, "cache_read_input_tokens": cached}
    garbage = GARBAGE_USAGE.get(body.get("model"))
    if garbage is not None:
        usage.update(input_tokens=garbage, output_tokens=garbage)
    return usage


def anthropic_messages(stream_events):
    """POST /v1/messages."""
    body = request.get_json()
    model = body.get("model", "")
    fault = _anthropic_fault(model)
    if fault is not None:
        return fault
    tool = _wants_tool(body)
    words = answer_words(body.get("max_tokens"))
    stop_reason = "tool_use" if tool else ("max_tokens" if len(words) < len(ANSWER) else "end_turn")
    output_tokens = 5 if tool else len(words)
    usage = anthropic_usage(body, output_tokens)
    if model == "fault-nousage":
        usage = {}
    content = ([{"type": "tool_use", "id": "toolu_fake_1", "name": tool, "input": TOOL_ARGS}]
               if tool else [{"type": "text", "text": " ".join(words)}])
    message = {"id": "msg_fake_1", "type": "message", "role": "assistant", "model": model,
               "content": content, "stop_reason": stop_reason, "stop_sequence": None,
               "usage": usage}
    if not body.get("stream"):
        if model == "fault-malformed":
            return Response("this is not json {", content_type="application/json")
        return jsonify(message)

    if model == "fault-overloaded":
        events = [_event("error", {"type": "error", "error": {
            "type": "overloaded_error", "message": "Overloaded"}})]
        return Response(stream_events(request.path, events, model),
                        content_type="text/event-stream")
    start_usage = dict(usage, output_tokens=1) if usage else {}
    events = [_event("message_start", {"type": "message_start", "message": dict(
        message, content=[], stop_reason=None, usage=start_usage)})]
    if model == "fault-malformed":
        events.append(b"event: ping\ndata: {not json\n\n")
    if tool:
        events.append(_event("content_block_start", {
            "type": "content_block_start", "index": 0,
            "content_block": {"type": "tool_use", "id": "toolu_fake_1", "name": tool, "input": {}}}))
        events.append(_event("ping", {"type": "ping"}))
        for piece in ("", '{"location"', ': "Paris"}'):
            events.append(_event("content_block_delta", {
                "type": "content_block_delta", "index": 0,
                "delta": {"type": "input_json_delta", "partial_json": piece}}))
    else:
        events.append(_event("content_block_start", {
            "type": "content_block_start", "index": 0,
            "content_block": {"type": "text", "text": ""}}))
        events.append(_event("ping", {"type": "ping"}))
        count = 40 if model == "fault-long" else len(words)
        for index in range(count):
            word = ANSWER[index % len(ANSWER)]
            events.append(_event("content_block_delta", {
                "type": "content_block_delta", "index": 0,
                "delta": {"type": "text_delta", "text": word if index == 0 else " " + word}}))
        if model == "fault-long" and usage:
            usage = dict(usage, output_tokens=count)
    if model == "fault-stream-error":
        events.insert(3, _event("error", {"type": "error", "error": {
            "type": "overloaded_error", "message": "Overloaded"}}))
    events.append(_event("content_block_stop", {"type": "content_block_stop", "index": 0}))
    delta_usage = {"output_tokens": usage["output_tokens"]} if usage else {"output_tokens": 0}
    events.append(_event("message_delta", {"type": "message_delta",
                                           "delta": {"stop_reason": stop_reason,
                                                     "stop_sequence": None},
                                           "usage": delta_usage}))
    events.append(_event("message_stop", {"type": "message_stop"}))
    return Response(stream_events(request.path, events, model), content_type="text/event-stream")


# --- Gemini -------------------------------------------------------------------------------

def _gemini_error(status, status_name, message, headers=None):
    response = jsonify(error={"code": status, "message": message, "status": status_name})
    response.status_code = status
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response


def _gemini_fault(model):
    if model == "fault-500":
        return _gemini_error(500, "INTERNAL", "The fake upstream had an internal error.")
    if model == "fault-429":
        return _gemini_error(429, "RESOURCE_EXHAUSTED", "Resource has been exhausted.",
                             {"Retry-After": "7"})
    if model == "fault-400":
        return _gemini_error(400, "INVALID_ARGUMENT",
                             "The fake upstream rejected this request: bad parameter.")
    if model == "fault-401":
        return _gemini_error(401, "UNAUTHENTICATED", "API key not valid. Please pass a valid "
                             "API key.")
    if model == "fault-timeout":
        time.sleep(10)
    return None


def _gemini_tool(body):
    declarations = [d for tool in body.get("tools") or [] for d in tool.get("functionDeclarations")
                    or []]
    mode = ((body.get("toolConfig") or {}).get("functionCallingConfig") or {}).get("mode")
    if not declarations or mode == "NONE":
        return None
    last = (body.get("contents") or [{}])[-1]
    if any("functionResponse" in part for part in last.get("parts") or []):
        return None
    return declarations[0]["name"]


def gemini_usage(body, completion, model=""):
    prompt = 3 + count_words(body.get("contents")) + count_words(body.get("systemInstruction"))
    usage = {"promptTokenCount": prompt, "candidatesTokenCount": completion,
             "totalTokenCount": prompt + completion}
    if body.get("fake_cached"):
        usage["cachedContentTokenCount"] = int(body["fake_cached"])
    if "thinking" in model:
        usage.update(thoughtsTokenCount=4, toolUsePromptTokenCount=5,
                     totalTokenCount=prompt + completion + 9)
    garbage = GARBAGE_USAGE.get(model)
    if garbage is not None:
        usage.update(promptTokenCount=garbage, candidatesTokenCount=garbage)
    return usage


def _candidate(parts, finish=None):
    candidate = {"content": {"role": "model", "parts": parts}, "index": 0}
    if finish:
        candidate["finishReason"] = finish
    return candidate


def gemini_generate(model, method, stream_events):
    """POST /v1beta/models/{model}:generateContent and :streamGenerateContent?alt=sse."""
    body = request.get_json()
    fault = _gemini_fault(model)
    if fault is not None:
        return fault
    if model == "fault-blocked":
        blocked = {"promptFeedback": {"blockReason": "SAFETY", "safetyRatings": [
            {"category": "HARM_CATEGORY_DANGEROUS_CONTENT", "probability": "HIGH"}]},
            "usageMetadata": {"promptTokenCount": 5, "totalTokenCount": 5}}
        if method == "generateContent":
            return jsonify(blocked)
        return Response(stream_events(request.path, [_data(blocked)], model),
                        content_type="text/event-stream")
    tool = _gemini_tool(body)
    cap = (body.get("generationConfig") or {}).get("maxOutputTokens")
    words = answer_words(cap)
    finish = "MAX_TOKENS" if not tool and len(words) < len(ANSWER) else "STOP"
    completion = 5 if tool else len(words)
    with_usage = model != "fault-nousage"
    if method == "generateContent":
        if model == "fault-malformed":
            return Response("this is not json {", content_type="application/json")
        parts = ([{"functionCall": {"name": tool, "args": TOOL_ARGS}}] if tool
                 else [{"text": " ".join(words)}])
        result = {"candidates": [_candidate(parts, finish)], "modelVersion": model,
                  "responseId": "fake-response-1"}
        if with_usage:
            result["usageMetadata"] = gemini_usage(body, completion, model)
        return jsonify(result)
    if request.args.get("alt") != "sse":
        return _gemini_error(400, "INVALID_ARGUMENT", "the fake only streams with alt=sse")
    events = []
    if tool:
        pieces = [[{"functionCall": {"name": tool, "args": TOOL_ARGS}}]]
    else:
        count = 40 if model == "fault-long" else len(words)
        completion = count
        pieces = [[{"text": (" " if i else "") + ANSWER[i % len(ANSWER)]}] for i in range(count)]
    for number, parts in enumerate(pieces):
        last = number == len(pieces) - 1
        chunk = {"candidates": [_candidate(parts, finish if last else None)],
                 "modelVersion": model, "responseId": "fake-response-1"}
        if with_usage:
            chunk["usageMetadata"] = gemini_usage(body, completion if last else number + 1, model)
        events.append(_data(chunk))
    if model == "fault-malformed":
        events.insert(1, b"data: {not json\n\n")
    if model == "fault-stream-error":
        events.insert(3, _data({"error": {"code": 500, "message": "Internal error mid-stream",
                                          "status": "INTERNAL"}}))
    return Response(stream_events(request.path, events, model), content_type="text/event-stream")


def _embedding(index):
    return {"values": [round(0.1 * (index + 1) * (j + 1), 4) for j in range(8)]}


def gemini_embed(model, method):
    """POST :embedContent and :batchEmbedContents."""
    body = request.get_json()
    fault = _gemini_fault(model)
    if fault is not None:
        return fault
    if method == "embedContent":
        return jsonify(embedding=_embedding(0))
    requests_ = body.get("requests") or []
    return jsonify(embeddings=[_embedding(i) for i in range(len(requests_))])


def register(app, record, stream):
    """Mount the Anthropic and Gemini endpoints on the fake upstream's Flask app.

    `record` is unused: the fake's before_request hook already records every request.
    """

    @app.post("/v1/messages")
    def fake_anthropic_messages():
        return anthropic_messages(stream)

    @app.post("/v1beta/models/<path:target>")
    def fake_gemini(target):
        model, _, method = target.partition(":")
        if method in ("generateContent", "streamGenerateContent"):
            return gemini_generate(model, method, stream)
        if method in ("embedContent", "batchEmbedContents"):
            return gemini_embed(model, method)
        return _gemini_error(404, "NOT_FOUND", f"unknown method {method!r}")
