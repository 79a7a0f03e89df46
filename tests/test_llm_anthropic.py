"""The Anthropic adapter of ``app.llm`` against local HTTP servers speaking the Messages API.

Handlers record the body the real ``anthropic`` SDK sends to ``POST /v1/messages``
and answer with Anthropic's documented shapes: a ``message`` object, the SSE
event sequence of a stream (``message_start``, ``content_block_start``,
``ping``, ``content_block_delta``, ``content_block_stop``, ``message_delta``,
``message_stop``) and ``{"type": "error", "error": {...}}`` bodies.

What every adapter promises alike (chat, streams, tools, structured output,
the common HTTP errors, timeouts, closing streams) is tested once for all in
``tests/test_provider_contract.py``; this file keeps what is Anthropic's own.
"""

from __future__ import annotations

import asyncio
import base64
import json
import sys
from typing import Any

import anthropic
import pytest
from pydantic import BaseModel

from app.connectors.anthropic_connector import (
    current_anthropic_connector,
    get_anthropic_client,
    get_async_anthropic_client,
    reset_anthropic_client,
)
from app.llm import (
    ChatResponse,
    LLMBadRequestError,
    LLMContextLengthError,
    LLMError,
    LLMNotConfiguredError,
    LLMNotFoundError,
    LLMPermissionError,
    LLMResponseError,
    LLMServerError,
    ToolCall,
    get_llm,
)
from tests.conftest import CANARY_KEY
from tests.payloads import ANTHROPIC_PING as PING
from tests.payloads import anthropic_error as error_body
from tests.payloads import anthropic_message as message
from tests.payloads import anthropic_message_end as message_end
from tests.payloads import anthropic_message_start as message_start
from tests.payloads import anthropic_sse as sse
from tests.payloads import anthropic_text_block as text_block
from tests.payloads import anthropic_tool_block as tool_block
from tests.servers import Reply, ScriptedServer, default_responder

MODEL = "anthropic/claude-sonnet-4-6"  # not in the SDK's deprecated list (4-5 warns)
SERVED_MODEL = "claude-sonnet-4-6"
MESSAGES_PATH = "/v1/messages"
PNG = b"\x89PNG\r\n\x1a\n-not-really-a-png"


# --- servers and answers ---------------------------------------------------------------------


@pytest.fixture
def app(make_app, upstream):
    return make_app(
        ANTHROPIC_API_KEY=CANARY_KEY, ANTHROPIC_BASE_URL=upstream.base_url, ANTHROPIC_MAX_RETRIES=0
    )


class Recorder:
    """What reached ``POST /v1/messages`` of the test's upstream: JSON bodies and headers, in order."""

    def __init__(self, server: ScriptedServer) -> None:
        self.server = server

    @property
    def requests(self) -> list[dict[str, Any]]:
        return [request.json for request in self.server.requests_to(MESSAGES_PATH)]

    @property
    def request_headers(self) -> list[dict[str, str]]:
        return [request.headers for request in self.server.requests_to(MESSAGES_PATH)]

    @property
    def last(self) -> dict[str, Any]:
        assert self.requests, "the SDK sent no request"
        return self.requests[-1]


def serve(
    server: ScriptedServer,
    body: Any = None,
    status: int = 200,
    headers: dict[str, str] | None = None,
    stream: str | None = None,
) -> Recorder:
    """Answer every ``POST /v1/messages`` alike: JSON ``body`` (a message by default) or SSE ``stream``."""
    if stream is not None:
        reply = Reply(status, headers=headers or {}, chunks=[stream])
    else:
        reply = Reply(status, body if body is not None else message(), headers or {})
    server.responder = lambda request: reply if request.path == MESSAGES_PATH else default_responder(request)
    return Recorder(server)


def chat(app, messages: Any = None, **kwargs: Any) -> ChatResponse:
    with app.app_context():
        return get_llm().chat(messages or [{"role": "user", "content": "Hi"}], model=MODEL, **kwargs)


