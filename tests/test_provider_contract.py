"""One contract, every adapter: what ``get_llm()`` promises whichever provider answers.

Each case runs against the OpenAI, Gemini and Anthropic adapters, through the
real SDKs, against :class:`tests.servers.ScriptedServer` speaking that
provider's wire format. A :class:`Dialect` maps the contract's cases (a text
answer, a stream, tool calls, an error, an error inside a stream) to each
provider's paths and payloads (:mod:`tests.payloads`), and reads back what
the SDK sent. Provider-specific behaviour (translation details, finish-reason
tables, provider error bodies) stays in ``test_llm_<provider>.py``.
"""

from __future__ import annotations

import asyncio
import email.utils
import gc
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import anthropic
import httpx2
import openai
import pytest
from flask import Flask
from google.genai import errors as genai_errors
from pydantic import BaseModel

from app.config import DEFAULTS
from app.llm import (
    ChatResponse,
    LLMAuthError,
    LLMBadRequestError,
    LLMConnectionError,
    LLMError,
    LLMNotConfiguredError,
    LLMRateLimitError,
    LLMResponseError,
    LLMServerError,
    LLMTimeoutError,
    ToolCall,
    get_llm,
)
from tests import payloads as p
from tests.conftest import CANARY_GEMINI_KEY, CANARY_KEY
from tests.servers import HANG, Chunk, Recorded, Reply, ScriptedServer, free_port

USER = [{"role": "user", "content": "Capital of France?"}]


class City(BaseModel):
    name: str
    population: int


def get_weather(city: str) -> str:
    """The current weather in a city."""
    return "sunny"


TIME_TOOL = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "The local time in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
CALLS = [
    ToolCall("call_a", "get_weather", {"city": "Paris"}),
    ToolCall("call_b", "get_time", {"city": "Tokyo"}),
]


# --- the dialects ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Dialect:
    """How one provider speaks each case of the contract on the wire."""

    name: str
    #: What the application passes to ``get_llm()``, and the model errors name.
    address: str
    model: str
    #: The model the answers name (``response.model``).
    served_model: str
    key: str
    key_setting: str
    timeout_setting: str
    settings: Callable[[ScriptedServer], dict[str, Any]]
    chat_path: str
    stream_path: str
    #: The SDK's exception classes the layer's errors are caused by.
    status_error: type[BaseException]
    timeout_cause: type[BaseException]
    connection_cause: type[BaseException]
    event_cause: type[BaseException]
    #: The status an error inside a stream carries (what a retry decision reads).
    event_status: int | None
    #: Answers: a text (with usage), tool calls, and the same as stream events.
    answer: Callable[[str, tuple[int, int]], dict[str, Any]]
    tool_answer: Callable[[Sequence[ToolCall]], dict[str, Any]]
    stream: Callable[[Sequence[str], tuple[int, int]], list[Chunk]]
    tool_stream: Callable[[str, Sequence[ToolCall]], list[Chunk]]
    #: An error body for a status and message, and an error arriving inside a stream.
    error: Callable[[int, str], dict[str, Any]]
    error_event: Chunk
    #: What the SDK sent: the last user text, the tool names, the JSON schema asked for.
    sent_text: Callable[[dict[str, Any]], str]
    sent_tools: Callable[[dict[str, Any]], list[str]]
    sent_schema: Callable[[dict[str, Any]], dict[str, Any]]
    sent_key: Callable[[Recorded], str]

    def __str__(self) -> str:
        return self.name


def _openai_tool_stream(text: str, calls: Sequence[ToolCall]) -> list[Chunk]:
    chunks = [p.openai_role_chunk(), *p.openai_text_chunks(text)]
    for index, call in enumerate(calls):
        arguments = json.dumps(call.arguments)
        chunks += p.openai_tool_chunks(index, call.id, call.name, arguments[:5], arguments[5:])
    chunks += [p.openai_chunk({}, "tool_calls"), p.openai_usage_chunk(30, 12)]
    return [p.sse_data(c) for c in chunks] + [p.sse_data("[DONE]")]


