"""OpenAI chat <-> Anthropic Messages conversions, as pure functions.

Two directions live here:
- outbound (an OpenAI client, an Anthropic channel): `openai_to_anthropic_request`,
  `anthropic_to_openai_response`, `anthropic_stream_to_openai`;
- inbound (an Anthropic client on /v1/messages, any other channel): `anthropic_to_openai_request`,
  `openai_to_anthropic_response`, `openai_stream_to_anthropic`, tied together by
  `messages_via_chat`, which base.Adaptor.send_messages calls.

Field names follow Anthropic's Messages API reference (docs.anthropic.com, "Messages" and
"Streaming Messages") and OpenAI's Chat Completions reference.
"""
import json
import math
import time
import uuid

from blueprints.api.errors import ApiError
from blueprints.api.providers.base import (
    Call, Reply, StreamBroken, UpstreamFailure, Usage, as_count, split_sse, sse_data, sse_encode,
)
from blueprints.api.tokens import estimate_prompt_tokens

DEFAULT_MAX_TOKENS = 4096  # Anthropic requires max_tokens; OpenAI clients often omit it

FINISH_FROM_STOP_REASON = {
    "end_turn": "stop", "stop_sequence": "stop", "pause_turn": "stop",
    "max_tokens": "length", "model_context_window_exceeded": "length",
    "tool_use": "tool_calls", "refusal": "content_filter",
}
STOP_REASON_FROM_FINISH = {
    "stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use",
    "function_call": "tool_use", "content_filter": "refusal",
}


def _bad_request(message, param=None):
    return ApiError(400, "invalid_request_error", message, param=param)


# --- shared small pieces ------------------------------------------------------------------

def parse_data_url(url):
    """(media_type, base64 data) of a `data:<type>;base64,<data>` URL, else None."""
    if not isinstance(url, str) or not url.startswith("data:") or "," not in url:
        return None
    head, data = url[5:].split(",", 1)
    if not head.endswith(";base64"):
        return None
    return head[: -len(";base64")] or "application/octet-stream", data


def text_of(content):
    """The plain text of an OpenAI or Anthropic content value (string or list of parts)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    pieces = []
    for part in content:
        if isinstance(part, str):
            pieces.append(part)
        elif isinstance(part, dict) and part.get("type") in ("text", "input_text", "output_text"):
            pieces.append(part.get("text") or "")
    return "".join(pieces)


def _image_url(part):
    value = part.get("image_url")
    return value.get("url") if isinstance(value, dict) else value


def loads_object(text):
    """Tool-call arguments as a dict; models sometimes send "" or broken JSON."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _new_id(prefix):
    return prefix + uuid.uuid4().hex[:24]


# --- outbound: OpenAI chat request -> Anthropic Messages request --------------------------

def _anthropic_image(url):
    inline = parse_data_url(url)
    if inline:
        media_type, data = inline
        return {"type": "image", "source": {"type": "base64", "media_type": media_type,
                                            "data": data}}
    return {"type": "image", "source": {"type": "url", "url": url}}


def _anthropic_blocks(content):
    """OpenAI message content (string or parts) as Anthropic content blocks."""
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    blocks = []
    for part in content:
        kind = part.get("type")
        if kind in ("text", "input_text"):
            if part.get("text"):
                blocks.append({"type": "text", "text": part["text"]})
        elif kind == "image_url":
            blocks.append(_anthropic_image(_image_url(part)))
        elif kind == "file" and parse_data_url((part.get("file") or {}).get("file_data")):
            media_type, data = parse_data_url(part["file"]["file_data"])
            blocks.append({"type": "document", "source": {"type": "base64",
                                                          "media_type": media_type,
                                                          "data": data}})
        else:
            raise _bad_request(f"Content part type {kind!r} is not supported by Anthropic models.",
                               "messages")
    return blocks


def _append_turn(messages, role, blocks):
    """Add blocks as a turn, merging into the previous turn of the same role (Anthropic alternates)."""
    if not blocks:
        return
    if messages and messages[-1]["role"] == role:
        messages[-1]["content"].extend(blocks)
    else:
        messages.append({"role": role, "content": list(blocks)})


