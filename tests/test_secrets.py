"""No secret in any output: logs (every logger, DEBUG), reprs, exceptions, error bodies, health, CLI.

The app is configured with the canary keys, a profile key given inline, a profile
key read from an environment variable, a Redis password (a redis-server with
``requirepass``) and the PostgreSQL password, and then used for real through
every client. Each secret is first shown to reach its server (so that its absence
from the outputs means something); then every output is searched for it.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from flask import Flask

from app import create_app
from app.errors import ConfigError, ServiceNotConfiguredError, UnknownProfileError
from app.redaction import (
    MASK,
    Secret,
    install_log_redaction,
    redact,
    redact_url,
    register_secret,
)
from app.services.db_service import transaction
from app.services.genai_service import get_genai_client
from app.services.openai_service import get_openai_client
from app.services.redis_service import get_redis_client
from tests.conftest import CANARY_GEMINI_KEY, CANARY_KEY, api_key_headers, chat_completion
from tests.servers import RedisServer, start_redis

PROFILE_KEY = "sk-profile-canary-3e8d1c0b9a7f6e5d4c3b2a19"
PROFILE_ENV_KEY = "sk-envprofile-canary-0a9b8c7d6e5f4a3b2c1d"
PROFILE_ENV_VAR = "FLASK_SERVICES_TEST_PROFILE_KEY"
LOGGERS = ("openai", "httpx2", "redis", "google_genai", "sqlalchemy", "urllib3", "app", "flask.app")
GEMINI_PATH = re.compile(r"^/gemini/.*:generateContent$")
GEMINI_ANSWER = {
    "candidates": [
        {"content": {"role": "model", "parts": [{"text": "hi from gemini"}]}, "finishReason": "STOP"}
    ]
}


@dataclass
class World:
    app: Flask
    redis: RedisServer
    secrets: tuple[str, ...]

    def assert_clean(self, text: str, where: str) -> None:
        for secret in self.secrets:
            assert secret not in text, f"a secret ({secret[:6]}...) appears in {where}"


@pytest.fixture
def password_redis() -> Iterator[RedisServer]:
    server = start_redis(password="redis-pw-" + secrets.token_hex(12))
    yield server
    server.stop()


@pytest.fixture
def world(make_app, monkeypatch, local_server, password_redis, postgres_server) -> World:
    monkeypatch.setenv(PROFILE_ENV_VAR, PROFILE_ENV_KEY)
    app = make_app(
        OPENAI_API_KEY=CANARY_KEY,
        OPENAI_BASE_URL=local_server.url_for("/v1"),
        OPENAI_MAX_RETRIES=1,
        LLM_MAX_RETRIES=1,
        LLM_BACKOFF_BASE=0.01,
        OPENAI_PROFILES={
            "local": {"base_url": local_server.url_for("/local/v1"), "api_key": PROFILE_KEY},
            "viaenv": {
                "base_url": local_server.url_for("/viaenv/v1"),
                "api_key_env": PROFILE_ENV_VAR,
                "max_retries": 0,
            },
        },
        GEMINI_API_KEY=CANARY_GEMINI_KEY,
        GENAI_BASE_URL=local_server.url_for("/gemini"),
        REDIS_URL=password_redis.url,
        DATABASE_URL=postgres_server.url,
        HEALTH_REQUIRED_SERVICES="redis",  # so that a Redis outage is a failure, with its detail
    )
    return World(
        app,
        password_redis,
        (CANARY_KEY, PROFILE_KEY, PROFILE_ENV_KEY, CANARY_GEMINI_KEY, password_redis.password,
         postgres_server.password),
    )  # fmt: skip


@pytest.fixture
def debug_logs(caplog) -> Iterator[pytest.LogCaptureFixture]:
    """Every logger at DEBUG, re-enabled if something (Alembic's fileConfig) disabled it."""
    caplog.set_level(logging.DEBUG)
    disabled = []
    for name in LOGGERS:
        caplog.set_level(logging.DEBUG, logger=name)
        logger = logging.getLogger(name)
        if logger.disabled:
            disabled.append(logger)
            logger.disabled = False
    for logger in logging.Logger.manager.loggerDict.values():
        if isinstance(logger, logging.Logger) and logger.disabled:
            disabled.append(logger)
            logger.disabled = False
    yield caplog
    for logger in disabled:
        logger.disabled = True


def _all_log_text(caplog: pytest.LogCaptureFixture) -> str:
    formatter = logging.Formatter("%(name)s %(levelname)s %(message)s")
    return caplog.text + "\n".join(formatter.format(record) for record in caplog.records)


def _chat(app: Flask, profile: str = "default"):
    return app.test_client().post(
        "/api/chat",
        json={"messages": [{"role": "user", "content": "hi"}], "model": "m", "profile": profile},
        headers=api_key_headers(app),
    )


def _echo_key_401(key: str) -> dict:
    return {"error": {"message": f"Incorrect API key provided: {key}.", "code": "invalid_api_key"}}


# --- logs ----------------------------------------------------------------------------------


@pytest.mark.postgres
def test_no_secret_in_any_log_record(world, local_server, debug_logs):
    app = world.app
    chat = chat_completion("ok")
    local_server.expect_oneshot_request("/v1/chat/completions").respond_with_json(chat)
    local_server.expect_oneshot_request("/local/v1/chat/completions").respond_with_json(chat)
    local_server.expect_oneshot_request("/viaenv/v1/chat/completions").respond_with_json(
        _echo_key_401(PROFILE_ENV_KEY), status=401
    )
    local_server.expect_request("/v1/chat/completions").respond_with_json(
        _echo_key_401(CANARY_KEY), status=429, headers={"retry-after-ms": "10"}
    )
    local_server.expect_oneshot_request(GEMINI_PATH).respond_with_json(GEMINI_ANSWER)
    local_server.expect_oneshot_request(GEMINI_PATH).respond_with_json(
        {
            "error": {
                "code": 400,
                "message": f"API key {CANARY_GEMINI_KEY} not valid",
                "status": "INVALID_ARGUMENT",
            }
        },
        status=400,
    )

    @app.get("/boom")
    def boom():
        raise RuntimeError(f"failed with key {CANARY_KEY} and redis {world.redis.url}")

    assert _chat(app).status_code == 200
    assert _chat(app, "local").status_code == 200
    assert _chat(app, "viaenv").status_code == 502
    assert _chat(app).status_code == 429  # after one retry, logged by the layer's retry loop
    assert app.test_client().get("/boom").status_code == 500
    with app.app_context():
        assert get_genai_client().models.generate_content(model="gemini-2.0-flash", contents="hi").text
        with pytest.raises(Exception, match="INVALID_ARGUMENT") as excinfo:
            get_genai_client().models.generate_content(model="gemini-2.0-flash", contents="hi")
        # What a view would do with it: log it, with the traceback.
        app.logger.error("gemini failed: %s", excinfo.value, exc_info=excinfo.value)
        redis = get_redis_client()
        redis.set("greeting", "hello")
        assert redis.get("greeting") == b"hello"
        app.logger.info("connected to %s", world.redis.url)  # a careless log line
        app.logger.info(f"database at {app.config['SQLALCHEMY_DATABASE_URI']}")
        with transaction() as session:
            from sqlalchemy import text

            assert session.execute(text("SELECT 1")).scalar() == 1
    assert app.test_client().get("/readyz").status_code == 200
    world.redis.stop()
    assert app.test_client().get("/readyz").status_code == 503

    # Every secret really went out: to the server that needed it, never to a log.
    sent = {request.path: request.headers for request, _ in local_server.log}
    assert sent["/v1/chat/completions"]["Authorization"] == f"Bearer {CANARY_KEY}"
    assert sent["/local/v1/chat/completions"]["Authorization"] == f"Bearer {PROFILE_KEY}"
    assert sent["/viaenv/v1/chat/completions"]["Authorization"] == f"Bearer {PROFILE_ENV_KEY}"
    gemini = [headers for path, headers in sent.items() if GEMINI_PATH.match(path)]
    assert gemini[0]["x-goog-api-key"] == CANARY_GEMINI_KEY

    loggers = {record.name.split(".")[0] for record in debug_logs.records}
    assert {"openai", "httpx2", "sqlalchemy"} <= loggers, loggers
    assert any(record.exc_info or record.exc_text for record in debug_logs.records)
    text = _all_log_text(debug_logs)
    assert "retrying openai/" in text
    assert "gemini failed" in text
    assert "unhandled error" in text
    assert "Traceback" in text
    world.assert_clean(text, "the logs")
    assert MASK in text  # the careless lines were scrubbed, not dropped


# --- reprs ---------------------------------------------------------------------------------


@pytest.mark.postgres
def test_no_secret_in_the_reprs_of_connectors_profiles_and_clients(world):
    app = world.app
    with app.app_context():
        clients = [get_openai_client(), get_openai_client("local"), get_openai_client("viaenv"),
                   get_genai_client(), get_redis_client()]  # fmt: skip
    texts = []
    for key in ("redis_service", "openai_service", "genai_service"):
        connector = app.extensions[key]
        texts += [repr(connector), str(connector), repr(vars(connector)), repr(connector.info())]
    openai_connector = app.extensions["openai_service"]
    texts += [repr(profile) for profile in openai_connector.profiles.values()]
    texts += [str(profile) for profile in openai_connector.profiles.values()]
    texts += [repr(app.extensions["redis_service"].settings), repr(app.extensions["genai_service"].settings)]
    texts += [repr(client) for client in clients]
    texts.append(repr(app.extensions["db_service"].info()))
    for text in texts:
        world.assert_clean(text, text[:60])


@pytest.mark.postgres
def test_no_secret_in_the_repr_of_the_database_connector(world):
    connector = world.app.extensions["db_service"]
    world.assert_clean(repr(connector.settings), "repr(DatabaseSettings)")
    world.assert_clean(repr(vars(connector)), "vars(DatabaseConnector)")


# --- exceptions and error bodies -----------------------------------------------------------


@pytest.mark.postgres
def test_no_secret_in_the_apps_exceptions(world, make_app, local_server):
    with world.app.app_context(), pytest.raises(UnknownProfileError) as unknown:
        get_openai_client("nope")
    other = make_app(OPENAI_PROFILES={"viaenv": {"base_url": local_server.url_for("/v1"),
                                                 "api_key_env": "UNSET_KEY_VAR"}})  # fmt: skip
    with other.app_context(), pytest.raises(ServiceNotConfiguredError) as not_configured:
        get_openai_client("viaenv")
    messages = [str(unknown.value), repr(unknown.value), str(not_configured.value)]
    assert "'viaenv'" in messages[0]
    assert "UNSET_KEY_VAR" in messages[2]
    for message in messages:
        world.assert_clean(message, message)


@pytest.mark.parametrize(
    ("settings", "secret"),
    [
        ({"DATABASE_URL": "mysql://app:db-secret-771@db.example/app"}, "db-secret-771"),
        ({"REDIS_URL": "http://:redis-secret-772@cache.example:6379/0"}, "redis-secret-772"),
        ({"OPENAI_PROFILES": {"x": {"api_key": "sk-inline-secret-773"}}}, "sk-inline-secret-773"),
        ({"OPENAI_PROFILES": {"x": {"api_key": "sk-inline-secret-774", "api_key_env": "K",
                                    "base_url": "http://h/v1"}}}, "sk-inline-secret-774"),
        ({"OPENAI_PROFILES": {"x": {"api_key": "sk-inline-secret-775", "base_url": "http://h/v1",
                                    "timeout": "sk-inline-secret-775"}}}, None),
    ],
)  # fmt: skip
def test_no_secret_in_config_errors(tmp_path, settings, secret):
    with pytest.raises(ConfigError) as excinfo:
        create_app({"TESTING": True, "INSTANCE_PATH": str(tmp_path), "DOTENV_PATH": str(tmp_path / "no"),
                    **settings})  # fmt: skip
    if secret is not None:
        assert secret not in str(excinfo.value)
        assert secret not in repr(excinfo.value)


@pytest.mark.postgres
def test_no_secret_in_api_error_bodies(world, local_server):
    local_server.expect_request("/v1/chat/completions").respond_with_json(
        _echo_key_401(CANARY_KEY), status=401, headers={"X-Key": CANARY_KEY}
    )
    local_server.expect_request("/local/v1/chat/completions").respond_with_json(
        {"error": {"message": f"model not found for key {PROFILE_KEY}"}}, status=404
    )
    local_server.expect_request("/viaenv/v1/chat/completions").respond_with_json(
        _echo_key_401(PROFILE_ENV_KEY), status=500
    )

    responses = [_chat(world.app), _chat(world.app, "local"), _chat(world.app, "viaenv"),
                 _chat(world.app, "nope")]  # fmt: skip

    assert [r.status_code for r in responses] == [502, 400, 502, 400]
    assert MASK in responses[1].json["error"]["message"]  # the provider's detail, scrubbed
    for response in responses:
        world.assert_clean(response.get_data(as_text=True), "an /api/chat error body")
        world.assert_clean(json.dumps(dict(response.headers)), "/api/chat error headers")


# --- health and CLI ------------------------------------------------------------------------


@pytest.mark.postgres
def test_no_secret_in_health_or_cli_output(world, postgres_server):
    app = world.app
    runner = app.test_cli_runner()
    outputs = {"readyz": app.test_client().get("/readyz").get_data(as_text=True)}
    outputs["info"] = runner.invoke(args=["services", "info"]).output
    outputs["check"] = runner.invoke(args=["services", "check"]).output
    assert json.loads(outputs["readyz"])["status"] == "pass"
    assert "redis://***@127.0.0.1" in outputs["info"]
    assert f"app:***@127.0.0.1:{postgres_server.port}" in outputs["info"]

    world.redis.stop()
    outputs["readyz down"] = app.test_client().get("/readyz").get_data(as_text=True)
    outputs["check down"] = runner.invoke(args=["services", "check"]).output
    assert "FAIL" in outputs["check down"]

    for where, text in outputs.items():
        world.assert_clean(text, where)


@pytest.mark.postgres
def test_wrong_passwords_are_not_shown_either(make_app, password_redis, postgres_server):
    wrong_redis = "wrong-redis-" + secrets.token_hex(6)
    wrong_pg = "wrong-pg-" + secrets.token_hex(6)
    app = make_app(
        REDIS_URL=f"redis://:{wrong_redis}@127.0.0.1:{password_redis.port}/0",
        DATABASE_URL=f"postgresql://app:{wrong_pg}@127.0.0.1:{postgres_server.port}/app",
        HEALTH_REQUIRED_SERVICES="redis",
    )
    response = app.test_client().get("/readyz")
    check = app.test_cli_runner().invoke(args=["services", "check"])

    assert response.status_code == 503
    body = response.json
    assert body["checks"]["redis:responseTime"][0]["status"] == "fail"
    assert body["checks"]["database:responseTime"][0]["status"] == "fail"
    for text in (response.get_data(as_text=True), check.output):
        assert wrong_redis not in text
        assert wrong_pg not in text


# --- app.redaction, unit by unit ------------------------------------------------------------


def test_secret_never_prints_itself():
    secret = Secret("sk-unit-" + secrets.token_hex(8))
    raw = secret.reveal()
    for text in (repr(secret), str(secret), f"{secret}", f"{secret!r}", format(secret),
                 repr([secret]), repr({"key": secret})):  # fmt: skip
        assert raw not in text
        assert MASK in text
    assert repr(secret) == "Secret('***')"
    assert raw.startswith("sk-unit-")
    assert secret == Secret(raw)
    assert secret != Secret(raw + "x")
    assert secret != raw
    assert hash(secret) == hash(Secret(raw))
    assert bool(secret) is True
    assert bool(Secret("")) is False


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("postgresql://app:pw123@db:5432/app", "postgresql://app:***@db:5432/app"),
        ("postgresql+psycopg://app:p%40ss@db/app", "postgresql+psycopg://app:***@db/app"),
        ("redis://:redispw@127.0.0.1:6379/0", "redis://***@127.0.0.1:6379/0"),
        ("redis://token-only@cache:6379", "redis://***@cache:6379"),
        ("rediss://user:p@ss:word@cache:6380/1?ssl=true", "rediss://user:***@cache:6380/1?ssl=true"),
        ("https://api.openai.com/v1", "https://api.openai.com/v1"),
        ("sqlite:////tmp/app.db", "sqlite:////tmp/app.db"),
        ("redis://user:pw@[::1", "redis://user:***@[::1"),  # not parseable: masked all the same
        # A raw '#', '/' or '@' in the password: parsers disagree on the host, the mask does not.
        ("postgresql://app:pa#ss/wo@rd@db:5432/app", "postgresql://app:***@db:5432/app"),
        ("redis://:pa#ss@cache:6379/0", "redis://***@cache:6379/0"),
        # In the query string, as redis-py and psycopg accept it.
        ("redis://cache:6379/0?password=pa%23ss&db=1", "redis://cache:6379/0?password=***&db=1"),
        (
            "postgresql://app@db/app?sslmode=require&password=pa#ss/wd",
            "postgresql://***@db/app?sslmode=require&password=***",
        ),
        (
            "https://host/v1beta/models?key=AIza-secret-value&alt=sse",
            "https://host/v1beta/models?key=***&alt=sse",
        ),
    ],
)
def test_redact_url(url, expected):
    assert redact_url(url) == expected