OPENAI = Dialect(
    name="openai",
    address="openai/gpt-4o-mini",
    model="gpt-4o-mini",
    served_model="gpt-4o-mini-2024-07-18",
    key=CANARY_KEY,
    key_setting="OPENAI_API_KEY",
    timeout_setting="OPENAI_TIMEOUT",
    settings=lambda server: {"OPENAI_API_KEY": CANARY_KEY, "OPENAI_BASE_URL": server.url_for("/v1")},
    chat_path="/v1/chat/completions",
    stream_path="/v1/chat/completions",
    status_error=openai.APIStatusError,
    timeout_cause=openai.APITimeoutError,
    connection_cause=openai.APIConnectionError,
    event_cause=openai.APIError,
    event_status=None,
    answer=lambda text, usage: p.chat_completion(text, "gpt-4o-mini-2024-07-18", usage=usage),
    tool_answer=lambda calls: p.chat_completion(
        None,
        "gpt-4o-mini-2024-07-18",
        tool_calls=[p.function_call(c.id, c.name, json.dumps(c.arguments)) for c in calls],
        finish_reason="tool_calls",
    ),
    stream=lambda pieces, usage: list(p.openai_text_events(*pieces, usage=usage)),
    tool_stream=_openai_tool_stream,
    error=lambda status, message: p.openai_error(message, "invalid_request_error", None),
    error_event=p.sse_data(p.openai_error("The server had an error.", "server_error", None)),
    sent_text=lambda body: body["messages"][-1]["content"],
    sent_tools=lambda body: [tool["function"]["name"] for tool in body["tools"]],
    sent_schema=lambda body: body["response_format"]["json_schema"]["schema"],
    sent_key=lambda request: request.headers["authorization"].removeprefix("Bearer "),
)


def _gemini_parts(calls: Sequence[ToolCall]) -> list[dict[str, Any]]:
    return [p.gemini_call(c.name, c.arguments, c.id) for c in calls]


GEMINI = Dialect(
    name="gemini",
    address="gemini/gemini-2.5-flash",
    model="gemini-2.5-flash",
    served_model="gemini-2.5-flash-001",
    key=CANARY_GEMINI_KEY,
    key_setting="GEMINI_API_KEY",
    timeout_setting="GENAI_TIMEOUT",
    settings=lambda server: {
        "GEMINI_API_KEY": CANARY_GEMINI_KEY,
        "GENAI_BASE_URL": server.url_for("/"),
        "GENAI_API_VERSION": "v1beta",
    },
    chat_path="/v1beta/models/gemini-2.5-flash:generateContent",
    stream_path="/v1beta/models/gemini-2.5-flash:streamGenerateContent",
    status_error=genai_errors.APIError,
    timeout_cause=httpx2.TimeoutException,
    connection_cause=httpx2.ConnectError,
    event_cause=genai_errors.ServerError,
    event_status=503,
    answer=lambda text, usage: p.gemini_reply(p.gemini_text(text), usage=usage),
    tool_answer=lambda calls: p.gemini_reply(*_gemini_parts(calls)),
    stream=lambda pieces, usage: [
        *(p.gemini_event(p.gemini_text_chunk(piece)) for piece in pieces[:-1]),
        p.gemini_event(p.gemini_reply(p.gemini_text(pieces[-1]), usage=usage)),
    ],
    tool_stream=lambda text, calls: [
        p.gemini_event(p.gemini_text_chunk(text)),
        p.gemini_event(p.gemini_reply(*_gemini_parts(calls), usage=(30, 12))),
    ],
    error=lambda status, message: p.gemini_error(
        status,
        {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 429: "RESOURCE_EXHAUSTED"}.get(status, "INTERNAL"),
        message,
    ),
    error_event=p.gemini_event(p.gemini_error(503, "UNAVAILABLE", "The model is overloaded.")),
    sent_text=lambda body: body["contents"][-1]["parts"][0]["text"],
    sent_tools=lambda body: [d["name"] for d in body["tools"][0]["functionDeclarations"]],
    sent_schema=lambda body: body["generationConfig"]["responseJsonSchema"],
    sent_key=lambda request: request.headers["x-goog-api-key"],
)