def stream_all(app, messages: Any = None, **kwargs: Any) -> tuple[list[str], ChatResponse]:
    with app.app_context():
        stream = get_llm().chat_stream(messages or [{"role": "user", "content": "Hi"}], model=MODEL, **kwargs)
        deltas = list(stream)
        return deltas, stream.response


def get_weather(city: str, unit: str = "celsius") -> str:
    """The current weather in a city."""
    return "sunny"


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
TIME_TOOL = {
    "name": "get_time",
    "description": "The local time in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}


# --- translation --------------------------------------------------------------------------------


def test_system_and_multi_turn_are_translated_with_alternating_roles(app, upstream):
    recorder = serve(upstream)

    response = chat(
        app,
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello! How can I help?"},
            {"role": "system", "content": "Answer in French."},
            {"role": "user", "content": "What is 2+2?"},
            {"role": "user", "content": [{"type": "text", "text": "And 3+3?"}]},
        ],
        temperature=0,
        user="user-42",
    )

    body = recorder.last
    headers = recorder.request_headers[-1]
    assert headers["authorization"] == f"Bearer {CANARY_KEY}"  # how SDK 2.x sends an API key
    assert headers["anthropic-version"]
    assert body["model"] == "claude-sonnet-4-6"
    assert body["system"] == "Be brief.\n\nAnswer in French."
    assert body["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Hello! How can I help?"}]},
        {
            "role": "user",
            "content": [{"type": "text", "text": "What is 2+2?"}, {"type": "text", "text": "And 3+3?"}],
        },
    ]
    assert body["max_tokens"] == 1024  # Anthropic requires it: the default
    assert body["temperature"] == 0
    assert body["metadata"] == {"user_id": "user-42"}
    assert "stream" not in body
    assert "tools" not in body
    assert "output_config" not in body

    assert response.content == "Hello!"
    assert response.model == SERVED_MODEL
    assert response.provider == "anthropic"
    assert response.finish_reason == "stop"
    assert (response.input_tokens, response.output_tokens, response.total_tokens) == (12, 6, 18)
    assert isinstance(response.raw, anthropic.types.Message)
    assert response.tool_calls == []
    assert not response.has_tool_calls
    assert response.latency_ms > 0


def test_max_tokens_passes_through_and_no_system_is_sent_without_one(app, upstream):
    recorder = serve(upstream)

    chat(app, max_tokens=200)

    assert recorder.last["max_tokens"] == 200
    assert "system" not in recorder.last
    assert "temperature" not in recorder.last
    assert "metadata" not in recorder.last


def test_images_as_bytes_data_url_and_https_url(app, upstream):
    recorder = serve(upstream)
    data_url = "data:image/jpeg;base64," + base64.b64encode(b"jpeg-bytes").decode()

    chat(
        app,
        [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Compare these."},
                    {"type": "image", "data": PNG, "mime_type": "image/png"},
                    {"type": "image", "url": data_url},
                    {"type": "image_url", "image_url": {"url": "https://example.com/cat.webp"}},
                ],
            }
        ],
    )

    assert recorder.last["messages"] == [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Compare these."},
                {
                    "type": "image",
                    "source": {
                        "type": "base64",
                        "media_type": "image/png",
                        "data": base64.b64encode(PNG).decode(),
                    },
                },
                {
                    "type": "image",
                    "source": {
                        "type": "base64",
                        "media_type": "image/jpeg",
                        "data": base64.b64encode(b"jpeg-bytes").decode(),
                    },
                },
                {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.webp"}},
            ],
        }
    ]


def test_an_image_url_of_another_scheme_is_a_bad_request_before_any_call(app, upstream):
    recorder = serve(upstream)

    with pytest.raises(LLMBadRequestError) as caught:
        chat(app, [{"role": "user", "content": [{"type": "image", "url": "ftp://example.com/cat.png"}]}])

    assert caught.value.provider == "anthropic"
    assert recorder.requests == []


