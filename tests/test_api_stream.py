"""``POST /api/chat`` with ``"stream": true``: Server-Sent Events from a real streaming upstream.

The upstream is the ``upstream`` fixture (:class:`tests.servers.ScriptedServer`)
speaking the OpenAI streaming protocol (``chat.completion.chunk`` SSE events
in a chunked body, a usage chunk, ``data: [DONE]``). Its scripted replies
write chunk by chunk, can wait on the test between chunks, break the
connection mid-body, and record whether the client closed the connection
before they sent everything. The app is driven through the Flask test client and through a
real gunicorn worker.
"""

from __future__ import annotations

import http.client
import json
import secrets
import socket
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any

import pytest

from tests.conftest import CANARY_KEY, api_key_for_env, api_key_headers
from tests.payloads import openai_chunk, sse_data
from tests.servers import CLOSE, Chunk, Reply, free_port
from tests.test_gunicorn import clean_env, run_gunicorn, wait_until_listening

MESSAGES = [{"role": "user", "content": "Hi"}]
WAIT = 10.0  # seconds any side waits for the other before giving up (a failure, never a hang)


# --- the streaming upstream (tests.servers.ScriptedServer) ---------------------------

CHAT_PATH = "/v1/chat/completions"


def chunk(
    content: str | None = None,
    *,
    finish: str | None = None,
    tool_calls: list[dict[str, Any]] | None = None,
    usage: dict[str, int] | None = None,
    role: str | None = None,
) -> dict[str, Any]:
    """One ``chat.completion.chunk`` (:func:`tests.payloads.openai_chunk`), by its delta's fields."""
    if usage:
        return {**openai_chunk(), "choices": [], "usage": usage}
    fields = (("role", role), ("content", content), ("tool_calls", tool_calls))
    return openai_chunk({name: value for name, value in fields if value is not None}, finish)


USAGE = {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12}
DONE = sse_data("[DONE]")


def as_sse(*chunks: dict[str, Any]) -> list[Chunk]:
    """Each chunk as one SSE event, written and flushed on its own."""
    return [sse_data(item) for item in chunks]


def text_answer(*texts: str) -> list[dict[str, Any]]:
    """The chunks of a plain answer: role, the texts, finish, usage."""
    return [
        chunk(role="assistant", content=""),
        *(chunk(text) for text in texts),
        chunk(finish="stop"),
        chunk(usage=USAGE),
    ]


def answer(*texts: str) -> Reply:
    """A plain streamed answer of ``texts``."""
    return Reply.stream([*as_sse(*text_answer(*texts)), DONE])


def trickle(count: int, interval: float = 0.02) -> Reply:
    """A long answer: one text chunk every ``interval`` s, ``count`` of them, then the end."""
    body: list[Chunk] = as_sse(chunk(role="assistant", content=""))
    for index in range(count):
        body += [*as_sse(chunk(f"t{index} ")), interval]
    return Reply.stream([*body, *as_sse(chunk(finish="stop"), chunk(usage=USAGE)), DONE])


#: Drop the connection in the middle of the body, as a crashing proxy does.
CUT_AFTER_FIRST_DELTA = Reply.stream(
    [*as_sse(chunk(role="assistant", content=""), chunk("partial")), 0.1, CLOSE]
)


@pytest.fixture
def stream_app(make_app, upstream):
    return make_app(
        OPENAI_API_KEY=CANARY_KEY,
        OPENAI_BASE_URL=upstream.url_for("/v1"),
        OPENAI_MAX_RETRIES=0,
    )


# --- reading SSE ---------------------------------------------------------------------


def sse_events(lines: Iterable[str]) -> Iterator[tuple[str, Any]]:
    """``(event, data)`` pairs from SSE text lines."""
    name, data = "message", []
    for line in lines:
        line = line.rstrip("\r\n")
        if not line:
            if data:
                yield name, json.loads("\n".join(data))
            name, data = "message", []
        elif line.startswith("event:"):
            name = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].strip())


def body_lines(response: Any) -> Iterator[str]:
    """The lines of a test-client response, read as the app yields them (buffered=False)."""
    pending = ""
    for piece in response.response:
        pending += piece.decode() if isinstance(piece, bytes) else piece
        while "\n" in pending:
            line, pending = pending.split("\n", 1)
            yield line + "\n"


def post_stream(app, body: dict[str, Any]):
    return app.test_client().post(
        "/api/chat", json={"stream": True, **body}, buffered=False, headers=api_key_headers(app)
    )


