"""Local token counting (offline BPE tables shipped in the bpe-openai wheel)."""
from functools import lru_cache

import bpe_openai

# Per-message framing tokens in OpenAI's chat format (role markers, separators).
TOKENS_PER_MESSAGE = 3


@lru_cache(maxsize=1)
def _encoding():
    return bpe_openai.get_encoding("o200k_base")


def count_text(text):
    """Tokens in `text` (o200k_base, the GPT-4o family's encoding)."""
    if not text:
        return 0
    return len(_encoding().encode(text, allowed_special="all"))


def _texts(value):
    """Every string inside a JSON value (message content parts, tool arguments...)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            if key in ("image_url", "source", "inline_data", "data"):  # images: not text
                continue
            yield from _texts(item)
    elif isinstance(value, list):
        for item in value:
            yield from _texts(item)


def estimate_prompt_tokens(body):
    """A prompt-token estimate for any JSON request body (chat, messages, embeddings...)."""
    if not isinstance(body, dict):
        return 0
    total = 0
    messages = body.get("messages")
    if isinstance(messages, list):
        for message in messages:
            total += TOKENS_PER_MESSAGE + count_text(" ".join(_texts(message)))
        total += 3
    for field in ("system", "prompt", "input", "instructions", "tools", "functions"):
        if field in body:
            total += count_text(" ".join(_texts(body[field])))
    return total


def requested_output_cap(body, default_cap):
    """The most output tokens the request can produce, for the credit reservation."""
    if isinstance(body, dict):
        for field in ("max_completion_tokens", "max_tokens", "max_output_tokens"):
            value = body.get(field)
            if isinstance(value, int) and value > 0:
                return value
    return default_cap