def _anthropic_tool_choice(choice, parallel):
    if choice is None and parallel is not False:
        return None
    if choice in (None, "auto"):
        result = {"type": "auto"}
    elif choice == "required":
        result = {"type": "any"}
    elif choice == "none":
        return {"type": "none"}
    elif isinstance(choice, dict) and choice.get("type") == "function":
        result = {"type": "tool", "name": choice["function"]["name"]}
    else:
        raise _bad_request(f"Unsupported tool_choice {choice!r}.", "tool_choice")
    if parallel is False:
        result["disable_parallel_tool_use"] = True
    return result


def openai_to_anthropic_request(body, upstream_model, output_cap=None):
    """An OpenAI chat completion request as an Anthropic Messages request.

    `output_cap` (what the relay reserved for) is sent as max_tokens, whatever the client
    asked; without it, the client's max_completion_tokens / max_tokens or a default.
    """
    system = []
    messages = []
    for message in body.get("messages") or []:
        role = message.get("role")
        if role in ("system", "developer"):
            text = text_of(message.get("content"))
            if text:
                system.append(text)
        elif role == "user":
            _append_turn(messages, "user", _anthropic_blocks(message.get("content")))
        elif role == "assistant":
            blocks = _anthropic_blocks(message.get("content"))
            for call in message.get("tool_calls") or []:
                function = call.get("function") or {}
                blocks.append({"type": "tool_use", "id": call.get("id") or _new_id("toolu_"),
                               "name": function.get("name", ""),
                               "input": loads_object(function.get("arguments"))})
            _append_turn(messages, "assistant", blocks)
        elif role == "tool":
            content = message.get("content")
            result = {"type": "tool_result", "tool_use_id": message.get("tool_call_id", "")}
            result["content"] = content if isinstance(content, str) else _anthropic_blocks(content)
            _append_turn(messages, "user", [result])
        else:
            raise _bad_request(f"Unsupported message role {role!r}.", "messages")

    max_tokens = output_cap if output_cap is not None else (
        body.get("max_completion_tokens") or body.get("max_tokens") or DEFAULT_MAX_TOKENS)
    out = {"model": upstream_model, "messages": messages, "max_tokens": max_tokens}
    if system:
        out["system"] = "\n\n".join(system)
    for ours, theirs in (("temperature", "temperature"), ("top_p", "top_p")):
        if body.get(ours) is not None:
            out[theirs] = body[ours]
    stop = body.get("stop")
    if stop:
        out["stop_sequences"] = [stop] if isinstance(stop, str) else list(stop)
    tools = [t for t in body.get("tools") or [] if t.get("type", "function") == "function"]
    if tools:
        out["tools"] = [{"name": t["function"]["name"],
                         "description": t["function"].get("description", ""),
                         "input_schema": t["function"].get("parameters")
                         or {"type": "object", "properties": {}}} for t in tools]
        choice = _anthropic_tool_choice(body.get("tool_choice"), body.get("parallel_tool_calls"))
        if choice is not None:
            out["tool_choice"] = choice
    if body.get("user"):
        out["metadata"] = {"user_id": str(body["user"])}
    if body.get("stream"):
        out["stream"] = True
    return out


# --- outbound: Anthropic response -> OpenAI chat completion -------------------------------

def anthropic_usage_numbers(usage):
    """(prompt, completion, cached, cache_write) from Anthropic usage.

    Anthropic's input_tokens excludes cache reads and writes; our prompt includes both. A
    count that is not a whole number makes its result NaN, which base.Usage marks garbled.
    """
    usage = usage if isinstance(usage, dict) else {}
    fresh, read, write, out = (as_count(_zero_if_none(usage.get(name))) for name in (
        "input_tokens", "cache_read_input_tokens", "cache_creation_input_tokens",
        "output_tokens"))
    prompt = math.nan if None in (fresh, read, write) else fresh + read + write
    return (prompt, math.nan if out is None else out, math.nan if read is None else read,
            math.nan if write is None else write)


