"""The built-in mock provider: no network, canned answers with honest usage.

It lets a new team try the gateway before adding an upstream key, and gives
`make run` a model that answers out of the box.
"""
import json
import time
import uuid

from blueprints.api.providers.base import Adaptor, Reply, Usage, sse_encode
from blueprints.api.tokens import count_text, estimate_prompt_tokens

ANSWER = ("Hello! This answer comes from TokenOpen's built-in mock provider. "
          "Add a real channel in the admin console to reach an actual model.")
EMBEDDING_SIZE = 16


class MockAdaptor(Adaptor):
    type = "mock"

    def _usage(self, call, completion_text):
        usage = Usage()
        usage.add_reported(prompt=estimate_prompt_tokens(call.body),
                           completion=count_text(completion_text), cached=0)
        return usage

    def _answer(self, call):
        """The canned answer's words, cut to the output cap (the reserved one when set)."""
        cap = call.output_cap
        if cap is None:
            cap = call.body.get("max_completion_tokens") or call.body.get("max_tokens")
        words = ANSWER.split(" ")
        if isinstance(cap, int) and cap > 0:
            words = words[:cap]
        return words

    def send_chat(self, call):
        words = self._answer(call)
        text = " ".join(words)
        created = int(time.time())
        completion_id = "chatcmpl-mock-" + uuid.uuid4().hex[:12]
        usage = self._usage(call, text)
        usage_json = {"prompt_tokens": usage.prompt_tokens,
                      "completion_tokens": usage.completion_tokens,
                      "total_tokens": usage.prompt_tokens + usage.completion_tokens}
        if not call.stream:
            body = {"id": completion_id, "object": "chat.completion", "created": created,
                    "model": call.model,
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": text}}],
                    "usage": usage_json}
            reply = Reply(body=json.dumps(body).encode(), usage=usage)
            reply.output_text.append(text)
            return reply

        def chunk(delta, finish=None):
            return {"id": completion_id, "object": "chat.completion.chunk", "created": created,
                    "model": call.model,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

        def events():
            yield sse_encode(chunk({"role": "assistant", "content": ""}))
            for index, word in enumerate(words):
                piece = word if index == 0 else " " + word
                reply.output_text.append(piece)
                yield sse_encode(chunk({"content": piece}))
            yield sse_encode(chunk({}, "stop"))
            if call.wants_usage:
                final = chunk({})
                final["choices"], final["usage"] = [], usage_json
                yield sse_encode(final)
            yield b"data: [DONE]\n\n"

        reply = Reply(content_type="text/event-stream", usage=usage)
        reply._chunks = events()
        return reply

    def send_embeddings(self, call):
        inputs = call.body.get("input")
        inputs = inputs if isinstance(inputs, list) else [inputs]
        data = []
        for index, text in enumerate(inputs):
            seed = sum(str(text).encode()) or 1
            vector = [((seed * (i + 7)) % 1000) / 1000.0 for i in range(EMBEDDING_SIZE)]
            data.append({"object": "embedding", "index": index, "embedding": vector})
        usage = Usage()
        usage.add_reported(prompt=estimate_prompt_tokens(call.body), completion=0)
        body = {"object": "list", "data": data, "model": call.model,
                "usage": {"prompt_tokens": usage.prompt_tokens,
                          "total_tokens": usage.prompt_tokens}}
        return Reply(body=json.dumps(body).encode(), usage=usage)
