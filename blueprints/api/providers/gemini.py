"""Gemini upstreams: {base}/v1beta/models/{model}:generateContent (and friends), x-goog-api-key.

OpenAI chat and embeddings calls are converted both ways (gemini_convert); Anthropic
Messages calls reach Gemini through chat (the relay converts them: relay.send_call).
"""
import json

from blueprints.api.providers.anthropic import first_then_rest, parse_event, post_json, read_json
from blueprints.api.providers.base import Adaptor, Reply, UpstreamFailure, sse_data
from blueprints.api.providers.gemini_convert import (
    PromptBlocked, embedding_inputs, gemini_stream_to_openai, gemini_to_openai_embeddings,
    gemini_to_openai_response, openai_to_gemini_embeddings, openai_to_gemini_request,
    record_gemini_usage, response_texts,
)
from blueprints.api.tokens import count_text

API_VERSION = "v1beta"
# Gemini's error `status` names, as the error types our routes already speak.
ERROR_TYPES = {
    "INVALID_ARGUMENT": "invalid_request_error", "FAILED_PRECONDITION": "invalid_request_error",
    "UNAUTHENTICATED": "authentication_error", "PERMISSION_DENIED": "permission_error",
    "NOT_FOUND": "not_found_error", "RESOURCE_EXHAUSTED": "rate_limit_error",
}


def gemini_error(response):
    """UpstreamFailure for a non-2xx Gemini answer: {"error": {"code", "message", "status"}}."""
    message, status_name = f"upstream answered HTTP {response.status_code}", None
    try:
        error = response.json().get("error") or {}
        message = error.get("message") or message
        status_name = error.get("status")
    except (ValueError, AttributeError):
        text = response.text[:300].strip()
        if text:
            message = f"{message}: {text}"
    finally:
        response.close()
    return UpstreamFailure("status", message, status=response.status_code,
                           retry_after=response.header("Retry-After"),
                           error_type=ERROR_TYPES.get(status_name), error_code=status_name)


class GeminiAdaptor(Adaptor):
    type = "gemini"

    def _post(self, method, body, stream=False):
        """POST to models/{upstream model}:{method}."""
        path = f"models/{self.target.upstream_model}:{method}"
        if stream:
            path += "?alt=sse"
        response = post_json(self, self.url(path, API_VERSION), body,
                             {"x-goog-api-key": self.target.api_key}, stream)
        if response.status_code >= 400:
            raise gemini_error(response)
        return response

    def send_chat(self, call):
        """OpenAI chat completion via generateContent / streamGenerateContent."""
        body = openai_to_gemini_request(call.body, call.output_cap)
        if not call.stream:
            payload = read_json(self._post("generateContent", body))
            completion = gemini_to_openai_response(payload, call.model)
            reply = Reply(body=json.dumps(completion).encode())
            record_gemini_usage(reply.usage, payload.get("usageMetadata"))
            reply.output_text.extend(response_texts(payload))
            return reply
        response = self._post("streamGenerateContent", body, stream=True)
        first, events = first_then_rest(self.sse_events(response))
        try:
            _check_first_event(first)
        except UpstreamFailure:
            response.close()
            raise
        reply = Reply(content_type="text/event-stream", close=response.close)
        reply._chunks = gemini_stream_to_openai((parse_event(e)[1] for e in events), call.model,
                                                call.wants_usage, reply.usage, reply.output_text)
        return reply

    def send_embeddings(self, call):
        """OpenAI embeddings via embedContent (one input) or batchEmbedContents."""
        method, body = openai_to_gemini_embeddings(call.body, self.target.upstream_model)
        payload = read_json(self._post(method, body))
        # Gemini does not report embedding usage: count locally, leave usage.reported False
        # so the relay marks the log row estimated.
        estimate = sum(count_text(text) for text in embedding_inputs(call.body))
        result = gemini_to_openai_embeddings(payload, call.model,
                                             call.body.get("encoding_format"), estimate)
        reply = Reply(body=json.dumps(result).encode())
        record_gemini_usage(reply.usage, payload.get("usageMetadata"))
        return reply


def _check_first_event(first):
    """A blocked prompt or an error in the first event fails before any byte is sent."""
    if first is None:
        raise UpstreamFailure("bad_response", "upstream sent an empty stream")
    _, text = sse_data(first)
    try:
        data = json.loads(text)
    except ValueError:
        raise UpstreamFailure("bad_response", "upstream sent a malformed event") from None
    if not isinstance(data, dict):
        raise UpstreamFailure("bad_response", "upstream sent a malformed event")
    reason = (data.get("promptFeedback") or {}).get("blockReason")
    if reason and not data.get("candidates"):
        raise PromptBlocked(reason)
    if data.get("error"):
        error = data["error"]
        raise UpstreamFailure("status", error.get("message") or "Gemini stream error",
                              status=error.get("code") if isinstance(error.get("code"), int)
                              else 500, error_code=error.get("status"))
