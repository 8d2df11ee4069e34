"""OpenAI chat and embeddings <-> Gemini generateContent / embedContent, as pure functions.

Field names follow the Gemini API reference (ai.google.dev/api): `contents[].parts[]`,
`systemInstruction`, `generationConfig`, `tools[].functionDeclarations`, `toolConfig`,
`candidates[].finishReason`, `promptFeedback.blockReason` and `usageMetadata`. Requests use
the REST API's camelCase names.
"""
import base64
import json
import math
import mimetypes
import struct
import time
import uuid

from blueprints.api.errors import ApiError
from blueprints.api.providers.anthropic_convert import (
    ChunkWriter, loads_object, openai_usage_of, parse_data_url, text_of,
)
from blueprints.api.providers.base import StreamBroken, UpstreamFailure, Usage, as_count

# Gemini 3 rejects function-call history that lacks a thought signature; this is the value its
# documentation gives for calls the model did not produce in this conversation (another client).
FOREIGN_THOUGHT_SIGNATURE = "skip_thought_signature_validator"

FINISH_REASONS = {
    "STOP": "stop", "MAX_TOKENS": "length",
    "SAFETY": "content_filter", "RECITATION": "content_filter", "BLOCKLIST": "content_filter",
    "PROHIBITED_CONTENT": "content_filter", "SPII": "content_filter",
    "IMAGE_SAFETY": "content_filter",
}
TOOL_MODES = {"auto": "AUTO", "required": "ANY", "none": "NONE"}


def _bad_request(message, param=None):
    return ApiError(400, "invalid_request_error", message, param=param)


class PromptBlocked(UpstreamFailure):
    """Gemini refused the prompt itself (promptFeedback.blockReason): the client's 400."""

    def __init__(self, reason):
        super().__init__("status", f"Gemini blocked the prompt: {reason}", status=400,
                         error_type="invalid_request_error", error_code="prompt_blocked")


def check_prompt_feedback(response):
    """Raise PromptBlocked when Gemini blocked the prompt and produced no candidates."""
    reason = (response.get("promptFeedback") or {}).get("blockReason")
    if reason and not response.get("candidates"):
        raise PromptBlocked(reason)


# --- OpenAI chat request -> Gemini generateContent request --------------------------------

def _gemini_part(part):
    kind = part.get("type")
    if kind in ("text", "input_text"):
        return {"text": part.get("text", "")}
    if kind == "image_url":
        value = part.get("image_url")
        url = value.get("url") if isinstance(value, dict) else value
        inline = parse_data_url(url)
        if inline:
            return {"inlineData": {"mimeType": inline[0], "data": inline[1]}}
        mime = mimetypes.guess_type(url.split("?", 1)[0])[0] or "image/jpeg"
        return {"fileData": {"mimeType": mime, "fileUri": url}}
    if kind == "file" and parse_data_url((part.get("file") or {}).get("file_data")):
        mime, data = parse_data_url(part["file"]["file_data"])
        return {"inlineData": {"mimeType": mime, "data": data}}
    if kind == "input_audio":
        audio = part.get("input_audio") or {}
        return {"inlineData": {"mimeType": "audio/" + (audio.get("format") or "wav"),
                               "data": audio.get("data", "")}}
    raise _bad_request(f"Content part type {kind!r} is not supported by Gemini models.",
                       "messages")


def _gemini_parts(content):
    if content is None:
        return []
    if isinstance(content, str):
        return [{"text": content}] if content else []
    return [_gemini_part(p) for p in content]


def _append_content(contents, role, parts):
    """Add parts as a turn, merging consecutive turns of the same role."""
    if not parts:
        return
    if contents and contents[-1]["role"] == role:
        contents[-1]["parts"].extend(parts)
    else:
        contents.append({"role": role, "parts": list(parts)})


def _function_response(content):
    """A tool message's content as functionResponse.response (which must be a JSON object)."""
    text = content if isinstance(content, str) else text_of(content)
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    return value if isinstance(value, dict) else {"content": text}


