"""Local token counting: exact in short slices, estimated past a size, never raising."""
import json
import subprocess
import sys

import pytest

from blueprints.api import tokens


def _reference_count(text):
    """The count of bpe-openai's own tiktoken-compatible wrapper (what we count without it)."""
    import bpe_openai
    return len(bpe_openai.get_encoding("o200k_base").encode(text, allowed_special="all"))


def test_short_and_mid_text_is_counted_exactly():
    text = "hello world lorem ipsum " * 10_000  # 240k characters: 12 slices
    assert tokens.count_text(text[:150_000]) == _reference_count(text[:150_000])
    assert tokens.count_text("") == 0 and tokens.count_text("hi") == 1


@pytest.mark.parametrize("text", [
    "<|endoftext|>", "a<|endoftext|>b<|endofprompt|><|endoftext|>", "<|endoftext", "<|fim_prefix|>",
    "ok \ud800 \udfff <|endoftext|> end", "\udc00", "héllo wörld 中文 😀 \u0301 ﬁ İ",
    "  \n\n\t  x ", "it's we'll THEY'RE 12345678"])
def test_special_tokens_and_odd_text_count_as_the_package_counts_them(text):
    assert tokens.count_text(text) == _reference_count(text)


def test_long_text_is_encoded_in_short_slices_with_pauses(monkeypatch):
    sizes, pauses = [], []
    real = tokens._encoding()

    class Recorder:
        def count(self, text):
            sizes.append(len(text))
            return real.count(text)
    monkeypatch.setattr(tokens, "_encoding", lambda: Recorder())
    monkeypatch.setattr(tokens, "_pause", lambda: pauses.append(1))
    text = ("word " * 150_000) + ("x" * 90_000)  # 840k characters, one run without spaces
    count = tokens.count_text(text)
    assert max(sizes) <= tokens.SLICE_CHARS and sum(sizes) == len(text)
    assert len(pauses) == len(sizes) - 1  # other greenlets run between every two slices
    # cuts fall before spaces (exact); only the hard cuts inside the long run may differ
    assert abs(count - _reference_count(text)) <= 5


@pytest.mark.parametrize("text", ["a" * 2_000_000, "日本語" * 500_000,
                                  "word " * 7_000_000])
