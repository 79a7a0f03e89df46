"""``POST /api/chat`` with ``"stream": true``: Server-Sent Events from a real streaming upstream.

The upstream is :class:`StreamingUpstream`, a local HTTP/1.1 server speaking
the OpenAI streaming protocol (``chat.completion.chunk`` SSE events in a
chunked body, a usage chunk, ``data: [DONE]``). Its handlers write chunk by
chunk, can wait on the test between chunks, break the connection mid-body,
and record whether the client closed the connection before they sent
everything. The app is driven through the Flask test client and through a
real gunicorn worker.
"""

from __future__ import annotations

import http.client
import json
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from tests.conftest import CANARY_KEY
from tests.servers import free_port
from tests.test_gunicorn import clean_env, run_gunicorn, wait_until_listening

MESSAGES = [{"role": "user", "content": "Hi"}]
WAIT = 10.0  # seconds any side waits for the other before giving up (a failure, never a hang)


# --- the streaming upstream --------------------------------------------------------


def chunk(
    content: str | None = None,
    *,
    finish: str | None = None,
    tool_calls: list[dict[str, Any]] | None = None,
    usage: dict[str, int] | None = None,
    role: str | None = None,
    model: str = "gpt-4o-mini-2024-07-18",
) -> dict[str, Any]:
    """One ``chat.completion.chunk`` as the OpenAI API streams it."""
    delta: dict[str, Any] = {}
    if role:
        delta["role"] = role
    if content is not None:
        delta["content"] = content
    if tool_calls is not None:
        delta["tool_calls"] = tool_calls
    choices = [] if usage else [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]
    return {
        "id": "chatcmpl-stream-1",
        "object": "chat.completion.chunk",
        "created": 1_700_000_000,
        "model": model,
        "system_fingerprint": "fp_1",
        "choices": choices,
        "usage": usage,
    }


USAGE = {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12}


def text_answer(*texts: str) -> list[dict[str, Any]]:
    """The chunks of a plain answer: role, the texts, finish, usage."""
    return [
        chunk(role="assistant", content=""),
        *(chunk(text) for text in texts),
        chunk(finish="stop"),
        chunk(usage=USAGE),
    ]


@dataclass
class Exchange:
    """One request the upstream served, and how its answer ended."""

    body: dict[str, Any]
    headers: dict[str, str]
    chunks_sent: int = 0
    #: "complete", "broken" (the handler cut it), or "client_closed" (a write failed).
    outcome: str | None = None
    finished: threading.Event = field(default_factory=threading.Event)


class Writer:
    """What a script uses to answer: SSE events in a chunked body, written and flushed one by one."""

    def __init__(self, handler: BaseHTTPRequestHandler, exchange: Exchange) -> None:
        self._handler = handler
        self.exchange = exchange
        self._started = False

    def _write(self, data: bytes) -> None:
        self._handler.wfile.write(data)
        self._handler.wfile.flush()

    def start(self) -> None:
        self._handler.send_response(200)
        self._handler.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self._handler.send_header("Transfer-Encoding", "chunked")
        self._handler.send_header("Cache-Control", "no-cache")
        self._handler.end_headers()
        self._started = True

    def event(self, data: dict[str, Any] | str) -> None:
        if not self._started:
            self.start()
        payload = data if isinstance(data, str) else json.dumps(data)
        body = f"data: {payload}\n\n".encode()
        self._write(b"%x\r\n%s\r\n" % (len(body), body))
        self.exchange.chunks_sent += 1

    def events(self, items: Iterable[dict[str, Any]]) -> None:
        for item in items:
            self.event(item)

    def done(self) -> None:
        self.event("[DONE]")
        self._write(b"0\r\n\r\n")

    def error(self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode()
        self._handler.send_response(status)
        self._handler.send_header("Content-Type", "application/json")
        for name, value in (headers or {}).items():
            self._handler.send_header(name, value)
        self._handler.send_header("Content-Length", str(len(data)))
        self._handler.end_headers()
        self._write(data)

    def cut(self) -> None:
        """Drop the connection in the middle of the body, as a crashing proxy does."""
        self._handler.close_connection = True
        self._handler.connection.shutdown(socket.SHUT_RDWR)


Script = Callable[[Writer], None]


class StreamingUpstream:
    """A threaded HTTP/1.1 server on 127.0.0.1 that answers each request with ``script(writer)``."""

    def __init__(self) -> None:
        self.script: Script = answer("hi")
        self.exchanges: list[Exchange] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}")
                exchange = Exchange(body, {k.lower(): v for k, v in self.headers.items()})
                owner.exchanges.append(exchange)
                try:
                    owner.script(Writer(self, exchange))
                    exchange.outcome = exchange.outcome or "complete"
                except (BrokenPipeError, ConnectionResetError):
                    exchange.outcome = "client_closed"
                    self.close_connection = True
                except OSError:
                    exchange.outcome = "broken"
                    self.close_connection = True
                finally:
                    exchange.finished.set()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def url_for(self, path: str) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}{path}"

    def only_exchange(self) -> Exchange:
        assert len(self.exchanges) == 1, f"{len(self.exchanges)} upstream requests"
        return self.exchanges[0]

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def answer(*texts: str) -> Script:
    """A plain streamed answer of ``texts``."""

    def script(w: Writer) -> None:
        w.events(text_answer(*texts))
        w.done()

    return script