def assert_sse_headers(response) -> None:
    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.mimetype == "text/event-stream"
    assert response.headers["X-Accel-Buffering"] == "no"
    assert response.headers["Cache-Control"] == "no-cache"
    assert "Content-Length" not in response.headers


def assert_json_error(response, status: int, kind: str) -> dict[str, Any]:
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.mimetype == "application/json"
    text = response.get_data(as_text=True)
    assert "Traceback" not in text
    assert CANARY_KEY not in text
    error = json.loads(text)["error"]
    assert error["type"] == kind
    return error


# --- the Flask test client -----------------------------------------------------------


def test_stream_sends_one_event_per_delta_then_done_with_usage(stream_app, upstream):
    released = threading.Event()

    first = as_sse(chunk(role="assistant", content=""), chunk("Hel"))
    rest = as_sse(chunk("lo"), chunk(" there"), chunk(finish="stop"), chunk(usage=USAGE))
    # The rest only once the test has read the first delta: the view flushes it, it does not buffer.
    upstream.script(CHAT_PATH, Reply.stream([*first, released, *rest, DONE]))

    response = post_stream(stream_app, {"messages": MESSAGES, "model": "openai/gpt-4o-mini"})

    assert_sse_headers(response)
    events = sse_events(body_lines(response))
    assert next(events) == ("delta", {"text": "Hel"})
    assert upstream.only_request().outcome is None  # the upstream is still waiting for us
    released.set()
    assert list(events) == [
        ("delta", {"text": "lo"}),
        ("delta", {"text": " there"}),
        (
            "done",
            {
                "model": "gpt-4o-mini-2024-07-18",
                "provider": "openai",
                "usage": {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12},
                "finish_reason": "stop",
                "tool_calls": [],
            },
        ),
    ]
    response.close()
    exchange = upstream.only_request()
    assert exchange.finished.wait(WAIT)
    assert exchange.outcome == "complete"
    assert exchange.json["stream"] is True
    assert exchange.json["stream_options"] == {"include_usage": True}
    assert exchange.json["model"] == "gpt-4o-mini"
    assert exchange.json["messages"] == MESSAGES
    assert exchange.headers["authorization"] == f"Bearer {CANARY_KEY}"


def test_stream_with_the_old_profile_field(make_app, upstream):
    upstream.script(CHAT_PATH, answer("via profile"))
    app = make_app(
        OPENAI_API_KEY=CANARY_KEY,
        OPENAI_PROFILES={"local": {"base_url": upstream.url_for("/v1"), "api_key": "sk-" + "4" * 24}},
    )

    response = post_stream(app, {"messages": MESSAGES, "model": "llama3", "profile": "local"})

    assert_sse_headers(response)
    events = list(sse_events(body_lines(response)))
    assert events[0] == ("delta", {"text": "via profile"})
    assert events[-1][0] == "done"
    assert events[-1][1]["provider"] == "local"
    assert upstream.only_request().json["model"] == "llama3"
    assert upstream.only_request().headers["authorization"] == "Bearer sk-" + "4" * 24


def test_streamed_tool_calls_arrive_in_the_done_event(stream_app, upstream):
    upstream.script(CHAT_PATH, Reply.stream([*as_sse(
        chunk(role="assistant", tool_calls=[{"index": 0, "id": "call_1", "type": "function",
                                             "function": {"name": "get_weather", "arguments": ""}}]),
        chunk(tool_calls=[{"index": 0, "function": {"arguments": '{"city": '}}]),
        chunk(tool_calls=[{"index": 0, "function": {"arguments": '"Paris"}'}}]),
        chunk(tool_calls=[{"index": 1, "id": "call_2", "type": "function",
                           "function": {"name": "get_time", "arguments": "{}"}}]),
        chunk(finish="tool_calls"),
        chunk(usage=USAGE),
    ), DONE]))  # fmt: skip
    tools = [
        {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}},
        {"type": "function", "function": {"name": "get_time", "description": "Now."}},
    ]

    response = post_stream(stream_app, {"messages": MESSAGES, "model": "openai/gpt-4o", "tools": tools})

    assert_sse_headers(response)
    ((name, done),) = list(sse_events(body_lines(response)))
    assert name == "done"
    assert done["finish_reason"] == "tool_calls"
    assert done["tool_calls"] == [
        {"id": "call_1", "name": "get_weather", "arguments": {"city": "Paris"}},
        {"id": "call_2", "name": "get_time", "arguments": {}},
    ]
    sent = upstream.only_request().json
    assert [tool["function"]["name"] for tool in sent["tools"]] == ["get_weather", "get_time"]
    assert all(tool["type"] == "function" for tool in sent["tools"])


