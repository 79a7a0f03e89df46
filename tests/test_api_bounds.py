"""Request bounds on ``/api``: every body past one is a 4xx naming what, and nothing reaches a provider.

The size bound is checked where it matters, under a real gunicorn worker: a
50 MB body is refused with a 413 JSON within a second, and the worker's
resident memory (``VmRSS`` in ``/proc/<pid>/status``) grows by less than 10 MB.
"""

from __future__ import annotations

import json
import secrets
import socket
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import CANARY_KEY, api_key_for_env, api_key_headers
from tests.servers import ScriptedServer, free_port
from tests.test_gunicorn import clean_env, run_gunicorn, wait_until_listening

MESSAGES = [{"role": "user", "content": "Hi"}]
MiB = 1024 * 1024


@pytest.fixture
def bounded_app(make_app, upstream: ScriptedServer):
    return make_app(
        OPENAI_API_KEY=CANARY_KEY,
        OPENAI_BASE_URL=upstream.url_for("/v1"),
        ANTHROPIC_API_KEY="sk-ant-" + "x" * 24,
        ANTHROPIC_BASE_URL=upstream.base_url,
    )


def post(app, path: str, body: bytes | str | dict, **headers: str):
    data = json.dumps(body) if isinstance(body, dict) else body
    return app.test_client().post(
        path, data=data, headers={"Content-Type": "application/json", **api_key_headers(app), **headers}
    )


def assert_refused(response, upstream: ScriptedServer, field: str, status: int = 400, *words: str) -> dict:
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.mimetype == "application/json"
    error = response.json["error"]
    assert error["field"] == field
    for word in words:
        assert word in error["message"]
    assert upstream.requests == []  # refused before any provider was asked
    return error


# --- size -----------------------------------------------------------------------------------------


def test_a_body_over_max_content_length_is_a_413_json(bounded_app, upstream):
    body = json.dumps({"model": "openai/m", "messages": [{"role": "user", "content": "x" * (4 * MiB)}]})

    error = assert_refused(post(bounded_app, "/api/chat", body), upstream, "body", 413, "MAX_CONTENT_LENGTH")
    assert error["type"] == "request_too_large"


def test_max_content_length_is_a_setting(make_app, upstream):
    app = make_app(
        MAX_CONTENT_LENGTH="1000", OPENAI_API_KEY=CANARY_KEY, OPENAI_BASE_URL=upstream.url_for("/v1")
    )
    small = {"model": "openai/m", "messages": MESSAGES}
    large = {"model": "openai/m", "messages": [{"role": "user", "content": "x" * 1000}]}

    assert post(app, "/api/chat", small).status_code == 200
    assert_refused(post(app, "/api/chat", large), upstream.__class__(), "body", 413)
    assert app.config["MAX_CONTENT_LENGTH"] == 1000