# --- tools ----------------------------------------------------------------------------------------


def test_tools_in_every_form_and_a_tool_call(app, upstream):
    recorder = serve(
        upstream,
        body=message(
            [
                {"type": "text", "text": "Let me check."},
                {"type": "tool_use", "id": "toolu_01A", "name": "get_weather", "input": {"city": "Paris"}},
            ],
            stop_reason="tool_use",
        ),
    )

    response = chat(
        app, tools=[get_weather, TIME_TOOL, {"type": "function", "function": {"name": "no_args"}}]
    )

    tools = recorder.last["tools"]
    assert [tool["name"] for tool in tools] == ["get_weather", "get_time", "no_args"]
    assert tools[0]["description"] == "The current weather in a city."
    assert tools[0]["input_schema"]["type"] == "object"
    assert tools[0]["input_schema"]["required"] == ["city"]
    assert set(tools[0]["input_schema"]["properties"]) == {"city", "unit"}
    assert tools[1] == {
        "name": "get_time",
        "description": "The local time in a city.",
        "input_schema": TIME_TOOL["parameters"],
    }
    assert tools[2] == {"name": "no_args", "input_schema": {"type": "object", "properties": {}}}
    assert "tool_choice" not in recorder.last

    assert response.content == "Let me check."
    assert response.finish_reason == "tool_calls"
    assert response.has_tool_calls
    assert response.tool_calls == [ToolCall(id="toolu_01A", name="get_weather", arguments={"city": "Paris"})]


def test_tool_results_round_trip_as_merged_user_tool_result_blocks(app, upstream):
    recorder = serve(upstream, body=message([{"type": "text", "text": "Sunny in Paris, 9 am in Tokyo."}]))

    response = chat(
        app,
        [
            {"role": "system", "content": "Use the tools."},
            {"role": "user", "content": "Weather in Paris and time in Tokyo?"},
            {
                "role": "assistant",
                "content": "Checking both.",
                "tool_calls": [
                    {
                        "id": "toolu_01A",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                    },
                    ToolCall("toolu_01B", "get_time", {"city": "Tokyo"}),
                ],
            },
            {"role": "tool", "tool_call_id": "toolu_01A", "name": "get_weather", "content": "sunny"},
            {"role": "tool", "tool_call_id": "toolu_01B", "content": "09:00"},
            {"role": "user", "content": "Thanks, summarise."},
        ],
        tools=[WEATHER_TOOL, TIME_TOOL],
    )

    assert recorder.last["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "Weather in Paris and time in Tokyo?"}]},
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "Checking both."},
                {"type": "tool_use", "id": "toolu_01A", "name": "get_weather", "input": {"city": "Paris"}},
                {"type": "tool_use", "id": "toolu_01B", "name": "get_time", "input": {"city": "Tokyo"}},
            ],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "toolu_01A", "content": "sunny"},
                {"type": "tool_result", "tool_use_id": "toolu_01B", "content": "09:00"},
                {"type": "text", "text": "Thanks, summarise."},
            ],
        },
    ]
    assert response.content == "Sunny in Paris, 9 am in Tokyo."


def test_an_assistant_tool_call_without_text_sends_only_tool_use(app, upstream):
    recorder = serve(upstream)

    chat(
        app,
        [
            {"role": "user", "content": "Weather?"},
            {"role": "assistant", "content": None, "tool_calls": [ToolCall("toolu_9", "get_weather", {})]},
            {"role": "tool", "tool_call_id": "toolu_9", "content": "rain"},
        ],
        tools=[WEATHER_TOOL],
    )

    assert recorder.last["messages"][1:] == [
        {
            "role": "assistant",
            "content": [{"type": "tool_use", "id": "toolu_9", "name": "get_weather", "input": {}}],
        },
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_9", "content": "rain"}]},
    ]


