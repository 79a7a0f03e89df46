"""The pytest plugin for apps built on this project (registered by ``tests/conftest.py``).

Fixtures: ``app_settings`` (a dict merged into the test settings; override it
in a module or conftest, or per test with ``@pytest.mark.app_settings(...)``),
``app``, ``client`` (pytest-flask's), ``api_headers``, ``db``, ``redis`` and
``redis_url`` (a private redis-server for the session, flushed per test),
``fake_llm`` (the scripted fake answering under every provider name the app
knows). The real-call guard refuses any SDK request past loopback unless a test
is marked ``@pytest.mark.allow_real_llm`` or pytest runs with
``--allow-real-llm``; ``@pytest.mark.llm_cassette("name")`` replays
``cassettes/name.json`` beside the test file, and ``--llm-record`` records it.

The test settings, which differ from production on purpose and are listed in
the README: ``TESTING``; an instance folder and SQLite database of the test's
own; the project's ``.env`` and the environment's settings of this app ignored;
a placeholder key for every built-in provider (so that a test that forgets the
fake reaches the guard, not a "not configured" error); ``LLM_MAX_RETRIES=0``
(a scripted error is the answer, with no hidden wait and no retry).
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from app.connectors.outbound import install_guard
from app.testing.guard import RealCallGuard

if TYPE_CHECKING:
    from flask import Flask
    from flask_sqlalchemy import SQLAlchemy
    from redis import Redis

    from app.llm.testing import FakeProvider
    from app.testing.servers import RedisServer

GUARD = RealCallGuard()

#: Placeholder keys: real-looking enough for every SDK, useless anywhere.
PLACEHOLDER_KEYS = {
    "OPENAI_API_KEY": "sk-test-kit-placeholder",
    "GEMINI_API_KEY": "test-kit-placeholder",
    "ANTHROPIC_API_KEY": "sk-ant-test-kit-placeholder",
}
#: Environment variables that name a provider's key outside the app's own prefixes.
_KEY_VARIABLES = ("GOOGLE_API_KEY", "GROQ_API_KEY", "OPENROUTER_API_KEY", "AZURE_OPENAI_API_KEY")


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("flask-services", "the app's test kit")
    group.addoption(
        "--allow-real-llm",
        action="store_true",
        help="let SDK clients reach real providers (the real-call guard is off for the whole run)",
    )
    group.addoption(
        "--llm-record",
        action="store_true",
        help="record the cassettes of @pytest.mark.llm_cassette tests from the configured providers",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "allow_real_llm: this test may call real providers")
    config.addinivalue_line("markers", "llm_cassette(name): replay (or record) cassettes/<name>.json")
    config.addinivalue_line("markers", "app_settings(**settings): settings of this test's app")
    install_guard(GUARD)


def pytest_unconfigure(config: pytest.Config) -> None:
    install_guard(None)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    """Fail a test whose code tried a real call, even if the app turned the refusal into a 502."""
    GUARD.allowed = bool(
        item.config.getoption("allow_real_llm")
        or item.get_closest_marker("allow_real_llm")
        or (item.config.getoption("llm_record") and item.get_closest_marker("llm_cassette"))
    )
    GUARD.take_refused()
    try:
        result = yield
    except BaseException as exc:
        refused = GUARD.take_refused()
        if refused and not isinstance(exc, pytest.fail.Exception):
            raise pytest.fail.Exception("\n".join(dict.fromkeys(refused)), pytrace=False) from exc
        raise
    finally:
        GUARD.allowed = False
    refused = GUARD.take_refused()
    if refused:
        pytest.fail("\n".join(dict.fromkeys(refused)), pytrace=False)
    return result


# --- fixtures ------------------------------------------------------------------------------


@pytest.fixture
def app_settings() -> dict[str, Any]:
    """Settings merged into the ``app`` fixture's test settings: override this fixture to change them."""
    return {}


