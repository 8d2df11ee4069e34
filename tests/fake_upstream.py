"""A fake model provider in its own process, for tests and benchmarks.

Speaks OpenAI's wire format (and Anthropic's and Gemini's through
tests/fake_upstream_native.py when present) with deterministic answers and usage.

Faults are chosen by the request, through the UPSTREAM model name, so a channel
alias such as `gpt-4o-mini=fault-500` makes one channel fail while another works:
  fault-500        HTTP 500                 fault-429     HTTP 429, Retry-After: 7
  fault-400        HTTP 400 (request error) fault-401     HTTP 401 (bad upstream key)
  fault-timeout    answers after 10 s       fault-slow    streams one event every 0.3 s
  fault-break      streams 3 events, then drops the connection
  fault-malformed  a body / event that is not JSON
  fault-nousage    a normal answer without any usage
  fault-long       streams 40 events, one every 0.1 s (for client disconnects)
  fault-stall      streams 3 events, then goes quiet for 4 s (past the gateway's read timeout)
  fault-overrun    ignores the max-tokens cap it was sent and reports 500 completion tokens
  fault-absurd / fault-negative / fault-strusage   report prompt_tokens 1e30 / -5 / "12"
  fault-comments   SSE comment lines: `: OPENROUTER PROCESSING` before the first event,
                   `: keep-alive` between events and a comment line inside one event
  fault-drip       streams 40 events, one a second (under the read timeout, past a deadline)
  fault-huge       a 2 MB answer without usage: one big JSON body sent chunked (no
                   Content-Length), or a stream of 200 events of 10 KB each
  fault-usage-*    a normal answer whose usage numbers are garbage: fault-usage-huge (1e30),
                   fault-usage-negative, fault-usage-string ("lots"), fault-usage-float (12.7)
Usage is deterministic: prompt_tokens = 3 + words in the request's text,
completion_tokens = words answered; `fake_cached: N` in the body reports N cached tokens.
Transcriptions report whisper's `{"type": "duration", "seconds": 2.4}` usage, or token usage
`{"type": "tokens", ...}` for a model named gpt-4o-transcribe*. Images report gpt-image's token
usage for a model named gpt-image*.

Control endpoints: GET /_health, GET /_events?since=N (what it saw: requests with
their Authorization header, and `closed` when a client went away mid-stream), POST /_reset.
"""
if __name__ == "__main__":
    from gevent import monkey  # served by gevent's WSGI server: keep-alive, like real providers

    monkey.patch_all()

import argparse  # noqa: E402
import functools
import json
import os
import sys
import threading
import time

from flask import Flask, Response, jsonify, request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fake_common import ANSWER, answer_words, count_words  # noqa: E402

app = Flask(__name__)
_events = []
_lock = threading.Lock()


def record(kind, **fields):
    with _lock:
        _events.append({"type": kind, "time": time.time(), **fields})


def prompt_tokens(body):
    text = body.get("messages") or body.get("prompt") or body.get("input") or ""
    return 3 + count_words(text)


def body_answer(body):
    return answer_words(body.get("max_tokens") or body.get("max_completion_tokens")
                        or body.get("max_output_tokens"))


GARBAGE_USAGE = {"fault-usage-huge": 1e30, "fault-usage-negative": -50,
                 "fault-usage-string": "lots", "fault-usage-float": 12.7}
HUGE_BYTES = 2_000_000
COMMENT_START = b": OPENROUTER PROCESSING\n\n"
COMMENT_BETWEEN = b": keep-alive\n\n"


def usage_for(body, completion):
    prompt = prompt_tokens(body)
    usage = {"prompt_tokens": prompt, "completion_tokens": completion,
             "total_tokens": prompt + completion}
    if body.get("fake_cached"):
        usage["prompt_tokens_details"] = {"cached_tokens": int(body["fake_cached"])}
    garbage = GARBAGE_USAGE.get(body.get("model"))
    if garbage is not None:
        usage.update(prompt_tokens=garbage, completion_tokens=garbage, total_tokens=garbage)
    return usage


# Upstreams that lie about usage: prompt_tokens as they report it.
USAGE_LIES = {"fault-absurd": 1e30, "fault-negative": -5, "fault-strusage": "12"}