def test_tool_results_come_first_in_their_merged_user_message(app, upstream):
    recorder = serve(upstream)

    chat(
        app,
        [
            {"role": "user", "content": "Weather?"},
            {"role": "assistant", "content": None, "tool_calls": [ToolCall("toolu_9", "get_weather", {})]},
            {"role": "user", "content": "Use Celsius."},
            {"role": "tool", "tool_call_id": "toolu_9", "content": "rain"},
        ],
        tools=[WEATHER_TOOL],
    )

    assert recorder.last["messages"][2] == {
        "role": "user",
        "content": [
            {"type": "tool_result", "tool_use_id": "toolu_9", "content": "rain"},
            {"type": "text", "text": "Use Celsius."},
        ],
    }


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        ("auto", {"type": "auto"}),
        ("none", {"type": "none"}),
        ("required", {"type": "any"}),
        ("get_time", {"type": "tool", "name": "get_time"}),
        ({"type": "function", "function": {"name": "get_weather"}}, {"type": "tool", "name": "get_weather"}),
    ],
)
def test_tool_choice_modes(app, upstream, choice, expected):
    recorder = serve(upstream)

    chat(app, tools=[WEATHER_TOOL, TIME_TOOL], tool_choice=choice)

    assert recorder.last["tool_choice"] == expected


# --- structured output ------------------------------------------------------------------------


class Address(BaseModel):
    city: str
    zip_code: str | None = None


class Person(BaseModel):
    name: str
    age: int
    address: Address


def test_structured_output_uses_native_json_schema_and_parses(app, upstream):
    answer = {"name": "Ada", "age": 36, "address": {"city": "London", "zip_code": None}}
    recorder = serve(upstream, body=message([{"type": "text", "text": json.dumps(answer)}]))

    response = chat(app, response_format=Person)

    output_format = recorder.last["output_config"]["format"]
    assert output_format["type"] == "json_schema"
    schema = output_format["schema"]
    assert schema["type"] == "object"
    assert schema["additionalProperties"] is False
    assert set(schema["required"]) == {"name", "age", "address"}
    assert schema["properties"]["age"]["type"] == "integer"
    assert schema["$defs"]["Address"]["additionalProperties"] is False
    assert isinstance(response.parsed, Person)
    assert response.parsed == Person.model_validate(answer)


# --- finish reasons and usage -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("stop_reason", "finish_reason"),
    [
        ("end_turn", "stop"),
        ("stop_sequence", "stop"),
        ("max_tokens", "length"),
        ("model_context_window_exceeded", "length"),
        ("tool_use", "tool_calls"),
        ("refusal", "content_filter"),
    ],
)
def test_finish_reasons(app, upstream, stop_reason, finish_reason):
    serve(upstream, body=message(stop_reason=stop_reason))

    assert chat(app).finish_reason == finish_reason


def test_usage_counts_cached_input_tokens(app, upstream):
    serve(
        upstream,
        body=message(
            usage={
                "input_tokens": 10,
                "cache_creation_input_tokens": 100,
                "cache_read_input_tokens": 1000,
                "output_tokens": 7,
            }
        ),
    )

    response = chat(app)

    assert (response.input_tokens, response.output_tokens, response.total_tokens) == (1110, 7, 1117)


# --- streaming ----------------------------------------------------------------------------------


def test_stream_yields_text_deltas_and_ends_with_usage_and_finish_reason(app, upstream):
    recorder = serve(
        upstream,
        stream=sse(
            message_start(input_tokens=25),
            text_block(0, "", "")[0],
            PING,
            *text_block(0, "Hello", ", world", "!")[1:],
            *message_end("max_tokens", output_tokens=15),
        ),
    )

    deltas, response = stream_all(
        app, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    )

    assert recorder.last["stream"] is True
    assert recorder.last["system"] == "Be brief."
    assert recorder.last["max_tokens"] == 1024
    assert deltas == ["Hello", ", world", "!"]
    assert response.content == "Hello, world!"
    assert response.model == SERVED_MODEL
    assert response.provider == "anthropic"
    assert response.finish_reason == "length"
    assert (response.input_tokens, response.output_tokens, response.total_tokens) == (25, 15, 40)
    assert response.tool_calls == []


