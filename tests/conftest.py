"""Fixtures on real parts: redis-server, PostgreSQL, local HTTP servers, SQLite.

Every app is built by :func:`make_app`, which isolates it from the machine's
own environment (no ``OPENAI_API_KEY`` etc. leaks in) and from the project's
``.env``, and puts its instance folder in a temporary directory.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from pytest_httpserver import HTTPServer

from app import create_app
from app.config import DEFAULTS
from app.services import reset_services
from tests.payloads import chat_completion
from tests.servers import (
    PostgresServer,
    RedisServer,
    ScriptedServer,
    free_port,
    start_postgres,
    start_redis,
)

#: The test kit users get (app/testing/plugin.py), and pytester to run users' test files in tests.
pytest_plugins = ["app.testing.plugin", "pytester"]

__all__ = [
    "CANARY_GEMINI_KEY",
    "CANARY_KEY",
    "ROOT",
    "api_key_for_env",
    "api_key_headers",
    "chat_completion",
    "shared_dir",
]

#: A key that must never appear in any output. Tests configure it and grep for it.
CANARY_KEY = "sk-canary-7f3a9c1e5b2d4f608a1b3c5d7e9f0a2b"
CANARY_GEMINI_KEY = "AIza-canary-1b2c3d4e5f60718293a4b5c6d7e8f90"

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _isolated_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The machine's own settings must not leak into apps under test."""
    for key in [
        *DEFAULTS,
        "OPENAI_ORG_ID",
        "OPENAI_PROJECT_ID",
        "GROQ_API_KEY",
        "OPENROUTER_API_KEY",
        "INSTANCE_PATH",
        "DOTENV_PATH",
    ]:
        monkeypatch.delenv(key, raising=False)


@pytest.fixture
def make_app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Flask]]:
    """Build apps with TESTING on, a temporary instance folder and no .env; reset them after."""
    apps: list[Flask] = []

    def factory(config: dict[str, Any] | None = None, **settings: Any) -> Flask:
        instance = tmp_path_factory.mktemp("instance")
        merged = {
            # No retries of LLM calls unless a test asks: error tests expect one upstream attempt.
            "LLM_MAX_RETRIES": 0,
            "TESTING": True,
            "INSTANCE_PATH": str(instance),
            "DOTENV_PATH": str(instance / "no.env"),
            **(config or {}),
            **settings,
        }
        app = create_app(merged)
        apps.append(app)
        return app

    yield factory
    for app in apps:
        reset_services(app)


@pytest.fixture
def app(make_app: Callable[..., Flask]) -> Flask:
    """The default app of pytest-flask's ``client`` fixture: SQLite, nothing else configured."""
    return make_app()


def api_key_headers(app: Flask, name: str = "tests", **options: Any) -> dict[str, str]:
    """Headers with a new API key of ``app`` (its tables made if missing): ``/api`` needs one.

    ``options``: ``tenant``, ``rpm``, ``tpm``, ``expires_at`` of
    :func:`app.api_keys.create_api_key`. Keys stay on in tests, as in production.
    """
    from app.api_keys import create_api_key
    from app.services.db_service import db

    with app.app_context():
        db.create_all()
        _key_id, secret = create_api_key(name, **options)
    return {"Authorization": f"Bearer {secret}"}


def api_key_for_env(env: dict[str, str], name: str = "tests", **options: Any) -> dict[str, str]:
    """Headers with a new API key in the database of a process started with ``env`` (gunicorn).

    The key is made here, by an app built from the same settings (database and
    ``SECRET_KEY``), as ``flask api-keys create`` would make it there.
    """
    settings = {key: value for key, value in env.items() if key in DEFAULTS}
    app = create_app(
        {
            **settings,
            "TESTING": True,
            "INSTANCE_PATH": env["INSTANCE_PATH"],
            "DOTENV_PATH": env["DOTENV_PATH"],
        }
    )
    try:
        return api_key_headers(app, name, **options)
    finally:
        reset_services(app)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = start_redis()
    yield server
    server.stop()


@pytest.fixture
def disposable_redis() -> Iterator[RedisServer]:
    """A redis-server of the test's own, for tests that stop it."""
    server = start_redis()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    server = start_postgres()
    yield server
    server.stop()


@pytest.fixture
def upstream() -> Iterator[ScriptedServer]:
    """The test's own scripted upstream (OpenAI, Gemini, Anthropic...): real HTTP/1.1, kept alive.

    One per test rather than one per session: it starts and stops in about a
    millisecond, and a late request of one test (an SDK retry in flight, a
    hung call) can never land in the next test's record.
    """
    server = ScriptedServer()
    yield server
    server.stop()


@pytest.fixture
def keepalive_server(upstream: ScriptedServer) -> ScriptedServer:
    """``upstream`` under the name older tests use for connection-reuse checks."""
    return upstream


class LocalHTTPServer(HTTPServer):
    """pytest-httpserver that stops in milliseconds: its loop polls for shutdown every 20 ms.

    werkzeug's default poll interval (0.5 s) made every test with a server of
    its own half a second slower; a server shared between tests instead let a
    late request of one test (an SDK retry in flight) land in the next one's log.
    """

    def thread_target(self) -> None:
        assert self.server is not None
        self.server.serve_forever(poll_interval=0.02)


@pytest.fixture
def local_server() -> Iterator[HTTPServer]:
    """A threaded HTTP server on 127.0.0.1 of the test's own.

    werkzeug closes every connection after a response, so tests about
    connection reuse use ``upstream`` (new tests should use it throughout).
    """
    server = LocalHTTPServer(host="127.0.0.1", port=0, threaded=True)
    server.start()
    yield server
    server.clear()
    if server.is_running():
        server.stop()


#: Where Prism is installed with npm: kept between sessions, so only the first run pays for it.
PRISM_HOME = Path(tempfile.gettempdir()) / "flask-services-prism"


@dataclass(frozen=True)
class Prism:
    port: int
    home: Path

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"


@pytest.fixture(scope="session")
def prism() -> Iterator[Prism]:
    """The official OpenAI spec served by Prism (../shared/peers/openai-spec-mock): 422 when invalid."""
    shared = shared_dir()
    if shared is None:
        pytest.skip("../shared is not beside the project, so the openai-spec-mock peer is not available")
    peer = shared / "peers" / "openai-spec-mock"
    if not (peer / "start.sh").is_file():
        pytest.skip(f"{peer}/start.sh is missing")
    if shutil.which("npm") is None or shutil.which("node") is None:
        pytest.skip("node and npm are needed to install and run Prism (the OpenAI spec mock)")
    server = Prism(free_port(), PRISM_HOME)
    env = {
        **os.environ,
        "PRISM_PORT": str(server.port),
        "PRISM_HOME": str(server.home),
        "PRISM_LOG_LEVEL": "warn",
    }
    # A Prism left running by an interrupted session would make start.sh report "already running".
    subprocess.run([str(peer / "stop.sh")], env=env, capture_output=True, timeout=60, check=False)
    started = subprocess.run(
        [str(peer / "start.sh")], env=env, capture_output=True, text=True, timeout=300, check=False
    )
    try:
        if started.returncode != 0:
            pytest.fail(f"Prism did not start:\n{started.stdout}\n{started.stderr}")
        yield server
    finally:
        subprocess.run([str(peer / "stop.sh")], env=env, capture_output=True, timeout=60, check=False)


def shared_dir() -> Path | None:
    """``../shared`` beside the project (CI puts it there), if present."""
    candidate = ROOT.parent / "shared"
    return candidate if candidate.is_dir() else None