def _zero_if_none(value):
    return 0 if value is None else value


def openai_usage_body(prompt, completion, cached):
    """OpenAI's usage object."""
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def openai_usage_of(usage):
    """OpenAI's usage object for a base.Usage (cache writes are part of prompt_tokens)."""
    return openai_usage_body(usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens)


def anthropic_to_openai_response(message, model):
    """An Anthropic Messages response as an OpenAI chat completion."""
    text, thinking, tool_calls = [], [], []
    for block in message.get("content") or []:
        kind = block.get("type")
        if kind == "text":
            text.append(block.get("text", ""))
        elif kind == "thinking":
            thinking.append(block.get("thinking", ""))
        elif kind == "tool_use":
            tool_calls.append({"id": block.get("id"), "type": "function",
                               "function": {"name": block.get("name"),
                                            "arguments": json.dumps(block.get("input") or {})}})
    reply = {"role": "assistant", "content": "".join(text) if text or not tool_calls else None}
    if thinking:
        reply["reasoning_content"] = "".join(thinking)
    if tool_calls:
        reply["tool_calls"] = tool_calls
    return {
        "id": "chatcmpl-" + (message.get("id") or _new_id("")),
        "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "message": reply, "logprobs": None,
                     "finish_reason": FINISH_FROM_STOP_REASON.get(message.get("stop_reason"),
                                                                  "stop")}],
        "usage": openai_usage_of(anthropic_usage(message.get("usage"))),
    }


# --- outbound: Anthropic SSE -> OpenAI chunks ---------------------------------------------

class ChunkWriter:
    """Builds chat.completion.chunk events sharing one id, timestamp and model."""

    def __init__(self, chunk_id, model):
        self.base = {"id": chunk_id, "object": "chat.completion.chunk",
                     "created": int(time.time()), "model": model}

    def delta(self, delta, finish_reason=None, index=0):
        return sse_encode(dict(self.base, choices=[{"index": index, "delta": delta,
                                                    "logprobs": None,
                                                    "finish_reason": finish_reason}]))

    def usage(self, usage):
        """The final usage-only chunk for a base.Usage."""
        return sse_encode(dict(self.base, choices=[], usage=openai_usage_of(usage)))


def anthropic_usage(raw):
    """A base.Usage from one whole Anthropic usage object."""
    usage = Usage()
    AnthropicUsageTracker(usage).update(raw)
    return usage


class AnthropicUsageTracker:
    """Folds Anthropic usage objects (message_start, message_delta, a whole body) into a Usage.

    message_delta counts are cumulative and may omit the input fields, so a field it leaves
    out keeps the value message_start gave. message_start's numbers are stored but not final
    (its output_tokens is a placeholder): a stream cut after it is counted from its text.
    """
    FIELDS = ("input_tokens", "cache_read_input_tokens", "cache_creation_input_tokens",
              "output_tokens")

    def __init__(self, usage):
        self.usage = usage
        self.counts = dict.fromkeys(self.FIELDS, 0)

    def update(self, raw, final=True):
        """Record one usage object from the upstream (`final=False`: message_start's)."""
        if not isinstance(raw, dict) or not raw:
            return
        for field in self.FIELDS:
            if raw.get(field) is not None:
                self.counts[field] = raw[field]
        prompt, completion, cached, cache_write = anthropic_usage_numbers(self.counts)
        self.usage.add_reported(prompt, completion, cached, cache_write, final=final)


