"""What a /v1 request body must be before the relay touches it: 400, never a 500 later.

Checked here: nesting depth, the model name, `stream` (a boolean), and the shapes of the chat and Messages fields
the converters walk. (The integers that size a hold, `max_tokens` and friends and `n`, are
bounded where the relay reads them: relay.output_cap_of and relay.measure.) Everything else
passes through for the upstream to judge.
"""
import unicodedata

from blueprints.api.errors import ApiError

MAX_DEPTH = 64  # JSON nesting; real requests (tool schemas included) stay far below
MAX_MODEL_CHARS = 200
ANTHROPIC_ROLES = ("user", "assistant")


def bad_request(message, param=None):
    """A 400 `invalid_request_error` in the route's shape."""
    return ApiError(400, "invalid_request_error", message, param=param)


def check_depth(value, limit=MAX_DEPTH):
    """400 when JSON nests deeper than `limit` (walked without recursion)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            raise bad_request(f"The request nests JSON deeper than {limit} levels.")
        if isinstance(item, dict):
            stack.extend((child, depth + 1) for child in item.values()
                         if isinstance(child, (dict, list)))
        elif isinstance(item, list):
            stack.extend((child, depth + 1) for child in item if isinstance(child, (dict, list)))


def check_model_name(model):
    """400 unless `model` is non-empty printable text of at most 200 characters."""
    if not isinstance(model, str) or not model:
        raise bad_request("you must provide a model parameter", "model")
    if len(model) > MAX_MODEL_CHARS:
        raise bad_request(f"The model name is longer than {MAX_MODEL_CHARS} characters.",
                          "model")
    # Cc control, Cf invisible format (bidi overrides spoof the console), Cs lone surrogate
    # (not even storable in the log row)
    if any(unicodedata.category(ch) in ("Cc", "Cf", "Cs") for ch in model):
        raise bad_request("The model name contains characters that are not valid text.",
                          "model")


def _objects(value, param, what):
    if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
        raise bad_request(f"'{param}' must be an array of {what} objects.", param)
    return value


def _check_blocks(content, param):
    """Anthropic content: a string or an array of blocks, each an object with a string type."""
    if isinstance(content, str):
        return
    for block in _objects(content, param, "content block"):
        if not isinstance(block.get("type"), str):
            raise bad_request(f"Each block in '{param}' needs a string 'type'.", param)
        if block.get("type") == "tool_result" and block.get("content") is not None:
            _check_blocks(block["content"], param)


def _check_parts(content):
    """OpenAI message content: null, a string, or an array of parts (objects with a type)."""
    if content is None or isinstance(content, str):
        return
    for part in _objects(content, "messages", "content part"):
        if not isinstance(part.get("type"), str):
            raise bad_request("Each content part needs a string 'type'.", "messages")
        if part["type"] in ("text", "input_text") and not isinstance(part.get("text", ""), str):
            raise bad_request("A text part's 'text' must be a string.", "messages")


def _is_function_ref(value):
    return isinstance(value, dict) and isinstance(value.get("function"), dict) \
        and isinstance(value["function"].get("name"), str)


def check_chat(body):
    """OpenAI chat, as its API reference types the fields every converter walks: messages
    (objects with a string role; content null, a string or parts; tool_calls objects with a
    function), tools, tool_choice, stop and response_format."""
    for message in _objects(body["messages"], "messages", "message"):
        if not isinstance(message.get("role"), str):
            raise bad_request("Each message needs a string 'role'.", "messages")
        _check_parts(message.get("content"))
        calls = message.get("tool_calls")
        if calls is not None and not all(isinstance(c, dict) and
                                         isinstance(c.get("function", {}), dict)
                                         for c in _objects(calls, "messages", "tool call")):
            raise bad_request("Each tool call's 'function' must be an object.", "messages")
    tools = body.get("tools")
    if tools is not None:
        for tool in _objects(tools, "tools", "tool"):
            if tool.get("type", "function") == "function" and not _is_function_ref(tool):
                raise bad_request("Each function tool needs a 'function' object with a string "
                                  "'name'.", "tools")
    choice = body.get("tool_choice")
    if choice is not None and not isinstance(choice, str):
        if not isinstance(choice, dict) or (choice.get("type") == "function"
                                            and not _is_function_ref(choice)):
            raise bad_request("'tool_choice' must be a string or a tool object.", "tool_choice")
    stop = body.get("stop")
    if stop is not None and not isinstance(stop, str) and (
            not isinstance(stop, list) or not all(isinstance(s, str) for s in stop)):
        raise bad_request("'stop' must be a string or an array of strings.", "stop")
    if body.get("response_format") is not None and not isinstance(body["response_format"], dict):
        raise bad_request("'response_format' must be an object.", "response_format")


def check_anthropic_messages(body):
    """Anthropic Messages: the shapes its API reference gives for the fields we convert."""
    for message in _objects(body["messages"], "messages", "message"):
        if message.get("role") not in ANTHROPIC_ROLES:
            raise bad_request("Each message's 'role' must be 'user' or 'assistant'.",
                              "messages")
        if message.get("content") is None:
            raise bad_request("Each message needs 'content' (a string or an array of blocks).",
                              "messages")
        _check_blocks(message["content"], "messages")
    if body.get("system") is not None:
        _check_blocks(body["system"], "system")
    if body.get("tools") is not None:
        _objects(body["tools"], "tools", "tool")
    if body.get("tool_choice") is not None:
        if not isinstance(body["tool_choice"], dict):
            raise bad_request("'tool_choice' must be an object.", "tool_choice")
    if body.get("metadata") is not None and not isinstance(body["metadata"], dict):
        raise bad_request("'metadata' must be an object.", "metadata")
    stops = body.get("stop_sequences")
    if stops is not None and (not isinstance(stops, list)
                              or not all(isinstance(s, str) for s in stops)):
        raise bad_request("'stop_sequences' must be an array of strings.", "stop_sequences")


SHAPE_CHECKS = {"chat": check_chat, "messages": check_anthropic_messages,
                "messages_count_tokens": check_anthropic_messages}


def check_stream_flags(body):
    """`stream` is true, false or absent: a truthy non-boolean ("yes", [1]) would have the
    upstream stream an answer the relay expects whole (found by the fuzz: a 502)."""
    if body.get("stream") is not None and not isinstance(body["stream"], bool):
        raise bad_request("'stream' must be a boolean.", "stream")
    if body.get("stream_options") is not None and not isinstance(body["stream_options"], dict):
        raise bad_request("'stream_options' must be an object.", "stream_options")


def validate_body(endpoint, body):
    """Every check above that applies to `endpoint`; raises a 400 ApiError on the first miss."""
    check_depth(body)
    check_model_name(body.get("model"))
    check_stream_flags(body)
    shape = SHAPE_CHECKS.get(endpoint)
    if shape is not None:
        shape(body)
