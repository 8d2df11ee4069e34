"""Local token counting: exact in short slices, estimated past a size, never raising."""
import subprocess
import sys

import pytest

from blueprints.api import tokens


def test_short_and_mid_text_is_counted_exactly():
    text = "hello world lorem ipsum " * 10_000  # 240k characters: 12 slices
    whole = len(tokens._encoding().encode(text[:150_000], allowed_special="all"))
    assert tokens.count_text(text[:150_000]) == whole
    assert tokens.count_text("") == 0 and tokens.count_text("hi") == 1


def test_long_text_is_encoded_in_short_slices_with_pauses(monkeypatch):
    sizes, pauses = [], []
    real = tokens._encoding()

    class Recorder:
        def encode(self, text, allowed_special):
            sizes.append(len(text))
            return real.encode(text, allowed_special=allowed_special)
    monkeypatch.setattr(tokens, "_encoding", lambda: Recorder())
    monkeypatch.setattr(tokens, "_pause", lambda: pauses.append(1))
    text = ("word " * 150_000) + ("x" * 90_000)  # 840k characters, one run without spaces
    count = tokens.count_text(text)
    assert max(sizes) <= tokens.SLICE_CHARS and sum(sizes) == len(text)
    assert len(pauses) == len(sizes) - 1  # other greenlets run between every two slices
    # cuts fall before spaces (exact); only the hard cuts inside the long run may differ
    assert abs(count - len(real.encode(text, allowed_special="all"))) <= 5


@pytest.mark.parametrize("text", ["a" * 2_000_000, "日本語" * 500_000,
                                  "word " * 7_000_000])
def test_past_the_limit_the_count_is_a_byte_estimate(text):
    assert tokens.count_text(text) == -(-len(text.encode()) // tokens.BYTES_PER_TOKEN)


def test_a_tokenizer_error_falls_back_to_the_estimate(monkeypatch):
    class Broken:
        def encode(self, text, allowed_special):
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


def test_the_tokenizer_loads_lazily():
    code = ("import sys; from blueprints.api import tokens; "
            "assert 'bpe_openai' not in sys.modules; tokens.warm(); "
            "assert 'bpe_openai' in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tokens.__file__.rsplit(
        "/blueprints/", 1)[0])
