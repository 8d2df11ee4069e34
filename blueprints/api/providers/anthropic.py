"""Anthropic upstreams: POST {base}/v1/messages with x-api-key and anthropic-version.

OpenAI chat calls are converted both ways (anthropic_convert); Anthropic Messages calls
pass through untouched except for the model name, events forwarded as they arrive.
"""
import json

from blueprints.api.providers.anthropic_convert import (
    AnthropicUsageTracker, anthropic_stream_to_openai, anthropic_to_openai_response,
    openai_to_anthropic_request,
)
from blueprints.api.providers.base import (
    Adaptor, Reply, StreamBroken, UpstreamFailure, broken_stream, sse_data,
)
from blueprints.api.providers.openai import upstream_error
from blueprints.api.upstream_http import ReadTimeout, TransportError

ANTHROPIC_VERSION = "2023-06-01"
FORWARDED_HEADERS = ("anthropic-beta",)  # client headers that change what the upstream does


def header_value(headers, name):
    """A header from a plain dict, whatever its case."""
    for key, value in (headers or {}).items():
        if key.lower() == name:
            return value
    return None


def post_json(adaptor, url, body, headers, stream):
    """POST JSON upstream (a dict, or bytes already encoded); UpstreamFailure for connect
    errors and timeouts."""
    headers = dict(headers, **{"Content-Type": "application/json"})
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return adaptor.http_post(url, raw, headers, stream=stream)


def read_json(response):
    """The JSON body of a 2xx answer, or UpstreamFailure("bad_response")."""
    try:
        payload = json.loads(response.content)
    except ValueError:
        raise UpstreamFailure("bad_response", "upstream sent a body that is not JSON") from None
    finally:
        response.close()
    if not isinstance(payload, dict):
        raise UpstreamFailure("bad_response", "upstream sent an unexpected JSON body")
    return payload


def first_then_rest(events):
    """Read the first event now (so failures surface before any byte is sent), then the rest.

    Returns (first event or None, iterator over all events including the first).
    """
    try:
        first = next(events, None)
    except StreamBroken as err:  # the deadline or the size cap, before any byte went out
        raise UpstreamFailure("bad_response", str(err)) from None
    except ReadTimeout:
        raise UpstreamFailure("timeout", "upstream did not start the stream in time") from None
    except (TransportError, OSError) as err:
        raise UpstreamFailure("connect", f"upstream stream failed: {type(err).__name__}") \
            from None

    def chained():
        if first is not None:
            yield first
        try:
            yield from events
        except (TransportError, OSError) as err:
            raise broken_stream(err) from None
    return first, chained()


def parse_event(event):
    """(event name, data dict) of one SSE event; StreamBroken when its data is not JSON."""
    name, text = sse_data(event)
    try:
        data = json.loads(text) if text else {}
    except ValueError:
        raise StreamBroken("upstream sent a malformed event") from None
    if not isinstance(data, dict):
        raise StreamBroken("upstream sent a malformed event")
    return name, data


def _early_error(first):
    """An `error` as the stream's first event is a failure before the first byte (retryable)."""
    if first is None:
        raise UpstreamFailure("bad_response", "upstream sent an empty stream")
    name, text = sse_data(first)
    try:
        data = json.loads(text)
    except ValueError:
        return
    if isinstance(data, dict) and (name == "error" or data.get("type") == "error"):
        error = data.get("error") or {}
        kind = error.get("type")
        status = {"overloaded_error": 529, "rate_limit_error": 429,
                  "invalid_request_error": 400}.get(kind, 500)
        raise UpstreamFailure("status", error.get("message") or "upstream stream error",
                              status=status, error_type=kind)


