"""``llm.ollama``: Ollama's native API, against a local server that speaks it (NDJSON pulls included)."""

from __future__ import annotations

import base64
import json
import socket
import time
from collections.abc import Iterator

import pytest
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

from app.llm import (
    LLMConnectionError,
    LLMNotFoundError,
    LLMRateLimitError,
    LLMResponseError,
    LLMServerError,
    LLMTimeoutError,
    get_llm,
)
from app.llm.ollama import DEFAULT_HOST, OllamaManager, model_key
from tests.servers import free_port

TAGS = {
    "models": [
        {
            "name": "llama3.2:latest",
            "model": "llama3.2:latest",
            "modified_at": "2025-01-01T00:00:00Z",
            "size": 2019393189,
            "digest": "a80c4f17acd55265feec403c7aef86be0c25983ab279d83f3bcd3abbcb5b8b72",
            "details": {"format": "gguf", "family": "llama", "parameter_size": "3.2B"},
        },
        {
            "name": "qwen2.5:0.5b",
            "model": "qwen2.5:0.5b",
            "modified_at": "2025-01-01T00:00:00Z",
            "size": 397821319,
            "digest": "a8b0c51577010a279d933d14c2a8ab4b268079d44c5c8830c0a93900f1827c67",
            "details": {"format": "gguf", "family": "qwen2", "parameter_size": "494.03M"},
        },
    ]
}

LAYER = {"status": "pulling dde5aa3fc5ff", "digest": "sha256:dde5aa3fc5ff", "total": 2019377376}
PULL_LINES = [
    {"status": "pulling manifest"},
    LAYER,
    {**LAYER, "completed": 1009688688},
    {**LAYER, "completed": 2019377376},
    {"status": "verifying sha256 digest"},
    {"status": "writing manifest"},
    {"status": "success"},
]


def ndjson(lines: list[dict], pause: float = 0.0) -> Iterator[bytes]:
    for line in lines:
        yield (json.dumps(line) + "\n").encode()
        if pause:
            time.sleep(pause)


def pull_handler(lines: list[dict], pause: float = 0.0):
    def handler(request: Request) -> Response:
        return Response(ndjson(lines, pause), content_type="application/x-ndjson")

    return handler


@pytest.fixture
def ollama_app(make_app, local_server: HTTPServer):
    return make_app(OLLAMA_HOST=local_server.url_for("").rstrip("/"))


@pytest.fixture
def ollama(ollama_app) -> OllamaManager:
    with ollama_app.app_context():
        return get_llm().ollama


def _paths(server: HTTPServer) -> list[str]:
    return [request.path for request, _ in server.log]


# --- configuration -------------------------------------------------------------------------


def test_for_app_defaults_to_the_local_ollama_port(make_app):
    app = make_app()
    with app.app_context():
        manager = get_llm().ollama
    assert manager.endpoint == DEFAULT_HOST == "http://127.0.0.1:11434"
    assert manager.timeout == 5.0
    assert manager.pull_timeout == 300.0


def test_for_app_follows_ollama_host_and_timeouts(make_app):
    app = make_app(OLLAMA_HOST="http://gpu-box:11500/", OLLAMA_TIMEOUT="2.5", OLLAMA_PULL_TIMEOUT=60)
    manager = OllamaManager.for_app(app)
    assert manager.endpoint == "http://gpu-box:11500"
    assert (manager.timeout, manager.connect_timeout, manager.pull_timeout) == (2.5, 2.5, 60.0)


def test_model_key_adds_the_latest_tag_only_when_there_is_none():
    assert model_key("llama3.2") == "llama3.2:latest"
    assert model_key("Llama3.2:latest") == "llama3.2:latest"
    assert model_key("qwen2.5:0.5b") == "qwen2.5:0.5b"
    assert model_key("registry.local:5000/team/model") == "registry.local:5000/team/model:latest"


# --- is_available --------------------------------------------------------------------------


def test_is_available_true_when_ollama_answers_its_version(ollama, local_server):
    local_server.expect_request("/api/version", method="GET").respond_with_json({"version": "0.5.7"})
    assert ollama.is_available() is True
    assert ollama.version() == "0.5.7"


def test_is_available_false_on_a_closed_port():
    manager = OllamaManager(f"http://127.0.0.1:{free_port()}")
    assert manager.is_available() is False


