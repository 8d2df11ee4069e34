"""What every fake provider answers alike: the canned answer and the word-count usage."""

ANSWER = "This is a deterministic answer from the fake upstream".split(" ")
TOOL_ARGS = {"location": "Paris"}
TEXT_FIELDS = ("content", "text", "input", "parts", "system")


def count_words(value):
    """Words in the text parts of any request JSON (messages, contents, system...)."""
    if isinstance(value, str):
        return len(value.split())
    if isinstance(value, list):
        return sum(count_words(v) for v in value)
    if isinstance(value, dict):
        return sum(count_words(v) for k, v in value.items() if k in TEXT_FIELDS)
    return 0


def answer_words(cap):
    """The canned answer, cut to `cap` words when a max-tokens cap asks for fewer."""
    return ANSWER[:cap] if isinstance(cap, int) and cap > 0 else ANSWER