def trickle(count: int, interval: float = 0.02) -> Script:
    """A long answer: one text chunk every ``interval`` s, ``count`` of them, then the end."""

    def script(w: Writer) -> None:
        w.event(chunk(role="assistant", content=""))
        for index in range(count):
            w.event(chunk(f"t{index} "))
            time.sleep(interval)
        w.events([chunk(finish="stop"), chunk(usage=USAGE)])
        w.done()

    return script


def cut_after_first_delta(w: Writer) -> None:
    w.events([chunk(role="assistant", content=""), chunk("partial")])
    time.sleep(0.1)
    w.cut()
    w.exchange.outcome = "broken"


@pytest.fixture
def upstream() -> Iterator[StreamingUpstream]:
    server = StreamingUpstream()
    yield server
    server.stop()


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
    return app.test_client().post("/api/chat", json={"stream": True, **body}, buffered=False)


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

    def script(w: Writer) -> None:
        w.events([chunk(role="assistant", content=""), chunk("Hel")])
        # The rest only once the test has read the first delta: the view flushes it, it does not buffer.
        w.exchange.outcome = None if released.wait(WAIT) else "timed_out"
        w.events([chunk("lo"), chunk(" there"), chunk(finish="stop"), chunk(usage=USAGE)])
        w.done()

    upstream.script = script

    response = post_stream(stream_app, {"messages": MESSAGES, "model": "openai/gpt-4o-mini"})

    assert_sse_headers(response)
    events = sse_events(body_lines(response))
    assert next(events) == ("delta", {"text": "Hel"})
    assert upstream.only_exchange().outcome is None  # the upstream is still waiting for us
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
    exchange = upstream.only_exchange()
    assert exchange.finished.wait(WAIT)
    assert exchange.outcome == "complete"
    assert exchange.body["stream"] is True
    assert exchange.body["stream_options"] == {"include_usage": True}
    assert exchange.body["model"] == "gpt-4o-mini"
    assert exchange.body["messages"] == MESSAGES
    assert exchange.headers["authorization"] == f"Bearer {CANARY_KEY}"


def test_stream_with_the_old_profile_field(make_app, upstream):
    upstream.script = answer("via profile")
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
    assert upstream.only_exchange().body["model"] == "llama3"
    assert upstream.only_exchange().headers["authorization"] == "Bearer sk-" + "4" * 24


def test_streamed_tool_calls_arrive_in_the_done_event(stream_app, upstream):
    def script(w: Writer) -> None:
        w.events([
            chunk(role="assistant", tool_calls=[{"index": 0, "id": "call_1", "type": "function",
                                                 "function": {"name": "get_weather", "arguments": ""}}]),
            chunk(tool_calls=[{"index": 0, "function": {"arguments": '{"city": '}}]),
            chunk(tool_calls=[{"index": 0, "function": {"arguments": '"Paris"}'}}]),
            chunk(tool_calls=[{"index": 1, "id": "call_2", "type": "function",
                               "function": {"name": "get_time", "arguments": "{}"}}]),
            chunk(finish="tool_calls"),
            chunk(usage=USAGE),
        ])  # fmt: skip
        w.done()

    upstream.script = script
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
    sent = upstream.only_exchange().body
    assert [tool["function"]["name"] for tool in sent["tools"]] == ["get_weather", "get_time"]
    assert all(tool["type"] == "function" for tool in sent["tools"])


