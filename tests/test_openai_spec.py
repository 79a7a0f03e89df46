"""What the app sends through the real openai SDK, validated against the official OpenAI spec.

Stoplight Prism (``../shared/peers/openai-spec-mock``) serves the OpenAI OpenAPI
spec in mock mode and answers 422 to any request the spec rejects. The first
start installs Prism with npm (about 15 s) and boots it (about 20 s).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from app.services.openai_service import get_openai_client
from tests.conftest import CANARY_KEY, shared_dir
from tests.servers import free_port

pytestmark = pytest.mark.slow


@dataclass(frozen=True)
class Prism:
    port: int
    home: Path

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"


@pytest.fixture(scope="session")
def prism() -> Iterator[Prism]:
    shared = shared_dir()
    if shared is None:
        pytest.skip("../shared is not beside the project, so the openai-spec-mock peer is not available")
    peer = shared / "peers" / "openai-spec-mock"
    if not (peer / "start.sh").is_file():
        pytest.skip(f"{peer}/start.sh is missing")
    if shutil.which("npm") is None or shutil.which("node") is None:
        pytest.skip("node and npm are needed to install and run Prism (the OpenAI spec mock)")
    server = Prism(free_port(), Path(tempfile.mkdtemp(prefix="prism-", dir="/tmp")))
    env = {
        **os.environ,
        "PRISM_PORT": str(server.port),
        "PRISM_HOME": str(server.home),
        "PRISM_LOG_LEVEL": "warn",
    }
    started = subprocess.run(
        [str(peer / "start.sh")], env=env, capture_output=True, text=True, timeout=300, check=False
    )
    try:
        if started.returncode != 0:
            pytest.fail(f"Prism did not start:\n{started.stdout}\n{started.stderr}")
        yield server
    finally:
        subprocess.run([str(peer / "stop.sh")], env=env, capture_output=True, timeout=60, check=False)
        shutil.rmtree(server.home, ignore_errors=True)


@pytest.fixture
def spec_app(make_app, prism):
    return make_app(
        OPENAI_API_KEY=CANARY_KEY,
        OPENAI_BASE_URL=prism.base_url,
        OPENAI_MAX_RETRIES=0,
        OPENAI_TIMEOUT=30,  # Prism never answers some malformed bodies
    )


def _chat(app, messages, model="gpt-4o-mini"):
    return app.test_client().post("/api/chat", json={"messages": messages, "model": model})


@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "user", "content": "Hi"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Hi"},
         {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "And?"}],
        [{"role": "user", "content": [{"type": "text", "text": "Describe this"}]}],
    ],
    ids=["user", "system", "conversation", "content-parts"],
)  # fmt: skip
def test_what_api_chat_sends_is_valid_by_the_spec(spec_app, messages):
    response = _chat(spec_app, messages)

    assert response.status_code == 200, response.get_data(as_text=True)
    body = response.json
    assert set(body) == {"content", "model", "usage"}
    assert isinstance(body["content"], str)  # Prism's example completion
    assert set(body["usage"]) == {"prompt_tokens", "completion_tokens", "total_tokens"}


def test_a_request_the_spec_rejects_comes_back_as_400_upstream_rejected(spec_app):
    # Valid for /api/chat's own checks, but the spec requires tool_call_id on a tool message.
    response = _chat(spec_app, [{"role": "tool", "content": "42"}])

    assert response.status_code == 400, response.get_data(as_text=True)
    error = response.json["error"]
    assert error["type"] == "upstream_rejected"
    assert error["upstream_status"] == 422


@pytest.mark.parametrize(
    "kwargs",
    [
        {"messages": [], "model": "gpt-4o-mini"},
        {"messages": [{"role": "bogus", "content": "hi"}], "model": "gpt-4o-mini"},
        {"messages": [{"role": "user", "content": "hi"}], "model": "gpt-4o-mini",
         "extra_body": {"temperature": "hot"}},
        {"messages": [{"role": "user", "content": "hi"}], "model": 123},
    ],
    ids=["no-messages", "bad-role", "bad-temperature", "bad-model"],
)  # fmt: skip
def test_the_mock_does_reject_invalid_requests(spec_app, kwargs):
    import openai

    with spec_app.app_context():
        client = get_openai_client()
        with pytest.raises(openai.UnprocessableEntityError) as excinfo:
            client.chat.completions.create(**kwargs)

    assert excinfo.value.status_code == 422


def test_the_clients_own_request_is_valid_by_the_spec(spec_app):
    with spec_app.app_context():
        completion = get_openai_client().chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "hi"}],
            temperature=0.2,
            max_completion_tokens=16,
        )
    assert completion.object == "chat.completion"
    assert completion.choices
