"""The contract all four services share: lazy, registered once, per app context, per app, resettable."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator

import pytest
from flask import Flask
from pytest_httpserver import HTTPServer

from app.errors import ConfigError
from app.services import db_service, genai_service, init_services, openai_service, redis_service
from app.services.genai_service import get_genai_client, reset_genai_client
from app.services.openai_service import get_async_openai_client, get_openai_client, reset_openai_client
from app.services.redis_service import get_redis_client, reset_redis_client
from tests.conftest import CANARY_GEMINI_KEY, CANARY_KEY, ROOT, LocalHTTPServer, chat_completion

SERVICES = {
    "db_service": db_service,
    "redis_service": redis_service,
    "openai_service": openai_service,
    "genai_service": genai_service,
}

OTHER_KEY = "sk-other-app-0123456789abcdef0123456789ab"


@pytest.fixture
def other_server() -> Iterator[HTTPServer]:
    """A second local HTTP server, for tests with two apps."""
    server = LocalHTTPServer(host="127.0.0.1", port=0, threaded=True)
    server.start()
    yield server
    server.clear()
    server.stop()


def expect_chat(server: HTTPServer, content: str = "hello") -> None:
    server.expect_request("/v1/chat/completions", method="POST").respond_with_json(chat_completion(content))


def ask(client) -> str:
    completion = client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
    )
    return completion.choices[0].message.content


# --- start-up builds nothing and imports no SDK ------------------------------------

IMPORT_PROBE = """
import json, sys, tempfile
from app import create_app
from app.services.genai_service import get_genai_client
from app.services.openai_service import get_openai_client
from app.services.redis_service import get_redis_client

SDKS = ("openai", "google.genai", "anthropic", "redis", "httpx2")
def loaded():
    return sorted(name for name in SDKS if name in sys.modules)

folder = tempfile.mkdtemp()
app = create_app({
    "TESTING": True, "INSTANCE_PATH": folder, "DOTENV_PATH": folder + "/none.env",
    "OPENAI_API_KEY": "sk-probe-0000000000", "OPENAI_PROFILES": {"groq": {"api_key": "gsk-probe-000000"}},
    "GEMINI_API_KEY": "AIza-probe-000000", "REDIS_URL": "redis://127.0.0.1:9/0",
    "DATABASE_URL": "postgresql://app:pw@127.0.0.1:9/app",
})
stages = {"create_app": loaded()}
assert app.test_client().get("/livez").status_code == 200
stages["livez"] = loaded()
with app.app_context():
    get_openai_client()
    stages["openai"] = loaded()
    get_redis_client()
    stages["redis"] = loaded()
    get_genai_client()
    stages["genai"] = loaded()
