"""OpenAI and every OpenAI-compatible upstream (DeepSeek, Qwen, OpenRouter, vLLM, Ollama...).

Requests go out nearly as received (only the model name and, for streams,
`stream_options.include_usage` change); responses come back byte for byte,
except the usage chunk the gateway asked for and the client did not.
"""
import json
from urllib.parse import urlparse

from urllib3 import encode_multipart_formdata

from blueprints.api.providers.base import (
    Adaptor, Reply, StreamBroken, UpstreamFailure, Usage, broken_stream, sse_data,
)
from blueprints.api.upstream_http import TransportError

CHAT_CAP_FIELDS = ("max_completion_tokens", "max_tokens")
# The one output-token limit each endpoint's upstream honours (chat: see chat_cap_field).
CAP_FIELD = {"completions": "max_tokens", "responses": "max_output_tokens"}


def read_openai_usage(usage, into):
    """Copy an OpenAI usage object (chat/completions or Responses API naming) into `into`.

    Transcriptions report `{"type": "duration", "seconds": N}` (whisper) or
    `{"type": "tokens", "input_tokens", "output_tokens"}` (gpt-4o-transcribe).
    """
    if not isinstance(usage, dict):
        return
    if usage.get("type") == "duration":
        into.add_reported(prompt=0, completion=0, seconds=usage.get("seconds"))
        return
    details = usage.get("prompt_tokens_details") or usage.get("input_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, dict) else None
    into.add_reported(
        prompt=usage.get("prompt_tokens", usage.get("input_tokens", 0)),
        completion=usage.get("completion_tokens", usage.get("output_tokens", 0)),
        cached=cached or 0)


def chat_cap_field(body, official_openai):
    """The field that carries a chat request's output cap: the one the client used; when it
    used both or neither, max_completion_tokens on api.openai.com (whose newer models refuse
    max_tokens) and max_tokens elsewhere (compatible APIs may ignore the newer name)."""
    used = [name for name in CHAT_CAP_FIELDS if body.get(name) is not None]
    if len(used) == 1:
        return used[0]
    return "max_completion_tokens" if official_openai else "max_tokens"


def capped_body(body, endpoint, cap, official_openai=False):
    """`body` with `cap` as its only output-token limit, in the field the upstream honours.

    `cap` is what the relay reserved credits for (None: leave the body as it is). `n` and
    `best_of` pass through: the relay multiplies the hold by them.
    """
    if cap is None or not isinstance(body, dict):
        return body
    if endpoint == "chat":
        field = chat_cap_field(body, official_openai)
        out = {k: v for k, v in body.items() if k not in CHAT_CAP_FIELDS}
    elif endpoint in CAP_FIELD:
        field = CAP_FIELD[endpoint]
        out = dict(body)
    else:
        return body
    out[field] = cap
    return out


def upstream_error(response):
    """UpstreamFailure for a non-2xx upstream answer, keeping its message and type."""
    message, error_type, code = f"upstream answered HTTP {response.status_code}", None, None
    try:
        payload = response.json()
        error = payload.get("error") if isinstance(payload, dict) else None
        if isinstance(error, dict):
            message = error.get("message") or message
            error_type, code = error.get("type"), error.get("code")
        elif isinstance(error, str):
            message = error
        elif isinstance(payload, dict) and payload.get("message"):
            message = payload["message"]
    except ValueError:
        text = response.text[:300].strip()
        if text:
            message = f"{message}: {text}"
    finally:
        response.close()
    return UpstreamFailure("status", message, status=response.status_code,
                           retry_after=response.header("Retry-After"),
                           error_type=error_type, error_code=code)


class OpenAIAdaptor(Adaptor):
    type = "openai"

    # -- sending ----------------------------------------------------------------------

    def _headers(self, content_type="application/json"):
        headers = {"Authorization": f"Bearer {self.target.api_key}"}
        if content_type:
            headers["Content-Type"] = content_type
        return headers

    def post(self, path, body, *, stream=False, content_type="application/json"):
        """POST to the upstream; UpstreamFailure for anything but a 2xx answer."""
        response = self.http_post(self.url(path), body, self._headers(content_type),
                                  stream=stream)
        if response.status_code >= 400:
            raise upstream_error(response)
        return response

    @property
    def official_openai(self):
        """True for api.openai.com itself (not a compatible API)."""
        return (urlparse(self.target.base_url).hostname or "").lower() == "api.openai.com"

    def _json_body(self, call, **changes):
        """The request bytes: untouched unless a field must change (model name, output cap)."""
        body = capped_body(call.body, call.endpoint, call.output_cap, self.official_openai)
        if body.get("model") != self.target.upstream_model:
            changes["model"] = self.target.upstream_model
        if body is call.body and not changes:
            return call.raw_body
        return json.dumps(dict(body, **changes)).encode()

    def _whole(self, response, read_usage, collect_text=None):
        """A non-stream Reply: the upstream body as is, with usage read from it."""
        body = response.content
        usage = Usage()
        reply = Reply(status=response.status_code,
                      content_type=response.header("Content-Type", "application/json"),
                      body=body, usage=usage)
        try:
            payload = json.loads(body)
        except ValueError:
            raise UpstreamFailure("bad_response", "upstream sent a body that is not JSON") \
                from None
        if not isinstance(payload, dict):
            raise UpstreamFailure("bad_response", "upstream sent an unexpected JSON body")
        read_usage(payload.get("usage"), usage)
        if collect_text:
            reply.output_text.extend(collect_text(payload))
        return reply

    # -- endpoints --------------------------------------------------------------------

    def send_chat(self, call):
        return self._text_generation(call, "chat/completions", chat_texts, chat_delta_texts)

    def send_completions(self, call):
        return self._text_generation(call, "completions", completion_texts,
                                     completion_delta_texts)

    def _text_generation(self, call, path, whole_texts, delta_texts):
        if not call.stream:
            response = self.post(path, self._json_body(call))
            return self._whole(response, read_openai_usage, whole_texts)
        options = call.body.get("stream_options")
        options = dict(options) if isinstance(options, dict) else {}
        options["include_usage"] = True  # we always meter; hidden again if the client did not ask
        response = self.post(path, self._json_body(call, stream_options=options), stream=True)
        reply = Reply(status=200, content_type="text/event-stream", close=response.close)
        reply._chunks = self._relay_chat_stream(response, reply, call.wants_usage, delta_texts)
        return reply

    def _relay_chat_stream(self, response, reply, wants_usage, delta_texts):
        """Forward each SSE event as it arrives; read usage; hide the usage-only chunk."""
        done = False
        try:
            for event in self.sse_events(response):
                _, data = sse_data(event)
                if data == "[DONE]":
                    done = True
                    yield b"data: [DONE]\n\n"
                    continue
                try:
                    chunk = json.loads(data)
                except ValueError:
                    raise StreamBroken("upstream sent a malformed event") from None
                if not isinstance(chunk, dict):
                    raise StreamBroken("upstream sent a malformed event")
                if chunk.get("error"):
                    error = chunk["error"]
                    raise StreamBroken(error.get("message") if isinstance(error, dict)
                                       else str(error))
                if chunk.get("usage"):
                    read_openai_usage(chunk["usage"], reply.usage)
                    if not wants_usage:
                        if not chunk.get("choices"):
                            continue  # the usage-only chunk the client did not ask for
                        chunk = {k: v for k, v in chunk.items() if k != "usage"}
                        event = b"data: " + json.dumps(chunk).encode()
                reply.output_text.extend(delta_texts(chunk))
                yield event + b"\n\n"
        except (TransportError, OSError) as err:
            raise broken_stream(err) from None
        if not done:
            raise StreamBroken("upstream closed the stream before it finished")

    def send_responses(self, call):
        if not call.stream:
            response = self.post("responses", self._json_body(call))
            return self._whole(response, read_openai_usage, responses_texts)
        response = self.post("responses", self._json_body(call), stream=True)
        reply = Reply(status=200, content_type="text/event-stream", close=response.close)
        reply._chunks = self._relay_responses_stream(response, reply)
        return reply

    def _relay_responses_stream(self, response, reply):
        """Responses API events pass through; usage comes in response.completed."""
        finished = False
        try:
            for event in self.sse_events(response):
                name, data = sse_data(event)
                if data and data != "[DONE]":
                    try:
                        payload = json.loads(data)
                    except ValueError:
                        raise StreamBroken("upstream sent a malformed event") from None
                    if not isinstance(payload, dict):
                        raise StreamBroken("upstream sent a malformed event")
                    kind = name or payload.get("type")
                    if kind in RESPONSES_TEXT_DELTAS:
                        delta = payload.get("delta")
                        reply.output_text.append(delta if isinstance(delta, str) else "")
                    elif kind in ("response.completed", "response.incomplete", "response.failed"):
                        finished = True
                        final = payload.get("response")
                        read_openai_usage(final.get("usage") if isinstance(final, dict)
                                          else None, reply.usage)
                    elif kind == "error":
                        raise StreamBroken(str(payload.get("message")
                                               or "upstream stream error"))
                yield event + b"\n\n"
        except (TransportError, OSError) as err:
            raise broken_stream(err) from None
        if not finished:
            raise StreamBroken("upstream closed the stream before it finished")

    def send_embeddings(self, call):
        response = self.post("embeddings", self._json_body(call))
        return self._whole(response, read_openai_usage)

    def send_images(self, call):
        response = self.post("images/generations", self._json_body(call))
        reply = self._whole(response, read_openai_usage)
        data = json.loads(reply.body).get("data")
        # Every model's images are counted from `data` (gpt-image also reports tokens); the
        # count does not mark usage reported by itself: that stays the token usage's say.
        reply.usage.add_reported(images=len(data) if isinstance(data, list) else 0, final=False)
        return reply

    def send_audio_speech(self, call):
        """Binary audio, streamed through as it is synthesised."""
        response = self.post("audio/speech", self._json_body(call), stream=True)
        reply = Reply(status=200, content_type=response.header("Content-Type", "audio/mpeg"),
                      close=response.close)

        def audio():
            try:
                yield from self.stream_pieces(response)
            except (TransportError, OSError) as err:
                raise broken_stream(err) from None
        reply._chunks = audio()
        return reply

    def send_audio_transcriptions(self, call):
        return self._audio_upload(call, "audio/transcriptions")

    def send_audio_translations(self, call):
        return self._audio_upload(call, "audio/translations")

    def _audio_upload(self, call, path):
        """Multipart re-sent with the upstream model name; the answer may be JSON or text."""
        fields = dict(call.form)
        fields["model"] = self.target.upstream_model
        parts = list(fields.items()) + [(name, (filename, content, ctype))
                                        for name, filename, content, ctype in call.files]
        body, content_type = encode_multipart_formdata(parts)
        response = self.post(path, body, content_type=content_type)
        ctype = response.header("Content-Type", "application/json")
        reply = Reply(status=response.status_code, content_type=ctype, body=response.content)
        if ctype.startswith("application/json"):
            try:
                payload = json.loads(response.content)
                read_openai_usage(payload.get("usage"), reply.usage)
                text = payload.get("text")
                reply.output_text.append(text if isinstance(text, str) else "")
            except (ValueError, AttributeError):
                raise UpstreamFailure("bad_response", "upstream sent a body that is not JSON") \
                    from None
        else:
            reply.output_text.append(response.text)
        return reply


# -- text extraction, for counting tokens locally when usage is missing ---------------
# Every piece of generated text counts: content, reasoning, refusals and tool arguments, so
# a stream cut short is billed for what it delivered. Shapes are checked: garbage yields "".

RESPONSES_TEXT_DELTAS = ("response.output_text.delta", "response.refusal.delta",
                         "response.function_call_arguments.delta",
                         "response.reasoning_text.delta", "response.reasoning_summary_text.delta",
                         "response.custom_tool_call_input.delta")
MESSAGE_TEXT_FIELDS = ("content", "reasoning_content", "reasoning", "refusal")


def _dicts(value):
    return [item for item in value if isinstance(item, dict)] if isinstance(value, list) else []


def _message_texts(message):
    """Text of a chat message or delta: content, reasoning, refusal, tool-call arguments."""
    if not isinstance(message, dict):
        return
    for name in MESSAGE_TEXT_FIELDS:
        if isinstance(message.get(name), str) and message[name]:
            yield message[name]
    for call in _dicts(message.get("tool_calls")):
        function = call.get("function")
        if isinstance(function, dict):
            for name in ("name", "arguments"):
                if isinstance(function.get(name), str) and function[name]:
                    yield function[name]


def chat_texts(payload):
    for choice in _dicts(payload.get("choices")):
        yield from _message_texts(choice.get("message"))


def chat_delta_texts(chunk):
    for choice in _dicts(chunk.get("choices")):
        yield from _message_texts(choice.get("delta"))


def completion_texts(payload):
    for choice in _dicts(payload.get("choices")):
        if isinstance(choice.get("text"), str):
            yield choice["text"]


def completion_delta_texts(chunk):
    return completion_texts(chunk)


def responses_texts(payload):
    for item in _dicts(payload.get("output")):
        for name in ("arguments", "input"):  # function and custom tool calls
            if isinstance(item.get(name), str):
                yield item[name]
        for part in _dicts(item.get("content")) + _dicts(item.get("summary")):
            if isinstance(part.get("text"), str):
                yield part["text"]
            elif isinstance(part.get("refusal"), str):
                yield part["refusal"]