def _tool_config(choice):
    if choice is None:
        return None
    if isinstance(choice, str):
        if choice not in TOOL_MODES:
            raise _bad_request(f"Unsupported tool_choice {choice!r}.", "tool_choice")
        return {"functionCallingConfig": {"mode": TOOL_MODES[choice]}}
    if isinstance(choice, dict) and choice.get("type") == "function":
        return {"functionCallingConfig": {"mode": "ANY",
                                          "allowedFunctionNames": [choice["function"]["name"]]}}
    raise _bad_request(f"Unsupported tool_choice {choice!r}.", "tool_choice")


def _generation_config(body, output_cap=None):
    config = {}
    max_tokens = output_cap if output_cap is not None else (
        body.get("max_completion_tokens") or body.get("max_tokens"))
    if max_tokens:
        config["maxOutputTokens"] = max_tokens
    for ours, theirs in (("temperature", "temperature"), ("top_p", "topP"), ("n", "candidateCount"),
                         ("seed", "seed"), ("presence_penalty", "presencePenalty"),
                         ("frequency_penalty", "frequencyPenalty")):
        if body.get(ours) is not None:
            config[theirs] = body[ours]
    stop = body.get("stop")
    if stop:
        config["stopSequences"] = [stop] if isinstance(stop, str) else list(stop)
    response_format = body.get("response_format") or {}
    if response_format.get("type") == "json_object":
        config["responseMimeType"] = "application/json"
    elif response_format.get("type") == "json_schema":
        config["responseMimeType"] = "application/json"
        schema = (response_format.get("json_schema") or {}).get("schema")
        if schema:
            config["responseJsonSchema"] = schema
    return config


def openai_to_gemini_request(body, output_cap=None):
    """An OpenAI chat completion request as a Gemini generateContent request body.

    `output_cap` (what the relay reserved for, per candidate) becomes maxOutputTokens whatever
    the client asked; `n` becomes candidateCount unchanged (the relay multiplies the hold).
    """
    system, contents = [], []
    tool_names = {}  # tool_call_id -> function name; functionResponse needs the name
    for message in body.get("messages") or []:
        role = message.get("role")
        if role in ("system", "developer"):
            text = text_of(message.get("content"))
            if text:
                system.append({"text": text})
        elif role == "user":
            _append_content(contents, "user", _gemini_parts(message.get("content")))
        elif role == "assistant":
            parts = _gemini_parts(message.get("content"))
            for number, call in enumerate(message.get("tool_calls") or []):
                function = call.get("function") or {}
                tool_names[call.get("id")] = function.get("name", "")
                part = {"functionCall": {"name": function.get("name", ""),
                                         "args": loads_object(function.get("arguments"))}}
                if number == 0:
                    part["thoughtSignature"] = FOREIGN_THOUGHT_SIGNATURE
                parts.append(part)
            _append_content(contents, "model", parts)
        elif role == "tool":
            name = tool_names.get(message.get("tool_call_id")) or message.get("name") or ""
            _append_content(contents, "user", [{"functionResponse": {
                "name": name, "response": _function_response(message.get("content"))}}])
        else:
            raise _bad_request(f"Unsupported message role {role!r}.", "messages")

    out = {"contents": contents}
    if system:
        out["systemInstruction"] = {"parts": system}
    config = _generation_config(body, output_cap)
    if config:
        out["generationConfig"] = config
    tools = [t for t in body.get("tools") or [] if t.get("type", "function") == "function"]
    if tools:
        declarations = []
        for tool in tools:
            function = tool["function"]
            declaration = {"name": function["name"],
                           "description": function.get("description", "")}
            if function.get("parameters"):
                # full JSON Schema; the older `parameters` field takes only an OpenAPI subset
                declaration["parametersJsonSchema"] = function["parameters"]
            declarations.append(declaration)
        out["tools"] = [{"functionDeclarations": declarations}]
        tool_config = _tool_config(body.get("tool_choice"))
        if tool_config:
            out["toolConfig"] = tool_config
    return out


