"""``GET /livez`` and ``GET /readyz`` on real parts: SQLite, PostgreSQL, redis-server, hung peers."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator

import pytest

from app.errors import ConfigError
from app.services.openai_service import get_openai_client
from tests.conftest import CANARY_KEY
from tests.servers import ScriptedServer

HEALTH_JSON = "application/health+json"


@pytest.fixture
def hung_server() -> Iterator[ScriptedServer]:
    """A peer that accepts connections and never answers (redis, PostgreSQL alike)."""
    server = ScriptedServer(mute=True)
    yield server
    server.stop()


def _checks(body: dict) -> dict[str, dict]:
    return {name: entries[0] for name, entries in body["checks"].items()}


def _get_readyz(app):
    response = app.test_client().get("/readyz")
    assert response.mimetype == HEALTH_JSON
    assert response.headers["Cache-Control"] == "no-store"
    return response, json.loads(response.get_data(as_text=True))


def test_livez_passes_without_checking_anything(client):
    response = client.get("/livez")
    assert response.status_code == 200
    assert response.mimetype == HEALTH_JSON
    assert response.headers["Cache-Control"] == "no-store"
    assert json.loads(response.get_data(as_text=True)) == {"status": "pass"}


def test_livez_passes_while_a_required_dependency_is_down(make_app, disposable_redis):
    app = make_app(REDIS_URL=disposable_redis.url)
    disposable_redis.stop()
    response = app.test_client().get("/livez")
    assert response.status_code == 200
    assert response.json == {"status": "pass"}


def test_readyz_on_sqlite_without_redis_passes_and_calls_no_provider(make_app, upstream):
    app = make_app(OPENAI_BASE_URL=upstream.url_for("/v1"), OPENAI_API_KEY=CANARY_KEY)

    response, body = _get_readyz(app)

    assert response.status_code == 200
    assert body["status"] == "pass"
    checks = _checks(body)
    database = checks["database:responseTime"]
    assert database["status"] == "pass"
    assert database["componentType"] == "datastore"
    assert isinstance(database["observedValue"], int | float)
    assert database["observedValue"] >= 0
    assert database["observedUnit"] == "ms"
    assert "time" in database
    assert checks["redis:responseTime"]["status"] == "pass"
    assert "not configured" in checks["redis:responseTime"]["output"]
    assert checks["openai:default:configured"] == {
        **checks["openai:default:configured"],
        "status": "pass",
        "observedValue": True,
        "output": "configured",
    }
    assert checks["gemini:configured"]["observedValue"] is False
    assert checks["gemini:configured"]["output"] == "not configured (GEMINI_API_KEY)"
    # Reported as configured, never probed: the provider saw nothing, no client was built.
    assert upstream.requests == []
    assert app.extensions["openai_service"].info()["default"]["client_built"] is False
    assert CANARY_KEY not in response.get_data(as_text=True)


def test_readyz_reports_each_openai_profile(make_app, upstream):
    profiles = {"local": {"base_url": upstream.url_for("/v1"), "api_key_env": "LOCAL_LLM_KEY"}}
    app = make_app(OPENAI_PROFILES=profiles)
    _, body = _get_readyz(app)
    checks = _checks(body)
    assert checks["openai:default:configured"]["output"] == "not configured (OPENAI_API_KEY)"
    assert checks["openai:local:configured"]["observedValue"] is False
    assert checks["openai:local:configured"]["output"] == "not configured (LOCAL_LLM_KEY)"
    assert upstream.requests == []


def test_readyz_with_redis_passes_then_warns_while_redis_is_down(make_app, disposable_redis):
    # Everything the app keeps in Redis fails open, so a Redis outage degrades the app
    # without stopping it: a warning, and the orchestrator keeps sending traffic.
    app = make_app(REDIS_URL=disposable_redis.url)

    response, body = _get_readyz(app)
    assert response.status_code == 200
    assert body["status"] == "pass"
    redis_check = _checks(body)["redis:responseTime"]
    assert redis_check["status"] == "pass"
    assert redis_check["observedUnit"] == "ms"

    disposable_redis.stop()
    response, body = _get_readyz(app)
    assert response.status_code == 200
    assert body["status"] == "warn"
    redis_check = _checks(body)["redis:responseTime"]
    assert redis_check["status"] == "warn"
    assert redis_check["output"] == "ConnectionError"  # the type only: /readyz needs no authentication
    assert "observedValue" not in redis_check
    assert _checks(body)["database:responseTime"]["status"] == "pass"

    disposable_redis.start()
    response, body = _get_readyz(app)
    assert response.status_code == 200, body
    assert body["status"] == "pass"


def test_required_redis_that_fails_fails_readiness(make_app, disposable_redis):
    app = make_app(REDIS_URL=disposable_redis.url, HEALTH_REQUIRED_SERVICES="redis")
    disposable_redis.stop()

    response, body = _get_readyz(app)

    assert response.status_code == 503
    assert body["status"] == "fail"
    assert _checks(body)["redis:responseTime"]["status"] == "fail"


def test_an_optional_database_that_fails_is_a_warning(make_app, tmp_path):
    # A database file in a folder that does not exist: SQLite cannot open it.
    app = make_app(
        DATABASE_URL=f"sqlite:///{tmp_path}/missing/dir/app.db", HEALTH_OPTIONAL_SERVICES="database"
    )

    response, body = _get_readyz(app)

    assert response.status_code == 200
    assert body["status"] == "warn"
    assert _checks(body)["database:responseTime"]["status"] == "warn"
    assert _checks(body)["database:responseTime"]["output"] == "OperationalError"


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"HEALTH_OPTIONAL_SERVICES": "redsi"}, "HEALTH_OPTIONAL_SERVICES must name services among"
                                                " database, redis, got 'redsi'; did you mean 'redis'?"),
        ({"HEALTH_REQUIRED_SERVICES": "redis,db"}, "HEALTH_REQUIRED_SERVICES must name services among"),
        ({"HEALTH_REQUIRED_SERVICES": "redis", "HEALTH_OPTIONAL_SERVICES": "redis"},
         "HEALTH_OPTIONAL_SERVICES and HEALTH_REQUIRED_SERVICES both name redis; keep one"),
        ({"HEALTH_CHECK_TIMEOUT": -1}, "HEALTH_CHECK_TIMEOUT must be a positive number of seconds, got -1"),
        ({"HEALTH_CHECK_TIMEOUT": "soon"}, "HEALTH_CHECK_TIMEOUT must be a positive number of seconds"),
    ],
)  # fmt: skip
def test_bad_health_settings_stop_start_up(make_app, settings, message):
    # Read only when /readyz is asked, these used to start silently and make every probe a 500.
    with pytest.raises(ConfigError) as info:
        make_app(settings)
    assert message in str(info.value)


@pytest.mark.postgres
def test_readyz_on_postgresql_passes(make_app, postgres_server):
    app = make_app(DATABASE_URL=postgres_server.url)

    response, body = _get_readyz(app)

    assert response.status_code == 200, body
    assert body["status"] == "pass"
    database = _checks(body)["database:responseTime"]
    assert database["status"] == "pass"
    assert database["observedUnit"] == "ms"
    assert postgres_server.password not in response.get_data(as_text=True)


@pytest.mark.postgres
def test_readyz_fails_when_postgresql_is_unreachable(make_app, postgres_server):
    # Nothing listens on this port any more: the connection is refused.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"postgresql://app:{postgres_server.password}@127.0.0.1:{port}/app"
    app = make_app(DATABASE_URL=url)

    response, body = _get_readyz(app)

    assert response.status_code == 503
    assert body["status"] == "fail"
    database = _checks(body)["database:responseTime"]
    assert database["status"] == "fail"
    assert database["output"] == "OperationalError"
    assert postgres_server.password not in response.get_data(as_text=True)


def test_hung_redis_fails_within_the_check_timeout(make_app, hung_server):
    app = make_app(
        REDIS_URL=f"redis://127.0.0.1:{hung_server.port}/0",
        HEALTH_CHECK_TIMEOUT=0.5,
        REDIS_SOCKET_TIMEOUT=5,
        REDIS_CONNECT_TIMEOUT=5,
    )
    client = app.test_client()
    client.get("/livez")  # warm up outside the measured request

    started = time.monotonic()
    response = client.get("/readyz")
    elapsed = time.monotonic() - started

    # The client alone would wait 5 s (and retry once): the probe gives up at 0.5 s.
    assert elapsed < 2.5
    assert response.status_code == 200  # Redis fails open: a warning
    assert response.headers["Cache-Control"] == "no-store"
    body = json.loads(response.get_data(as_text=True))
    redis_check = _checks(body)["redis:responseTime"]
    assert redis_check["status"] == "warn"
    assert redis_check["output"] == "no answer within 0.5 s"
    assert hung_server.accepted >= 1, "the probe never reached the hung server"


@pytest.mark.postgres
def test_two_hung_checks_cost_one_timeout_not_two(make_app, hung_server):
    # Both the database and Redis point at a peer that accepts and never answers;
    # each client would wait 5 s. Checked one after the other they would take at
    # least two timeouts (3 s); concurrently, about one (1.5 s).
    app = make_app(
        DATABASE_URL=f"postgresql://app:pw-unused@127.0.0.1:{hung_server.port}/app",
        DATABASE_CONNECT_TIMEOUT=5,
        REDIS_URL=f"redis://127.0.0.1:{hung_server.port}/0",
        REDIS_SOCKET_TIMEOUT=5,
        REDIS_CONNECT_TIMEOUT=5,
        HEALTH_CHECK_TIMEOUT=1.5,
    )
    client = app.test_client()
    client.get("/livez")

    started = time.monotonic()
    response = client.get("/readyz")
    elapsed = time.monotonic() - started

    assert response.status_code == 503
    checks = _checks(response.json)
    assert checks["database:responseTime"]["output"] == "no answer within 1.5 s"
    assert checks["redis:responseTime"]["output"] == "no answer within 1.5 s"
    assert hung_server.accepted >= 2
    assert elapsed < 2.7


def test_readyz_does_not_build_or_call_a_built_provider_client(make_app, upstream):
    app = make_app(OPENAI_BASE_URL=upstream.url_for("/v1"), OPENAI_API_KEY=CANARY_KEY)
    with app.app_context():
        get_openai_client()  # even with a client at hand, the probe makes no paid call

    response, body = _get_readyz(app)

    assert response.status_code == 200
    assert _checks(body)["openai:default:configured"]["observedValue"] is True
    assert upstream.requests == []


def test_while_redis_is_down_api_chat_serves_and_readyz_warns(make_app, disposable_redis):
    # Why Redis is a warning: breakers, rate limits and /api quotas fail open, so the app serves.
    from app.llm.testing import install_fake_llm
    from tests.conftest import api_key_headers

    app = make_app(REDIS_URL=disposable_redis.url, LLM_RATE_LIMITS={"fake": {"rpm": 100}})
    headers = api_key_headers(app)
    fake = install_fake_llm(app, echo=True)
    body = {"model": "fake/m", "messages": [{"role": "user", "content": "Hi"}]}
    assert app.test_client().post("/api/chat", json=body, headers=headers).status_code == 200
    disposable_redis.stop()

    answer = app.test_client().post("/api/chat", json=body, headers=headers)
    response, readiness = _get_readyz(app)

    assert answer.status_code == 200, answer.get_data(as_text=True)
    assert answer.json["content"] == "Hi"
    assert len(fake.calls) == 2
    assert (response.status_code, readiness["status"]) == (200, "warn")