def anthropic_stream_to_openai(events, model, wants_usage, usage, output_text):
    """Anthropic (event name, data dict) pairs -> OpenAI chunk SSE bytes, ending with [DONE].

    Fills `usage` (a base.Usage) and `output_text` as it goes; an `error` event or a stream
    that ends before message_stop raises StreamBroken.
    """
    writer = None
    tracker = AnthropicUsageTracker(usage)
    tool_index = {}  # Anthropic block index -> OpenAI tool_calls index
    finish = "stop"
    for name, data in events:
        kind = data.get("type", name)
        if kind == "error":
            error = data.get("error") or {}
            raise StreamBroken(error.get("message") or "Anthropic stream error")
        if kind == "message_start":
            message = data.get("message") or {}
            writer = ChunkWriter("chatcmpl-" + (message.get("id") or _new_id("")), model)
            tracker.update(message.get("usage"), final=False)
            yield writer.delta({"role": "assistant", "content": ""})
            continue
        if writer is None:
            if kind == "ping":
                continue
            raise StreamBroken(f"Anthropic stream began with {kind!r}, not message_start")
        if kind == "content_block_start":
            block = data.get("content_block") or {}
            if block.get("type") == "tool_use":
                index = tool_index[data.get("index")] = len(tool_index)
                output_text.append(block.get("name") or "")
                yield writer.delta({"tool_calls": [{
                    "index": index, "id": block.get("id"), "type": "function",
                    "function": {"name": block.get("name"), "arguments": ""}}]})
        elif kind == "content_block_delta":
            delta = data.get("delta") or {}
            if delta.get("type") == "text_delta" and delta.get("text"):
                output_text.append(delta["text"])
                yield writer.delta({"content": delta["text"]})
            elif delta.get("type") == "thinking_delta" and delta.get("thinking"):
                output_text.append(delta["thinking"])
                yield writer.delta({"reasoning_content": delta["thinking"]})
            elif delta.get("type") == "input_json_delta" and delta.get("partial_json"):
                output_text.append(delta["partial_json"])
                yield writer.delta({"tool_calls": [{
                    "index": tool_index.get(data.get("index"), 0),
                    "function": {"arguments": delta["partial_json"]}}]})
        elif kind == "message_delta":
            reason = (data.get("delta") or {}).get("stop_reason")
            finish = FINISH_FROM_STOP_REASON.get(reason, "stop")
            tracker.update(data.get("usage"))
        elif kind == "message_stop":
            yield writer.delta({}, finish_reason=finish)
            if wants_usage:
                yield writer.usage(usage)
            yield b"data: [DONE]\n\n"
            return
    raise StreamBroken("The Anthropic stream ended before message_stop.")


# --- inbound: Anthropic Messages request -> OpenAI chat request ---------------------------

def _openai_image(source):
    if source.get("type") == "base64":
        return {"type": "image_url",
                "image_url": {"url": f"data:{source.get('media_type')};base64,{source.get('data')}"}}
    if source.get("type") == "url":
        return {"type": "image_url", "image_url": {"url": source.get("url")}}
    raise _bad_request(f"Image source type {source.get('type')!r} is not supported here.",
                       "messages")


def _openai_parts(blocks):
    """Anthropic text/image/document blocks as OpenAI content parts."""
    parts = []
    for block in blocks:
        kind = block.get("type")
        if kind == "text":
            parts.append({"type": "text", "text": block.get("text", "")})
        elif kind == "image":
            parts.append(_openai_image(block.get("source") or {}))
        elif kind == "document":
            source = block.get("source") or {}
            if source.get("type") == "text":
                parts.append({"type": "text", "text": source.get("data", "")})
            elif source.get("type") == "base64":
                parts.append({"type": "file", "file": {
                    "filename": block.get("title") or "document.pdf",
                    "file_data": f"data:{source.get('media_type')};base64,{source.get('data')}"}})
            else:
                raise _bad_request("Only base64 and text documents can be sent to this model.",
                                   "messages")
        elif kind in ("thinking", "redacted_thinking"):
            continue  # signed reasoning from an earlier turn means nothing to another provider
        else:
            raise _bad_request(f"Content block type {kind!r} is not supported by this model.",
                               "messages")
    return parts


def _openai_content(parts):
    """Parts as OpenAI content: a plain string when they are all text (widest compatibility)."""
    if all(p["type"] == "text" for p in parts):
        return "".join(p["text"] for p in parts)
    return parts


def _tool_result_text(content):
    if isinstance(content, str):
        return content
    return text_of(content or [])