# --- Gemini response -> OpenAI chat completion --------------------------------------------

def gemini_usage_numbers(metadata):
    """(prompt, completion, cached) from usageMetadata.

    Tool-use prompt tokens (e.g. search results fed back) are billed as input and thought
    tokens as output, as Google bills them; promptTokenCount already includes the cached
    content. A count that is not a whole number makes its result NaN (base.Usage: garbled).
    """
    metadata = metadata if isinstance(metadata, dict) else {}
    prompt, tool_prompt, candidates, thoughts, cached = (
        as_count(0 if metadata.get(name) is None else metadata[name]) for name in (
            "promptTokenCount", "toolUsePromptTokenCount", "candidatesTokenCount",
            "thoughtsTokenCount", "cachedContentTokenCount"))
    return (math.nan if None in (prompt, tool_prompt) else prompt + tool_prompt,
            math.nan if None in (candidates, thoughts) else candidates + thoughts,
            math.nan if cached is None else cached)


def record_gemini_usage(usage, metadata, final=True):
    """Copy usageMetadata into a base.Usage (nothing when it is absent).

    `final=False` for a stream's running counts before its finishReason: stored, but a stream
    cut short is counted from the text it delivered."""
    if isinstance(metadata, dict) and metadata:
        usage.add_reported(*gemini_usage_numbers(metadata), final=final)


def gemini_usage(metadata):
    """A base.Usage from one usageMetadata object."""
    usage = Usage()
    record_gemini_usage(usage, metadata)
    return usage


def _tool_call(part, index=None):
    call = part["functionCall"]
    out = {"id": call.get("id") or "call_" + uuid.uuid4().hex[:24], "type": "function",
           "function": {"name": call.get("name"), "arguments": json.dumps(call.get("args") or {})}}
    if index is not None:
        out["index"] = index
    return out


def _finish_reason(reason, has_tool_calls):
    if has_tool_calls and reason in (None, "STOP"):
        return "tool_calls"
    return FINISH_REASONS.get(reason, "stop")


def gemini_to_openai_response(response, model):
    """A Gemini generateContent response as an OpenAI chat completion.

    Raises PromptBlocked when the prompt itself was blocked.
    """
    check_prompt_feedback(response)
    choices = []
    for position, candidate in enumerate(response.get("candidates") or []):
        text, thoughts, tool_calls = [], [], []
        for part in (candidate.get("content") or {}).get("parts") or []:
            if "functionCall" in part:
                tool_calls.append(_tool_call(part))
            elif part.get("thought"):
                thoughts.append(part.get("text") or "")
            elif "text" in part:
                text.append(part["text"])
        message = {"role": "assistant",
                   "content": "".join(text) if text or not tool_calls else None}
        if thoughts:
            message["reasoning_content"] = "".join(thoughts)
        if tool_calls:
            message["tool_calls"] = tool_calls
        choices.append({"index": candidate.get("index", position), "message": message,
                        "logprobs": None,
                        "finish_reason": _finish_reason(candidate.get("finishReason"),
                                                        bool(tool_calls))})
    return {"id": "chatcmpl-" + (response.get("responseId") or uuid.uuid4().hex[:24]),
            "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": choices,
            "usage": openai_usage_of(gemini_usage(response.get("usageMetadata")))}


def response_texts(response):
    """Generated text in a Gemini response (text, thoughts, call arguments), for counting."""
    for candidate in response.get("candidates") or []:
        for part in (candidate.get("content") or {}).get("parts") or []:
            if "functionCall" in part:
                yield json.dumps(part["functionCall"].get("args") or {})
            elif part.get("text"):
                yield part["text"]


# --- Gemini SSE -> OpenAI chunks ----------------------------------------------------------

