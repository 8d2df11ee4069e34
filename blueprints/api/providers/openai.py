"""OpenAI and every OpenAI-compatible upstream (DeepSeek, Qwen, OpenRouter, vLLM, Ollama...).

Requests go out nearly as received (only the model name and, for streams,
`stream_options.include_usage` change); responses come back byte for byte,
except the usage chunk the gateway asked for and the client did not.
"""
import json

import requests

from blueprints.api.providers.base import (
    Adaptor, Reply, StreamBroken, UpstreamFailure, Usage, broken_stream, sse_data, sse_events,
)

AUDIO_CHUNK = 16 * 1024


def read_openai_usage(usage, into):
    """Copy an OpenAI usage object (chat/completions or Responses API naming) into `into`."""
    if not isinstance(usage, dict):
        return
    details = usage.get("prompt_tokens_details") or usage.get("input_tokens_details") or {}
    into.add_reported(
        prompt=usage.get("prompt_tokens", usage.get("input_tokens", 0)),
        completion=usage.get("completion_tokens", usage.get("output_tokens", 0)),
        cached=(details or {}).get("cached_tokens") or 0)


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
                           retry_after=response.headers.get("Retry-After"),
                           error_type=error_type, error_code=code)


class OpenAIAdaptor(Adaptor):
    type = "openai"

    # -- sending ----------------------------------------------------------------------

    def _headers(self, content_type="application/json"):
        headers = {"Authorization": f"Bearer {self.target.api_key}"}
        if content_type:
            headers["Content-Type"] = content_type
        return headers

    def post(self, path, *, data=None, files=None, stream=False, content_type="application/json"):
        """POST to the upstream; UpstreamFailure for anything but a 2xx answer."""
        response = self.http_post(self.url(path), data=data, files=files, stream=stream,
                                  headers=self._headers(None if files else content_type))
        if response.status_code >= 400:
            raise upstream_error(response)
        return response

    def _json_body(self, call, **changes):
        """The request bytes: untouched unless a field must change."""
        if call.body.get("model") != self.target.upstream_model:
            changes["model"] = self.target.upstream_model
        if not changes:
            return call.raw_body
        return json.dumps(call.json_with(**changes)).encode()

    def _whole(self, response, read_usage, collect_text=None):
        """A non-stream Reply: the upstream body as is, with usage read from it."""
        body = response.content
        usage = Usage()
        reply = Reply(status=response.status_code,
                      content_type=response.headers.get("Content-Type", "application/json"),
                      body=body, usage=usage)
        try:
            payload = json.loads(body)
        except ValueError:
            raise UpstreamFailure("bad_response", "upstream sent a body that is not JSON") \
                from None
        read_usage(payload.get("usage") if isinstance(payload, dict) else None, usage)
        if collect_text and isinstance(payload, dict):
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
            response = self.post(path, data=self._json_body(call))
            return self._whole(response, read_openai_usage, whole_texts)
        options = dict(call.body.get("stream_options") or {})
        options["include_usage"] = True  # we always meter; hidden again if the client did not ask
        response = self.post(path, data=self._json_body(call, stream_options=options),
                             stream=True)
        reply = Reply(status=200, content_type="text/event-stream", close=response.close)
        reply._chunks = self._relay_chat_stream(response, reply, call.wants_usage, delta_texts)
        return reply

    def _relay_chat_stream(self, response, reply, wants_usage, delta_texts):
        """Forward each SSE event as it arrives; read usage; hide the usage-only chunk."""
        done = False
        try:
            for event in sse_events(response):
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
        except (requests.RequestException, OSError) as err:
            raise broken_stream(err) from None
        if not done:
            raise StreamBroken("upstream closed the stream before it finished")

    def send_responses(self, call):
        if not call.stream:
            response = self.post("responses", data=self._json_body(call))
            return self._whole(response, read_openai_usage, responses_texts)
        response = self.post("responses", data=self._json_body(call), stream=True)
        reply = Reply(status=200, content_type="text/event-stream", close=response.close)
        reply._chunks = self._relay_responses_stream(response, reply)
        return reply

    def _relay_responses_stream(self, response, reply):
        """Responses API events pass through; usage comes in response.completed."""
        finished = False
        try:
            for event in sse_events(response):
                name, data = sse_data(event)
                if data and data != "[DONE]":
                    try:
                        payload = json.loads(data)
                    except ValueError:
                        raise StreamBroken("upstream sent a malformed event") from None
                    kind = name or payload.get("type")
                    if kind == "response.output_text.delta":
                        reply.output_text.append(payload.get("delta") or "")
                    elif kind in ("response.completed", "response.incomplete", "response.failed"):
                        finished = True
                        read_openai_usage((payload.get("response") or {}).get("usage"),
                                          reply.usage)
                    elif kind == "error":
                        raise StreamBroken(payload.get("message") or "upstream stream error")
                yield event + b"\n\n"
        except (requests.RequestException, OSError) as err:
            raise broken_stream(err) from None
        if not finished:
            raise StreamBroken("upstream closed the stream before it finished")

    def send_embeddings(self, call):
        response = self.post("embeddings", data=self._json_body(call))
        return self._whole(response, read_openai_usage)

    def send_images(self, call):
        response = self.post("images/generations", data=self._json_body(call))
        return self._whole(response, read_openai_usage)

    def send_audio_speech(self, call):
        """Binary audio, streamed through as it is synthesised."""
        response = self.post("audio/speech", data=self._json_body(call), stream=True)
        reply = Reply(status=200, content_type=response.headers.get("Content-Type", "audio/mpeg"),
                      close=response.close)

        def audio():
            try:
                yield from response.iter_content(AUDIO_CHUNK)
            except (requests.RequestException, OSError) as err:
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
        files = [(name, (filename, content, ctype)) for name, filename, content, ctype in call.files]
        response = self.post(path, data=fields, files=files)
        ctype = response.headers.get("Content-Type", "application/json")
        reply = Reply(status=response.status_code, content_type=ctype, body=response.content)
        if ctype.startswith("application/json"):
            try:
                payload = json.loads(response.content)
                read_openai_usage(payload.get("usage"), reply.usage)
                reply.output_text.append(payload.get("text") or "")
            except (ValueError, AttributeError):
                raise UpstreamFailure("bad_response", "upstream sent a body that is not JSON") \
                    from None
        else:
            reply.output_text.append(response.text)
        return reply


# -- text extraction, for counting tokens locally when usage is missing ---------------

def chat_texts(payload):
    for choice in payload.get("choices") or []:
        message = choice.get("message") or {}
        yield message.get("content") or ""
        for call in message.get("tool_calls") or []:
            yield (call.get("function") or {}).get("arguments") or ""


def chat_delta_texts(chunk):
    for choice in chunk.get("choices") or []:
        delta = choice.get("delta") or {}
        if delta.get("content"):
            yield delta["content"]
        for call in delta.get("tool_calls") or []:
            arguments = (call.get("function") or {}).get("arguments")
            if arguments:
                yield arguments


def completion_texts(payload):
    for choice in payload.get("choices") or []:
        yield choice.get("text") or ""


def completion_delta_texts(chunk):
    return completion_texts(chunk)


def responses_texts(payload):
    for item in payload.get("output") or []:
        for part in item.get("content") or []:
            if part.get("type") == "output_text":
                yield part.get("text") or ""