def test_is_available_false_when_ollama_answers_an_error(ollama, local_server):
    local_server.expect_request("/api/version").respond_with_data("boom", status=500)
    assert ollama.is_available() is False


def test_is_available_false_within_its_timeout_when_nothing_answers():
    with socket.socket() as listener:  # accepts connections (backlog), never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        manager = OllamaManager(f"http://127.0.0.1:{listener.getsockname()[1]}", timeout=10)
        started = time.monotonic()
        assert manager.is_available(timeout=0.3) is False
        assert time.monotonic() - started < 3


# --- list_models / has_model ---------------------------------------------------------------


def test_list_models_returns_the_tag_names(ollama, local_server):
    local_server.expect_request("/api/tags", method="GET").respond_with_json(TAGS)
    assert ollama.list_models() == ["llama3.2:latest", "qwen2.5:0.5b"]


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("llama3.2", True),
        ("llama3.2:latest", True),
        ("qwen2.5:0.5b", True),
        ("qwen2.5", False),  # qwen2.5:latest is not there, only the 0.5b tag
        ("llama3.2:1b", False),
        ("mistral", False),
    ],
)
def test_has_model_matches_with_and_without_the_tag(ollama, local_server, name, expected):
    local_server.expect_request("/api/tags").respond_with_json(TAGS)
    assert ollama.has_model(name) is expected


def test_queries_keep_a_path_prefix_of_ollama_host(make_app, local_server):
    local_server.expect_request("/ollama/api/tags").respond_with_json(TAGS)
    app = make_app(OLLAMA_HOST=local_server.url_for("/ollama/"))
    assert OllamaManager.for_app(app).list_models()[0] == "llama3.2:latest"


def test_list_models_on_a_closed_port_is_a_connection_error():
    manager = OllamaManager(f"http://127.0.0.1:{free_port()}")
    with pytest.raises(LLMConnectionError) as caught:
        manager.list_models()
    assert caught.value.provider == "ollama"
    assert isinstance(caught.value.__cause__, OSError)


def test_list_models_server_error_is_typed_with_the_status(ollama, local_server):
    local_server.expect_request("/api/tags").respond_with_json({"error": "llama runner crashed"}, status=500)
    with pytest.raises(LLMServerError) as caught:
        ollama.list_models()
    assert caught.value.status_code == 500
    assert "llama runner crashed" in str(caught.value)


def test_list_models_rejects_an_answer_without_models(ollama, local_server):
    local_server.expect_request("/api/tags").respond_with_data("<html>proxy</html>", content_type="text/html")
    with pytest.raises(LLMResponseError) as caught:
        ollama.list_models()
    assert "<html>proxy" in (caught.value.raw_text or "")


def test_a_slow_query_is_a_timeout_error(local_server):
    def slow(request: Request) -> Response:
        time.sleep(1.5)
        return Response(json.dumps(TAGS), content_type="application/json")

    local_server.expect_request("/api/tags").respond_with_handler(slow)
    manager = OllamaManager(local_server.url_for("").rstrip("/"), timeout=0.3)
    started = time.monotonic()
    with pytest.raises(LLMTimeoutError):
        manager.list_models()
    assert time.monotonic() - started < 1.4


def test_credentials_in_ollama_host_go_as_basic_auth_and_never_show(make_app, local_server):
    local_server.expect_request(
        "/api/tags", headers={"Authorization": "Basic " + base64.b64encode(b"admin:s3cret-pass").decode()}
    ).respond_with_json(TAGS)
    app = make_app(OLLAMA_HOST=local_server.url_for("").replace("http://", "http://admin:s3cret-pass@"))
    manager = OllamaManager.for_app(app)
    assert manager.list_models() == ["llama3.2:latest", "qwen2.5:0.5b"]
    assert "s3cret-pass" not in manager.endpoint and "s3cret-pass" not in repr(manager)

    closed = OllamaManager(f"http://admin:s3cret-pass@127.0.0.1:{free_port()}")
    with pytest.raises(LLMConnectionError) as caught:
        closed.list_models()
    assert "s3cret-pass" not in str(caught.value)
    assert "admin:***@127.0.0.1" in str(caught.value)


# --- pull_model / ensure_model -------------------------------------------------------------


def test_pull_sends_the_model_and_calls_progress_per_line_in_order(ollama, local_server):
    local_server.expect_request(
        "/api/pull", method="POST", json={"model": "llama3.2", "stream": True}
    ).respond_with_handler(pull_handler(PULL_LINES))
    seen: list[dict] = []

    ollama.pull_model("llama3.2", progress=seen.append)

    assert seen == PULL_LINES
    local_server.check_assertions()


