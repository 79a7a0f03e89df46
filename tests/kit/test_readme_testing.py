"""The README's "Testing your app", followed as a user would: new test files, run by pytest.

Each test writes a user's test files into a fresh folder (pytester) with the one line the
project's ``conftest.py`` has, ``pytest_plugins = ["app.testing.plugin"]``, and runs pytest
there in a subprocess: the kit is exercised exactly as users get it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.payloads import (
    chat_completion,
    openai_chunk,
    openai_role_chunk,
    openai_sse,
    openai_text_events,
    openai_tool_chunks,
    openai_usage_chunk,
)
from tests.readme import python_blocks
from tests.servers import Reply, ScriptedServer

CANARY = "sk-proj-canaryReadmeKit0123456789abcdefABCDEF"
SECTION = "Testing your app"

#: Writes every socket connection the inner pytest makes, and every name it resolves, to a file.
AUDIT_CONFTEST = """
import json, os, sys

pytest_plugins = ["app.testing.plugin"]

_log = os.environ.get("SOCKET_AUDIT_LOG")

def _audit(event, args):
    if _log and event in ("socket.connect", "socket.getaddrinfo"):
        target = repr(args[1] if event == "socket.connect" else args[0])
        test = os.environ.get("PYTEST_CURRENT_TEST", "")
        with open(_log, "a") as file:
            file.write(json.dumps([test, event, target]) + "\\n")

sys.addaudithook(_audit)
"""

UPSTREAM_SETTINGS = """
import os
import pytest

@pytest.fixture
def app_settings():
    return {"OPENAI_BASE_URL": os.environ["UPSTREAM"], "OPENAI_API_KEY": os.environ["RECORD_KEY"]}