def _openai_messages(messages):
    out = []
    for message in messages:
        role, content = message.get("role"), message.get("content")
        if isinstance(content, str):
            out.append({"role": role, "content": content})
            continue
        if role == "assistant":
            tool_calls = [{"id": b.get("id"), "type": "function",
                           "function": {"name": b.get("name"),
                                        "arguments": json.dumps(b.get("input") or {})}}
                          for b in content if b.get("type") == "tool_use"]
            parts = _openai_parts([b for b in content if b.get("type") != "tool_use"])
            turn = {"role": "assistant", "content": _openai_content(parts) or None}
            if tool_calls:
                turn["tool_calls"] = tool_calls
            out.append(turn)
            continue
        # user: tool results become "tool" messages, which must directly follow the assistant turn
        for block in content:
            if block.get("type") == "tool_result":
                text = _tool_result_text(block.get("content"))
                if block.get("is_error"):
                    text = "Error: " + text
                out.append({"role": "tool", "tool_call_id": block.get("tool_use_id"),
                            "content": text})
        parts = _openai_parts([b for b in content if b.get("type") != "tool_result"])
        if parts:
            out.append({"role": "user", "content": _openai_content(parts)})
    return out


def _openai_tool_choice(choice):
    kind = choice.get("type")
    if kind == "auto":
        return "auto"
    if kind == "any":
        return "required"
    if kind == "none":
        return "none"
    if kind == "tool":
        return {"type": "function", "function": {"name": choice.get("name")}}
    raise _bad_request(f"Unsupported tool_choice type {kind!r}.", "tool_choice")


def anthropic_to_openai_request(body):
    """An Anthropic Messages request as an OpenAI chat completion request."""
    messages = []
    system = body.get("system")
    if system:
        if not isinstance(system, str):
            system = "\n\n".join(b.get("text", "") for b in system if b.get("type") == "text")
        messages.append({"role": "system", "content": system})
    messages.extend(_openai_messages(body.get("messages") or []))
    out = {"model": body.get("model"), "messages": messages}
    if body.get("max_tokens"):
        out["max_tokens"] = body["max_tokens"]
    for field in ("temperature", "top_p"):
        if body.get(field) is not None:
            out[field] = body[field]
    if body.get("stop_sequences"):
        out["stop"] = list(body["stop_sequences"])
    tools = body.get("tools") or []
    if tools:
        converted = []
        for tool in tools:
            if tool.get("type") not in (None, "custom"):
                raise _bad_request(f"Tool type {tool['type']!r} is only available on Anthropic "
                                   "models.", "tools")
            converted.append({"type": "function", "function": {
                "name": tool.get("name"), "description": tool.get("description", ""),
                "parameters": tool.get("input_schema") or {"type": "object", "properties": {}}}})
        out["tools"] = converted
    choice = body.get("tool_choice")
    if choice:
        if tools or choice.get("type") == "none":
            out["tool_choice"] = _openai_tool_choice(choice)
        if choice.get("disable_parallel_tool_use") and tools:
            out["parallel_tool_calls"] = False
    user = (body.get("metadata") or {}).get("user_id")
    if user:
        out["user"] = user
    if body.get("stream"):
        out["stream"] = True
        out["stream_options"] = {"include_usage": True}
    return out


# --- inbound: OpenAI chat completion -> Anthropic message ---------------------------------

def anthropic_usage_body(prompt, completion, cached, cache_write=0):
    """Anthropic's usage object; its input_tokens excludes cache reads and writes."""
    return {"input_tokens": max(prompt - cached - cache_write, 0), "output_tokens": completion,
            "cache_creation_input_tokens": cache_write, "cache_read_input_tokens": cached}


def anthropic_usage_of(usage):
    """Anthropic's usage object for a base.Usage."""
    return anthropic_usage_body(usage.prompt_tokens, usage.completion_tokens,
                                usage.cached_tokens, usage.cache_write_tokens)