def error(status, message, kind, headers=None):
    response = jsonify(error={"message": message, "type": kind, "param": None, "code": None})
    response.status_code = status
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response


def fault_response(model):
    """The HTTP answer for a fault that happens before any body, or None."""
    if model == "fault-500":
        return error(500, "The fake upstream had an internal error.", "server_error")
    if model == "fault-429":
        return error(429, "Rate limit reached on the fake upstream.", "rate_limit_error",
                     {"Retry-After": "7"})
    if model == "fault-400":
        return error(400, "The fake upstream rejected this request: bad parameter.",
                     "invalid_request_error")
    if model == "fault-401":
        return error(401, "Incorrect API key provided: sk-ups***cret.", "invalid_request_error")
    if model == "fault-timeout":
        time.sleep(10)
    return None


def with_faults(view):
    """Answer a before-the-body fault (chosen by the model name) instead of calling `view`."""
    @functools.wraps(view)
    def wrapped(*args, **kwargs):
        body = request.get_json(silent=True) or {}
        model = body.get("model") or request.form.get("model", "")
        early = fault_response(model)
        return early if early is not None else view(*args, **kwargs)
    return wrapped


def sse(data):
    return ("data: " + (data if isinstance(data, str) else json.dumps(data)) + "\n\n").encode()


def stream_events(path, events, model):
    """Yield SSE events with the fault's pacing; record a client that went away."""
    delay = {"fault-slow": 0.3, "fault-long": 0.1, "fault-drip": 1.0}.get(model, 0)
    sent = 0
    try:
        if model == "fault-comments":
            yield COMMENT_START
        for index, event in enumerate(events):
            if model == "fault-break" and index == 3:
                raise ConnectionAbortedError("fake upstream drops the stream")
            if model == "fault-stall" and index == 3:
                time.sleep(4)
            if delay and index:
                time.sleep(delay)
            if model == "fault-comments" and index:
                yield COMMENT_BETWEEN
                if index == 2:  # a comment line inside an event is ignored as well
                    event = b": still here\n" + event
            sent += len(event)
            yield event
        record("stream_done", path=path, bytes=sent)
    except GeneratorExit:
        record("closed", path=path, bytes=sent)
        raise