def test_streamed_tool_call_with_malformed_arguments_keeps_the_raw_text(app, upstream):
    serve(
        upstream,
        stream=sse(
            message_start(),
            *tool_block(0, "toolu_01A", "get_weather", '{"city": "Par'),
            *message_end("tool_use"),
        ),
    )

    with pytest.raises(LLMResponseError) as caught:
        stream_all(app, tools=[WEATHER_TOOL])

    assert caught.value.raw_text == '{"city": "Par'


# --- async ----------------------------------------------------------------------------------------


def test_one_async_client_per_event_loop_and_reset_closes_it(app, upstream):
    serve(upstream)

    async def main() -> tuple[anthropic.AsyncAnthropic, bool]:
        await get_llm().achat([{"role": "user", "content": "Hi"}], model=MODEL)
        client = get_async_anthropic_client()
        await get_llm().achat([{"role": "user", "content": "Hi"}], model=MODEL)
        same = get_async_anthropic_client() is client
        return client, same

    loop = asyncio.new_event_loop()
    try:
        with app.app_context():
            first, same = loop.run_until_complete(main())
            second, _ = asyncio.run(main())
            assert same  # the provider used the loop's client twice
            assert first is not second  # another loop, another client
            assert isinstance(first, anthropic.AsyncAnthropic)
            assert first.api_key == CANARY_KEY
            assert get_anthropic_client() is not first
            assert current_anthropic_connector().built
            reset_anthropic_client()
            assert first.is_closed()
            assert not current_anthropic_connector().built
    finally:
        loop.close()


# --- embeddings and models ----------------------------------------------------------------------


def test_embeddings_are_a_bad_request_naming_the_alternative(app, upstream):
    recorder = serve(upstream)

    with app.app_context():
        with pytest.raises(LLMBadRequestError) as sync_error:
            get_llm().embed(["a", "b"], model="anthropic/claude-sonnet-4-6")
        with pytest.raises(LLMBadRequestError) as async_error:
            asyncio.run(get_llm().aembed(["a"], model="anthropic/claude-sonnet-4-6"))

    for caught in (sync_error, async_error):
        assert "no embeddings API" in str(caught.value)
        assert caught.value.provider == "anthropic"
        assert caught.value.model == "claude-sonnet-4-6"
    assert recorder.requests == []


def test_list_models(app, upstream):
    upstream.script(
        "/v1/models",
        {
            "data": [
                {"id": "claude-sonnet-4-5-20250929", "type": "model", "display_name": "Claude Sonnet 4.5",
                 "created_at": "2025-09-29T00:00:00Z"},
                {"id": "claude-haiku-4-5-20251001", "type": "model", "display_name": "Claude Haiku 4.5",
                 "created_at": "2025-10-01T00:00:00Z"},
            ],
            "has_more": False,
            "first_id": "claude-sonnet-4-5-20250929",
            "last_id": "claude-haiku-4-5-20251001",
        }
    )  # fmt: skip

    with app.app_context():
        models = get_llm().list_models("anthropic")

    assert models == ["claude-haiku-4-5-20251001", "claude-sonnet-4-5-20250929"]
    request = upstream.only_request()
    assert (request.method, request.path) == ("GET", "/v1/models")
    assert request.headers["authorization"] == f"Bearer {CANARY_KEY}"


