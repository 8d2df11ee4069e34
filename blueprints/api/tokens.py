"""Local token counting (offline BPE tables shipped in the bpe-openai wheel).

Counting must never fail a request and never hold the gevent worker: text is encoded in
slices of a few milliseconds each (yielding to other greenlets between them), text past
EXACT_LIMIT characters is estimated from its UTF-8 size, and any tokenizer error falls
back to that estimate.
"""
import math
from functools import lru_cache

# Per-message framing tokens in OpenAI's chat format (role markers, separators).
TOKENS_PER_MESSAGE = 3
SLICE_CHARS = 10_000  # ~1 ms of encoding; bpe-openai refuses 1M characters in one call
EXACT_LIMIT = 1_000_000  # characters counted exactly; longer text is estimated from bytes
BYTES_PER_TOKEN = 3  # a conservative estimate: English runs ~4, CJK ~3 bytes per token
ESTIMATE_SLICE = 250_000  # characters measured between two yields when estimating


@lru_cache(maxsize=1)
def _encoding():
    import bpe_openai  # imported on first use: loading its tables takes a moment
    return bpe_openai.get_encoding("o200k_base")


def warm():
    """Load the tokenizer tables now (a gunicorn worker calls this before serving)."""
    _encoding().encode("warm up", allowed_special="all")


def _pause():
    """Let other greenlets run between two slices (a no-op outside a gevent worker)."""
    try:
        from gevent import monkey, sleep
    except ImportError:
        return
    if monkey.is_module_patched("socket"):
        sleep(0)


def _slices(text, size):
    """`text` in pieces of at most `size` characters, cut before whitespace where possible
    (BPE words start with their leading space, so such cuts keep the count exact)."""
    start = 0
    while start < len(text):
        end = start + size
        if end < len(text):
            cut = max(text.rfind(" ", start + 1, end), text.rfind("\n", start + 1, end))
            if cut > start:
                end = cut
        yield text[start:end]
        start = end


def estimate_from_bytes(text):
    """ceil(UTF-8 bytes / BYTES_PER_TOKEN), measured slice by slice."""
    size = 0
    for index, piece in enumerate(_slices(text, ESTIMATE_SLICE)):
        if index:
            _pause()
        size += len(piece) if piece.isascii() else len(piece.encode("utf-8", "replace"))
    return math.ceil(size / BYTES_PER_TOKEN)


def count_text(text, exact=True):
    """Tokens in `text` (o200k_base, the GPT-4o family's encoding); never raises.

    Text longer than EXACT_LIMIT characters (or any, with `exact=False`) is estimated."""
    if not text:
        return 0
    if not isinstance(text, str):
        text = str(text)
    if not exact or len(text) > EXACT_LIMIT:
        return estimate_from_bytes(text)
    try:
        encoding = _encoding()
        if len(text) <= SLICE_CHARS:
            return len(encoding.encode(text, allowed_special="all"))
        total = 0
        for index, piece in enumerate(_slices(text, SLICE_CHARS)):
            if index:
                _pause()
            total += len(encoding.encode(piece, allowed_special="all"))
        return total
    except Exception:  # noqa: BLE001 - the tokenizer must never fail a request
        return estimate_from_bytes(text)


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
    texts = []
    messages = body.get("messages")
    if isinstance(messages, list):
        for message in messages:
            total += TOKENS_PER_MESSAGE
            texts.append(" ".join(_texts(message)))
        total += 3
    for field in ("system", "prompt", "input", "instructions", "tools", "functions"):
        if field in body:
            texts.append(" ".join(_texts(body[field])))
    exact = sum(len(text) for text in texts) <= EXACT_LIMIT  # a huge body is estimated whole
    return total + sum(count_text(text, exact) for text in texts)