def gemini_stream_to_openai(responses, model, wants_usage, usage, output_text):
    """Gemini streamGenerateContent?alt=sse data objects -> OpenAI chunk SSE bytes + [DONE].

    Each item of `responses` is one event's parsed JSON (a GenerateContentResponse). Fills
    `usage` and `output_text`; an error object, a blocked prompt or a stream that ends without
    a finishReason raises StreamBroken.
    """
    writer = ChunkWriter("chatcmpl-" + uuid.uuid4().hex[:24], model)
    yield writer.delta({"role": "assistant", "content": ""})
    tool_count = {}  # candidate index -> tool calls emitted so far
    finish = {}  # candidate index -> Gemini finishReason
    for response in responses:
        if response.get("error"):
            raise StreamBroken((response["error"] or {}).get("message") or "Gemini stream error")
        reason = (response.get("promptFeedback") or {}).get("blockReason")
        if reason and not response.get("candidates"):
            raise StreamBroken(f"Gemini blocked the prompt: {reason}")
        for position, candidate in enumerate(response.get("candidates") or []):
            index = candidate.get("index", position)
            for part in (candidate.get("content") or {}).get("parts") or []:
                if "functionCall" in part:
                    number = tool_count.get(index, 0)
                    tool_count[index] = number + 1
                    call = _tool_call(part, number)
                    output_text.append(call["function"]["arguments"])
                    yield writer.delta({"tool_calls": [call]}, index=index)
                elif part.get("text"):
                    output_text.append(part["text"])
                    field = "reasoning_content" if part.get("thought") else "content"
                    yield writer.delta({field: part["text"]}, index=index)
            if candidate.get("finishReason"):
                finish[index] = candidate["finishReason"]
        # usageMetadata counts are running totals: final once a candidate has finished
        record_gemini_usage(usage, response.get("usageMetadata"), final=bool(finish))
    if not finish:
        raise StreamBroken("The Gemini stream ended without a finishReason.")
    for index, reason in sorted(finish.items()):
        yield writer.delta({}, finish_reason=_finish_reason(reason, tool_count.get(index)),
                           index=index)
    if wants_usage:
        yield writer.usage(usage)
    yield b"data: [DONE]\n\n"


# --- embeddings ---------------------------------------------------------------------------

def embedding_inputs(body):
    """The texts of an OpenAI embeddings request (token-id inputs are not supported)."""
    value = body.get("input")
    texts = [value] if isinstance(value, str) else value
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        raise _bad_request("Gemini embeddings take `input` as a string or a list of strings.",
                           "input")
    return texts


def openai_to_gemini_embeddings(body, upstream_model):
    """(method, request body): embedContent for one input, batchEmbedContents for several."""
    texts = embedding_inputs(body)
    dimensions = body.get("dimensions")

    def request(text, with_model):
        one = {"content": {"parts": [{"text": text}]}}
        if with_model:
            one["model"] = "models/" + upstream_model
        if dimensions:
            one["outputDimensionality"] = dimensions
        return one
    if len(texts) == 1:
        return "embedContent", request(texts[0], False)
    return "batchEmbedContents", {"requests": [request(t, True) for t in texts]}


def _encode_embedding(values, encoding_format):
    if encoding_format == "base64":  # what the openai SDK asks for by default
        return base64.b64encode(struct.pack(f"<{len(values)}f", *values)).decode()
    return values


def gemini_to_openai_embeddings(response, model, encoding_format, prompt_tokens):
    """An embedContent/batchEmbedContents response in OpenAI's list shape."""
    if "embedding" in response:
        embeddings = [response["embedding"]]
    else:
        embeddings = response.get("embeddings") or []
    data = [{"object": "embedding", "index": index,
             "embedding": _encode_embedding(item.get("values") or [], encoding_format)}
            for index, item in enumerate(embeddings)]
    return {"object": "list", "data": data, "model": model,
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}}
