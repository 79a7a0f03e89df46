"""``flask llm chat|models|pull``: in process (fake provider, local servers) and as the real command."""

from __future__ import annotations

import json
import os
import re
import secrets
import select
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from werkzeug import Request, Response

from app.llm import LLMConnectionError, LLMRateLimitError, LLMServerError, ToolCall
from app.llm.providers.base import ChatRequest, StreamEvent
from app.llm.testing import FakeProvider, install_fake_llm
from tests.conftest import CANARY_KEY, ROOT
from tests.servers import free_port

FLASK = ROOT / ".venv" / "bin" / "flask"


@pytest.fixture
def app(make_app):
    return make_app()


@pytest.fixture
def fake(app) -> FakeProvider:
    return install_fake_llm(app)


def run(app, *args: str, input: str | None = None):
    return app.test_cli_runner().invoke(args=["llm", *args], input=input)


def assert_one_line_error(result, *fragments: str) -> None:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


# --- flask llm chat with the fake provider -------------------------------------------------------


def test_chat_streams_the_answer_and_prints_usage_on_stderr(app, fake):
    fake.add_stream(["Hel", "lo", " Ada"], usage={"input_tokens": 3, "output_tokens": 2})

    result = run(app, "chat", "Say hi", "--model", "fake/m")

    assert result.exit_code == 0, result.output
    assert result.stdout == "Hello Ada\n"
    assert result.stderr.startswith("[fake/m] tokens: 3 in, 2 out, 5 total; finish: stop;")
    assert fake.methods == ["stream"]
    request = fake.last_request
    assert isinstance(request, ChatRequest)
    assert [(m.role, m.text) for m in request.messages] == [("user", "Say hi")]


class _SnapshotFake(FakeProvider):
    """Records what the terminal shows each time the next event is asked for."""

    def __init__(self) -> None:
        super().__init__("snap")
        self.seen: list[str] = []

    def stream(self, request: ChatRequest) -> Iterator[StreamEvent]:
        events = super().stream(request)

        def watched() -> Iterator[StreamEvent]:
            for event in events:
                yield event
                sys.stdout.flush()  # what a terminal would have by now, had the CLI flushed
                self.seen.append(sys.stdout.buffer.getvalue().decode())

        return watched()


def test_chat_prints_each_delta_before_the_next_arrives(app):
    snap = _SnapshotFake()
    app.extensions["llm"].register_provider("snap", snap)
    snap.add_stream(["one ", "two ", "three"])

    result = run(app, "chat", "count", "--model", "snap/m")

    assert result.exit_code == 0, result.output
    assert snap.seen[:3] == ["one ", "one two ", "one two three"]


def test_chat_no_stream_waits_for_the_whole_answer(app, fake):
    fake.add_response("The whole answer.")

    result = run(app, "chat", "Hi", "--model", "fake/m", "--no-stream")

    assert result.exit_code == 0, result.output
    assert result.stdout == "The whole answer.\n"
    assert "[fake/m] tokens: 1 in, 3 out, 4 total; finish: stop;" in result.stderr
    assert fake.methods == ["chat"]


def test_chat_sends_system_as_a_system_message(app, fake):
    fake.add_response("ok")

    result = run(app, "chat", "Hi", "-m", "fake/m", "--system", "Answer in French.")

    assert result.exit_code == 0, result.output
    request = fake.last_request
    assert isinstance(request, ChatRequest)
    assert [(m.role, m.text) for m in request.messages] == [("system", "Answer in French."), ("user", "Hi")]


def test_chat_reads_the_prompt_from_stdin_with_a_dash(app, fake):
    fake.add_response("ok")
    result = run(app, "chat", "-", "-m", "fake/m", input="a long prompt\nover lines\n")
    assert result.exit_code == 0, result.output
    assert fake.last_request.messages[-1].text == "a long prompt\nover lines\n"


def test_chat_uses_llm_default_model(make_app):
    app = make_app(LLM_DEFAULT_MODEL="fake/default-model")
    fake = install_fake_llm(app)
    fake.add_response("ok")

    result = run(app, "chat", "Hi")

    assert result.exit_code == 0, result.output
    assert fake.last_request.model == "default-model"


