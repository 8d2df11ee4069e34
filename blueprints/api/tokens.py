"""Local token counting (offline BPE tables shipped in the bpe-openai wheel).

Counting must never fail a request and never hold the gevent worker: text is encoded in
slices of a few milliseconds each (yielding to other greenlets between them), text past
EXACT_LIMIT characters is estimated from its UTF-8 size, and any tokenizer error falls
back to that estimate.

The tokenizer costs a worker ~70 MB (RSS 76 -> 146 MB here) and 0.05-0.08 s to load, so it is
loaded on first need (a reply without usage, a stream's checkpoint, /v1/messages/count_tokens,
a prompt longer than RESERVE_BOUND_BYTES), not at start: an idle worker stays small, and the
hold and TPM admission of a short prompt need none.
"""
import glob
import importlib.util
import math
import os
import re
import threading

from give_way import in_native_thread

# Per-message framing tokens in OpenAI's chat format (role markers, separators).
TOKENS_PER_MESSAGE = 3
SLICE_CHARS = 10_000  # ~1 ms of encoding; bpe-openai refuses 1M characters in one call
EXACT_LIMIT = 1_000_000  # characters counted exactly; longer text is estimated from bytes
BYTES_PER_TOKEN = 3  # over-counts natural text (3.4-4.4 bytes a token), not random strings
ESTIMATE_SLICE = 250_000  # characters measured between two yields when estimating
# Up to this many UTF-8 bytes of prompt text a hold reserves one token per byte (a bound that
# needs no tokenizer); past it, the exact count. So a hold is never below the exact count and
# at most 2,048 tokens above it (~1,550 for English: 2,048 bytes of it are ~500 tokens).
RESERVE_BOUND_BYTES = 2048

_tokenizer = []
_tokenizer_lock = threading.Lock()

# o200k_base's special tokens (as in bpe_openai.registry): one token each, as tiktoken's
# encode(allowed_special="all") counts them; the Rust tokenizer alone would split them up.
SPECIAL_TOKENS = re.compile(r"(<\|endoftext\|>|<\|endofprompt\|>)")


class O200k:
    """Counts o200k_base tokens (the GPT-4o family's encoding) with bpe-openai's Rust
    tokenizer, exactly as the package's tiktoken-compatible `encode(text,
    allowed_special="all")` would, without building the token list."""

    def __init__(self, rust):
        self._rust = rust

    def count(self, text):
        total = 0
        for index, part in enumerate(SPECIAL_TOKENS.split(text)):
            if index % 2:
                total += 1
            elif part:
                try:
                    total += self._rust.count(part)
                except UnicodeEncodeError:  # lone surrogates: replaced, as the package does
                    total += self._rust.count(
                        part.encode("utf-16", "surrogatepass").decode("utf-16", "replace"))
        return total


def _encoding():
    """o200k_base, loaded on first use."""
    if not _tokenizer:
        with _tokenizer_lock:
            if not _tokenizer:
                _tokenizer.append(in_native_thread(_load_o200k))
    return _tokenizer[0]


def _load_o200k():
    tokenizer = O200k(_rust_bindings().tokenizer_for_encoding("o200k_base"))
    tokenizer.count("warm up")
    return tokenizer


def _rust_bindings():
    """bpe-openai's Rust extension, loaded without its package: the package's import builds
    its model registry by parsing the rank tables of cl100k, o200k and voyage3 into Python
    dicts (0.55 s of CPU here, and ~40 MB it keeps), all for the wrapper's Python side; the
    Rust tokenizer is built from tables compiled into the extension (0.05 s). Falls back to
    the plain import if the wheel's layout ever changes."""
    spec = importlib.util.find_spec("bpe_openai")
    found = glob.glob(os.path.join(os.path.dirname(spec.origin), "_bindings*.so")) \
        if spec is not None and spec.origin else []
    if not found:
        from bpe_openai import _bindings
        return _bindings
    bindings = importlib.util.spec_from_file_location("bpe_openai._bindings", found[0])
    module = importlib.util.module_from_spec(bindings)
    bindings.loader.exec_module(module)
    return module


def warm():
    """Load the tokenizer tables now."""
    _encoding()


_loading = []  # the greenlet loading the tables for ready()

# Natural text is 3.4-4.4 UTF-8 bytes a token: an estimate at 4 errs low for most of it.
CHECKPOINT_BYTES_PER_TOKEN = 4