def _worker_pid(master: int, timeout: float = 10.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        children = Path(f"/proc/{master}/task/{master}/children").read_text().split()
        if children:
            return int(children[0])
        time.sleep(0.05)
    raise AssertionError("gunicorn started no worker")


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def _post_large(port: int, headers: dict[str, str], size: int) -> tuple[bytes, float]:
    """POST ``size`` bytes from a thread while reading the answer; the answer and its delay."""
    head = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    request = f"POST /api/chat HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {size}\r\n{head}\r\n".encode()
    chunk = b'{"model": "openai/m", "messages": [' + b" " * (MiB - 37)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.settimeout(10)

        def send_body() -> None:
            sent = 0
            try:
                while sent < size:
                    piece = chunk[: size - sent]
                    sock.sendall(piece)
                    sent += len(piece)
            except OSError:  # the server answered and closed: the rest is not wanted
                return

        started = time.monotonic()
        sock.sendall(request)
        sender = threading.Thread(target=send_body, daemon=True)
        sender.start()
        answer = b""
        while b"\r\n\r\n" not in answer:
            piece = sock.recv(65536)
            assert piece, f"the connection closed before an answer: {answer!r}"
            answer += piece
        elapsed = time.monotonic() - started
        head_end = answer.index(b"\r\n\r\n") + 4
        length = int(next(line.split(b":")[1] for line in answer[:head_end].split(b"\r\n")
                          if line.lower().startswith(b"content-length")))  # fmt: skip
        while len(answer) < head_end + length:
            piece = sock.recv(65536)
            if not piece:
                break
            answer += piece
    sender.join(timeout=10)
    return answer, elapsed


@pytest.mark.slow
def test_a_50_mb_body_under_gunicorn_is_a_413_within_a_second_without_growing_the_worker(
    tmp_path, upstream, record_property
):
    env = clean_env(
        tmp_path,
        PORT=str(free_port()),
        SECRET_KEY=secrets.token_hex(32),
        OPENAI_API_KEY=CANARY_KEY,
        OPENAI_BASE_URL=upstream.url_for("/v1"),
    )
    headers = {"Content-Type": "application/json", **api_key_for_env(env)}
    with run_gunicorn(env, "-w", "1", "wsgi:app", log=tmp_path / "g.log") as server:
        wait_until_listening(server)
        worker = _worker_pid(server.process.pid)
        small, _ = _post_large(server.port, headers, 100)  # warm: the key check, the limiter
        before = _rss_kib(worker)
        answer, elapsed = _post_large(server.port, headers, 50 * 1000 * 1000)
        after = _rss_kib(worker)
        output = server.output()

    assert small.startswith(b"HTTP/1.1 400")
    status_line, _, rest = answer.partition(b"\r\n")
    assert status_line.startswith(b"HTTP/1.1 413"), answer[:500]
    body = json.loads(rest.partition(b"\r\n\r\n")[2])
    assert body["error"]["type"] == "request_too_large"
    assert body["error"]["field"] == "body"
    assert elapsed < 1.0, f"the 413 took {elapsed:.2f} s"
    record_property("413_seconds", round(elapsed, 3))
    record_property("worker_rss_growth_kib", after - before)
    assert after - before < 10 * 1024, f"the worker grew from {before} KiB to {after} KiB"
    assert upstream.requests == []
    assert "Traceback" not in output


# --- nesting, numbers, text -------------------------------------------------------------------


@pytest.mark.parametrize("body", ["[" * 100_000, '{"a":' * 1000, '{"messages": ' + "[" * 40 + "]" * 40 + "}"])
def test_deep_nesting_is_a_400_before_the_parser_recurses(bounded_app, upstream, body):
    assert_refused(post(bounded_app, "/api/chat", body), upstream, "body", 400, "levels deep")
    assert_refused(post(bounded_app, "/api/embeddings", body), upstream, "body", 400, "levels deep")


def test_nesting_within_the_limit_is_read(bounded_app, upstream):
    schema: dict = {"type": "object"}
    node = schema
    for _ in range(14):  # 31 levels deep in all, under API_MAX_JSON_DEPTH (32)
        node["properties"] = {"a": {"type": "object"}}
        node = node["properties"]["a"]
    body = {"model": "openai/m", "messages": MESSAGES, "response_format": schema}

    response = post(bounded_app, "/api/chat", body)
    assert "levels deep" not in response.get_data(as_text=True)
    assert len(upstream.requests) == 1


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e999", "-1e999"])
def test_nan_and_infinity_are_a_400_not_a_502(bounded_app, upstream, literal):
    body = (
        '{"model": "openai/m", "messages": [{"role": "user", "content": "Hi"}], "temperature": '
        + literal
        + "}"
    )

    assert_refused(post(bounded_app, "/api/chat", body), upstream, "body", 400, "not valid JSON")


def test_a_lone_surrogate_is_a_400_naming_where_it_is(bounded_app, upstream):
    chat = '{"model": "openai/m", "messages": [{"role": "user", "content": "a\\ud800b"}]}'
    embed = '{"model": "openai/m", "input": ["fine", "\\udfff"]}'
    key = '{"model": "openai/m", "messages": [{"role": "user", "content": "Hi"}], "\\ud800": 1}'

    assert_refused(post(bounded_app, "/api/chat", chat), upstream, "messages[0].content", 400, "surrogate")
    assert_refused(post(bounded_app, "/api/embeddings", embed), upstream, "input[1]", 400, "surrogate")
    assert_refused(post(bounded_app, "/api/chat", key), upstream, "body", 400, "surrogate")


def test_invalid_utf8_is_a_400(bounded_app, upstream):
    assert_refused(post(bounded_app, "/api/chat", b'{"model": "\xff"}'), upstream, "body", 400, "UTF-8")


@pytest.mark.parametrize("role", [["user"], {"role": "user"}, 1, None, True, "robot"])
def test_a_role_of_any_json_type_is_a_400_naming_it(bounded_app, upstream, role):
    body = {"model": "openai/m", "messages": [{"role": role, "content": "Hi"}]}

    assert_refused(post(bounded_app, "/api/chat", body), upstream, "messages[0].role")


# --- max_tokens, message count, prompt size ---------------------------------------------------


def test_max_tokens_over_the_limit_is_a_400_naming_it(bounded_app, upstream):
    over = {"model": "openai/m", "messages": MESSAGES, "max_tokens": 100_000_000}

    assert_refused(post(bounded_app, "/api/chat", over), upstream, "max_tokens", 400, "LLM_MAX_TOKENS_LIMIT")


def test_max_tokens_at_the_limit_is_sent(bounded_app, upstream):
    limit = bounded_app.config["LLM_MAX_TOKENS_LIMIT"]
    response = post(
        bounded_app, "/api/chat", {"model": "openai/m", "messages": MESSAGES, "max_tokens": limit}
    )

    assert response.status_code == 200, response.get_data(as_text=True)
    assert upstream.only_request().json["max_completion_tokens"] == limit


def test_the_limits_are_settings(make_app, upstream):
    app = make_app(
        API_MAX_MESSAGES="2",
        API_MAX_PROMPT_CHARS="10",
        API_MAX_INPUTS="1",
        LLM_MAX_TOKENS_LIMIT="5",
        OPENAI_API_KEY=CANARY_KEY,
        OPENAI_BASE_URL=upstream.url_for("/v1"),
    )
    three = [{"role": "user", "content": "a"}] * 3
    long = [{"role": "user", "content": "x" * 11}]

    assert_refused(post(app, "/api/chat", {"model": "openai/m", "messages": three}), upstream, "messages",
                   400, "at most 2", "API_MAX_MESSAGES")  # fmt: skip
    assert_refused(post(app, "/api/chat", {"model": "openai/m", "messages": long}), upstream, "messages",
                   400, "at most 10", "API_MAX_PROMPT_CHARS")  # fmt: skip
    two = {"model": "openai/m", "input": ["a", "b"]}
    assert_refused(post(app, "/api/embeddings", two), upstream, "input", 400, "API_MAX_INPUTS")
    assert_refused(post(app, "/api/chat", {"model": "openai/m", "messages": MESSAGES, "max_tokens": 6}),
                   upstream, "max_tokens")  # fmt: skip


def test_default_bounds():
    from app.config import DEFAULTS

    assert DEFAULTS["MAX_CONTENT_LENGTH"] == 4 * MiB
    assert DEFAULTS["LLM_MAX_TOKENS_LIMIT"] == 8192
    assert DEFAULTS["API_MAX_JSON_DEPTH"] == 32


# --- schemas a provider cannot take -------------------------------------------------------------


@pytest.mark.parametrize(
    ("response_format", "field"),
    [
        ({"properties": {"a": {"type": "string"}}}, "response_format"),
        ({"type": "object", "properties": {"a": {}}}, "response_format.properties.a"),
        ({"type": "object", "properties": {"a": {"type": "wat"}}}, "response_format.properties.a"),
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"properties": {}}}},
         "response_format.json_schema.schema"),
    ],
)  # fmt: skip
def test_a_schema_anthropic_cannot_take_is_a_400_naming_it(bounded_app, upstream, response_format, field):
    body = {"model": "anthropic/claude-sonnet-4-6", "messages": MESSAGES, "response_format": response_format}

    error = assert_refused(post(bounded_app, "/api/chat", body), upstream, field)
    assert error["type"] == "invalid_request"
    assert error["provider"] == "anthropic"