def test_chat_prints_tool_calls(app, fake):
    fake.add_stream(["Let me check."], tool_calls=[ToolCall("call_9", "get_weather", {"city": "Paris"})])

    result = run(app, "chat", "Weather?", "-m", "fake/m")

    assert result.exit_code == 0, result.output
    assert result.stdout == 'Let me check.\ntool call: get_weather({"city": "Paris"}) [id call_9]\n'
    assert "finish: tool_calls" in result.stderr


def test_chat_without_a_model_is_a_one_line_error(app):
    result = run(app, "chat", "Hi")
    assert_one_line_error(result, "no model given", "LLM_DEFAULT_MODEL")


def test_chat_with_an_unknown_provider_is_a_one_line_error(app):
    result = run(app, "chat", "Hi", "-m", "nope/m")
    assert_one_line_error(result, "unknown provider 'nope'")


def test_chat_error_is_one_line_and_exit_1(app, fake):
    fake.add_error(LLMRateLimitError("slow down", retry_after=3))
    result = run(app, "chat", "Hi", "-m", "fake/m")
    assert_one_line_error(result, "fake/m: slow down")


def test_chat_error_without_stream_is_one_line_and_exit_1(app, fake):
    fake.add_error(LLMServerError("upstream 503"))
    result = run(app, "chat", "Hi", "-m", "fake/m", "--no-stream")
    assert_one_line_error(result, "upstream 503")


def test_chat_error_mid_stream_keeps_the_partial_answer(app, fake):
    fake.add_stream(["partial"], error=LLMConnectionError("connection reset"))
    result = run(app, "chat", "Hi", "-m", "fake/m")
    assert result.stdout == "partial\n"
    assert_one_line_error(result, "connection reset")
    assert fake.open_streams == 0


# --- flask llm chat against an OpenAI-compatible server ----------------------------------------


def _chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1_700_000_000,
        "model": "llama-local",
        "system_fingerprint": None,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        **extra,
    }


SSE_CHUNKS = [
    _chunk({"role": "assistant", "content": ""}),
    _chunk({"content": "Hel"}),
    _chunk({"content": "lo!"}),
    _chunk({}, "stop"),
    {
        **_chunk({}),
        "choices": [],
        "usage": {"prompt_tokens": 11, "completion_tokens": 2, "total_tokens": 13},
    },
]


def sse(chunks: list[dict[str, Any]], gate: threading.Event | None = None) -> Iterator[bytes]:
    """What the API sends: one ``data:`` event per chunk, then ``data: [DONE]``.

    With ``gate``, everything after the first text chunk waits until the gate opens.
    """
    for index, chunk in enumerate(chunks):
        yield f"data: {json.dumps(chunk)}\n\n".encode()
        if gate is not None and index == 1 and not gate.wait(10):
            return
    yield b"data: [DONE]\n\n"


def sse_handler(chunks: list[dict[str, Any]], gate: threading.Event | None = None):
    def handler(request: Request) -> Response:
        return Response(sse(chunks, gate), content_type="text/event-stream")

    return handler


@pytest.fixture
def profile_app(make_app, local_server):
    profiles = {"local": {"base_url": local_server.url_for("/v1"), "api_key": CANARY_KEY, "max_retries": 0}}
    return make_app(OPENAI_PROFILES=json.dumps(profiles))