def huge_json_body(base):
    """A chat completion of HUGE_BYTES, sent in pieces (chunked: no Content-Length)."""
    head = json.dumps(dict(base, object="chat.completion", choices=[{
        "index": 0, "finish_reason": "stop",
        "message": {"role": "assistant", "content": "@"}}]))
    before, after = head.split("@")
    yield before.encode()
    for _ in range(HUGE_BYTES // 10_000):
        yield b"x" * 10_000
    yield after.encode()


def _stream(path, events, model):
    return Response(stream_events(path, events, model), content_type="text/event-stream")


@app.before_request
def log_request():
    if request.path.startswith("/_"):
        return None
    body = request.get_json(silent=True) if request.is_json else None
    record("request", path=request.path, auth=request.headers.get("Authorization"),
           api_key=request.headers.get("x-api-key") or request.headers.get("x-goog-api-key"),
           body=body, form=request.form.to_dict() if request.form else None)
    return None


@app.get("/_health")
def health():
    return {"ok": True}


@app.get("/_events")
def events():
    since = int(request.args.get("since", 0))
    with _lock:
        return jsonify(_events[since:])


@app.post("/_reset")
def reset():
    with _lock:
        _events.clear()
    return {"ok": True}


@app.post("/v1/chat/completions")
@with_faults
def chat():
    body = request.get_json()
    model = body.get("model", "")
    words = body_answer(body)
    created = int(time.time())
    base = {"id": "chatcmpl-fake", "created": created, "model": model}
    tools = body.get("tools")
    last_role = (body.get("messages") or [{}])[-1].get("role")
    call_tool = bool(tools) and body.get("tool_choice") != "none" and last_role != "tool"
    tool_call = {"id": "call_fake_1", "type": "function",
                 "function": {"name": (tools[0].get("function") or {}).get("name", "tool")
                              if tools else "", "arguments": '{"location": "Paris"}'}}
    usage = usage_for(body, 5 if call_tool else len(words))
    if model == "fault-overrun":  # an upstream that ignores the cap it was sent
        words, usage = ANSWER, usage_for(body, 500)
    if model in USAGE_LIES:
        usage["prompt_tokens"] = USAGE_LIES[model]
    with_usage = model not in ("fault-nousage", "fault-huge")
    if not body.get("stream"):
        if model == "fault-malformed":
            return Response("this is not json {", content_type="application/json")
        if model == "fault-huge":
            return Response(huge_json_body(base), content_type="application/json")
        message = {"role": "assistant", "content": None if call_tool else " ".join(words)}
        if call_tool:
            message["tool_calls"] = [tool_call]
        result = dict(base, object="chat.completion", choices=[{
            "index": 0, "message": message,
            "finish_reason": "tool_calls" if call_tool else
            ("length" if len(words) < len(ANSWER) else "stop")}])
        if with_usage:
            result["usage"] = usage
        return jsonify(result)

    def chunk(delta, finish=None):
        return dict(base, object="chat.completion.chunk",
                    choices=[{"index": 0, "delta": delta, "finish_reason": finish}])
    events = [sse(chunk({"role": "assistant", "content": ""}))]
    if model == "fault-malformed":
        events.append(b"data: {not json\n\n")
    if call_tool:
        first = {"index": 0, "id": tool_call["id"], "type": "function",
                 "function": {"name": tool_call["function"]["name"], "arguments": ""}}
        events.append(sse(chunk({"tool_calls": [first]})))
        for part in ('{"location"', ': "Paris"}'):
            events.append(sse(chunk({"tool_calls": [{"index": 0,
                                                     "function": {"arguments": part}}]})))
        events.append(sse(chunk({}, "tool_calls")))
    elif model == "fault-huge":
        for _ in range(HUGE_BYTES // 10_000):
            events.append(sse(chunk({"content": "x" * 10_000})))
    else:
        count = 40 if model in ("fault-long", "fault-drip") else len(words)
        for index in range(count):
            word = ANSWER[index % len(ANSWER)]
            events.append(sse(chunk({"content": word if index == 0 else " " + word})))
        if model in ("fault-long", "fault-drip"):
            usage = usage_for(body, count)
        events.append(sse(chunk({}, "stop")))
    if with_usage and (body.get("stream_options") or {}).get("include_usage"):
        final = dict(base, object="chat.completion.chunk", choices=[], usage=usage)
        events.append(sse(final))
    events.append(sse("[DONE]"))
    return _stream(request.path, events, model)


@app.post("/v1/completions")
@with_faults
def completions():
    body = request.get_json()
    model = body.get("model", "")
    words = body_answer(body)
    usage = usage_for(body, len(words))
    base = {"id": "cmpl-fake", "object": "text_completion", "created": int(time.time()),
            "model": model}
    if not body.get("stream"):
        return jsonify(dict(base, choices=[{"index": 0, "text": " ".join(words),
                                            "finish_reason": "stop", "logprobs": None}],
                            usage=usage))
    events = [sse(dict(base, choices=[{"index": 0, "text": (" " if i else "") + w,
                                       "finish_reason": None, "logprobs": None}]))
              for i, w in enumerate(words)]
    if (body.get("stream_options") or {}).get("include_usage"):
        events.append(sse(dict(base, choices=[], usage=usage)))
    events.append(sse("[DONE]"))
    return _stream(request.path, events, model)


@app.post("/v1/embeddings")
@with_faults
def embeddings():
    body = request.get_json()
    inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
    data = [{"object": "embedding", "index": i,
             "embedding": [round(0.1 * (i + 1) * (j + 1), 4) for j in range(8)]}
            for i, _ in enumerate(inputs)]
    tokens = 3 + count_words(inputs)
    return jsonify(object="list", data=data, model=body["model"],
                   usage={"prompt_tokens": tokens, "total_tokens": tokens})


@app.post("/v1/responses")
@with_faults
def responses():
    body = request.get_json()
    model = body.get("model", "")
    words = body_answer(body)
    text = " ".join(words)
    usage = {"input_tokens": prompt_tokens(body), "output_tokens": len(words),
             "total_tokens": prompt_tokens(body) + len(words),
             "input_tokens_details": {"cached_tokens": 0},
             "output_tokens_details": {"reasoning_tokens": 0}}
    message = {"id": "msg_fake", "type": "message", "status": "completed", "role": "assistant",
               "content": [{"type": "output_text", "text": text, "annotations": []}]}
    response = {"id": "resp_fake", "object": "response", "created_at": int(time.time()),
                "status": "completed", "model": model, "output": [message], "usage": usage,
                "parallel_tool_calls": True, "tool_choice": "auto", "tools": []}
    if not body.get("stream"):
        return jsonify(response)
    pending = dict(response, status="in_progress", output=[], usage=None)
    empty_item = dict(message, status="in_progress", content=[])
    part = {"type": "output_text", "text": "", "annotations": []}
    sequence = [("response.created", {"response": pending}),
                ("response.in_progress", {"response": pending}),
                ("response.output_item.added", {"output_index": 0, "item": empty_item}),
                ("response.content_part.added", {"item_id": "msg_fake", "output_index": 0,
                                                 "content_index": 0, "part": part})]
    for index, word in enumerate(words):
        sequence.append(("response.output_text.delta", {
            "item_id": "msg_fake", "output_index": 0, "content_index": 0,
            "delta": (" " if index else "") + word}))
    sequence += [("response.output_text.done", {"item_id": "msg_fake", "output_index": 0,
                                                "content_index": 0, "text": text}),
                 ("response.content_part.done", {"item_id": "msg_fake", "output_index": 0,
                                                 "content_index": 0,
                                                 "part": dict(part, text=text)}),
                 ("response.output_item.done", {"output_index": 0, "item": message}),
                 ("response.completed", {"response": response})]
    events = []
    for number, (kind, fields) in enumerate(sequence):
        payload = dict(fields, type=kind, sequence_number=number)
        events.append(f"event: {kind}\ndata: {json.dumps(payload)}\n\n".encode())
    return _stream(request.path, events, model)


@app.post("/v1/images/generations")
@with_faults
def images():
    body = request.get_json()
    count = int(body.get("n") or 1)
    result = {"created": int(time.time()),
              "data": [{"b64_json": "iVBORw0KGgo=", "revised_prompt": body["prompt"]}
                       for _ in range(count)]}
    if str(body.get("model", "")).startswith("gpt-image"):
        prompt = prompt_tokens(body)
        result["usage"] = {"input_tokens": prompt, "output_tokens": 272 * count,
                           "total_tokens": prompt + 272 * count,
                           "input_tokens_details": {"text_tokens": prompt, "image_tokens": 0}}
    return jsonify(result)


@app.post("/v1/audio/speech")
@with_faults
def speech():
    body = request.get_json()
    chunks = [b"ID3fake-audio-" + str(i).encode() * 100 for i in range(5)]
    return Response(stream_events(request.path, chunks, body.get("model", "")),
                    content_type="audio/mpeg")


@app.post("/v1/audio/transcriptions")
@app.post("/v1/audio/translations")
@with_faults
def transcription():
    upload = request.files["file"]
    size = len(upload.read())
    text = f"fake transcript of {upload.filename} ({size} bytes)"
    if request.form.get("response_format") == "text":
        return Response(text, content_type="text/plain")
    if request.path.endswith("/translations"):  # translations report no usage
        return jsonify(text=text)
    if request.form.get("model", "").startswith("gpt-4o-transcribe"):
        usage = {"type": "tokens", "input_tokens": 14, "output_tokens": len(text.split()),
                 "total_tokens": 14 + len(text.split()),
                 "input_token_details": {"text_tokens": 0, "audio_tokens": 14}}
    else:
        usage = {"type": "duration", "seconds": 2.4}
    return jsonify(text=text, usage=usage)


def _mount_native():
    """Anthropic and Gemini endpoints, kept in their own module."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    try:
        import fake_upstream_native
    except ImportError:
        return
    register = getattr(fake_upstream_native, "register", None)
    if register is not None:
        register(app, record=record, stream=stream_events)


_mount_native()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    import socket

    from gevent.pywsgi import WSGIServer
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # Without TCP_NODELAY, keep-alive replies stall ~40 ms on Nagle + delayed ACK.
    listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    listener.bind(("127.0.0.1", args.port))
    listener.listen(1024)
    WSGIServer(listener, app, log=None).serve_forever()