def test_streamed_structured_output_is_parsed_in_the_done_event(stream_app, upstream):
    upstream.script(CHAT_PATH, answer('{"answer": ', "42}"))
    schema = {"type": "object", "properties": {"answer": {"type": "integer"}}}

    response = post_stream(
        stream_app, {"messages": MESSAGES, "model": "openai/gpt-4o", "response_format": schema}
    )

    events = list(sse_events(body_lines(response)))
    assert [name for name, _ in events] == ["delta", "delta", "done"]
    assert events[-1][1]["parsed"] == {"answer": 42}
    assert upstream.only_request().json["response_format"]["type"] == "json_schema"


def test_a_stream_sends_the_generation_parameters_too(stream_app, upstream):
    upstream.script(CHAT_PATH, answer("ok"))
    options = {"top_p": 0.5, "stop": ["END"], "seed": 3, "frequency_penalty": 0.1}

    response = post_stream(stream_app, {"messages": MESSAGES, "model": "openai/gpt-4o", **options})

    assert [name for name, _ in sse_events(body_lines(response))] == ["delta", "done"]
    sent = upstream.only_request().json
    assert {name: sent.get(name) for name in options} == options


def test_upstream_breaking_mid_stream_is_an_error_event(stream_app, upstream):
    upstream.script(CHAT_PATH, CUT_AFTER_FIRST_DELTA)

    response = post_stream(stream_app, {"messages": MESSAGES, "model": "openai/gpt-4o"})

    assert_sse_headers(response)
    text = "".join(body_lines(response))
    events = list(sse_events(text.splitlines(keepends=True)))
    assert events[0] == ("delta", {"text": "partial"})
    ((name, data),) = events[1:]
    assert name == "error"
    assert data["error"]["type"] == "upstream_unreachable"
    assert data["error"]["status"] == 502
    assert data["error"]["message"]
    assert "Traceback" not in text
    assert len(upstream.requests) == 1  # no retry


@pytest.mark.parametrize(
    ("error", "kind", "status"),
    [
        ({"message": "The server had an error while processing your request.", "type": "server_error",
          "code": None}, "upstream_error", 502),
        ({"message": "Invalid prompt: flagged.", "type": "invalid_request_error", "code": None},
         "upstream_rejected", 400),
    ],
)  # fmt: skip
def test_an_error_event_from_the_upstream_is_an_error_event(stream_app, upstream, error, kind, status):
    upstream.script(
        CHAT_PATH,
        Reply.stream(
            [*as_sse(chunk(role="assistant", content=""), chunk("partial"), {"error": error}), DONE]
        ),
    )

    events = list(sse_events(body_lines(post_stream(stream_app, {"messages": MESSAGES, "model": "m"}))))

    assert events[0] == ("delta", {"text": "partial"})
    ((name, data),) = events[1:]
    assert name == "error"
    assert (data["error"]["type"], data["error"]["status"]) == (kind, status)


def test_an_error_event_before_the_first_delta_is_a_json_error(stream_app, upstream):
    upstream.script(
        CHAT_PATH,
        Reply.stream(
            [*as_sse({"error": {"message": "overloaded", "type": "server_error", "code": None}}), DONE]
        ),
    )

    assert_json_error(post_stream(stream_app, {"messages": MESSAGES, "model": "m"}), 502, "upstream_error")


def test_upstream_stalling_mid_stream_is_a_timeout_event(make_app, upstream):
    app = make_app(
        OPENAI_API_KEY=CANARY_KEY,
        OPENAI_BASE_URL=upstream.url_for("/v1"),
        OPENAI_MAX_RETRIES=0,
        OPENAI_TIMEOUT=0.3,
    )
    release = threading.Event()

    upstream.script(
        CHAT_PATH, Reply.stream([*as_sse(chunk(role="assistant", content=""), chunk("slow")), release])
    )
    try:
        events = list(sse_events(body_lines(post_stream(app, {"messages": MESSAGES, "model": "m"}))))
    finally:
        release.set()

    assert events[0] == ("delta", {"text": "slow"})
    assert events[1][0] == "error"
    assert events[1][1]["error"]["type"] == "upstream_timeout"
    assert events[1][1]["error"]["status"] == 504