# --- errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "kind", "text", "error_class", "headers", "retry_after"),
    [
        (400, "invalid_request_error", "prompt is too long: 212432 tokens > 200000 maximum",
         LLMContextLengthError, {}, None),
        (403, "permission_error", "Your API key does not have permission to use the specified resource.",
         LLMPermissionError, {}, None),
        (404, "not_found_error", "model: claude-sonnet-4-5", LLMNotFoundError, {}, None),
        (529, "overloaded_error", "Overloaded", LLMServerError, {"retry-after-ms": "1500"}, 1.5),
    ],
    # 400, 401, 429 with Retry-After and 500: tests/test_provider_contract.py (every provider).
    ids=["400-prompt-too-long", "403", "404", "529"],
)  # fmt: skip
def test_http_errors_are_typed(app, upstream, status, kind, text, error_class, headers, retry_after):
    serve(upstream, status=status, headers=headers, body=error_body(kind, text))

    with pytest.raises(LLMError) as caught:
        chat(app)

    error = caught.value
    assert type(error) is error_class
    assert error.status_code == status
    assert error.retry_after == retry_after
    assert error.provider == "anthropic"
    assert error.model == "claude-sonnet-4-6"
    assert isinstance(error.__cause__, anthropic.APIStatusError)
    assert error.__cause__.status_code == status
    assert kind in str(error)
    assert CANARY_KEY not in str(error)
    assert CANARY_KEY not in repr(error)
    assert CANARY_KEY not in error.message


def test_without_the_sdk_installed_the_provider_is_not_configured(app, upstream, monkeypatch):
    """The SDK is an optional extra: without it, "anthropic/..." is a typed error naming the extra."""
    recorder = serve(upstream)
    monkeypatch.setitem(sys.modules, "anthropic", None)  # what an absent package looks like to import
    monkeypatch.delitem(sys.modules, "app.llm.providers.anthropic_provider", raising=False)

    with pytest.raises(LLMNotConfiguredError) as caught:
        chat(app)

    assert "pip install '.[anthropic]'" in str(caught.value)
    assert caught.value.provider == "anthropic"
    assert recorder.requests == []


# --- closing a stream early closes the upstream connection ----------------------------------
# Closing (sync, unread, async) for every provider: tests/test_provider_contract.py. Here, what is
# Anthropic's own: the adapter closes the SDK's stream itself, even while something still holds it.


def _held_upstream(events):
    """The SDK stream the adapter's generator holds, found through the layers of generators above it."""
    queue, seen = [events], set()
    while queue:
        generator = queue.pop()
        frame = getattr(generator, "ag_frame", None)
        if frame is None or id(generator) in seen:
            continue
        seen.add(id(generator))
        if "upstream" in frame.f_locals:
            return frame.f_locals["upstream"]
        queue.extend(value for value in frame.f_locals.values() if hasattr(value, "ag_frame"))
    raise AssertionError("no generator holds an 'upstream' SDK stream")


def test_closing_an_async_stream_held_elsewhere_closes_the_upstream_connection(app, upstream):
    pings = [item for _ in range(160) for item in (sse(PING), 0.05)]  # 8 s unless the client leaves
    upstream.script(MESSAGES_PATH, Reply.stream([sse(message_start(), *text_block(0, "first")[:2]), *pings]))

    async def main() -> bool:
        stream = get_llm().achat_stream([{"role": "user", "content": "Hi"}], model=MODEL)
        assert await stream.__anext__() == "first"
        [request] = upstream.requests
        assert not request.finished.is_set()  # the upstream is still streaming
        # Hold the SDK's stream, as a reference cycle or a traceback might: then only the
        # adapter's explicit close ends the response (dropping it would let GC close it).
        sdk_stream = _held_upstream(stream._events)
        assert isinstance(sdk_stream, anthropic.AsyncStream)
        await stream.aclose()
        assert sdk_stream.response.is_closed
        return await asyncio.to_thread(request.finished.wait, 3)

    with app.app_context():
        assert asyncio.run(main())
    assert upstream.requests[0].outcome == "client_closed"