def test_streamed_structured_output_is_parsed_in_the_done_event(stream_app, upstream):
    upstream.script = answer('{"answer": ', "42}")
    schema = {"type": "object", "properties": {"answer": {"type": "integer"}}}

    response = post_stream(
        stream_app, {"messages": MESSAGES, "model": "openai/gpt-4o", "response_format": schema}
    )

    events = list(sse_events(body_lines(response)))
    assert [name for name, _ in events] == ["delta", "delta", "done"]
    assert events[-1][1]["parsed"] == {"answer": 42}
    assert upstream.only_exchange().body["response_format"]["type"] == "json_schema"


def test_upstream_breaking_mid_stream_is_an_error_event(stream_app, upstream):
    upstream.script = cut_after_first_delta

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
    assert len(upstream.exchanges) == 1  # no retry


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
    def script(w: Writer) -> None:
        w.events([chunk(role="assistant", content=""), chunk("partial"), {"error": error}])
        w.done()

    upstream.script = script

    events = list(sse_events(body_lines(post_stream(stream_app, {"messages": MESSAGES, "model": "m"}))))

    assert events[0] == ("delta", {"text": "partial"})
    ((name, data),) = events[1:]
    assert name == "error"
    assert (data["error"]["type"], data["error"]["status"]) == (kind, status)


def test_an_error_event_before_the_first_delta_is_a_json_error(stream_app, upstream):
    def script(w: Writer) -> None:
        w.event({"error": {"message": "overloaded", "type": "server_error", "code": None}})
        w.done()

    upstream.script = script

    assert_json_error(post_stream(stream_app, {"messages": MESSAGES, "model": "m"}), 502, "upstream_error")


def test_upstream_stalling_mid_stream_is_a_timeout_event(make_app, upstream):
    app = make_app(
        OPENAI_API_KEY=CANARY_KEY,
        OPENAI_BASE_URL=upstream.url_for("/v1"),
        OPENAI_MAX_RETRIES=0,
        OPENAI_TIMEOUT=0.3,
    )
    release = threading.Event()

    def script(w: Writer) -> None:
        w.events([chunk(role="assistant", content=""), chunk("slow")])
        release.wait(WAIT)

    upstream.script = script
    try:
        events = list(sse_events(body_lines(post_stream(app, {"messages": MESSAGES, "model": "m"}))))
    finally:
        release.set()

    assert events[0] == ("delta", {"text": "slow"})
    assert events[1][0] == "error"
    assert events[1][1]["error"]["type"] == "upstream_timeout"
    assert events[1][1]["error"]["status"] == 504


def test_structured_output_that_does_not_parse_is_an_error_event(stream_app, upstream):
    upstream.script = answer("not json")
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
    response = stream_app.test_client().post("/api/chat", json=body)

    error = assert_json_error(response, 400, "invalid_request")
    assert error["field"] == field
    assert upstream.exchanges == []


def test_stream_not_configured_is_a_json_503(make_app, upstream):
    app = make_app(OPENAI_BASE_URL=upstream.url_for("/v1"))

    error = assert_json_error(post_stream(app, {"messages": MESSAGES, "model": "m"}), 503, "not_configured")

    assert error["setting"] == "OPENAI_API_KEY"
    assert upstream.exchanges == []


def test_stream_upstream_401_is_a_json_502(stream_app, upstream):
    upstream.script = lambda w: w.error(
        401, {"error": {"message": f"Incorrect API key provided: {CANARY_KEY}", "code": "invalid_api_key"}}
    )

    response = post_stream(stream_app, {"messages": MESSAGES, "model": "m"})

    error = assert_json_error(response, 502, "upstream_auth")
    assert error["upstream_status"] == 401


def test_stream_upstream_429_is_a_json_429_with_retry_after(stream_app, upstream):
    upstream.script = lambda w: w.error(429, {"error": {"message": "slow down"}}, {"retry-after-ms": "1200"})

    response = post_stream(stream_app, {"messages": MESSAGES, "model": "m"})

    assert_json_error(response, 429, "rate_limited")
    assert response.headers["Retry-After"] == "2"
    assert len(upstream.exchanges) == 1


def test_stream_upstream_400_is_a_json_400(stream_app, upstream):
    upstream.script = lambda w: w.error(
        400, {"error": {"message": "This model's maximum context length is 8192 tokens",
                        "code": "context_length_exceeded"}},
    )  # fmt: skip

    error = assert_json_error(post_stream(stream_app, {"messages": MESSAGES, "model": "m"}), 400,
                              "upstream_rejected")  # fmt: skip

    assert error["upstream_status"] == 400
    assert error["reason"] == "context_length"
    assert "maximum context length" in error["message"]