def test_redact_masks_registered_secrets_and_url_passwords_in_free_text():
    value = "sk-registered-" + secrets.token_hex(8)
    assert redact(f"key {value}") == f"key {value}"  # not known yet
    register_secret(value)
    register_secret(Secret("sk-wrapped-" + secrets.token_hex(8)))
    register_secret("short")  # too short to mask safely: ignored
    register_secret(None)
    assert redact(f"key {value}, again {value}") == "key ***, again ***"
    assert (
        redact("connect to postgresql://app:hunter2x@db/app now")
        == "connect to postgresql://app:***@db/app now"
    )
    assert redact("a short word stays") == "a short word stays"
    assert redact("mail me at someone@example.com") == "mail me at someone@example.com"


@pytest.fixture
def redacting_logger(caplog) -> Iterator[tuple[logging.Logger, pytest.LogCaptureFixture]]:
    install_log_redaction()
    install_log_redaction()  # idempotent: one factory, not two wrapped
    logger = logging.getLogger("tests.redaction")
    caplog.set_level(logging.DEBUG, logger="tests.redaction")
    yield logger, caplog


def test_log_factory_masks_args_and_messages(redacting_logger):
    logger, caplog = redacting_logger
    value = "sk-logged-" + secrets.token_hex(8)
    register_secret(value)

    logger.debug("key is %s", value)
    logger.info(f"key is {value}")
    logger.warning("dsn %s", "postgresql://app:pw-in-url@db/app")
    logger.error("secret object %r", Secret(value))
    logger.info("%(key)s in a mapping", {"key": value})

    messages = [record.getMessage() for record in caplog.records]
    assert messages == [
        "key is ***",
        "key is ***",
        "dsn postgresql://app:***@db/app",
        "secret object Secret('***')",
        "*** in a mapping",
    ]
    assert all(value not in record.msg for record in caplog.records)
    assert value not in caplog.text
    assert "pw-in-url" not in caplog.text


def test_log_factory_masks_exception_tracebacks(redacting_logger):
    logger, caplog = redacting_logger
    value = "sk-traceback-" + secrets.token_hex(8)
    register_secret(value)

    try:
        raise ValueError(f"upstream rejected {value}")
    except ValueError:
        logger.exception("call failed")

    (record,) = caplog.records
    assert record.exc_text is not None
    assert "ValueError: upstream rejected ***" in record.exc_text
    assert value not in logging.Formatter().format(record)
    assert value not in caplog.text


def test_log_factory_survives_a_broken_format_string():
    install_log_redaction()
    factory = logging.getLogRecordFactory()
    record = factory("tests.redaction", logging.INFO, __file__, 1, "%d items", ("many",), None)
    assert record.msg == "%d items"
    assert record.args == ("many",)
