"""The Anthropic adapter of ``app.llm`` against local HTTP servers speaking the Messages API.

Handlers record the body the real ``anthropic`` SDK sends to ``POST /v1/messages``
and answer with Anthropic's documented shapes: a ``message`` object, the SSE
event sequence of a stream (``message_start``, ``content_block_start``,
``ping``, ``content_block_delta``, ``content_block_stop``, ``message_delta``,
``message_stop``) and ``{"type": "error", "error": {...}}`` bodies.
"""

from __future__ import annotations

import asyncio
import base64
import json
import select
import socket
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import anthropic
import pytest
from pydantic import BaseModel
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

from app.connectors.anthropic_connector import (
    current_anthropic_connector,
    get_anthropic_client,
    get_async_anthropic_client,
    reset_anthropic_client,
)
from app.llm import (
    ChatResponse,
    LLMAuthError,
    LLMBadRequestError,
    LLMConnectionError,
    LLMContextLengthError,
    LLMError,
    LLMNotConfiguredError,
    LLMNotFoundError,
    LLMPermissionError,
    LLMRateLimitError,
    LLMResponseError,
    LLMServerError,
    LLMTimeoutError,
    ToolCall,
    get_llm,
)
from tests.conftest import CANARY_KEY
from tests.servers import free_port

MODEL = "anthropic/claude-sonnet-4-6"  # not in the SDK's deprecated list (4-5 warns)
SERVED_MODEL = "claude-sonnet-4-6"
MESSAGES_PATH = "/v1/messages"
PNG = b"\x89PNG\r\n\x1a\n-not-really-a-png"


# --- servers and answers ---------------------------------------------------------------------


@pytest.fixture
def app(make_app, local_server):
    return make_app(
        ANTHROPIC_API_KEY=CANARY_KEY,
        ANTHROPIC_BASE_URL=local_server.url_for("/").rstrip("/"),
        ANTHROPIC_MAX_RETRIES=0,
    )