class AnthropicAdaptor(Adaptor):
    type = "anthropic"

    def _headers(self, call):
        headers = {"x-api-key": self.target.api_key, "anthropic-version": ANTHROPIC_VERSION}
        for name in FORWARDED_HEADERS:
            value = header_value(call.headers, name)
            if value:
                headers[name] = value
        return headers

    def _post(self, call, body):
        response = post_json(self, self.url("messages"), body, self._headers(call), call.stream)
        if response.status_code >= 400:
            raise upstream_error(response)
        return response

    def _stream(self, response):
        """The upstream's events, the first already read; an early `error` is retryable."""
        first, events = first_then_rest(self.sse_events(response))
        try:
            _early_error(first)
        except UpstreamFailure:
            response.close()
            raise
        return events

    # -- OpenAI chat in, Anthropic upstream ------------------------------------------

    def send_chat(self, call):
        """OpenAI chat completion via Anthropic Messages, stream or not."""
        body = openai_to_anthropic_request(call.body, self.target.upstream_model, call.output_cap)
        response = self._post(call, body)
        if not call.stream:
            message = read_json(response)
            completion = anthropic_to_openai_response(message, call.model)
            reply = Reply(body=json.dumps(completion).encode())
            AnthropicUsageTracker(reply.usage).update(message.get("usage"))
            reply.output_text.extend(message_texts(message))
            return reply
        events = self._stream(response)
        reply = Reply(content_type="text/event-stream", close=response.close)
        reply._chunks = anthropic_stream_to_openai((parse_event(e) for e in events), call.model,
                                                   call.wants_usage, reply.usage,
                                                   reply.output_text)
        return reply

    # -- Anthropic Messages in, Anthropic upstream: pass-through -----------------------

    def send_messages(self, call):
        """Anthropic Messages passed through: only the model name and the output cap may
        change on the way out; a body where neither does is sent as received."""
        changes = {}
        if call.body.get("model") != self.target.upstream_model:
            changes["model"] = self.target.upstream_model
        cap = call.body.get("max_tokens")
        if call.output_cap is not None and not (type(cap) is int and cap == call.output_cap):
            changes["max_tokens"] = call.output_cap  # the cap the relay reserved, nothing more
        body = json.dumps(call.json_with(**changes)).encode() if changes else call.raw_body
        response = self._post(call, body)
        if not call.stream:
            raw = response.content
            message = read_json(response)
            reply = Reply(body=raw)
            AnthropicUsageTracker(reply.usage).update(message.get("usage"))
            reply.output_text.extend(message_texts(message))
            return reply
        events = self._stream(response)
        reply = Reply(content_type="text/event-stream", close=response.close)
        reply._chunks = self._pass_through(events, reply)
        return reply

    def _pass_through(self, events, reply):
        """Forward each event unchanged, reading usage and text on the way."""
        tracker = AnthropicUsageTracker(reply.usage)
        for event in events:
            name, data = parse_event(event)
            kind = data.get("type", name)
            if kind == "error":
                raise StreamBroken((data.get("error") or {}).get("message")
                                   or "Anthropic stream error")
            if kind == "message_start":
                message = data.get("message")
                tracker.update(message.get("usage") if isinstance(message, dict) else None,
                               final=False)
            elif kind == "message_delta":
                tracker.update(data.get("usage"))
            elif kind == "content_block_start":
                reply.output_text.extend(block_start_texts(data.get("content_block")))
            elif kind == "content_block_delta":
                reply.output_text.extend(delta_texts(data.get("delta")))
            yield event + b"\n\n"
            if kind == "message_stop":
                return
        raise StreamBroken("The Anthropic stream ended before message_stop.")


def message_texts(message):
    """Generated text in an Anthropic message (text, thinking, tool input), for counting."""
    content = message.get("content")
    for block in content if isinstance(content, list) else []:
        if not isinstance(block, dict):
            continue
        if block.get("type") == "text" and isinstance(block.get("text"), str):
            yield block["text"]
        elif block.get("type") == "thinking" and isinstance(block.get("thinking"), str):
            yield block["thinking"]
        elif block.get("type") in ("tool_use", "server_tool_use"):
            yield str(block.get("name") or "") + json.dumps(block.get("input") or {})


def block_start_texts(block):
    """Text a content_block_start already carries (a tool's name), for counting."""
    if isinstance(block, dict) and block.get("type") in ("tool_use", "server_tool_use") \
            and isinstance(block.get("name"), str):
        yield block["name"]


def delta_texts(delta):
    """Text of a content_block_delta: text, thinking or tool-input JSON, for counting."""
    if not isinstance(delta, dict):
        return
    for field in ("text", "thinking", "partial_json"):
        if isinstance(delta.get(field), str) and delta[field]:
            yield delta[field]