def ready():
    """True once the tables are in memory. In a gevent worker, before that, starts loading
    them in the background and answers False at once: the hold keeper must not stand still
    for the load (1.5 s on a slow core when the package's own import did it; 0.05-0.1 s since,
    more under load), its checkpoints of every stream waiting, and a worker killed meanwhile
    leaving them all at nothing."""
    if _tokenizer:
        return True
    try:
        from gevent import monkey, spawn
    except ImportError:
        return True
    if not monkey.is_module_patched("socket"):
        return True  # no loop to hold: counting loads the tables in place
    if not _loading:
        _loading.append(spawn(_encoding))
    return False


def checkpoint_estimate(text):
    """Tokens in `text` for a checkpoint taken while the tables load: UTF-8 bytes / 4."""
    return estimate_from_bytes(text, CHECKPOINT_BYTES_PER_TOKEN)


def checkpoint_prompt_estimate(body):
    """estimate_prompt_tokens(body) for a checkpoint taken while the tables load."""
    framing, texts = _prompt_texts(body)
    return framing + sum(checkpoint_estimate(text) for text in texts)


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


def utf8_size(text):
    """UTF-8 bytes of `text` (lone surrogates as 3), measured slice by slice."""
    size = 0
    for index, piece in enumerate(_slices(text, ESTIMATE_SLICE)):
        if index:
            _pause()
        size += len(piece) if piece.isascii() else len(piece.encode("utf-8", "surrogatepass"))
    return size


def estimate_from_bytes(text, bytes_per_token=BYTES_PER_TOKEN):
    """ceil(UTF-8 bytes / bytes_per_token): no tokenizer needed."""
    return math.ceil(utf8_size(text) / bytes_per_token) if text else 0


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
            return encoding.count(text)
        total = 0
        for index, piece in enumerate(_slices(text, SLICE_CHARS)):
            if index:
                _pause()
            total += encoding.count(piece)
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


def _prompt_texts(body):
    """(framing tokens, the prompt's texts) of any JSON request body."""
    if not isinstance(body, dict):
        return 0, []
    framing = 0
    texts = []
    messages = body.get("messages")
    if isinstance(messages, list):
        for message in messages:
            framing += TOKENS_PER_MESSAGE
            texts.append(" ".join(_texts(message)))
        framing += 3
    for field in ("system", "prompt", "input", "instructions", "tools", "functions"):
        if field in body:
            texts.append(" ".join(_texts(body[field])))
    return framing, texts


def estimate_prompt_tokens(body):
    """The prompt's tokens for any JSON request body (chat, messages, embeddings...):
    o200k exactly, or estimated from bytes when huge. Loads the tokenizer."""
    framing, texts = _prompt_texts(body)
    return framing + _count_texts(texts)


def _count_texts(texts):
    exact = sum(len(text) for text in texts) <= EXACT_LIMIT  # a huge body is estimated whole
    return sum(count_text(text, exact) for text in texts)


def reserve_prompt_tokens(body):
    """The prompt tokens a hold reserves: never fewer than estimate_prompt_tokens(body), so
    no prompt is under-reserved.

    A short prompt reserves one token per UTF-8 byte, an upper bound without the tokenizer
    (every o200k token is at least one byte), at most RESERVE_BOUND_BYTES tokens; a longer
    one (where that bound would reserve 3-4x too much) is counted exactly."""
    framing, texts, size = _measure(body)
    return framing + (size if size <= RESERVE_BOUND_BYTES else _exact(body, texts))


def admit_prompt_tokens(body):
    """The prompt tokens TPM admission counts before the request runs (corrected to the real
    usage when it ends): a short prompt's bytes / 3 (no tokenizer; within ~1,000 tokens of the
    count, above it for natural text), a longer prompt's exact count."""
    framing, texts, size = _measure(body)
    if size <= RESERVE_BOUND_BYTES:
        return framing + math.ceil(size / BYTES_PER_TOKEN)
    return framing + _exact(body, texts)


def _measure(body):
    framing, texts = _prompt_texts(body)
    return framing, texts, sum(utf8_size(text) for text in texts)


_last_exact = [(None, 0)]  # [(body, count)]: admission and the hold count a long prompt once


def _exact(body, texts):
    counted, count = _last_exact[0]
    if counted is not body:
        count = _count_texts(texts)
        _last_exact[0] = (body, count)
    return count