def test_structured_output_that_does_not_parse_is_an_error_event(stream_app, upstream):
    upstream.script(CHAT_PATH, answer("not json"))
    schema = {"type": "object", "properties": {"answer": {"type": "integer"}}}

    response = post_stream(stream_app, {"messages": MESSAGES, "model": "m", "response_format": schema})

    events = list(sse_events(body_lines(response)))
    assert events[0] == ("delta", {"text": "not json"})
    assert events[1][0] == "error"
    assert events[1][1]["error"]["type"] == "upstream_error"
    assert events[1][1]["error"]["status"] == 502


# --- errors before the first byte are JSON responses with their status codes -------------


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"messages": MESSAGES, "model": "m", "stream": "yes"}, "stream"),
        ({"messages": [], "model": "m", "stream": True}, "messages"),
        ({"messages": MESSAGES, "model": "nope/m", "stream": True}, "model"),
        ({"messages": MESSAGES, "model": "m", "stream": True, "tool_choice": "get_weather"}, "tool_choice"),
    ],
)
def test_invalid_stream_request_is_a_json_400(stream_app, upstream, body, field):
    response = stream_app.test_client().post("/api/chat", json=body, headers=api_key_headers(stream_app))

    error = assert_json_error(response, 400, "invalid_request")
    assert error["field"] == field
    assert upstream.requests == []


def test_stream_not_configured_is_a_json_503(make_app, upstream):
    app = make_app(OPENAI_BASE_URL=upstream.url_for("/v1"))

    error = assert_json_error(post_stream(app, {"messages": MESSAGES, "model": "m"}), 503, "not_configured")

    assert error["setting"] == "OPENAI_API_KEY"
    assert upstream.requests == []


def test_stream_upstream_401_is_a_json_502(stream_app, upstream):
    upstream.script(
        CHAT_PATH,
        Reply(
            401,
            {"error": {"message": f"Incorrect API key provided: {CANARY_KEY}", "code": "invalid_api_key"}},
        ),
    )

    response = post_stream(stream_app, {"messages": MESSAGES, "model": "m"})

    error = assert_json_error(response, 502, "upstream_auth")
    assert error["upstream_status"] == 401


def test_stream_upstream_429_is_a_json_429_with_retry_after(stream_app, upstream):
    upstream.script(CHAT_PATH, Reply(429, {"error": {"message": "slow down"}}, {"retry-after-ms": "1200"}))

    response = post_stream(stream_app, {"messages": MESSAGES, "model": "m"})

    assert_json_error(response, 429, "rate_limited")
    assert response.headers["Retry-After"] == "2"
    assert len(upstream.requests) == 1


def test_stream_upstream_400_is_a_json_400(stream_app, upstream):
    upstream.script(CHAT_PATH, Reply(
        400, {"error": {"message": "This model's maximum context length is 8192 tokens",
                        "code": "context_length_exceeded"}},
    ))  # fmt: skip

    error = assert_json_error(post_stream(stream_app, {"messages": MESSAGES, "model": "m"}), 400,
                              "upstream_rejected")  # fmt: skip

    assert error["upstream_status"] == 400
    assert error["reason"] == "context_length"
    assert "maximum context length" in error["message"]


def test_upstream_failing_before_the_first_delta_is_a_json_error(stream_app, upstream):
    # Headers and a first event, but no text yet, then the connection drops.
    upstream.script(CHAT_PATH, Reply.stream([*as_sse(chunk(role="assistant", content="")), CLOSE]))

    response = post_stream(stream_app, {"messages": MESSAGES, "model": "m"})

    error = assert_json_error(response, 502, "upstream_unreachable")
    assert error["message"]


# --- the client going away closes the upstream ----------------------------------------


def test_closing_the_response_early_closes_the_upstream(stream_app, upstream):
    upstream.script(CHAT_PATH, trickle(250))  # 5 s of chunks

    response = post_stream(stream_app, {"messages": MESSAGES, "model": "m"})
    events = sse_events(body_lines(response))
    assert next(events) == ("delta", {"text": "t0 "})
    assert next(events)[0] == "delta"
    started = time.monotonic()
    response.close()

    exchange = upstream.only_request()
    assert exchange.finished.wait(WAIT)
    assert exchange.outcome == "client_closed"
    assert exchange.chunks_sent < 100
    assert time.monotonic() - started < 2