def _openai_usage_numbers(usage):
    """(prompt, completion, cached) of an OpenAI usage object; garbage counts as 0."""
    usage = usage if isinstance(usage, dict) else {}
    details = usage.get("prompt_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, dict) else 0
    return tuple(as_count(value or 0) or 0 for value in (
        usage.get("prompt_tokens"), usage.get("completion_tokens"), cached))


def openai_to_anthropic_response(completion, model, usage=None):
    """An OpenAI chat completion as an Anthropic Messages response.

    `usage` (the base.Usage the inner adaptor read, when reported) wins over the body's own
    usage: it carries what the provider reported beyond OpenAI's fields (cache writes).
    """
    choice = (completion.get("choices") or [{}])[0]
    message = choice.get("message") or {}
    content = []
    if message.get("reasoning_content"):
        content.append({"type": "thinking", "thinking": message["reasoning_content"],
                        "signature": ""})
    text = text_of(message.get("content"))
    if text:
        content.append({"type": "text", "text": text})
    for call in message.get("tool_calls") or []:
        function = call.get("function") or {}
        content.append({"type": "tool_use", "id": call.get("id") or _new_id("toolu_"),
                        "name": function.get("name"),
                        "input": loads_object(function.get("arguments"))})
    return {"id": _message_id(completion.get("id")), "type": "message", "role": "assistant",
            "model": model, "content": content,
            "stop_reason": STOP_REASON_FROM_FINISH.get(choice.get("finish_reason"), "end_turn"),
            "stop_sequence": None,
            "usage": anthropic_usage_of(usage) if usage is not None and usage.reported
            else anthropic_usage_body(*_openai_usage_numbers(completion.get("usage")))}


def _message_id(openai_id):
    if openai_id and openai_id.startswith("chatcmpl-"):
        return "msg_" + openai_id[len("chatcmpl-"):]
    return "msg_" + (openai_id or uuid.uuid4().hex[:24])


# --- inbound: OpenAI chunks -> Anthropic events -------------------------------------------

class _EventWriter:
    """Anthropic stream events with the block bookkeeping they need (one open block at a time)."""

    def __init__(self):
        self.index = -1  # index of the current content block
        self.open_kind = None  # "text" | "thinking" | "tool" | None
        self.open_tool = None  # OpenAI tool index of the open tool_use block
        self.open_tool_id = None

    @staticmethod
    def event(data):
        return sse_encode(data, event=data["type"])

    def close(self):
        if self.open_kind is None:
            return []
        self.open_kind = self.open_tool = self.open_tool_id = None
        return [self.event({"type": "content_block_stop", "index": self.index})]

    def start(self, kind, block, tool=None, tool_id=None):
        events = self.close()
        self.index += 1
        self.open_kind, self.open_tool, self.open_tool_id = kind, tool, tool_id
        events.append(self.event({"type": "content_block_start", "index": self.index,
                                  "content_block": block}))
        return events

    def delta(self, delta):
        return self.event({"type": "content_block_delta", "index": self.index, "delta": delta})


def openai_stream_to_anthropic(chunks, model, input_estimate=0, usage=None):
    """OpenAI chunk SSE bytes -> Anthropic Messages stream events, in the order the SDKs expect.

    message_start (input_tokens: the reported count if known, else `input_estimate`), then per
    block content_block_start/delta/stop, then message_delta (stop_reason, final usage) and
    message_stop. `usage` (a base.Usage filled by the inner adaptor) is the fallback when the
    chunks themselves carry no usage. A StreamBroken from `chunks` propagates.
    """
    out = _EventWriter()
    message_id = _new_id("msg_")
    yield out.event({"type": "message_start", "message": {
        "id": message_id, "type": "message", "role": "assistant", "model": model,
        "content": [], "stop_reason": None, "stop_sequence": None,
        "usage": {"input_tokens": input_estimate, "output_tokens": 0,
                  "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}}})
    stop_reason = "end_turn"
    reported = None
    for event in split_sse(chunks):
        _, text = sse_data(event)
        if not text or text.strip() == "[DONE]":
            continue
        try:
            chunk = json.loads(text)
        except ValueError:
            continue
        if not isinstance(chunk, dict):
            continue
        if chunk.get("error"):
            raise StreamBroken((chunk["error"] or {}).get("message") or "upstream stream error")
        if chunk.get("usage"):
            reported = _openai_usage_numbers(chunk["usage"])
        for choice in chunk.get("choices") or []:
            if choice.get("index", 0) != 0:
                continue  # Anthropic has one message; extra choices (n>1) are dropped
            delta = choice.get("delta") or {}
            reasoning = delta.get("reasoning_content") or delta.get("reasoning")
            if reasoning:
                if out.open_kind != "thinking":
                    yield from out.start("thinking", {"type": "thinking", "thinking": "",
                                                      "signature": ""})
                yield out.delta({"type": "thinking_delta", "thinking": reasoning})
            if delta.get("content"):
                if out.open_kind != "text":
                    yield from out.start("text", {"type": "text", "text": ""})
                yield out.delta({"type": "text_delta", "text": delta["content"]})
            for call in delta.get("tool_calls") or []:
                function = call.get("function") or {}
                tool = call.get("index", 0)
                same_block = out.open_kind == "tool" and out.open_tool == tool
                if not same_block or call.get("id") not in (None, out.open_tool_id):
                    yield from out.start("tool", {"type": "tool_use",
                                                  "id": call.get("id") or _new_id("toolu_"),
                                                  "name": function.get("name") or "",
                                                  "input": {}}, tool=tool, tool_id=call.get("id"))
                if function.get("arguments"):
                    yield out.delta({"type": "input_json_delta",
                                     "partial_json": function["arguments"]})
            if choice.get("finish_reason"):
                stop_reason = STOP_REASON_FROM_FINISH.get(choice["finish_reason"], "end_turn")
    yield from out.close()
    if usage is not None and usage.reported:
        final_usage = anthropic_usage_of(usage)
    else:
        final_usage = anthropic_usage_body(*(reported or (input_estimate, 0, 0)))
    yield out.event({"type": "message_delta",
                     "delta": {"stop_reason": stop_reason, "stop_sequence": None},
                     "usage": final_usage})
    yield out.event({"type": "message_stop"})


# --- inbound, end to end -----------------------------------------------------------------

def count_tokens(body):
    """A local input-token count for POST /v1/messages/count_tokens: {"input_tokens": N}."""
    return {"input_tokens": estimate_prompt_tokens(body)}


def messages_via_chat(adaptor, call):
    """Serve an Anthropic Messages call through `adaptor.send_chat`, converting both ways."""
    if not isinstance(call.body, dict):
        raise _bad_request("The request body must be a JSON object.")
    chat_body = anthropic_to_openai_request(call.body)
    if call.output_cap is not None:
        # the inner adaptor sends the cap in the field its channel honours
        chat_body.pop("max_tokens", None)
    chat_call = Call(endpoint="chat", model=call.model, body=chat_body,
                     raw_body=json.dumps(chat_body).encode(), content_type="application/json",
                     stream=call.stream, wants_usage=True, request_id=call.request_id,
                     headers=call.headers, output_cap=call.output_cap)
    inner = adaptor.send_chat(chat_call)
    model = call.body.get("model") or call.model
    if not inner.is_stream:
        try:
            completion = json.loads(inner.body)
        except (TypeError, ValueError):
            inner.close()
            raise UpstreamFailure("bad_response", "The upstream answered with a body that is "
                                  "not JSON.")
        if not isinstance(completion, dict):
            inner.close()
            raise UpstreamFailure("bad_response", "The upstream answered with an unexpected "
                                  "JSON body.")
        body = json.dumps(openai_to_anthropic_response(completion, model, inner.usage)).encode()
        reply = Reply(status=inner.status, body=body, usage=inner.usage, close=inner.close)
    else:
        chunks = openai_stream_to_anthropic(inner.chunks(), model,
                                            estimate_prompt_tokens(call.body), inner.usage)
        reply = Reply(status=inner.status, content_type="text/event-stream", chunks=chunks,
                      usage=inner.usage, close=inner.close)
    reply.output_text = inner.output_text  # shared list: counting works even after a disconnect
    return reply