def test_upstream_failing_before_the_first_delta_is_a_json_error(stream_app, upstream):
    def script(w: Writer) -> None:
        w.event(chunk(role="assistant", content=""))  # headers and a first event, but no text yet
        w.cut()
        w.exchange.outcome = "broken"

    upstream.script = script

    response = post_stream(stream_app, {"messages": MESSAGES, "model": "m"})

    error = assert_json_error(response, 502, "upstream_unreachable")
    assert error["message"]


# --- the client going away closes the upstream ----------------------------------------


def test_closing_the_response_early_closes_the_upstream(stream_app, upstream):
    upstream.script = trickle(250)  # 5 s of chunks

    response = post_stream(stream_app, {"messages": MESSAGES, "model": "m"})
    events = sse_events(body_lines(response))
    assert next(events) == ("delta", {"text": "t0 "})
    assert next(events)[0] == "delta"
    started = time.monotonic()
    response.close()

    exchange = upstream.only_exchange()
    assert exchange.finished.wait(WAIT)
    assert exchange.outcome == "client_closed"
    assert exchange.chunks_sent < 100
    assert time.monotonic() - started < 2


def test_closing_the_response_before_reading_closes_the_upstream(stream_app, upstream):
    upstream.script = trickle(250)

    response = post_stream(stream_app, {"messages": MESSAGES, "model": "m"})
    assert_sse_headers(response)
    response.close()  # the app pulled the first delta; the body generator never ran

    exchange = upstream.only_exchange()
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
    with run_gunicorn(env, "-w", "1", "--threads", "2", "wsgi:app", log=tmp_path / "g.log") as server:
        wait_until_listening(server)
        yield server


def open_stream(port: int, body: dict[str, Any]) -> tuple[http.client.HTTPConnection, Any]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=WAIT)
    connection.request(
        "POST", "/api/chat", json.dumps({"stream": True, **body}), {"Content-Type": "application/json"}
    )
    return connection, connection.getresponse()


def http_lines(response: Any) -> Iterator[str]:
    while line := response.readline():
        yield line.decode()


@pytest.mark.slow
def test_gunicorn_sends_each_delta_before_the_upstream_finishes(gunicorn_server, upstream):
    released = threading.Event()

    def script(w: Writer) -> None:
        w.events([chunk(role="assistant", content=""), chunk("first")])
        w.exchange.outcome = None if released.wait(WAIT) else "timed_out"
        w.events([chunk(" second"), chunk(finish="stop"), chunk(usage=USAGE)])
        w.done()

    upstream.script = script

    connection, response = open_stream(gunicorn_server.port, {"messages": MESSAGES, "model": "openai/m"})
    try:
        assert response.status == 200, response.read()
        assert response.getheader("Content-Type").startswith("text/event-stream")
        assert response.getheader("X-Accel-Buffering") == "no"
        assert response.getheader("Cache-Control") == "no-cache"
        events = sse_events(http_lines(response))
        assert next(events) == ("delta", {"text": "first"})  # through gunicorn, while the upstream waits
        exchange = upstream.only_exchange()
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
    upstream.script = trickle(500)  # 10 s of chunks

    with socket.create_connection(("127.0.0.1", gunicorn_server.port), timeout=WAIT) as client:
        body = json.dumps({"stream": True, "messages": MESSAGES, "model": "m"}).encode()
        client.sendall(
            b"POST /api/chat HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        received = b""
        while b"t1 " not in received:  # the headers and the first deltas
            piece = client.recv(4096)
            assert piece, f"gunicorn closed the connection:\n{received!r}"
            received += piece
        assert received.startswith(b"HTTP/1.1 200")
        assert b"event: delta" in received
    closed_at = time.monotonic()

    exchange = upstream.only_exchange()
    assert exchange.finished.wait(WAIT), "the upstream was still sending 10 s after the client left"
    assert exchange.outcome == "client_closed"
    assert exchange.chunks_sent < 300
    assert time.monotonic() - closed_at < 5

    # The worker lives on and serves the next request.
    upstream.script = answer("again")
    connection, response = open_stream(gunicorn_server.port, {"messages": MESSAGES, "model": "m"})
    try:
        assert [name for name, _ in sse_events(http_lines(response))] == ["delta", "done"]
    finally:
        connection.close()