def test_pull_progress_arrives_while_the_pull_runs(ollama, local_server):
    local_server.expect_request("/api/pull", method="POST").respond_with_handler(
        pull_handler(PULL_LINES, pause=0.1)
    )
    arrivals: list[float] = []
    started = time.monotonic()

    ollama.pull_model("llama3.2", progress=lambda line: arrivals.append(time.monotonic() - started))

    assert len(arrivals) == len(PULL_LINES)
    assert arrivals[0] < arrivals[-1] - 0.4  # the first line came long before the last


def test_pull_error_line_raises_a_typed_error_and_stops(ollama, local_server):
    lines = [{"status": "pulling manifest"}, {"error": "pull model manifest: file does not exist"}]
    local_server.expect_request("/api/pull", method="POST").respond_with_handler(pull_handler(lines))
    seen: list[dict] = []

    with pytest.raises(LLMNotFoundError) as caught:
        ollama.pull_model("no-such-model", progress=seen.append)

    assert seen == [{"status": "pulling manifest"}]
    assert (caught.value.provider, caught.value.model) == ("ollama", "no-such-model")
    assert "file does not exist" in str(caught.value)


def test_pull_error_line_of_another_kind_is_a_server_error(ollama, local_server):
    lines = [{"status": "pulling manifest"}, {"error": "max retries exceeded: unexpected EOF"}]
    local_server.expect_request("/api/pull", method="POST").respond_with_handler(pull_handler(lines))
    with pytest.raises(LLMServerError, match="max retries exceeded"):
        ollama.pull_model("llama3.2")


def test_pull_http_429_keeps_retry_after(ollama, local_server):
    local_server.expect_request("/api/pull", method="POST").respond_with_json(
        {"error": "too many requests"}, status=429, headers={"Retry-After": "7"}
    )
    with pytest.raises(LLMRateLimitError) as caught:
        ollama.pull_model("llama3.2")
    assert caught.value.retry_after == 7.0
    assert caught.value.status_code == 429


def test_pull_that_ends_before_success_is_an_error(ollama, local_server):
    local_server.expect_request("/api/pull", method="POST").respond_with_handler(pull_handler(PULL_LINES[:3]))
    with pytest.raises(LLMConnectionError, match="before it reported success"):
        ollama.pull_model("llama3.2")


def test_pull_with_a_malformed_line_is_a_response_error(ollama, local_server):
    def handler(request: Request) -> Response:
        return Response([b'{"status": "pulling manifest"}\n', b"<html>bad gateway</html>\n"])

    local_server.expect_request("/api/pull", method="POST").respond_with_handler(handler)
    with pytest.raises(LLMResponseError) as caught:
        ollama.pull_model("llama3.2")
    assert caught.value.raw_text == "<html>bad gateway</html>"


def test_pull_read_timeout_applies_between_lines(local_server):
    local_server.expect_request("/api/pull", method="POST").respond_with_handler(
        pull_handler(PULL_LINES, pause=1.5)
    )
    manager = OllamaManager(local_server.url_for("").rstrip("/"), pull_timeout=0.3)
    seen: list[dict] = []
    with pytest.raises(LLMTimeoutError):
        manager.pull_model("llama3.2", progress=seen.append)
    assert seen == PULL_LINES[:1]


def test_ensure_model_does_not_pull_a_model_that_is_there(ollama, local_server):
    local_server.expect_request("/api/tags").respond_with_json(TAGS)
    local_server.expect_request("/api/pull").respond_with_handler(pull_handler(PULL_LINES))

    assert ollama.ensure_model("llama3.2") is False

    assert _paths(local_server) == ["/api/tags"]


def test_ensure_model_pulls_a_missing_model(ollama, local_server):
    local_server.expect_request("/api/tags").respond_with_json(TAGS)
    local_server.expect_request(
        "/api/pull", method="POST", json={"model": "mistral", "stream": True}
    ).respond_with_handler(pull_handler(PULL_LINES))
    seen: list[dict] = []

    assert ollama.ensure_model("mistral", progress=seen.append) is True

    assert _paths(local_server) == ["/api/tags", "/api/pull"]
    assert seen[-1] == {"status": "success"}