def message(
    content: list[dict[str, Any]] | None = None,
    stop_reason: str = "end_turn",
    usage: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A Messages API response body."""
    return {
        "id": "msg_01XFDUDYJgAACzvnptvVoYEL",
        "type": "message",
        "role": "assistant",
        "model": SERVED_MODEL,
        "content": content if content is not None else [{"type": "text", "text": "Hello!"}],
        "stop_reason": stop_reason,
        "stop_sequence": None,
        "usage": usage or {"input_tokens": 12, "output_tokens": 6},
    }


def error_body(kind: str, text: str) -> dict[str, Any]:
    return {
        "type": "error",
        "error": {"type": kind, "message": text},
        "request_id": "req_011CSHoEeqs5C35K2UUqR7Fy",
    }


def sse(*events: dict[str, Any]) -> str:
    return "".join(f"event: {event['type']}\ndata: {json.dumps(event)}\n\n" for event in events)


def message_start(input_tokens: int = 25) -> dict[str, Any]:
    return {
        "type": "message_start",
        "message": {
            "id": "msg_1nZdL29xx5MUA1yADyHTEsnR8uuvGzszyY",
            "type": "message",
            "role": "assistant",
            "content": [],
            "model": SERVED_MODEL,
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": input_tokens, "output_tokens": 1},
        },
    }


def text_block(index: int, *pieces: str) -> list[dict[str, Any]]:
    return [
        {"type": "content_block_start", "index": index, "content_block": {"type": "text", "text": ""}},
        *(
            {"type": "content_block_delta", "index": index, "delta": {"type": "text_delta", "text": piece}}
            for piece in pieces
        ),
        {"type": "content_block_stop", "index": index},
    ]


def tool_block(index: int, call_id: str, name: str, *fragments: str) -> list[dict[str, Any]]:
    return [
        {
            "type": "content_block_start",
            "index": index,
            "content_block": {"type": "tool_use", "id": call_id, "name": name, "input": {}},
        },
        *(
            {
                "type": "content_block_delta",
                "index": index,
                "delta": {"type": "input_json_delta", "partial_json": fragment},
            }
            for fragment in fragments
        ),
        {"type": "content_block_stop", "index": index},
    ]


def message_end(stop_reason: str = "end_turn", output_tokens: int = 15) -> list[dict[str, Any]]:
    return [
        {
            "type": "message_delta",
            "delta": {"stop_reason": stop_reason, "stop_sequence": None},
            "usage": {"output_tokens": output_tokens},
        },
        {"type": "message_stop"},
    ]


PING = {"type": "ping"}


class Recorder:
    """A handler for pytest-httpserver that records every request and answers the same way."""

    def __init__(
        self,
        body: Any = None,
        status: int = 200,
        headers: dict[str, str] | None = None,
        stream: str | None = None,
        delay: float = 0.0,
    ) -> None:
        self.body = body if body is not None else message()
        self.status = status
        self.headers = headers or {}
        self.stream = stream
        self.delay = delay
        self.requests: list[dict[str, Any]] = []
        self.request_headers: list[dict[str, str]] = []

    def __call__(self, request: Request) -> Response:
        self.requests.append(json.loads(request.get_data()))
        self.request_headers.append({k.lower(): v for k, v in request.headers.items()})
        if self.delay:
            time.sleep(self.delay)
        if self.stream is not None:
            return Response(
                self.stream, status=self.status, headers=self.headers, content_type="text/event-stream"
            )
        return Response(
            json.dumps(self.body), status=self.status, headers=self.headers, content_type="application/json"
        )

    @property
    def last(self) -> dict[str, Any]:
        assert self.requests, "the SDK sent no request"
        return self.requests[-1]


def serve(local_server: HTTPServer, **kwargs: Any) -> Recorder:
    recorder = Recorder(**kwargs)
    local_server.expect_request(MESSAGES_PATH, method="POST").respond_with_handler(recorder)
    return recorder


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


def test_system_and_multi_turn_are_translated_with_alternating_roles(app, local_server):
    recorder = serve(local_server)

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


def test_max_tokens_passes_through_and_no_system_is_sent_without_one(app, local_server):
    recorder = serve(local_server)

    chat(app, max_tokens=200)

    assert recorder.last["max_tokens"] == 200
    assert "system" not in recorder.last
    assert "temperature" not in recorder.last
    assert "metadata" not in recorder.last


def test_images_as_bytes_data_url_and_https_url(app, local_server):
    recorder = serve(local_server)
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


def test_an_image_url_of_another_scheme_is_a_bad_request_before_any_call(app, local_server):
    recorder = serve(local_server)

    with pytest.raises(LLMBadRequestError) as caught:
        chat(app, [{"role": "user", "content": [{"type": "image", "url": "ftp://example.com/cat.png"}]}])

    assert caught.value.provider == "anthropic"
    assert recorder.requests == []


# --- tools ----------------------------------------------------------------------------------------


def test_tools_in_every_form_and_a_tool_call(app, local_server):
    recorder = serve(
        local_server,
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


def test_parallel_tool_calls(app, local_server):
    serve(
        local_server,
        body=message(
            [
                {"type": "tool_use", "id": "toolu_01A", "name": "get_weather", "input": {"city": "Paris"}},
                {"type": "tool_use", "id": "toolu_01B", "name": "get_time", "input": {"city": "Tokyo"}},
            ],
            stop_reason="tool_use",
        ),
    )

    response = chat(app, tools=[WEATHER_TOOL, TIME_TOOL])

    assert response.content is None
    assert response.tool_calls == [
        ToolCall("toolu_01A", "get_weather", {"city": "Paris"}),
        ToolCall("toolu_01B", "get_time", {"city": "Tokyo"}),
    ]


def test_tool_results_round_trip_as_merged_user_tool_result_blocks(app, local_server):
    recorder = serve(local_server, body=message([{"type": "text", "text": "Sunny in Paris, 9 am in Tokyo."}]))

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


def test_an_assistant_tool_call_without_text_sends_only_tool_use(app, local_server):
    recorder = serve(local_server)

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


def test_tool_results_come_first_in_their_merged_user_message(app, local_server):
    recorder = serve(local_server)

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
def test_tool_choice_modes(app, local_server, choice, expected):
    recorder = serve(local_server)

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


def test_structured_output_uses_native_json_schema_and_parses(app, local_server):
    answer = {"name": "Ada", "age": 36, "address": {"city": "London", "zip_code": None}}
    recorder = serve(local_server, body=message([{"type": "text", "text": json.dumps(answer)}]))

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


@pytest.mark.parametrize(
    "text",
    ['{"name": "Ada", "age": "thirty-six"}', '{"name": "Ada", "age": 36, "address": {"city": "Lon'],
    ids=["invalid", "truncated"],
)
def test_structured_output_that_does_not_validate_is_a_response_error_with_raw_text(app, local_server, text):
    serve(local_server, body=message([{"type": "text", "text": text}]))

    with pytest.raises(LLMResponseError) as caught:
        chat(app, response_format=Person)

    assert caught.value.raw_text == text
    assert caught.value.provider == "anthropic"
    assert caught.value.model == "claude-sonnet-4-6"


def test_structured_output_from_a_stream(app, local_server):
    text = '{"name": "Ada", "age": 36, "address": {"city": "London"}}'
    recorder = serve(
        local_server,
        stream=sse(message_start(), *text_block(0, text[:20], text[20:]), *message_end()),
    )

    deltas, response = stream_all(app, response_format=Person)

    assert "".join(deltas) == text
    assert recorder.last["output_config"]["format"]["type"] == "json_schema"
    assert response.parsed == Person(name="Ada", age=36, address=Address(city="London"))


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
def test_finish_reasons(app, local_server, stop_reason, finish_reason):
    serve(local_server, body=message(stop_reason=stop_reason))

    assert chat(app).finish_reason == finish_reason


def test_usage_counts_cached_input_tokens(app, local_server):
    serve(
        local_server,
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


def test_stream_yields_text_deltas_and_ends_with_usage_and_finish_reason(app, local_server):
    recorder = serve(
        local_server,
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


def test_streamed_parallel_tool_calls_arrive_in_the_final_response(app, local_server):
    recorder = serve(
        local_server,
        stream=sse(
            message_start(),
            *text_block(0, "Checking."),
            *tool_block(1, "toolu_01A", "get_weather", "", '{"ci', 'ty": "Par', 'is"}'),
            PING,
            *tool_block(2, "toolu_01B", "get_time", '{"city": ', '"Tokyo"}'),
            *message_end("tool_use", output_tokens=40),
        ),
    )

    deltas, response = stream_all(app, tools=[WEATHER_TOOL, TIME_TOOL], tool_choice="required")

    assert recorder.last["tool_choice"] == {"type": "any"}
    assert [tool["name"] for tool in recorder.last["tools"]] == ["get_weather", "get_time"]
    assert deltas == ["Checking."]
    assert response.finish_reason == "tool_calls"
    assert response.tool_calls == [
        ToolCall("toolu_01A", "get_weather", {"city": "Paris"}),
        ToolCall("toolu_01B", "get_time", {"city": "Tokyo"}),
    ]
    assert response.output_tokens == 40


def test_streamed_tool_call_with_malformed_arguments_keeps_the_raw_text(app, local_server):
    serve(
        local_server,
        stream=sse(
            message_start(),
            *tool_block(0, "toolu_01A", "get_weather", '{"city": "Par'),
            *message_end("tool_use"),
        ),
    )

    with pytest.raises(LLMResponseError) as caught:
        stream_all(app, tools=[WEATHER_TOOL])

    assert caught.value.raw_text == '{"city": "Par'


def test_an_error_event_inside_a_stream_is_typed(app, local_server):
    serve(
        local_server,
        stream=sse(
            message_start(),
            *text_block(0, "Hel"),
            {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}},
        ),
    )

    with app.app_context():
        stream = get_llm().chat_stream([{"role": "user", "content": "Hi"}], model=MODEL)
        assert next(stream) == "Hel"
        with pytest.raises(LLMServerError) as caught:
            next(stream)

    assert caught.value.status_code == 529
    assert "Overloaded" in str(caught.value)
    assert isinstance(caught.value.__cause__, anthropic.APIStatusError)


def test_a_stream_error_status_raises_when_the_stream_is_opened(app, local_server):
    serve(
        local_server,
        status=429,
        headers={"retry-after": "9"},
        body=error_body(
            "rate_limit_error", "Number of request tokens has exceeded your per-minute rate limit"
        ),
    )

    with app.app_context(), pytest.raises(LLMRateLimitError) as caught:
        get_llm().chat_stream([{"role": "user", "content": "Hi"}], model=MODEL)

    assert caught.value.retry_after == 9
    assert isinstance(caught.value.__cause__, anthropic.RateLimitError)


# --- async ----------------------------------------------------------------------------------------


def test_async_chat(app, local_server):
    recorder = serve(
        local_server,
        body=message(
            [{"type": "tool_use", "id": "toolu_01A", "name": "get_weather", "input": {"city": "Paris"}}],
            stop_reason="tool_use",
        ),
    )

    async def main() -> tuple[ChatResponse, ChatResponse]:
        llm = get_llm()
        first = await llm.achat(
            [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather?"}],
            model=MODEL,
            tools=[WEATHER_TOOL],
            tool_choice="get_weather",
        )
        second = await llm.achat([{"role": "user", "content": "Again"}], model=MODEL)
        return first, second

    with app.app_context():
        first, _ = asyncio.run(main())

    assert recorder.request_headers[0]["authorization"] == f"Bearer {CANARY_KEY}"
    assert recorder.requests[0]["system"] == "Be brief."
    assert recorder.requests[0]["tool_choice"] == {"type": "tool", "name": "get_weather"}
    assert first.tool_calls == [ToolCall("toolu_01A", "get_weather", {"city": "Paris"})]
    assert first.finish_reason == "tool_calls"
    assert (first.input_tokens, first.output_tokens, first.total_tokens) == (12, 6, 18)
    assert len(recorder.requests) == 2


def test_async_stream(app, local_server):
    recorder = serve(
        local_server,
        stream=sse(
            message_start(input_tokens=9),
            *text_block(0, "Bon", "jour"),
            PING,
            *tool_block(1, "toolu_01A", "get_weather", '{"city": "Paris"}'),
            *message_end("tool_use", output_tokens=3),
        ),
    )

    async def main() -> tuple[list[str], ChatResponse]:
        stream = get_llm().achat_stream(
            [{"role": "user", "content": "Hi"}], model=MODEL, tools=[WEATHER_TOOL]
        )
        deltas = [text async for text in stream]
        return deltas, stream.response

    with app.app_context():
        deltas, response = asyncio.run(main())

    assert recorder.last["stream"] is True
    assert deltas == ["Bon", "jour"]
    assert response.content == "Bonjour"
    assert response.tool_calls == [ToolCall("toolu_01A", "get_weather", {"city": "Paris"})]
    assert response.finish_reason == "tool_calls"
    assert (response.input_tokens, response.output_tokens, response.total_tokens) == (9, 3, 12)


def test_async_errors_are_typed(app, local_server):
    serve(local_server, status=401, body=error_body("authentication_error", "invalid x-api-key"))

    async def chat_once() -> None:
        await get_llm().achat([{"role": "user", "content": "Hi"}], model=MODEL)

    async def stream_once() -> None:
        async for _ in get_llm().achat_stream([{"role": "user", "content": "Hi"}], model=MODEL):
            pass

    with app.app_context():
        for call in (chat_once, stream_once):
            with pytest.raises(LLMAuthError) as caught:
                asyncio.run(call())
            assert isinstance(caught.value.__cause__, anthropic.AuthenticationError)
            assert caught.value.status_code == 401


def test_one_async_client_per_event_loop_and_reset_closes_it(app, local_server):
    serve(local_server)

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


def test_embeddings_are_a_bad_request_naming_the_alternative(app, local_server):
    recorder = serve(local_server)

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


def test_list_models(app, local_server):
    local_server.expect_request("/v1/models", method="GET").respond_with_json(
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
    assert local_server.log[-1][0].headers["Authorization"] == f"Bearer {CANARY_KEY}"


# --- errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "kind", "text", "error_class", "headers", "retry_after"),
    [
        (400, "invalid_request_error", "messages: roles must alternate", LLMBadRequestError, {}, None),
        (400, "invalid_request_error", "prompt is too long: 212432 tokens > 200000 maximum",
         LLMContextLengthError, {}, None),
        (401, "authentication_error", f"invalid x-api-key {CANARY_KEY}", LLMAuthError, {}, None),
        (403, "permission_error", "Your API key does not have permission to use the specified resource.",
         LLMPermissionError, {}, None),
        (404, "not_found_error", "model: claude-sonnet-4-5", LLMNotFoundError, {}, None),
        (429, "rate_limit_error", "Number of request tokens has exceeded your per-minute rate limit",
         LLMRateLimitError, {"retry-after": "9"}, 9),
        (500, "api_error", "Internal server error", LLMServerError, {}, None),
        (529, "overloaded_error", "Overloaded", LLMServerError, {"retry-after-ms": "1500"}, 1.5),
    ],
    ids=["400", "400-prompt-too-long", "401", "403", "404", "429", "500", "529"],
)  # fmt: skip
def test_http_errors_are_typed(app, local_server, status, kind, text, error_class, headers, retry_after):
    serve(local_server, status=status, headers=headers, body=error_body(kind, text))

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


def test_timeout(make_app, local_server):
    serve(local_server, delay=1.5)
    app = make_app(
        ANTHROPIC_API_KEY=CANARY_KEY,
        ANTHROPIC_BASE_URL=local_server.url_for("/").rstrip("/"),
        ANTHROPIC_MAX_RETRIES=0,
        ANTHROPIC_TIMEOUT=0.5,
    )

    started = time.monotonic()
    with pytest.raises(LLMTimeoutError) as caught:
        chat(app)

    assert time.monotonic() - started < 1.4
    assert isinstance(caught.value.__cause__, anthropic.APITimeoutError)
    assert caught.value.provider == "anthropic"
    assert CANARY_KEY not in str(caught.value)


def test_connection_refused(make_app):
    app = make_app(
        ANTHROPIC_API_KEY=CANARY_KEY,
        ANTHROPIC_BASE_URL=f"http://127.0.0.1:{free_port()}",
        ANTHROPIC_MAX_RETRIES=0,
    )

    with pytest.raises(LLMConnectionError) as caught:
        chat(app)
    with app.app_context(), pytest.raises(LLMConnectionError):
        get_llm().chat_stream([{"role": "user", "content": "Hi"}], model=MODEL)

    assert type(caught.value) is LLMConnectionError
    assert isinstance(caught.value.__cause__, anthropic.APIConnectionError)
    assert not isinstance(caught.value.__cause__, anthropic.APITimeoutError)
    assert CANARY_KEY not in str(caught.value)


def test_missing_key_is_a_not_configured_error_naming_the_setting(make_app, local_server):
    recorder = serve(local_server)
    app = make_app(ANTHROPIC_BASE_URL=local_server.url_for("/").rstrip("/"))

    with pytest.raises(LLMNotConfiguredError) as caught:
        chat(app)

    assert caught.value.setting == "ANTHROPIC_API_KEY"
    assert caught.value.provider == "anthropic"
    assert recorder.requests == []


def test_without_the_sdk_installed_the_provider_is_not_configured(app, local_server, monkeypatch):
    """The SDK is an optional extra: without it, "anthropic/..." is a typed error naming the extra."""
    recorder = serve(local_server)
    monkeypatch.setitem(sys.modules, "anthropic", None)  # what an absent package looks like to import
    monkeypatch.delitem(sys.modules, "app.llm.providers.anthropic_provider", raising=False)

    with pytest.raises(LLMNotConfiguredError) as caught:
        chat(app)

    assert "pip install '.[anthropic]'" in str(caught.value)
    assert caught.value.provider == "anthropic"
    assert recorder.requests == []


# --- closing a stream early closes the upstream connection ----------------------------------


class SlowStreamServer:
    """Streams a message's first events, then pings every 50 ms until the client goes away.

    ``disconnected`` is set when the server sees the client close the connection;
    ``finished`` when it ran out of pings (the client never closed).
    """

    def __init__(self, duration: float = 8.0) -> None:
        self.disconnected = threading.Event()
        self.finished = threading.Event()
        self.first_sent = threading.Event()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                try:
                    self._chunk(sse(message_start(), *text_block(0, "first")[:2]))
                    owner.first_sent.set()
                    deadline = time.monotonic() + duration
                    while time.monotonic() < deadline:
                        if self._peer_closed():
                            owner.disconnected.set()
                            return
                        self._chunk(sse(PING))
                        time.sleep(0.05)
                    owner.finished.set()
                except (BrokenPipeError, ConnectionResetError):
                    owner.disconnected.set()

            def _chunk(self, text: str) -> None:
                data = text.encode()
                self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                self.wfile.flush()

            def _peer_closed(self) -> bool:
                readable, _, _ = select.select([self.connection], [], [], 0)
                if not readable:
                    return False
                try:
                    return self.connection.recv(1, socket.MSG_PEEK) == b""
                except (ConnectionResetError, OSError):
                    return True

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def slow_stream_server() -> Iterator[SlowStreamServer]:
    server = SlowStreamServer()
    yield server
    server.stop()


@pytest.fixture
def slow_app(make_app, slow_stream_server):
    return make_app(
        ANTHROPIC_API_KEY=CANARY_KEY, ANTHROPIC_BASE_URL=slow_stream_server.url, ANTHROPIC_MAX_RETRIES=0
    )


def test_closing_a_stream_early_closes_the_upstream_connection(slow_app, slow_stream_server):
    with slow_app.app_context():
        stream = get_llm().chat_stream([{"role": "user", "content": "Hi"}], model=MODEL)
        assert next(stream) == "first"
        assert not slow_stream_server.disconnected.is_set()  # the upstream is still streaming
        stream.close()

        assert slow_stream_server.disconnected.wait(3)
        assert not slow_stream_server.finished.is_set()
        with pytest.raises(RuntimeError):
            _ = stream.response  # never read to the end


def test_closing_an_unread_stream_closes_the_upstream_connection(slow_app, slow_stream_server):
    with slow_app.app_context():
        stream = get_llm().chat_stream([{"role": "user", "content": "Hi"}], model=MODEL)
        assert slow_stream_server.first_sent.wait(3)  # the request is open before the first read
        stream.close()

        assert slow_stream_server.disconnected.wait(3)


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


def test_closing_an_async_stream_early_closes_the_upstream_connection(slow_app, slow_stream_server):
    async def main() -> bool:
        stream = get_llm().achat_stream([{"role": "user", "content": "Hi"}], model=MODEL)
        assert await stream.__anext__() == "first"
        assert not slow_stream_server.disconnected.is_set()
        # Hold the SDK's stream, as a reference cycle or a traceback might: then only the
        # adapter's explicit close ends the response (dropping it would let GC close it).
        upstream = _held_upstream(stream._events)
        assert isinstance(upstream, anthropic.AsyncStream)
        await stream.aclose()
        assert upstream.response.is_closed
        return await asyncio.to_thread(slow_stream_server.disconnected.wait, 3)

    with slow_app.app_context():
        assert asyncio.run(main())
    assert not slow_stream_server.finished.is_set()