@pytest.fixture
def app(
    app_settings: dict[str, Any],
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Flask]:
    """The app, built by ``create_app`` with the test settings (see the module docstring)."""
    from app import create_app
    from app.config import DEFAULTS
    from app.services import reset_services

    for key in (*DEFAULTS, *_KEY_VARIABLES, "DOTENV_PATH", "INSTANCE_PATH"):
        monkeypatch.delenv(key, raising=False)
    folder = tmp_path_factory.mktemp("app")
    settings: dict[str, Any] = {
        "TESTING": True,
        "INSTANCE_PATH": str(folder / "instance"),
        "DOTENV_PATH": str(folder / "no.env"),  # the project's .env is not read
        "DATABASE_URL": f"sqlite:///{folder / 'test.db'}",
        "LLM_MAX_RETRIES": 0,
        **PLACEHOLDER_KEYS,
    }
    if "redis" in request.fixturenames or "redis_url" in request.fixturenames:
        settings["REDIS_URL"] = request.getfixturevalue("redis_url")
    for marker in reversed(list(request.node.iter_markers("app_settings"))):
        settings.update(*marker.args, **marker.kwargs)
    settings.update(app_settings)
    flask_app = create_app(settings)
    cassette = request.node.get_closest_marker("llm_cassette")
    if cassette is not None:
        _install_cassette(flask_app, request, cassette)
    yield flask_app
    if cassette is not None:
        saving = flask_app.extensions.get("test_kit_cassette")
        if saving is not None and saving.recording:
            saving.save()
    reset_services(flask_app)


def _install_cassette(flask_app: Flask, request: pytest.FixtureRequest, marker: pytest.Mark) -> None:
    from app.testing.cassettes import Cassette, CassetteProvider

    if not marker.args:
        raise pytest.UsageError('@pytest.mark.llm_cassette needs a name: @pytest.mark.llm_cassette("chat")')
    path = Path(request.node.path).parent / "cassettes" / f"{marker.args[0]}.json"
    cassette = Cassette(path, record=bool(request.config.getoption("llm_record")))
    flask_app.extensions["test_kit_cassette"] = cassette
    llm = flask_app.extensions["llm"]
    for name in llm.provider_names():
        adapter = partial(llm.builtin_adapter, name)
        llm.register_provider(name, CassetteProvider(name, adapter, cassette))


@pytest.fixture
def api_headers(app: Flask) -> dict[str, str]:
    """Headers that carry a valid API key for the app's ``/api`` (keys stay on, as in production)."""
    from app.api_keys import create_api_key

    with app.app_context():
        _ensure_tables(app)
        _record, secret = create_api_key("test-kit", tenant="test")
    return {"Authorization": f"Bearer {secret}"}


def _ensure_tables(app: Flask) -> None:
    from app.services.db_service import db

    with app.app_context():
        db.create_all()


@pytest.fixture
def db(app: Flask) -> Iterator[SQLAlchemy]:
    """The app's ``db`` with every table created for the test, and dropped after it.

    Each test already has a SQLite file of its own, so creating the tables is all
    it needs: faster than a transaction rolled back at the end, and code under test
    may commit (``transaction()`` does) without anything to undo.
    """
    from app.services.db_service import db as database

    with app.app_context():
        database.create_all()
        yield database
        database.session.remove()
        database.drop_all()


@pytest.fixture(scope="session")
def _redis_server() -> Iterator[RedisServer]:
    import shutil

    from app.testing.servers import start_redis

    if shutil.which("redis-server") is None:
        pytest.skip("no redis-server on PATH (Debian: apt-get install redis-server); `make test` installs it")
    server = start_redis()
    yield server
    server.stop()


@pytest.fixture
def redis_url(_redis_server: RedisServer) -> str:
    """The private redis-server's URL; the ``app`` fixture uses it as ``REDIS_URL``."""
    return _redis_server.url


@pytest.fixture
def redis(redis_url: str) -> Iterator[Redis]:
    """A client of a private redis-server started for the session, flushed before each test."""
    import redis as redis_py

    client = redis_py.Redis.from_url(redis_url)
    client.flushall()
    yield client
    client.close()


@pytest.fixture
def fake_llm(app: Flask) -> FakeProvider:
    """The scripted fake provider, answering under every provider name the app knows.

    So ``openai/gpt-4o-mini`` in a view is answered by the fake: views need no change.
    """
    from app.llm.testing import install_fake_llm

    fake = install_fake_llm(app)
    llm = app.extensions["llm"]
    for name in llm.provider_names():
        llm.register_provider(name, fake)
    return fake


__all__ = ["GUARD", "PLACEHOLDER_KEYS"]