def test_closing_the_response_before_reading_closes_the_upstream(stream_app, upstream):
    upstream.script(CHAT_PATH, trickle(250))

    response = post_stream(stream_app, {"messages": MESSAGES, "model": "m"})
    assert_sse_headers(response)
    response.close()  # the app pulled the first delta; the body generator never ran

    exchange = upstream.only_request()
    assert exchange.finished.wait(WAIT)
    assert exchange.outcome == "client_closed"
    assert exchange.chunks_sent < 100


# --- a real gunicorn worker ------------------------------------------------------------


@pytest.fixture
def gunicorn_server(tmp_path, upstream):
    env = clean_env(
        tmp_path,
        PORT=str(free_port()),
        SECRET_KEY=secrets.token_hex(32),
        OPENAI_API_KEY=CANARY_KEY,
        OPENAI_BASE_URL=upstream.url_for("/v1"),
        OPENAI_MAX_RETRIES="0",
    )
    headers = api_key_for_env(env)
    with run_gunicorn(env, "-w", "1", "--threads", "2", "wsgi:app", log=tmp_path / "g.log") as server:
        wait_until_listening(server)
        server.api_headers = headers  # type: ignore[attr-defined]
        yield server


def open_stream(server: Any, body: dict[str, Any]) -> tuple[http.client.HTTPConnection, Any]:
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=WAIT)
    headers = {"Content-Type": "application/json", **server.api_headers}
    connection.request("POST", "/api/chat", json.dumps({"stream": True, **body}), headers)
    return connection, connection.getresponse()


def http_lines(response: Any) -> Iterator[str]:
    while line := response.readline():
        yield line.decode()


@pytest.mark.slow
def test_gunicorn_sends_each_delta_before_the_upstream_finishes(gunicorn_server, upstream):
    released = threading.Event()

    first = as_sse(chunk(role="assistant", content=""), chunk("first"))
    rest = as_sse(chunk(" second"), chunk(finish="stop"), chunk(usage=USAGE))
    upstream.script(CHAT_PATH, Reply.stream([*first, released, *rest, DONE]))

    connection, response = open_stream(gunicorn_server, {"messages": MESSAGES, "model": "openai/m"})
    try:
        assert response.status == 200, response.read()
        assert response.getheader("Content-Type").startswith("text/event-stream")
        assert response.getheader("X-Accel-Buffering") == "no"
        assert response.getheader("Cache-Control") == "no-cache"
        events = sse_events(http_lines(response))
        assert next(events) == ("delta", {"text": "first"})  # through gunicorn, while the upstream waits
        exchange = upstream.only_request()
        assert not exchange.finished.is_set()
        released.set()
        rest = list(events)
    finally:
        released.set()
        connection.close()

    assert rest[0] == ("delta", {"text": " second"})
    assert rest[1][0] == "done"
    assert rest[1][1]["usage"] == {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12}
    assert rest[1][1]["finish_reason"] == "stop"
    assert exchange.finished.wait(WAIT)
    assert exchange.outcome == "complete"  # not "timed_out": the first delta arrived before the rest was sent
    assert "Traceback" not in gunicorn_server.output()


@pytest.mark.slow
def test_gunicorn_client_disconnect_closes_the_upstream(gunicorn_server, upstream):
    upstream.script(CHAT_PATH, trickle(500))  # 10 s of chunks

    with socket.create_connection(("127.0.0.1", gunicorn_server.port), timeout=WAIT) as client:
        body = json.dumps({"stream": True, "messages": MESSAGES, "model": "m"}).encode()
        client.sendall(
            b"POST /api/chat HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            b"Authorization: %s\r\n"
            b"Content-Length: %d\r\n\r\n%s"
            % (gunicorn_server.api_headers["Authorization"].encode(), len(body), body)
        )
        received = b""
        while b"t1 " not in received:  # the headers and the first deltas
            piece = client.recv(4096)
            assert piece, f"gunicorn closed the connection:\n{received!r}"
            received += piece
        assert received.startswith(b"HTTP/1.1 200")
        assert b"event: delta" in received
    closed_at = time.monotonic()

    exchange = upstream.only_request()
    assert exchange.finished.wait(WAIT), "the upstream was still sending 10 s after the client left"
    assert exchange.outcome == "client_closed"
    assert exchange.chunks_sent < 300
    assert time.monotonic() - closed_at < 5

    # The worker lives on and serves the next request.
    upstream.script(CHAT_PATH, answer("again"))
    connection, response = open_stream(gunicorn_server, {"messages": MESSAGES, "model": "m"})
    try:
        assert [name for name, _ in sse_events(http_lines(response))] == ["delta", "done"]
    finally:
        connection.close()