ANTHROPIC = Dialect(
    name="anthropic",
    address="anthropic/claude-sonnet-4-6",
    model="claude-sonnet-4-6",
    served_model="claude-sonnet-4-6",
    key=CANARY_KEY,
    key_setting="ANTHROPIC_API_KEY",
    timeout_setting="ANTHROPIC_TIMEOUT",
    settings=lambda server: {"ANTHROPIC_API_KEY": CANARY_KEY, "ANTHROPIC_BASE_URL": server.base_url},
    chat_path="/v1/messages",
    stream_path="/v1/messages",
    status_error=anthropic.APIStatusError,
    timeout_cause=anthropic.APITimeoutError,
    connection_cause=anthropic.APIConnectionError,
    event_cause=anthropic.APIStatusError,
    event_status=529,
    answer=lambda text, usage: p.anthropic_message(
        [{"type": "text", "text": text}], usage={"input_tokens": usage[0], "output_tokens": usage[1]}
    ),
    tool_answer=lambda calls: p.anthropic_message(
        [p.anthropic_tool_use(c.id, c.name, c.arguments) for c in calls], stop_reason="tool_use"
    ),
    stream=lambda pieces, usage: [
        p.anthropic_event(event)
        for event in [
            p.anthropic_message_start(usage[0]),
            *p.anthropic_text_block(0, *pieces),
            *p.anthropic_message_end(output_tokens=usage[1]),
        ]
    ],
    tool_stream=lambda text, calls: [
        p.anthropic_event(event)
        for event in [
            p.anthropic_message_start(30),
            *p.anthropic_text_block(0, text),
            p.ANTHROPIC_PING,
            *(
                e
                for i, c in enumerate(calls, 1)
                for e in p.anthropic_tool_block(i, c.id, c.name, json.dumps(c.arguments))
            ),
            *p.anthropic_message_end("tool_use", output_tokens=12),
        ]
    ],
    error=lambda status, message: p.anthropic_error(
        {400: "invalid_request_error", 401: "authentication_error", 429: "rate_limit_error"}.get(
            status, "api_error"
        ),
        message,
    ),
    error_event=p.anthropic_event(
        {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
    ),
    sent_text=lambda body: body["messages"][-1]["content"][-1]["text"],
    sent_tools=lambda body: [tool["name"] for tool in body["tools"]],
    sent_schema=lambda body: body["output_config"]["format"]["schema"],
    sent_key=lambda request: request.headers["authorization"].removeprefix("Bearer "),
)


@pytest.fixture(params=[OPENAI, GEMINI, ANTHROPIC], ids=str)
def dialect(request: pytest.FixtureRequest) -> Dialect:
    return request.param


@pytest.fixture
def app(make_app: Callable[..., Flask], upstream: ScriptedServer, dialect: Dialect) -> Flask:
    """An app whose provider points at the test's upstream; no retries unless a test asks."""
    return make_app(dialect.settings(upstream), LLM_MAX_RETRIES=0)


# --- calling the layer -------------------------------------------------------------------------


def call(app: Flask, dialect: Dialect, mode: str, **kwargs: Any) -> ChatResponse:
    """``chat`` or ``achat`` with the user message."""
    with app.app_context():
        if mode == "sync":
            return get_llm().chat(USER, model=dialect.address, **kwargs)
        return asyncio.run(get_llm().achat(USER, model=dialect.address, **kwargs))


def stream(app: Flask, dialect: Dialect, mode: str, **kwargs: Any) -> tuple[list[str], ChatResponse]:
    """``chat_stream`` or ``achat_stream`` read to the end: the deltas and the final response."""
    with app.app_context():
        if mode == "sync":
            chat_stream = get_llm().chat_stream(USER, model=dialect.address, **kwargs)
            return list(chat_stream), chat_stream.response

        async def read() -> tuple[list[str], ChatResponse]:
            achat_stream = get_llm().achat_stream(USER, model=dialect.address, **kwargs)
            return [delta async for delta in achat_stream], achat_stream.response

        return asyncio.run(read())


MODES = pytest.mark.parametrize("mode", ["sync", "async"])


def assert_sent(dialect: Dialect, request: Recorded, path: str, streamed: bool) -> dict[str, Any]:
    """The request that reached the server: its path, key, model, user text; its body."""
    body = request.json
    assert (request.method, request.path) == ("POST", path)
    assert dialect.sent_key(request) == dialect.key
    assert dialect.sent_text(body) == USER[0]["content"]
    if dialect is GEMINI:
        assert request.query == ({"alt": "sse"} if streamed else {})
    else:
        assert body["model"] == dialect.model
        assert body.get("stream", False) is streamed
    return body


# --- chat and stream ---------------------------------------------------------------------------


@MODES
def test_chat_sends_the_request_and_reads_text_and_usage(app, upstream, dialect, mode):
    upstream.script(dialect.chat_path, dialect.answer("Paris.", (13, 8)))

    response = call(app, dialect, mode)

    assert_sent(dialect, upstream.only_request(), dialect.chat_path, streamed=False)
    assert isinstance(response, ChatResponse)
    assert response.content == "Paris."
    assert (response.provider, response.model) == (dialect.name, dialect.served_model)
    assert response.finish_reason == "stop"
    assert (response.input_tokens, response.output_tokens, response.total_tokens) == (13, 8, 21)
    assert response.tool_calls == [] and not response.has_tool_calls
    assert response.parsed is None
    assert response.latency_ms > 0


@MODES
def test_stream_yields_text_deltas_then_the_full_response_with_usage(app, upstream, dialect, mode):
    upstream.script(dialect.stream_path, Reply.stream(dialect.stream(["Par", "is", "."], (17, 4))))

    deltas, response = stream(app, dialect, mode)

    assert_sent(dialect, upstream.only_request(), dialect.stream_path, streamed=True)
    assert deltas == ["Par", "is", "."]
    assert response.content == "Paris."
    assert (response.provider, response.model) == (dialect.name, dialect.served_model)
    assert response.finish_reason == "stop"
    assert (response.input_tokens, response.output_tokens, response.total_tokens) == (17, 4, 21)
    assert response.tool_calls == []


@MODES
def test_a_stream_response_is_not_ready_before_the_end(app, upstream, dialect, mode):
    upstream.script(dialect.stream_path, Reply.stream(dialect.stream(["a", "b"], (1, 2))))

    async def read_async() -> None:
        achat_stream = get_llm().achat_stream(USER, model=dialect.address)
        assert await achat_stream.__anext__() == "a"
        with pytest.raises(RuntimeError, match="read to the end"):
            achat_stream.response
        assert [delta async for delta in achat_stream] == ["b"]
        assert achat_stream.response.content == "ab"

    with app.app_context():
        if mode == "async":
            asyncio.run(read_async())
            return
        chat_stream = get_llm().chat_stream(USER, model=dialect.address)
        assert next(chat_stream) == "a"
        with pytest.raises(RuntimeError, match="read to the end"):
            chat_stream.response
        assert list(chat_stream) == ["b"]
        assert chat_stream.response.content == "ab"


# --- tools -------------------------------------------------------------------------------------


@MODES
def test_tools_are_sent_and_parallel_tool_calls_parsed(app, upstream, dialect, mode):
    upstream.script(dialect.chat_path, dialect.tool_answer(CALLS))

    response = call(app, dialect, mode, tools=[get_weather, TIME_TOOL])

    body = assert_sent(dialect, upstream.only_request(), dialect.chat_path, streamed=False)
    assert dialect.sent_tools(body) == ["get_weather", "get_time"]
    assert response.tool_calls == CALLS
    assert response.has_tool_calls
    assert response.content is None
    assert response.finish_reason == "tool_calls"


@MODES
def test_streamed_text_then_tool_calls_add_up_in_the_response(app, upstream, dialect, mode):
    upstream.script(dialect.stream_path, Reply.stream(dialect.tool_stream("Checking.", CALLS)))

    deltas, response = stream(app, dialect, mode, tools=[get_weather, TIME_TOOL])

    body = assert_sent(dialect, upstream.only_request(), dialect.stream_path, streamed=True)
    assert dialect.sent_tools(body) == ["get_weather", "get_time"]
    assert deltas == ["Checking."]
    assert response.content == "Checking."
    assert response.tool_calls == CALLS
    assert response.finish_reason == "tool_calls"
    assert (response.input_tokens, response.output_tokens, response.total_tokens) == (30, 12, 42)


# --- structured output -------------------------------------------------------------------------

PARIS = '{"name": "Paris", "population": 2102650}'


def _assert_schema_sent(dialect: Dialect, upstream: ScriptedServer) -> None:
    schema = dialect.sent_schema(upstream.only_request().json)
    assert schema["type"] == "object"
    assert set(schema["properties"]) == {"name", "population"}


@MODES
def test_structured_output_sends_the_schema_and_parses_the_answer(app, upstream, dialect, mode):
    upstream.script(dialect.chat_path, dialect.answer(PARIS, (5, 9)))

    response = call(app, dialect, mode, response_format=City)

    _assert_schema_sent(dialect, upstream)
    assert response.parsed == City(name="Paris", population=2102650)
    assert response.content == PARIS


def test_streamed_structured_output_is_parsed_at_the_end(app, upstream, dialect):
    upstream.script(dialect.stream_path, Reply.stream(dialect.stream([PARIS[:12], PARIS[12:]], (5, 9))))

    deltas, response = stream(app, dialect, "sync", response_format=City)

    _assert_schema_sent(dialect, upstream)
    assert "".join(deltas) == PARIS
    assert response.parsed == City(name="Paris", population=2102650)


@pytest.mark.parametrize(
    "text",
    ['{"name": "Paris", "population": "many"}', '{"name": "Paris", "popul'],
    ids=["schema-mismatch", "truncated"],
)
@pytest.mark.parametrize("how", ["chat", "stream"])
def test_structured_output_that_does_not_validate_is_a_response_error_with_the_raw_text(
    app, upstream, dialect, how, text
):
    if how == "chat":
        upstream.script(dialect.chat_path, dialect.answer(text, (5, 9)))
    else:
        upstream.script(dialect.stream_path, Reply.stream(dialect.stream([text[:10], text[10:]], (5, 9))))

    with pytest.raises(LLMResponseError) as caught:
        if how == "chat":
            call(app, dialect, "sync", response_format=City)
        else:
            stream(app, dialect, "sync", response_format=City)

    assert caught.value.raw_text == text
    assert (caught.value.provider, caught.value.model) == (dialect.name, dialect.model)
    if text.endswith('"many"}'):
        assert "population" in str(caught.value)  # which field failed


# --- errors ------------------------------------------------------------------------------------

ERRORS = {
    "401": (401, {}, LLMAuthError, None),
    "429-retry-after": (429, {"Retry-After": "7"}, LLMRateLimitError, 7.0),
    "429-retry-after-date": (429, {"Retry-After": "HTTP-DATE+30"}, LLMRateLimitError, 30.0),
    "400": (400, {}, LLMBadRequestError, None),
    "500": (500, {}, LLMServerError, None),
}
#: Every error in sync calls and streams; async calls share the mapping, so three of them suffice there.
ERROR_CASES = [
    pytest.param(how, *ERRORS[name], id=f"{name}-{how}")
    for how in ("chat", "stream", "achat", "astream")
    for name in ERRORS
    if how in ("chat", "stream") or name in ("401", "429-retry-after", "500")
]


def _http_date(seconds_from_now: float) -> str:
    return email.utils.formatdate(time.time() + seconds_from_now, usegmt=True)


@pytest.mark.parametrize(("how", "status", "headers", "error_class", "retry_after"), ERROR_CASES)
def test_http_errors_are_typed_after_one_request_without_retries(
    app, upstream, dialect, how, status, headers, error_class, retry_after
):
    headers = {k: _http_date(30) if v == "HTTP-DATE+30" else v for k, v in headers.items()}
    message = f"refused (key {dialect.key})"  # providers echo keys back: the layer must not
    path = dialect.chat_path if how in ("chat", "achat") else dialect.stream_path
    upstream.script(path, Reply(status, dialect.error(status, message), headers))

    with pytest.raises(LLMError) as caught, app.app_context():
        if how == "chat":
            get_llm().chat(USER, model=dialect.address)
        elif how == "stream":
            get_llm().chat_stream(USER, model=dialect.address)  # raised on opening, before any read
        else:
            stream(app, dialect, "async") if how == "astream" else call(app, dialect, "async")

    error = caught.value
    assert type(error) is error_class
    assert (error.provider, error.model, error.status_code) == (dialect.name, dialect.model, status)
    if retry_after is None:
        assert error.retry_after is None
    else:
        assert error.retry_after == pytest.approx(retry_after, abs=2)
    assert isinstance(error.__cause__, dialect.status_error)
    assert "refused" in str(error)
    assert str(error).startswith(f"{dialect.name}/{dialect.model}: ")
    for text in (str(error), repr(error), error.message):
        assert dialect.key not in text
    assert len(upstream.requests) == 1  # LLM_MAX_RETRIES=0: no retry


@pytest.mark.parametrize("how", ["chat", "stream"])
def test_retryable_failures_are_retried_with_the_default_retries(make_app, upstream, dialect, how):
    path = dialect.chat_path if how == "chat" else dialect.stream_path
    answer = dialect.answer("ok", (1, 1)) if how == "chat" else Reply.stream(dialect.stream(["ok"], (1, 1)))
    upstream.script(
        path,
        Reply(500, dialect.error(500, "Internal error")),
        Reply(429, dialect.error(429, "Slow down"), {"Retry-After": "0"}),
        answer,
    )
    # The default number of retries; only the backoff is shortened so the test stays fast.
    app = make_app(
        dialect.settings(upstream), LLM_MAX_RETRIES=DEFAULTS["LLM_MAX_RETRIES"], LLM_BACKOFF_BASE=0.001
    )

    if how == "chat":
        response = call(app, dialect, "sync")
    else:
        deltas, response = stream(app, dialect, "sync")
        assert deltas == ["ok"]

    assert DEFAULTS["LLM_MAX_RETRIES"] == 2
    assert response.content == "ok"
    assert [request.path for request in upstream.requests] == [path] * 3


def test_a_bad_request_is_not_retried_even_with_retries_on(make_app, upstream, dialect):
    upstream.script(
        dialect.chat_path, Reply(400, dialect.error(400, "Invalid value")), dialect.answer("no", (1, 1))
    )
    app = make_app(dialect.settings(upstream), LLM_MAX_RETRIES=2, LLM_BACKOFF_BASE=0.001)

    with pytest.raises(LLMBadRequestError):
        call(app, dialect, "sync")

    assert len(upstream.requests) == 1


def test_an_error_inside_a_stream_is_typed_after_the_deltas_before_it(app, upstream, dialect):
    events = dialect.stream(["Hel", "lo"], (1, 1))
    first = next(i for i, event in enumerate(events) if "Hel" in str(event))
    upstream.script(dialect.stream_path, Reply.stream([*events[: first + 1], dialect.error_event]))
    received: list[str] = []

    with app.app_context(), pytest.raises(LLMServerError) as caught:
        for delta in get_llm().chat_stream(USER, model=dialect.address):
            received.append(delta)

    assert received == ["Hel"]
    assert (caught.value.provider, caught.value.model) == (dialect.name, dialect.model)
    assert isinstance(caught.value.__cause__, dialect.event_cause)
    assert caught.value.status_code == dialect.event_status
    assert len(upstream.requests) == 1


@pytest.mark.parametrize("how", ["chat", "stream"])
def test_an_upstream_that_never_answers_is_a_timeout_error(make_app, upstream, dialect, how):
    path = dialect.chat_path if how == "chat" else dialect.stream_path
    upstream.script(path, HANG)
    app = make_app(dialect.settings(upstream), LLM_MAX_RETRIES=0, **{dialect.timeout_setting: 0.2})

    started = time.monotonic()
    with pytest.raises(LLMTimeoutError) as caught:
        if how == "chat":
            call(app, dialect, "sync")
        else:
            stream(app, dialect, "sync")

    assert time.monotonic() - started < 1.2  # it did not wait for the answer
    error = caught.value
    assert (error.provider, error.model, error.status_code) == (dialect.name, dialect.model, None)
    assert isinstance(error.__cause__, dialect.timeout_cause)
    assert dialect.key not in str(error)
    [request] = upstream.requests
    assert request.finished.wait(2) and request.outcome == "client_closed"  # the client hung up


def test_a_refused_connection_is_a_connection_error(make_app, dialect):
    class Nowhere:
        base_url = f"http://127.0.0.1:{free_port()}"

        def url_for(self, path: str) -> str:
            return self.base_url + path

    app = make_app(dialect.settings(Nowhere()), LLM_MAX_RETRIES=0)  # type: ignore[arg-type]

    for attempt in (lambda: call(app, dialect, "sync"), lambda: stream(app, dialect, "sync")):
        with pytest.raises(LLMConnectionError) as caught:
            attempt()
        error = caught.value
        assert type(error) is LLMConnectionError
        assert (error.provider, error.model, error.status_code) == (dialect.name, dialect.model, None)
        assert isinstance(error.__cause__, dialect.connection_cause)
        assert dialect.key not in str(error)


def test_a_missing_key_is_not_configured_and_nothing_is_sent(make_app, upstream, dialect):
    settings = {k: v for k, v in dialect.settings(upstream).items() if k != dialect.key_setting}
    app = make_app(settings)

    with pytest.raises(LLMNotConfiguredError) as caught:
        stream(app, dialect, "sync")

    assert caught.value.setting == dialect.key_setting
    assert caught.value.provider == dialect.name
    assert upstream.requests == []


# --- closing a stream early closes the upstream connection --------------------------------------

PIECES = 200  # 0.02 s apart: about 4 s if nobody closes the stream


def _slow_stream(dialect: Dialect) -> Reply:
    events = dialect.stream([f"w{i} " for i in range(PIECES)], (1, PIECES))
    return Reply.stream([item for event in events for item in (event, 0.02)])


def _close_sync(app: Flask, dialect: Dialect, how: str) -> None:
    with app.app_context():
        if how == "with-block":
            with get_llm().chat_stream(USER, model=dialect.address) as chat_stream:
                assert next(chat_stream) == "w0 "
            return
        chat_stream = get_llm().chat_stream(USER, model=dialect.address)
        if how == "read-one":
            assert next(chat_stream) == "w0 "
        chat_stream.close()
        with pytest.raises(RuntimeError):
            chat_stream.response  # never read to the end


def _close_async(app: Flask, dialect: Dialect, how: str) -> None:
    async def main() -> None:
        if how == "async-with":
            async with get_llm().achat_stream(USER, model=dialect.address) as achat_stream:
                assert await achat_stream.__anext__() == "w0 "
            return
        achat_stream = get_llm().achat_stream(USER, model=dialect.address)
        assert await achat_stream.__anext__() == "w0 "
        await achat_stream.aclose()
        # The loop keeps running here, as in a server: the SDK's inner generators finalise on it.
        await asyncio.sleep(0.05)

    with app.app_context():
        asyncio.run(main())


@pytest.mark.parametrize("how", ["read-one", "unread", "with-block", "aclose", "async-with"])
def test_closing_a_stream_early_closes_the_upstream_connection(app, upstream, dialect, how, caplog):
    upstream.script(dialect.stream_path, _slow_stream(dialect))
    # Clients of earlier tests, collected while this test's loop runs, would schedule their own
    # aclose() on it (google-genai's BaseApiClient.__del__ does): collect them first, with no loop.
    gc.collect()

    started = time.monotonic()
    if how in ("aclose", "async-with"):
        _close_async(app, dialect, how)
    else:
        _close_sync(app, dialect, how)

    [request] = upstream.requests
    assert request.finished.wait(2), "the server kept streaming into an open connection"
    assert request.outcome == "client_closed"
    assert request.chunks_sent < PIECES // 2
    assert upstream.wait_closed(request.port, 2)
    assert time.monotonic() - started < 2
    # The SDK's generators were finalised in order, not by the garbage collector.
    assert [r.getMessage() for r in caplog.records if r.name == "asyncio"] == []
