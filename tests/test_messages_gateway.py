"""Claude, Gemini and GPT models on their native channel types, through the official SDKs.

Every inbound format (OpenAI chat via the openai SDK, Anthropic Messages via the anthropic
SDK) against every upstream type (openai, anthropic, gemini on the fake upstream), stream and
non-stream, with tools; usage and credits on the log row; errors in the route's shape.
"""
import anthropic
import openai
import pytest

MODELS = {  # public name -> (channel type, upstream name on the fake)
    "gpt-4o-mini": ("openai", "gpt-up"),
    "claude-sonnet-4-6": ("anthropic", "claude-up"),
    "gemini-3.5-flash": ("gemini", "gemini-up"),
}
ANSWER = "This is a deterministic answer from the fake upstream"
TOOLS_OPENAI = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"location": {"type": "string"}},
                   "required": ["location"]}}}]
TOOLS_ANTHROPIC = [{"name": "get_weather", "description": "Weather in a city",
                    "input_schema": TOOLS_OPENAI[0]["function"]["parameters"]}]


def setup_member(gw, credits=10):
    """A member with a key, one channel per provider type on the fake upstream, and prices."""
    gw.user("member@example.com", credits=credits)
    for public, (kind, upstream) in MODELS.items():
        gw.channel(name=f"{kind}-channel", models=f"{public}={upstream}", type=kind)
        gw.price(public, input=1, output=2)
    return gw.key("member@example.com")


def openai_client(gw, key):
    return openai.OpenAI(base_url=gw.base_url, api_key=key, max_retries=0, timeout=20)


def anthropic_client(gw, key):
    return anthropic.Anthropic(base_url=gw.url, api_key=key, max_retries=0, timeout=20)


def assert_billed(gw, model, prompt, completion, stream, endpoint):
    """One Success row with the usage the client saw, charged 1/M in and 2/M out."""
    [row] = gw.wait_logs(1)
    assert (row["model"], row["endpoint"], row["is_stream"], row["status"]) == \
        (model, endpoint, stream, "Success")
    assert row["channel_name"] == MODELS[model][0] + "-channel"
    assert (row["prompt_tokens"], row["completion_tokens"], row["estimated"]) == \
        (prompt, completion, False)
    assert row["credits_micro"] == prompt * 1 + completion * 2
    return row


# --- OpenAI chat in ---------------------------------------------------------------------------

@pytest.mark.parametrize("model", list(MODELS))
def test_openai_sdk_on_every_channel_type(gateway, model):
    key = setup_member(gateway)
    client = openai_client(gateway, key)
    completion = client.chat.completions.create(
        model=model, messages=[{"role": "system", "content": "Be brief."},
                               {"role": "user", "content": "hello there friend"}])
    assert completion.choices[0].message.content == ANSWER
    assert completion.choices[0].finish_reason == "stop"
    assert completion.model in (model, MODELS[model][1])
    usage = completion.usage
    assert_billed(gateway, model, usage.prompt_tokens, usage.completion_tokens, False, "chat")
    assert usage.completion_tokens == 9


@pytest.mark.parametrize("model", list(MODELS))
def test_openai_sdk_streams_tools_from_every_channel_type(live, model):
    key = setup_member(live)
    chunks = list(openai_client(live, key).chat.completions.create(
        model=model, messages=[{"role": "user", "content": "weather in Paris?"}],
        tools=TOOLS_OPENAI, stream=True, stream_options={"include_usage": True}))
    calls = [call for c in chunks if c.choices for call in c.choices[0].delta.tool_calls or []]
    assert calls[0].id and calls[0].function.name == "get_weather"
    assert "".join(c.function.arguments or "" for c in calls) == '{"location": "Paris"}'
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage.completion_tokens == 5
    assert_billed(live, model, usage.prompt_tokens, usage.completion_tokens, True, "chat")