# --- shapes the fuzz test found or the issue names, kept as fixed cases --------------------------

TOOLS = [{"name": "get_weather", "parameters": {"type": "object"}}]


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": None}}, "tool_choice"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": ["get_weather"]}}, "tool_choice"),
        ({"tools": TOOLS, "tool_choice": {"function": "get_weather"}}, "tool_choice"),
        ({"tools": [{"name": "get_weather\n"}]}, "tools[0].name"),
        ({"tools": [{"name": "f", "description": "\ud800"}]}, "tools[0].description"),
    ],
)
def test_tool_shapes_are_a_400_naming_the_field(bounded_app, upstream, extra, field):
    body = json.dumps({"model": "openai/m", "messages": MESSAGES, **extra})

    assert_refused(post(bounded_app, "/api/chat", body), upstream, field)


@pytest.mark.parametrize(
    ("arguments", "words"),
    [("[" * 5000, "levels deep"), ('{"a": NaN}', "not valid JSON"), ("{oops", "not valid JSON"),
     ('{"a": 1' + "0" * 5000 + "}", "not valid JSON"), ('{"\\ud800": 1}', "surrogate")],
)  # fmt: skip
def test_tool_call_arguments_that_are_not_plain_json_are_a_400(bounded_app, upstream, arguments, words):
    call = {"id": "c1", "function": {"name": "f", "arguments": arguments}}
    messages = [*MESSAGES, {"role": "assistant", "content": None, "tool_calls": [call]}]

    response = post(bounded_app, "/api/chat", {"model": "openai/m", "messages": messages})

    error = assert_refused(response, upstream, response.json["error"].get("field", ""), 400, words)
    assert error["field"].startswith("messages[1].tool_calls[0].function")


@pytest.mark.parametrize("url", ["data:image/png;base64,abc", "data:,x", "data:image/png,notbase64"])
def test_a_data_url_that_is_not_base64_is_a_400(bounded_app, upstream, url):
    messages = [{"role": "user", "content": [{"type": "image", "url": url}]}]

    for model in ("openai/m", "anthropic/claude-sonnet-4-6"):
        body = {"model": model, "messages": messages}
        assert_refused(post(bounded_app, "/api/chat", body), upstream, "messages[0].content[0].url")


def test_an_image_anthropic_cannot_fetch_is_a_400_naming_it(bounded_app, upstream):
    messages = [{"role": "user", "content": [{"type": "image", "url": "ftp://example.com/a.png"}]}]
    body = {"model": "anthropic/claude-sonnet-4-6", "messages": messages}

    assert_refused(post(bounded_app, "/api/chat", body), upstream, "messages[0].content[0].url", 400, "http")