def test_past_the_limit_the_count_is_a_byte_estimate(text):
    assert tokens.count_text(text) == -(-len(text.encode()) // tokens.BYTES_PER_TOKEN)


def test_a_tokenizer_error_falls_back_to_the_estimate(monkeypatch):
    class Broken:
        def count(self, text):
            raise ValueError("Input too long to encode safely")
    monkeypatch.setattr(tokens, "_encoding", lambda: Broken())
    assert tokens.count_text("abcdef" * 10) == 20
    body = {"messages": [{"role": "user", "content": "abc"}]}
    assert tokens.estimate_prompt_tokens(body) == 9  # "user abc": 3 + 3 + 3


def test_a_huge_body_is_estimated_whole():
    body = {"messages": [{"role": "user", "content": "word " * 100_000} for _ in range(5)]}
    # five 500k messages: 2.5M characters in all, so none of them is tokenised exactly
    per_message = -(-len("user " + "word " * 100_000) // 3)
    assert tokens.estimate_prompt_tokens(body) == 5 * (3 + per_message) + 3


def _in_a_fresh_process(code):
    """Run `code` in a new interpreter at the project root (nothing imported or loaded yet)."""
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tokens.__file__.rsplit(
        "/blueprints/", 1)[0])


def test_the_tokenizer_loads_lazily():
    code = ("from blueprints.api import tokens; "
            "assert not tokens._tokenizer; tokens.warm(); assert tokens._tokenizer")
    _in_a_fresh_process(code)


def test_the_tokenizer_loads_without_the_packages_python_tables():
    """bpe_openai's import parses three encodings' rank tables into Python dicts (0.55 s, and
    it keeps them); the Rust tokenizer we count with needs none of them."""
    code = ("import os, sys; from blueprints.api import tokens; "
            "rss = lambda: int(next(l for l in open(f'/proc/{os.getpid()}/status') "
            "if l.startswith('VmRSS')).split()[1]) // 1024; "
            "before = rss(); tokens.warm(); "
            "assert 'bpe_openai' not in sys.modules and 'bpe_openai.registry' not in sys.modules; "
            "assert tokens.count_text('hello world') == 2; "
            "assert rss() < before + 90, (before, rss())")  # +70 MB here, +109 by the package
    _in_a_fresh_process(code)


def test_a_gevent_worker_is_not_kept_waiting_for_the_tables():
    """tokens.ready() in a gevent worker answers False at once while the tables load in the
    background (the hold keeper checkpoints with a byte estimate meanwhile), True after."""
    code = ("from gevent import monkey; monkey.patch_all(); "
            "from blueprints.api import tokens; "
            "assert tokens.ready() is False and not tokens._tokenizer; "
            "assert tokens.ready() is False and len(tokens._loading) == 1; "
            "tokens._loading[0].join(60); assert tokens.ready() is True; "
            "assert tokens.checkpoint_estimate('hello world') == 3; "  # 11 bytes / 4
            "body = {'messages': [{'role': 'user', 'content': 'hello world'}]}; "
            "framing, texts = tokens._prompt_texts(body); "
            "assert tokens.checkpoint_prompt_estimate(body) == "
            "framing + sum(-(-len(t.encode()) // 4) for t in texts)")
    _in_a_fresh_process(code)


# --- the prompt a hold reserves: a byte bound for short prompts, no tokenizer ------------------
# o200k on these samples (UTF-8 bytes per token, measured 2026-11-30): English prose 4.0, Python
# 4.4, JSON tool schemas 3.6, Chinese 4.3, Japanese 3.4, Korean 4.0, digits 3.0; random ASCII
# 1.33, base64 1.47, hex 1.77, random CJK 1.56, random BMP 1.31, emoji 1.57; whitespace runs
# 35, special tokens 13. No bytes-per-token ratio but 1 is safe for all of them: a ratio of 3
# (the estimate past EXACT_LIMIT) under-reserves random text up to 2.3x, one of 4 up to 3x.
# One token per byte is a bound by construction (every o200k token is one byte or more); it
# reserves 3-4.4x the prompt of natural text, so only short prompts use it.

def _samples():
    import base64
    import random
    rng = random.Random(7)
    tools = [{"type": "function", "function": {
        "name": f"get_{n}", "description": f"Get the {n} for a location",
        "parameters": {"type": "object", "properties": {
            "location": {"type": "string", "description": "City and country, e.g. Paris"},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
            "required": ["location"]}}} for n in ("weather", "time", "news", "traffic")]
    return {
        "english": "The quick brown fox jumps over the lazy dog. Tokens are counted locally "
                   "only when an upstream does not report them, or for a long prompt. " * 30,
        "code": open(tokens.__file__, encoding="utf-8").read(),
        "chinese": "人工智能是计算机科学的一个分支，它企图了解智能的实质。" * 40,
        "japanese": "吾輩は猫である。名前はまだ無い。どこで生れたかとんと見当がつかぬ。" * 40,
        "korean": "대한민국은 동아시아의 한반도 남부에 위치한 민주공화국이다." * 40,
        "json_tools": json.dumps(tools),
        "base64": base64.b64encode(rng.randbytes(4000)).decode(),
        "hex": rng.randbytes(3000).hex(),
        "digits": "".join(rng.choice("0123456789") for _ in range(5000)),
        "random_ascii": "".join(chr(rng.randint(33, 126)) for _ in range(5000)),
        "random_cjk": "".join(chr(rng.randint(0x4E00, 0x9FFF)) for _ in range(2000)),
        "random_bmp": "".join(chr(rng.randint(0x00A0, 0xD7FF)) for _ in range(2000)),
        "emoji": "".join(chr(rng.randint(0x1F300, 0x1FAFF)) for _ in range(1500)),
        "whitespace": " " * 3000 + "\n" * 2000,
        "special_tokens": "<|endoftext|>" * 300,
        "lone_surrogates": "ok \ud800 \udfff " * 200,
    }


@pytest.mark.parametrize("name", sorted(_samples()))
def test_the_reserved_prompt_is_never_below_the_exact_count(name):
    text = _samples()[name]
    for size in (40, 700, tokens.RESERVE_BOUND_BYTES // 3, len(text)):
        body = {"messages": [{"role": "system", "content": "Be brief."},
                             {"role": "user", "content": text[:size]}],
                "tools": [{"type": "function", "function": {"name": "f"}}]}
        exact = tokens.estimate_prompt_tokens(body)
        reserved = tokens.reserve_prompt_tokens(body)
        framing, texts = tokens._prompt_texts(body)
        nbytes = sum(len(t.encode("utf-8", "surrogatepass")) for t in texts)
        admitted = tokens.admit_prompt_tokens(body)
        assert reserved >= exact, (name, size)
        if nbytes <= tokens.RESERVE_BOUND_BYTES:
            assert reserved == framing + nbytes  # the byte bound, no tokenizer
            assert reserved - exact <= tokens.RESERVE_BOUND_BYTES
            # TPM admission: bytes / 3, corrected to the real usage at the end
            assert admitted == framing + -(-nbytes // tokens.BYTES_PER_TOKEN)
            assert abs(admitted - exact) <= tokens.RESERVE_BOUND_BYTES // 2, (name, size)
        else:
            assert reserved == admitted == exact  # long prompts: counted, not over-reserved


def test_a_short_prompt_is_reserved_without_loading_the_tokenizer():
    code = ("import sys; from blueprints.api import tokens; "
            "body = {'messages': [{'role': 'user', 'content': 'hello ' * 300}]}; "
            "assert tokens.reserve_prompt_tokens(body) == 3 + 3 + len('user ' + 'hello ' * 300); "
            "assert not tokens._tokenizer; "
            "body['messages'][0]['content'] = 'hello ' * 400; "
            "assert tokens.reserve_prompt_tokens(body) == tokens.estimate_prompt_tokens(body); "
            "assert tokens._tokenizer")
    _in_a_fresh_process(code)


def test_the_tokenizer_loads_in_a_native_thread_inside_a_gevent_worker():
    """Other greenlets keep running while the tables load (it used to stall the worker)."""
    code = """
from gevent import monkey; monkey.patch_all()
import sys, threading, gevent
from blueprints.api import tokens
main = threading.get_ident()
seen = []
real = tokens._load_o200k
def load():
    seen.append(threading.get_ident())
    return real()
tokens._load_o200k = load
ticks = []
ticker = gevent.spawn(lambda: [ticks.append(gevent.sleep(0.005)) for _ in range(1000)])
gevent.sleep(0)
assert tokens.count_text("hello world") == 2
assert seen and seen[0] != main, seen
assert ticks, "no greenlet ran while the tokenizer loaded"
ticker.kill()
"""
    _in_a_fresh_process(code)