@pytest.mark.parametrize("model", ["claude-sonnet-4-6", "gemini-3.5-flash"])
def test_openai_sdk_tool_round_trip_and_text_stream(live, model):
    key = setup_member(live)
    client = openai_client(live, key)
    first = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "weather in Paris?"}], tools=TOOLS_OPENAI)
    call = first.choices[0].message.tool_calls[0]
    assert first.choices[0].finish_reason == "tool_calls"
    assert call.function.arguments.replace(" ", "") == '{"location":"Paris"}'
    messages = [{"role": "user", "content": "weather in Paris?"},
                first.choices[0].message.model_dump(exclude_none=True),
                {"role": "tool", "tool_call_id": call.id, "content": '{"celsius": 21}'}]
    chunks = list(client.chat.completions.create(model=model, messages=messages,
                                                 tools=TOOLS_OPENAI, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ANSWER
    assert all(c.usage is None for c in chunks)  # the client did not ask for usage
    rows = live.wait_logs(2)
    assert [r["status"] for r in rows] == ["Success", "Success"]
    assert rows[1]["completion_tokens"] == 9 and rows[1]["is_stream"] is True
    sent = [e for e in live.upstream.events() if e["type"] == "request"][-1]["body"]
    if model.startswith("claude"):
        assert sent["messages"][-1]["content"][0]["type"] == "tool_result"
    else:
        assert sent["contents"][-1]["parts"][0]["functionResponse"] == {
            "name": "get_weather", "response": {"celsius": 21}}


def test_gemini_embeddings_through_the_openai_sdk(live):
    live.user("member@example.com", credits=10)
    live.channel(name="gemini-channel", models="text-embedding-004", type="gemini")
    live.price("text-embedding-004", input=1, output=2)
    key = live.key("member@example.com")
    result = openai_client(live, key).embeddings.create(model="text-embedding-004",
                                                        input=["one two", "three"])
    assert [round(d.embedding[0], 4) for d in result.data] == [0.1, 0.2]  # base64 decoded by the SDK
    [row] = live.wait_logs(1)
    assert row["status"] == "Success" and row["estimated"] is True and row["prompt_tokens"] > 0


# --- Anthropic Messages in --------------------------------------------------------------------

@pytest.mark.parametrize("model", list(MODELS))
def test_anthropic_sdk_create_on_every_channel_type(gateway, model):
    key = setup_member(gateway)
    message = anthropic_client(gateway, key).messages.create(
        model=model, max_tokens=100, system="Be brief.",
        messages=[{"role": "user", "content": "hello there friend"}])
    assert message.type == "message" and message.role == "assistant"
    assert message.content[0].type == "text" and message.content[0].text == ANSWER
    assert message.stop_reason == "end_turn"
    usage = message.usage
    prompt = usage.input_tokens + (usage.cache_read_input_tokens or 0) + \
        (usage.cache_creation_input_tokens or 0)
    assert usage.output_tokens == 9
    assert_billed(gateway, model, prompt, usage.output_tokens, False, "messages")


@pytest.mark.parametrize("model", list(MODELS))
def test_anthropic_sdk_stream_with_tools_on_every_channel_type(live, model):
    key = setup_member(live)
    with anthropic_client(live, key).messages.stream(
            model=model, max_tokens=100, tools=TOOLS_ANTHROPIC,
            messages=[{"role": "user", "content": "weather in Paris?"}]) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_message()
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert "content_block_start" in kinds and "message_delta" in kinds
    tool = [b for b in final.content if b.type == "tool_use"][0]
    assert tool.name == "get_weather" and tool.input == {"location": "Paris"} and tool.id
    assert final.stop_reason == "tool_use"
    assert final.usage.output_tokens == 5
    prompt = final.usage.input_tokens + (final.usage.cache_read_input_tokens or 0) + \
        (final.usage.cache_creation_input_tokens or 0)
    assert_billed(live, model, prompt, 5, True, "messages")


@pytest.mark.parametrize("model", list(MODELS))
def test_anthropic_sdk_text_stream(live, model):
    key = setup_member(live)
    with anthropic_client(live, key).messages.stream(
            model=model, max_tokens=3,
            messages=[{"role": "user", "content": "hello there friend"}]) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == "This is a" and final.usage.output_tokens == 3
    if model != "gpt-4o-mini":  # the fake's OpenAI stream always finishes with "stop"
        assert final.stop_reason == "max_tokens"
    assert_billed(live, model, final.usage.input_tokens, 3, True, "messages")


def test_anthropic_channel_passes_messages_through(live):
    key = setup_member(live)
    client = anthropic_client(live, key)
    message = client.messages.create(
        model="claude-sonnet-4-6", max_tokens=50, extra_body={"fake_cached": 2},
        extra_headers={"anthropic-beta": "prompt-caching-2024-07-31"},
        messages=[{"role": "user", "content": "hello there friend"}])
    assert message.id == "msg_fake_1" and message.model == "claude-up"  # the upstream's own body
    assert (message.usage.input_tokens, message.usage.cache_read_input_tokens) == (4, 2)
    [seen] = [e for e in live.upstream.events() if e["type"] == "request"]
    assert seen["path"] == "/v1/messages" and seen["body"]["model"] == "claude-up"
    assert seen["api_key"] == "sk-upstream-secret"
    [row] = live.wait_logs(1)
    assert (row["prompt_tokens"], row["cached_tokens"], row["completion_tokens"]) == (6, 2, 9)


# --- errors on /v1/messages are Anthropic-shaped ---------------------------------------------

def test_messages_errors_are_anthropic_shaped(gateway):
    key = setup_member(gateway)
    bad = anthropic_client(gateway, "sk-not-a-real-key")
    with pytest.raises(anthropic.AuthenticationError) as err:
        bad.messages.create(model="claude-sonnet-4-6", max_tokens=5,
                            messages=[{"role": "user", "content": "hi"}])
    assert err.value.body["type"] == "error"
    assert err.value.body["error"]["type"] == "authentication_error"
    client = anthropic_client(gateway, key)
    with pytest.raises(anthropic.NotFoundError) as err:
        client.messages.create(model="no-such-model", max_tokens=5,
                               messages=[{"role": "user", "content": "hi"}])
    assert err.value.body["error"]["type"] == "not_found_error"
    with pytest.raises(anthropic.BadRequestError) as err:  # server tools need an Anthropic model
        client.messages.create(model="gpt-4o-mini", max_tokens=5,
                               messages=[{"role": "user", "content": "hi"}],
                               tools=[{"type": "web_search_20250305", "name": "web_search"}])
    assert "only available on Anthropic models" in err.value.body["error"]["message"]
    assert err.value.body["error"]["type"] == "invalid_request_error"


def test_upstream_request_errors_pass_through_on_both_routes(live):
    live.user("member@example.com", credits=10)
    live.channel(name="anthropic-channel", models="claude-bad=fault-400", type="anthropic")
    live.channel(name="gemini-channel", models="gemini-blocked=fault-blocked", type="gemini")
    for model in ("claude-bad", "gemini-blocked"):
        live.price(model, input=1, output=2)
    key = live.key("member@example.com")
    with pytest.raises(anthropic.BadRequestError) as err:
        anthropic_client(live, key).messages.create(
            model="claude-bad", max_tokens=5, messages=[{"role": "user", "content": "hi"}])
    assert err.value.body == {"type": "error", "error": {
        "type": "invalid_request_error",
        "message": "The fake upstream rejected this request: bad parameter."}}
    with pytest.raises(openai.BadRequestError) as err:
        openai_client(live, key).chat.completions.create(
            model="gemini-blocked", messages=[{"role": "user", "content": "something bad"}],
            stream=True)
    assert err.value.body["message"] == "Gemini blocked the prompt: SAFETY"
    assert err.value.body["type"] == "invalid_request_error"
    with pytest.raises(anthropic.BadRequestError) as err:
        anthropic_client(live, key).messages.create(
            model="gemini-blocked", max_tokens=5, messages=[{"role": "user", "content": "bad"}])
    assert err.value.body["error"]["message"] == "Gemini blocked the prompt: SAFETY"
    rows = live.wait_logs(3)
    assert [r["http_status"] for r in rows] == [400, 400, 400]
    assert all(r["credits_micro"] == 0 for r in rows)


@pytest.mark.parametrize("upstream_type", ["anthropic", "gemini"])
def test_break_mid_stream_ends_with_an_anthropic_error_event(live, upstream_type):
    live.user("member@example.com", credits=10)
    live.channel(name="broken", models="flaky=fault-stream-error", type=upstream_type)
    live.price("flaky", input=1, output=2)
    key = live.key("member@example.com")
    with pytest.raises(anthropic.APIStatusError) as err:
        with anthropic_client(live, key).messages.stream(
                model="flaky", max_tokens=50,
                messages=[{"role": "user", "content": "hello"}]) as stream:
            for _ in stream:
                pass
    assert err.value.body["type"] == "error" and err.value.body["error"]["type"] == "api_error"
    [row] = live.wait_logs(1)
    assert row["status"] == "Failed"


# --- failover across channel types for one model name ----------------------------------------

def test_failover_across_channel_types_for_one_model(gateway):
    gateway.user("member@example.com", credits=10)
    gateway.channel(name="claude-down", models="smart=fault-500", type="anthropic", priority=10)
    gateway.channel(name="gemini-up", models="smart=gemini-up", type="gemini", priority=0)
    gateway.price("smart", input=1, output=2)
    key = gateway.key("member@example.com")
    completion = openai_client(gateway, key).chat.completions.create(
        model="smart", messages=[{"role": "user", "content": "hello there friend"}])
    assert completion.choices[0].message.content == ANSWER
    with anthropic_client(gateway, key).messages.stream(
            model="smart", max_tokens=100,
            messages=[{"role": "user", "content": "hello there friend"}]) as stream:
        assert "".join(stream.text_stream) == ANSWER
    rows = gateway.wait_logs(2)
    assert [r["channel_name"] for r in rows] == ["gemini-up", "gemini-up"]
    assert [r["credits_micro"] for r in rows] == [24, 24]
    paths = [e["path"] for e in gateway.upstream.events() if e["type"] == "request"]
    assert paths.count("/v1/messages") == 2  # the anthropic channel was tried first each time


# --- count_tokens -----------------------------------------------------------------------------

def test_count_tokens_is_local_free_and_authenticated(live):
    key = setup_member(live)
    client = anthropic_client(live, key)
    short = client.messages.count_tokens(
        model="claude-sonnet-4-6", messages=[{"role": "user", "content": "hi"}])
    longer = client.messages.count_tokens(
        model="claude-sonnet-4-6", system="You are terse.",
        messages=[{"role": "user", "content": "hi " * 50}])
    assert 0 < short.input_tokens < longer.input_tokens
    assert live.logs() == [] and live.upstream.events() == []  # free: no log, no upstream call
    with pytest.raises(anthropic.AuthenticationError) as caught:
        anthropic_client(live, "sk-wrong").messages.count_tokens(
            model="claude-sonnet-4-6", messages=[{"role": "user", "content": "hi"}])
    assert caught.value.body["type"] == "error"
    with pytest.raises(anthropic.NotFoundError):
        client.messages.count_tokens(model="nope", messages=[{"role": "user", "content": "x"}])


def test_anthropic_sdk_lists_models_in_its_own_shape(live):
    key = setup_member(live)
    client = anthropic_client(live, key)
    models = client.models.list()
    assert sorted(m.id for m in models.data) == sorted(MODELS)
    assert all(m.type == "model" and m.display_name for m in models.data)
    assert client.models.retrieve("claude-sonnet-4-6").id == "claude-sonnet-4-6"
    with pytest.raises(anthropic.NotFoundError) as caught:
        client.models.retrieve("no-such-model")
    assert caught.value.body["type"] == "error"
    # the openai SDK on the same route still gets OpenAI's list
    assert {m.id for m in openai_client(live, key).models.list()} == set(MODELS)