def test_chat_streams_from_an_openai_compatible_profile(profile_app, local_server):
    local_server.expect_request("/v1/chat/completions", method="POST").respond_with_handler(
        sse_handler(SSE_CHUNKS)
    )

    result = run(profile_app, "chat", "Hi", "-m", "local/llama-local", "-s", "Be brief.")

    assert result.exit_code == 0, result.output
    assert result.stdout == "Hello!\n"
    assert result.stderr.startswith("[local/llama-local] tokens: 11 in, 2 out, 13 total; finish: stop;")
    body = json.loads(local_server.log[0][0].get_data())
    assert body["stream"] is True
    assert body["model"] == "llama-local"
    assert body["messages"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert CANARY_KEY not in result.output


def test_chat_no_stream_from_an_openai_compatible_profile(profile_app, local_server):
    from tests.conftest import chat_completion

    local_server.expect_request("/v1/chat/completions", method="POST").respond_with_json(
        chat_completion("Whole answer.", "llama-local")
    )
    result = run(profile_app, "chat", "Hi", "-m", "local/llama-local", "--no-stream")
    assert result.exit_code == 0, result.output
    assert result.stdout == "Whole answer.\n"
    assert "tokens: 5 in, 7 out, 12 total" in result.stderr
    assert "stream" not in json.loads(local_server.log[0][0].get_data())


def test_chat_http_error_from_a_profile_is_one_line_without_the_key(profile_app, local_server):
    local_server.expect_request("/v1/chat/completions").respond_with_json(
        {"error": {"message": f"Incorrect API key provided: {CANARY_KEY}", "type": "invalid_request_error",
                   "code": "invalid_api_key"}},
        status=401,
    )  # fmt: skip
    result = run(profile_app, "chat", "Hi", "-m", "local/llama-local")
    assert_one_line_error(result, "local/llama-local")
    assert CANARY_KEY not in result.output


def test_the_real_flask_command_prints_deltas_before_the_upstream_finishes(tmp_path, local_server):
    gate = threading.Event()
    local_server.expect_request("/v1/chat/completions", method="POST").respond_with_handler(
        sse_handler(SSE_CHUNKS, gate)
    )
    env = {
        **os.environ,
        "SECRET_KEY": secrets.token_hex(32),
        "INSTANCE_PATH": str(tmp_path),
        "DOTENV_PATH": str(tmp_path / "no.env"),
        "OPENAI_API_KEY": CANARY_KEY,
        "OPENAI_BASE_URL": local_server.url_for("/v1"),
        "OPENAI_MAX_RETRIES": "0",
    }
    env.pop("FLASK_APP", None)
    env.pop("PYTHONUNBUFFERED", None)  # stdout to a pipe is block-buffered: only flushing gets "Hel" out
    process = subprocess.Popen(
        [str(FLASK), "--app", "wsgi", "llm", "chat", "Hi", "--model", "openai/llama-local"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        received = b""
        deadline = time.monotonic() + 60
        while b"Hel" not in received and time.monotonic() < deadline:
            ready, _, _ = select.select([process.stdout], [], [], 0.2)
            if ready:
                data = os.read(process.stdout.fileno(), 1024)
                if not data:
                    break
                received += data
        # The upstream is still holding the rest back: "Hel" came through on its own.
        assert received == b"Hel", process.stderr.read() if process.poll() is not None else received
        gate.set()
        out, err = process.communicate(timeout=60)
    finally:
        gate.set()
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, err
    assert received + out == b"Hello!\n"
    assert b"tokens: 11 in, 2 out, 13 total" in err
    assert CANARY_KEY.encode() not in received + out + err


# --- flask llm models --------------------------------------------------------------------------


def test_models_lists_the_fake_and_marks_unconfigured_providers(app, fake):
    fake.models = ["small", "large"]

    result = run(app, "models")

    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[lines.index("fake:") + 1 : lines.index("fake:") + 3] == ["  small", "  large"]
    assert "openai: not configured (OPENAI_API_KEY)" in lines
    assert "gemini: not configured (GEMINI_API_KEY)" in lines
    assert "anthropic: not configured (ANTHROPIC_API_KEY)" in lines


def test_models_for_one_provider(app, fake):
    result = run(app, "models", "--provider", "fake")
    assert result.exit_code == 0, result.output
    assert result.stdout == "fake:\n  fake-model\n"


def test_models_for_an_unconfigured_provider_exits_1(app):
    result = run(app, "models", "--provider", "openai")
    assert result.exit_code == 1
    assert result.stdout == "openai: not configured (OPENAI_API_KEY)\n"


def test_models_for_an_unknown_provider_is_a_one_line_error(app):
    result = run(app, "models", "-p", "nope")
    assert_one_line_error(result, "unknown provider 'nope'")


class _BrokenListing(FakeProvider):
    def list_models(self) -> list[str]:
        raise LLMServerError("upstream 502\nwith a second line", provider=self.name)


def test_models_shows_a_failing_listing_on_one_line_and_exits_1(app, fake):
    app.extensions["llm"].register_provider("broken", _BrokenListing("broken"))

    result = run(app, "models")

    assert result.exit_code == 1
    assert "broken: error: broken: upstream 502" in result.stdout.splitlines()
    assert "fake:" in result.stdout.splitlines()  # the others are still listed
    assert "Traceback" not in result.output


def test_models_lists_an_openai_compatible_profile(profile_app, local_server):
    local_server.expect_request("/v1/models", method="GET").respond_with_json(
        {
            "object": "list",
            "data": [
                {"id": "llama-local", "object": "model", "created": 1, "owned_by": "me"},
                {"id": "qwen-local", "object": "model", "created": 1, "owned_by": "me"},
            ],
        }
    )
    result = run(profile_app, "models", "--provider", "local")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[0] == "local:"
    assert set(result.stdout.splitlines()[1:]) == {"  llama-local", "  qwen-local"}


def test_models_on_an_unreachable_profile_is_one_error_line_naming_the_url(make_app):
    port = free_port()
    profiles = {
        "down": {
            "base_url": f"http://admin:{CANARY_KEY}@127.0.0.1:{port}/v1",
            "api_key": "k",
            "max_retries": 0,
        }
    }
    app = make_app(OPENAI_PROFILES=json.dumps(profiles))
    result = run(app, "models", "--provider", "down")
    assert result.exit_code == 1
    lines = result.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith("down: error: ")
    assert lines[0].endswith(f"(http://admin:***@127.0.0.1:{port}/v1/models)")  # where it tried, no password
    assert "Traceback" not in result.output
    assert CANARY_KEY not in result.output


def _flask(tmp_path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """The real ``flask`` command in a copy of the project's layout: .env and instance/config.py."""
    instance = tmp_path / "instance"
    instance.mkdir(exist_ok=True)
    (instance / "config.py").write_text(
        f"SECRET_KEY = {secrets.token_hex(32)!r}\n"
    )  # as `make run` writes it
    environ = {k: v for k, v in os.environ.items() if k not in ("FLASK_APP", "OPENAI_API_KEY", "OLLAMA_HOST")}
    environ.update(INSTANCE_PATH=str(instance), DOTENV_PATH=str(tmp_path / ".env"), **env)
    return subprocess.run(
        [str(FLASK), "--app", "wsgi", *args],
        cwd=ROOT,
        env=environ,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_example_env_file_copied_as_it_is_runs_llm_models(tmp_path):
    (tmp_path / ".env").write_text((ROOT / ".env.example").read_text())

    result = _flask(tmp_path, "llm", "models")

    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines() == [
        "anthropic: not configured (ANTHROPIC_API_KEY)",
        "gemini: not configured (GEMINI_API_KEY)",
        "openai: not configured (OPENAI_API_KEY)",
    ]


def test_an_unreachable_ollama_is_named_by_its_url(tmp_path):
    (tmp_path / ".env").write_text((ROOT / ".env.example").read_text())
    port = free_port()  # nothing listens there

    result = _flask(tmp_path, "llm", "models", "--provider", "ollama", OLLAMA_HOST=f"http://127.0.0.1:{port}")

    assert result.returncode == 1
    assert result.stdout.strip() == (
        f"ollama: error: ollama: the provider could not be reached (http://127.0.0.1:{port}/v1/models)"
    )


# --- flask llm breakers ------------------------------------------------------------------------


def test_breakers_says_when_redis_is_unreachable_and_shows_the_local_state(make_app, disposable_redis):
    settings = {"REDIS_URL": disposable_redis.url, "LLM_BREAKER_MIN_CALLS": 1, "LLM_BREAKER_FAILURE_RATE": 1}
    app = make_app(settings)
    fake = install_fake_llm(app)
    fake.add_error(LLMServerError("down"))
    with app.app_context(), pytest.raises(LLMServerError):
        app.extensions["llm"].chat([{"role": "user", "content": "Hi"}], model="fake/shared")
    shared = run(app, "breakers")
    assert shared.exit_code == 0, shared.output
    assert _table(shared.stdout)["fake/shared"][1::3] == ["open", "redis"]
    assert shared.stderr == ""

    disposable_redis.stop()
    fake.add_error(LLMServerError("down"))
    with app.app_context(), pytest.raises(LLMServerError):
        app.extensions["llm"].chat([{"role": "user", "content": "Hi"}], model="fake/local")
    local = run(app, "breakers")

    assert local.exit_code == 1
    port = disposable_redis.port
    assert local.stderr.splitlines() == [
        f"Redis (redis://127.0.0.1:{port}/0) is unreachable: the shared breakers cannot be read;"
        " showing this process's own"
    ]
    rows = _table(local.stdout)
    assert rows["fake/local"][1::3] == ["open", "local"]
    assert rows["fake/shared"][1::3] == ["open", "local"]  # this process mirrored what Redis said
    # A process of its own (the real command) has seen no call: it says so, not "no breaker yet".
    fresh = run(make_app(settings), "breakers")
    assert fresh.exit_code == 1
    assert fresh.stdout.strip() == "this process has no breaker"
    assert "is unreachable" in fresh.stderr


def _table(output: str) -> dict[str, list[str]]:
    return {cells[0]: cells for cells in (re.split(r"\s{2,}", line.strip()) for line in output.splitlines())}


def test_breakers_without_redis_says_each_process_has_its_own(app):
    result = run(app, "breakers")
    assert result.exit_code == 0
    assert result.stdout.strip() == "no breaker has seen a call yet"
    assert "REDIS_URL is not set" in result.stderr


# --- flask llm pull ----------------------------------------------------------------------------


PULL_LINES = [
    {"status": "pulling manifest"},
    {"status": "pulling dde5aa3fc5ff", "digest": "sha256:dde5aa3fc5ff", "total": 2000, "completed": 0},
    {"status": "pulling dde5aa3fc5ff", "digest": "sha256:dde5aa3fc5ff", "total": 2000, "completed": 1000},
    {"status": "pulling dde5aa3fc5ff", "digest": "sha256:dde5aa3fc5ff", "total": 2000, "completed": 2000},
    {"status": "verifying sha256 digest"},
    {"status": "writing manifest"},
    {"status": "success"},
]


def ndjson_handler(lines: list[dict[str, Any]]):
    def handler(request: Request) -> Response:
        body = (json.dumps(line).encode() + b"\n" for line in lines)
        return Response(body, content_type="application/x-ndjson")

    return handler


@pytest.fixture
def ollama_app(make_app, local_server):
    return make_app(OLLAMA_HOST=local_server.url_for("").rstrip("/"))


def test_pull_shows_progress_in_percent_and_exits_0(ollama_app, local_server):
    local_server.expect_request(
        "/api/pull", method="POST", json={"model": "llama3.2", "stream": True}
    ).respond_with_handler(ndjson_handler(PULL_LINES))

    result = run(ollama_app, "pull", "llama3.2")

    assert result.exit_code == 0, result.output
    out = result.stdout
    assert out.index("pulling manifest\n") < out.index("\rpulling dde5aa3fc5ff:   0%")
    assert out.index("  0%") < out.index(" 50%") < out.index("100%") < out.index("verifying sha256 digest")
    assert "\rpulling dde5aa3fc5ff: 100% (2.0 KB / 2.0 KB)\n" in out
    assert out.rstrip().endswith(f"pulled llama3.2 into Ollama at {local_server.url_for('').rstrip('/')}")
    local_server.check_assertions()


def test_pull_error_line_exits_1_with_one_line(ollama_app, local_server):
    lines = [{"status": "pulling manifest"}, {"error": "pull model manifest: file does not exist"}]
    local_server.expect_request("/api/pull", method="POST").respond_with_handler(ndjson_handler(lines))

    result = run(ollama_app, "pull", "no-such-model")

    assert_one_line_error(result, "ollama/no-such-model", "file does not exist")
    assert result.stdout == "pulling manifest\n"


def test_pull_with_ollama_down_exits_1_with_one_line(make_app):
    app = make_app(OLLAMA_HOST=f"http://user:hunter2-secret@127.0.0.1:{free_port()}")
    result = run(app, "pull", "llama3.2")
    assert_one_line_error(result, "not reachable")
    assert "hunter2-secret" not in result.output