print(json.dumps(stages))
"""


def test_start_up_imports_no_sdk_and_each_get_imports_only_its_own():
    out = subprocess.run(
        [sys.executable, "-c", IMPORT_PROBE], cwd=ROOT, capture_output=True, text=True, check=True, timeout=60
    )
    stages = json.loads(out.stdout)
    assert stages["create_app"] == []
    assert stages["livez"] == []
    assert "openai" in stages["openai"]
    assert not {"google.genai", "redis"} & set(stages["openai"])
    assert "redis" in stages["redis"]
    assert "google.genai" not in stages["redis"]
    assert "google.genai" in stages["genai"]
    assert "anthropic" not in stages["genai"]


def test_init_app_registers_each_service_under_its_own_key_and_builds_nothing(make_app):
    app = make_app(
        OPENAI_API_KEY=CANARY_KEY, GEMINI_API_KEY=CANARY_GEMINI_KEY, REDIS_URL="redis://127.0.0.1:9/0"
    )
    for key in SERVICES:
        assert key in app.extensions
    for key in ("redis_service", "openai_service", "genai_service"):
        info = app.extensions[key].info()
        assert not any(entry["client_built"] for entry in info.values()), key
    # Flask-SQLAlchemy creates the engine objects at init_app; they hold no connection yet.
    assert app.extensions["db_service"].engines
    for engine in app.extensions["db_service"].engines:
        assert engine.pool.checkedin() == 0
        assert engine.pool.checkedout() == 0


@pytest.mark.parametrize("key", sorted(SERVICES))
def test_init_app_twice_is_a_clear_error(make_app, key):
    app = make_app()
    with pytest.raises(RuntimeError) as info:
        SERVICES[key].init_app(app)
    assert f"{key}.init_app() was already called on app" in str(info.value)
    assert "once per app" in str(info.value)


@pytest.mark.parametrize("key", ["redis_service", "openai_service", "genai_service"])
def test_init_app_on_a_plain_flask_app(key):
    app = Flask(f"plain_{key}")
    SERVICES[key].init_app(app)
    assert key in app.extensions
    with pytest.raises(RuntimeError, match="already called"):
        SERVICES[key].init_app(app)


def test_init_app_on_a_plain_flask_app_uses_the_defaults(tmp_path):
    app = Flask("plain_defaults", instance_path=str(tmp_path))
    redis_service.init_app(app)
    openai_service.init_app(app)
    genai_service.init_app(app)
    db_service.init_app(app)
    assert app.extensions["redis_service"].settings.max_retries == 1
    assert app.extensions["openai_service"].profile().timeout == 60.0
    assert app.extensions["genai_service"].settings.timeout == 60.0
    assert app.config["SQLALCHEMY_ENGINE_OPTIONS"]["pool_pre_ping"] is True
    assert app.config["SQLALCHEMY_DATABASE_URI"] == f"sqlite:///{tmp_path}/app.db"


def test_init_services_twice_is_a_clear_error(make_app):
    with pytest.raises(RuntimeError, match=r"db_service.init_app\(\) was already called"):
        init_services(make_app())


# --- an app context is required -------------------------------------------------------


@pytest.mark.parametrize(
    "call",
    [
        get_openai_client,
        lambda: get_openai_client("groq"),
        get_async_openai_client,
        get_redis_client,
        get_genai_client,
        db_service.engine,
        lambda: db_service.transaction().__enter__(),
    ],
    ids=["openai", "openai-profile", "async-openai", "redis", "genai", "db-engine", "db-transaction"],
)
def test_get_outside_an_app_context_says_to_use_app_context(call):
    with pytest.raises(RuntimeError) as info:
        call()
    assert "app.app_context()" in str(info.value)


@pytest.mark.parametrize(
    "call", [get_openai_client, get_redis_client, get_genai_client], ids=["openai", "redis", "genai"]
)
def test_get_on_an_app_without_the_service_says_how_to_register_it(call):
    app = Flask("no_services")
    with app.app_context(), pytest.raises(RuntimeError) as info:
        call()
    assert "is not registered on app 'no_services'" in str(info.value)
    assert "init_app(app)" in str(info.value)


@pytest.mark.parametrize(
    "reset", [reset_openai_client, reset_redis_client, reset_genai_client], ids=["openai", "redis", "genai"]
)
def test_reset_without_app_outside_a_context_is_an_error(reset):
    with pytest.raises(RuntimeError, match="application context"):
        reset()


# --- first call builds, later calls return the same object -------------------------------


def test_first_get_builds_and_later_gets_return_the_same_client(make_app, redis_server, local_server):
    app = make_app(
        OPENAI_API_KEY=CANARY_KEY,
        OPENAI_BASE_URL=local_server.url_for("/v1"),
        GEMINI_API_KEY=CANARY_GEMINI_KEY,
        REDIS_URL=redis_server.url,
    )
    with app.app_context():
        for key, get in [
            ("openai_service", get_openai_client),
            ("redis_service", get_redis_client),
            ("genai_service", get_genai_client),
        ]:
            (entry,) = [
                e for name, e in app.extensions[key].info().items() if name in ("default", "redis", "gemini")
            ]
            assert entry["client_built"] is False
            first = get()
            assert get() is first
            assert get() is first
            (entry,) = [
                e for name, e in app.extensions[key].info().items() if name in ("default", "redis", "gemini")
            ]
            assert entry["client_built"] is True
        assert db_service.engine() is db_service.engine()
    # A new app context of the same app resolves the same client.
    with app.app_context():
        assert get_openai_client() is get_openai_client()


# --- several apps in one process -----------------------------------------------------------


def test_two_apps_have_their_own_openai_clients(make_app, local_server, other_server):
    expect_chat(local_server, "from one")
    expect_chat(other_server, "from two")
    one = make_app(OPENAI_API_KEY=CANARY_KEY, OPENAI_BASE_URL=local_server.url_for("/v1"))
    two = make_app(OPENAI_API_KEY=OTHER_KEY, OPENAI_BASE_URL=other_server.url_for("/v1"))
    with one.app_context():
        client_one = get_openai_client()
        assert ask(client_one) == "from one"
    with two.app_context():
        client_two = get_openai_client()
        assert ask(client_two) == "from two"
    assert client_one is not client_two
    ((request_one, _),) = local_server.log
    ((request_two, _),) = other_server.log
    assert request_one.headers["Authorization"] == f"Bearer {CANARY_KEY}"
    assert request_two.headers["Authorization"] == f"Bearer {OTHER_KEY}"

    # Resetting one app leaves the other's client alone.
    reset_openai_client(one)
    assert client_one.is_closed()
    assert not client_two.is_closed()
    with two.app_context():
        assert get_openai_client() is client_two


def test_two_apps_have_their_own_genai_clients(make_app, local_server):
    local_server.expect_request(
        "/v1beta/models/gemini-2.0-flash:generateContent", method="POST"
    ).respond_with_json(
        {"candidates": [{"content": {"parts": [{"text": "hi"}], "role": "model"}, "finishReason": "STOP"}]}
    )
    base = {"GENAI_BASE_URL": local_server.url_for("/"), "GENAI_API_VERSION": "v1beta"}
    one = make_app(base, GEMINI_API_KEY=CANARY_GEMINI_KEY)
    two = make_app(base, GEMINI_API_KEY="AIza-other-app-000000000")
    clients = []
    for app in (one, two):
        with app.app_context():
            clients.append(get_genai_client())
            assert clients[-1].models.generate_content(model="gemini-2.0-flash", contents="hi").text == "hi"
    assert clients[0] is not clients[1]
    keys = [request.headers["x-goog-api-key"] for request, _ in local_server.log]
    assert keys == [CANARY_GEMINI_KEY, "AIza-other-app-000000000"]


def test_two_apps_have_their_own_redis_clients(make_app, redis_server):
    one = make_app(REDIS_URL=redis_server.url.replace("/0", "/1"))
    two = make_app(REDIS_URL=redis_server.url.replace("/0", "/2"))
    with one.app_context():
        client_one = get_redis_client()
        client_one.set("contract:which-app", "one")
    with two.app_context():
        client_two = get_redis_client()
        assert client_two.get("contract:which-app") is None
    assert client_one is not client_two
    assert client_one.connection_pool is not client_two.connection_pool
    client_one.delete("contract:which-app")


def test_two_apps_have_their_own_database_engines(make_app):
    from sqlalchemy import text

    one, two = make_app(), make_app()
    with one.app_context():
        engine_one = db_service.engine()
        with db_service.transaction() as session:
            session.execute(text("CREATE TABLE marker (name TEXT)"))
            session.execute(text("INSERT INTO marker VALUES ('one')"))
    with two.app_context():
        engine_two = db_service.engine()
        with engine_two.connect() as connection:
            tables = connection.execute(text("SELECT name FROM sqlite_master WHERE type = 'table'")).all()
    assert engine_one is not engine_two
    assert str(engine_one.url) != str(engine_two.url)
    assert ("marker",) not in tables


# --- reset -----------------------------------------------------------------------------------


def test_reset_openai_client_closes_and_forgets(make_app, local_server):
    expect_chat(local_server)
    app = make_app(OPENAI_API_KEY=CANARY_KEY, OPENAI_BASE_URL=local_server.url_for("/v1"))
    with app.app_context():
        old = get_openai_client()
        assert ask(old) == "hello"
    reset_openai_client(app)
    assert old.is_closed()
    assert app.extensions["openai_service"].info()["default"]["client_built"] is False
    with app.app_context():
        new = get_openai_client()
        assert new is not old
        assert ask(new) == "hello"
        reset_openai_client()  # inside an app context, without the app
        assert new.is_closed()
        assert get_openai_client() is not new
    assert len(local_server.log) == 2


def test_reset_openai_client_closes_the_connection(make_app, keepalive_server):
    app = make_app(OPENAI_API_KEY=CANARY_KEY, OPENAI_BASE_URL=keepalive_server.url_for("/v1"))
    with app.app_context():
        ask(get_openai_client())
        reset_openai_client()
        ask(get_openai_client())
    first, second = keepalive_server.requests
    assert keepalive_server.wait_closed(first.port)
    assert second.port != first.port


def test_reset_builds_the_next_client_from_the_current_config(make_app, local_server, other_server):
    expect_chat(local_server, "old endpoint")
    expect_chat(other_server, "new endpoint")
    app = make_app(OPENAI_API_KEY=CANARY_KEY, OPENAI_BASE_URL=local_server.url_for("/v1"))
    with app.app_context():
        assert ask(get_openai_client()) == "old endpoint"
        app.config["OPENAI_BASE_URL"] = other_server.url_for("/v1")
        app.config["OPENAI_API_KEY"] = OTHER_KEY
        reset_openai_client()
        assert ask(get_openai_client()) == "new endpoint"
    ((request, _),) = other_server.log
    assert request.headers["Authorization"] == f"Bearer {OTHER_KEY}"


def test_reset_with_an_invalid_current_config_names_the_key(make_app, local_server):
    expect_chat(local_server)
    app = make_app(OPENAI_API_KEY=CANARY_KEY, OPENAI_BASE_URL=local_server.url_for("/v1"))
    with app.app_context():
        client = get_openai_client()
        app.config["OPENAI_TIMEOUT"] = "abc"
        with pytest.raises(
            ConfigError, match="OPENAI_TIMEOUT must be a positive number of seconds, got 'abc'"
        ):
            reset_openai_client()
        assert get_openai_client() is client  # nothing changed


def test_reset_redis_client_closes_and_forgets(make_app, redis_server):
    import redis

    app = make_app(REDIS_URL=redis_server.url)
    admin = redis.Redis.from_url(redis_server.url)
    with app.app_context():
        old = get_redis_client()
        old.client_setname("contract-reset-old")
        assert "contract-reset-old" in {c["name"] for c in admin.client_list()}
        reset_redis_client()
        # The server saw the connection go away.
        assert "contract-reset-old" not in {c["name"] for c in admin.client_list()}
        new = get_redis_client()
        assert new is not old
        assert new.ping()
    app.config["REDIS_URL"] = redis_server.url.replace("/0", "/5")
    reset_redis_client(app)
    with app.app_context():
        assert get_redis_client().connection_pool.connection_kwargs["db"] == 5
    admin.close()


def test_reset_genai_client_closes_and_forgets(make_app, keepalive_server):
    app = make_app(
        GEMINI_API_KEY=CANARY_GEMINI_KEY,
        GENAI_BASE_URL=keepalive_server.url_for("/"),
        GENAI_API_VERSION="v1beta",
    )
    with app.app_context():
        old = get_genai_client()
        old.models.generate_content(model="gemini-2.0-flash", contents="hi")
    reset_genai_client(app)
    (first,) = keepalive_server.requests
    assert keepalive_server.wait_closed(first.port)  # the old client closed its connection
    app.config["GEMINI_API_KEY"] = "AIza-rotated-key-0000000"
    with app.app_context():
        reset_genai_client()
        new = get_genai_client()
        assert new is not old
        new.models.generate_content(model="gemini-2.0-flash", contents="hi")
    assert keepalive_server.requests[-1].headers["x-goog-api-key"] == "AIza-rotated-key-0000000"


def test_reset_of_a_client_never_built_is_harmless(make_app):
    app = make_app()
    reset_openai_client(app)
    reset_redis_client(app)
    reset_genai_client(app)


def test_reset_on_an_app_without_the_service_is_harmless():
    app = Flask("bare")
    reset_openai_client(app)
    reset_redis_client(app)
    reset_genai_client(app)


# --- the database ----------------------------------------------------------------------


@pytest.mark.postgres
def test_postgres_url_connects_through_psycopg_and_pings_before_use(make_app, postgres_server):
    from sqlalchemy import text

    app = make_app(DATABASE_URL=postgres_server.url.replace("postgresql://", "postgres://", 1))

    def backend_pid() -> int:
        with db_service.engine().connect() as connection:
            return int(connection.execute(text("SELECT pg_backend_pid()")).scalar_one())

    with app.app_context():
        engine = db_service.engine()
        assert engine.dialect.driver == "psycopg"
        first = backend_pid()
        assert backend_pid() == first  # pooled
        # The server drops the pooled connection (a restart, an idle timeout ...).
        assert postgres_server.psql(f"SELECT pg_terminate_backend({first})") == "t"
        # pool_pre_ping notices on checkout and reconnects: the next query just works.
        second = backend_pid()
        assert second != first
        with db_service.transaction() as session:
            assert session.execute(text("SELECT 1")).scalar_one() == 1