"""


def _run(pytester: pytest.Pytester, *args: str, **env: str) -> pytest.RunResult:
    for name, value in env.items():
        pytester._monkeypatch.setenv(name, value)
    return pytester.runpytest_subprocess("-p", "no:cacheprovider", "-q", *args, timeout=120)


def _audit(pytester: pytest.Pytester) -> list[list[str]]:
    log = Path(pytester.path) / "audit.log"
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text().splitlines()]


@pytest.fixture
def user_project(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makeconftest(AUDIT_CONFTEST)
    pytester._monkeypatch.setenv("SOCKET_AUDIT_LOG", str(Path(pytester.path) / "audit.log"))
    # A real-looking key in a .env the user's shell points at: the kit must never use it.
    (Path(pytester.path) / ".env").write_text(f"OPENAI_API_KEY={CANARY}\n")
    pytester._monkeypatch.setenv("DOTENV_PATH", str(Path(pytester.path) / ".env"))
    pytester._monkeypatch.setenv("OPENAI_API_KEY", CANARY)
    return pytester


FORGOT_THE_FAKE = """
def test_forgot_the_fake(client, api_headers):
    r = client.post(
        "/api/chat",
        headers=api_headers,
        json={"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "Hi"}]},
    )
    assert r.status_code == 200
"""

ALLOWED = """
import pytest
from app.llm import LLMConnectionError, get_llm

@pytest.mark.allow_real_llm
@pytest.mark.app_settings(OPENAI_BASE_URL="http://real-provider.invalid/v1", OPENAI_TIMEOUT=2)
def test_marked(app):
    with app.app_context(), pytest.raises(LLMConnectionError) as caught:
        get_llm().chat([{"role": "user", "content": "Hi"}], model="openai/gpt-4o-mini")
    assert "real-call guard" not in "".join(str(e) for e in (caught.value, caught.value.__cause__))
"""


def test_new_test_files_written_from_the_readme(user_project):
    """The README's test file and fake example pass as written; a forgotten fake meets the guard."""
    view_tests, _cassette, fake_script = python_blocks(SECTION)
    body = view_tests.split("def test_chat_answers")[1].split("\n\n")[0].splitlines()[1:]
    assert len([line for line in body if line.strip()]) <= 5, body  # a view test in at most 5 lines
    user_project.makepyfile(
        test_my_views=view_tests, test_fake_script=fake_script, test_forgot=FORGOT_THE_FAKE, test_real=ALLOWED
    )
    result = _run(user_project, "-vv")
    result.assert_outcomes(passed=4, failed=1)
    output = result.stdout.str()

    # The README's scripted error passed: 429 with Retry-After. Under the old hidden-retry
    # behaviour the policy waited 3 s, retried, found nothing scripted and answered 502.
    assert "test_my_views.py::test_a_rate_limit_reaches_the_client PASSED" in output

    # The forgotten fake: the test fails naming the guard and how to allow a real call ...
    assert "FAILED test_forgot.py::test_forgot_the_fake" in output
    assert "real-call guard refused POST api.openai.com/v1/chat/completions" in output
    assert "@pytest.mark.allow_real_llm" in output and "--allow-real-llm" in output
    assert CANARY not in output  # ... without the real-looking key of .env and the environment
    # ... and refused before any connection: no name resolved, no socket connected, in any test but
    # the one marked to allow it (whose ".invalid" name does not resolve here).
    audited = _audit(user_project)
    assert [entry for entry in audited if "test_real.py" not in entry[0]] == [], audited
    assert any("real-provider.invalid" in entry[2] for entry in audited), "the marked test got through"


def _script_recording(upstream: ScriptedServer) -> None:
    upstream.script("/v1/chat/completions", chat_completion("Hello from the recording"))
    upstream.script(
        "/v1/chat/completions",
        Reply.stream(openai_text_events("Hel", "lo")),
    )
    tool_stream = openai_sse(
        openai_role_chunk(),
        *openai_tool_chunks(0, "call_1", "get_weather", '{"city":', '"Paris"}'),
        openai_chunk({}, "tool_calls"),
        openai_usage_chunk(9, 3),
    )
    upstream.script("/v1/chat/completions", Reply.stream([tool_stream]))


CASSETTE_TESTS = """
import pytest
from app.llm import get_llm

MESSAGES = [{"role": "user", "content": "Say hello"}]
CITY = {"type": "object", "properties": {"city": {"type": "string"}}}
TOOLS = [{"name": "get_weather", "description": "Weather", "parameters": CITY}]


@pytest.mark.llm_cassette("recorded")
def test_chat_stream_and_tools(app):
    with app.app_context():
        llm = get_llm()
        assert llm.chat(MESSAGES, model="openai/gpt-4o-mini").content == "Hello from the recording"
        with llm.chat_stream(MESSAGES, model="openai/gpt-4o-mini", temperature=0) as stream:
            assert list(stream) == ["Hel", "lo"]
        with llm.chat_stream(MESSAGES, model="openai/gpt-4o-mini", tools=TOOLS) as stream:
            list(stream)
        assert stream.response.tool_calls[0].arguments == {"city": "Paris"}
"""


def test_a_cassette_recorded_against_a_local_upstream_replays_with_it_stopped(user_project, upstream):
    """Chat, stream and tools, and the README's cassette example: recorded once, replayed offline."""
    user_project.makeconftest(AUDIT_CONFTEST + UPSTREAM_SETTINGS)
    user_project.makepyfile(test_cassette=CASSETTE_TESTS, test_greeting=python_blocks(SECTION)[1])
    _script_recording(upstream)
    upstream.script("/v1/chat/completions", chat_completion("Hello!"))  # the README's greeting
    env = {"UPSTREAM": upstream.url_for("/v1"), "RECORD_KEY": CANARY}
    _run(user_project, "--llm-record", **env).assert_outcomes(passed=2)
    assert len(upstream.requests) == 4
    for cassette in (Path(user_project.path) / "cassettes").glob("*.json"):
        text = cassette.read_text()
        assert CANARY not in text and "authorization" not in text.lower()

    upstream.stop()  # replay: nothing listens any more
    # ... and a request that is not in the cassette fails, naming what differed.
    changed = CASSETTE_TESTS.replace('"Say hello"', '"Say goodbye"').replace(
        "def test_chat_stream_and_tools", "def test_changed"
    )
    user_project.makepyfile(test_changed=changed)
    result = _run(user_project, **env)
    result.assert_outcomes(passed=2, failed=1)
    assert "FAILED test_changed.py::test_changed" in result.stdout.str()
    assert "differs in: messages[0].parts[0].text" in result.stdout.str()


def test_the_adding_a_service_example_runs(app, upstream):
    (example,) = python_blocks("Adding a service")
    app.config.update(WEATHER_BASE_URL=upstream.url_for("/v1"), WEATHER_API_KEY=CANARY)
    upstream.script("/v1/forecast", {"city": "Paris", "celsius": 12})
    namespace: dict[str, Any] = {"app": app}
    exec(compile(example, "README.md", "exec"), namespace)
    assert namespace["forecast"] == {"city": "Paris", "celsius": 12}
    assert upstream.only_request().query == {"city": "Paris"}
