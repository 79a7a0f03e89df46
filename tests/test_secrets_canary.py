"""Canaries: a password in eight URL shapes, and an API key in every LLMError's traceback.

Part one: a canary password holding ``#``, ``/`` and ``@`` is configured in eight
shapes (Redis and PostgreSQL; in the userinfo and in the query string; raw and
percent-encoded), against a real redis-server and PostgreSQL that accept it.
Each shape either stops start-up (with an error naming the key) or runs: then
the encoded shapes must really authenticate (so the secret went out), and the
password, whole, encoded or in any of the pieces a raw ``#``, ``/`` or ``@``
cuts it into, must appear 0 times in ``flask services info|check``,
``flask llm breakers``, ``/readyz`` (up, with a wrong password, and down), an
error body, and every log record at DEBUG.

Part two: a real upstream of each provider echoes the canary key in its
answers (bodies and headers); every LLMError type the layer raises must show
it 0 times in ``traceback.format_exception``, ``str`` and ``repr`` of its
cause.
"""

from __future__ import annotations

import json
import logging
import secrets
import threading
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any
from urllib.parse import quote, quote_plus

import pytest
import redis as redis_py
from flask import Flask

from app.errors import ConfigError
from app.llm import errors as llm_errors
from app.llm import get_llm
from app.llm.errors import LLMError
from app.services import reset_services
from tests.conftest import CANARY_GEMINI_KEY, CANARY_KEY
from tests.payloads import (
    anthropic_error,
    chat_completion,
    function_call,
    gemini_error,
    openai_error,
    sse_data,
)
from tests.servers import CLOSE, HANG, PostgresServer, RedisServer, Reply, ScriptedServer, start_redis

MESSAGES = [{"role": "user", "content": "hi"}]

# --- part one: a canary password in eight URL shapes ------------------------------------------------


def canary_password() -> str:
    """A password with '#', '/' and '@' in it, each piece long enough to be recognised on its own."""
    return (
        "cnry"
        + "#".join(secrets.token_hex(5) for _ in range(2))
        + "/"
        + secrets.token_hex(5)
        + "@"
        + (secrets.token_hex(5))
    )


def forms(password: str) -> set[str]:
    """Every way the password could show: whole, encoded, and the pieces a raw delimiter cuts it into."""
    pieces = {password, quote(password, safe=""), quote_plus(password)}
    for delimiter in "#/@":
        pieces.update(password.split(delimiter))
    pieces.update(piece for part in password.split("#") for piece in part.split("/"))
    pieces.update(piece for part in password.replace("#", "/").split("/") for piece in part.split("@"))
    return {piece for piece in pieces if len(piece) >= 8}


SHAPES = [
    (service, place, encoding)
    for service in ("redis", "postgresql")
    for place in ("userinfo", "query")
    for encoding in ("encoded", "raw")
]


@dataclass
class Canary:
    password: str
    redis: RedisServer
    postgres: PostgresServer
    role: str

    def url(self, service: str, place: str, encoding: str) -> str:
        secret = quote(self.password, safe="") if encoding == "encoded" else self.password
        if service == "redis":
            host = f"127.0.0.1:{self.redis.port}"
            return (
                f"redis://:{secret}@{host}/0"
                if place == "userinfo"
                else f"redis://{host}/0?password={secret}"
            )
        host = f"127.0.0.1:{self.postgres.port}"
        if place == "userinfo":
            return f"postgresql://{self.role}:{secret}@{host}/app"
        return f"postgresql://{self.role}@{host}/app?password={secret}"


@pytest.fixture
def canary(postgres_server: PostgresServer) -> Iterator[Canary]:
    password = canary_password()
    role = "canary_" + secrets.token_hex(4)
    postgres_server.psql(f"CREATE ROLE {role} LOGIN PASSWORD '{password}'")
    server = start_redis(password=password)
    try:
        yield Canary(password, server, postgres_server, role)
    finally:
        server.stop()
        postgres_server.psql(f"DROP ROLE {role}")


@pytest.fixture
def every_log(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """Every logger at DEBUG (re-enabled if something disabled it)."""
    caplog.set_level(logging.DEBUG)
    disabled = [
        logger
        for logger in logging.Logger.manager.loggerDict.values()
        if isinstance(logger, logging.Logger) and logger.disabled
    ]
    for logger in disabled:
        logger.disabled = False
    yield caplog
    for logger in disabled:
        logger.disabled = True


def _log_text(caplog: pytest.LogCaptureFixture) -> str:
    formatter = logging.Formatter("%(name)s %(levelname)s %(message)s")
    return caplog.text + "\n".join(formatter.format(record) for record in caplog.records)


def _readyz(app: Flask) -> tuple[str, dict[str, Any]]:
    response = app.test_client().get("/readyz")
    text = response.get_data(as_text=True)
    return text, json.loads(text)


def _status(body: dict[str, Any], service: str) -> str:
    return str(body["checks"][f"{service}:responseTime"][0]["status"])


def _cli(app: Flask, *args: str) -> str:
    result = app.test_cli_runner().invoke(args=list(args))
    return result.output + (str(result.exception) if result.exception else "")


def _break_authentication(canary: Canary, service: str, app: Flask) -> Callable[[], None]:
    """Make the server refuse the configured password; returns what undoes it."""
    other = "other-" + secrets.token_hex(8)
    if service == "redis":
        admin = redis_py.Redis(host="127.0.0.1", port=canary.redis.port, password=canary.password)
        admin.config_set("requirepass", other)
        admin.close()
        admin = redis_py.Redis(host="127.0.0.1", port=canary.redis.port, password=other)
        admin.client_kill_filter(_type="normal", skipme=True)  # the app's open connection goes too

        def restore() -> None:
            admin.config_set("requirepass", canary.password)
            admin.close()

        return restore
    canary.postgres.psql(f"ALTER ROLE {canary.role} PASSWORD '{other}'")
    reset_services(app)  # close the pooled connections: the next one authenticates again
    return lambda: canary.postgres.psql(f"ALTER ROLE {canary.role} PASSWORD '{canary.password}'")


@pytest.mark.postgres
@pytest.mark.parametrize(("service", "place", "encoding"), SHAPES, ids=["-".join(shape) for shape in SHAPES])
def test_a_canary_password_shows_nowhere(make_app, canary, every_log, service, place, encoding):
    url = canary.url(service, place, encoding)
    key = "REDIS_URL" if service == "redis" else "DATABASE_URL"
    outputs: dict[str, str] = {}
    try:
        app = make_app({key: url, "HEALTH_REQUIRED_SERVICES": "redis"})
    except ConfigError as exc:  # a URL no library can read as meant: refused at start, never shown
        assert key in str(exc)
        assert encoding == "raw", f"an encoded password was refused: {exc}"
        outputs["start-up error"] = f"{exc}\n{exc!r}\n{''.join(traceback.format_exception(exc))}"
    else:

        @app.get("/boom")
        def boom() -> str:
            raise RuntimeError(f"could not use {url}")

        text, body = _readyz(app)
        # Only an encoded password is accepted (a raw one would be misread by the client library),
        # and it reached the server, which let us in.
        assert encoding == "encoded"
        assert _status(body, "redis" if service == "redis" else "database") == "pass", body
        outputs["readyz"] = text
        outputs["services info"] = _cli(app, "services", "info")
        outputs["services check"] = _cli(app, "services", "check")
        outputs["llm breakers"] = _cli(app, "llm", "breakers")
        error = app.test_client().get("/boom")
        assert error.status_code == 500
        outputs["error body"] = error.get_data(as_text=True)
        app.logger.info("connected to %s", url)  # a careless log line
        app.logger.info(f"repr of the config: {app.config!r}")

        restore = _break_authentication(canary, service, app)
        try:
            text, body = _readyz(app)
            outputs["readyz, wrong password"] = text
            outputs["services check, wrong password"] = _cli(app, "services", "check")
        finally:
            restore()
        if service == "redis":
            canary.redis.stop()
            text, body = _readyz(app)
            assert _status(body, "redis") == "fail"
            outputs["readyz, down"] = text
            outputs["services check, down"] = _cli(app, "services", "check")
            outputs["llm breakers, down"] = _cli(app, "llm", "breakers")
    outputs["logs"] = _log_text(every_log)

    assert outputs
    for where, text in outputs.items():
        for form in forms(canary.password):
            assert form not in text, f"the canary password ({form[:4]}...) shows in {where}"


def test_the_canary_forms_cover_every_piece():
    password = "cnryAAAAAAAAAA#BBBBBBBBBB/CCCCCCCCCC@DDDDDDDDDD"
    assert {"cnryAAAAAAAAAA", "BBBBBBBBBB", "CCCCCCCCCC", "DDDDDDDDDD"} <= forms(password)
    assert quote(password, safe="") in forms(password)


# --- part two: the canary key in every LLMError's traceback -------------------------------------------

CHAT = "/v1/chat/completions"
GEMINI_CHAT = "/v1beta/models/gemini-2.5-flash:generateContent"
ECHO = {"X-Echo-Key": CANARY_KEY}  # a header that repeats the key, as some proxies do


def _openai_status(status: int, message: str, code: str | None = None, **headers: str) -> Reply:
    body = openai_error(f"{message} (key {CANARY_KEY})", "invalid_request_error", code)
    return Reply(status, body, headers={**ECHO, **headers})


@pytest.fixture
def layer(make_app, upstream: ScriptedServer) -> Flask:
    return make_app(
        OPENAI_API_KEY=CANARY_KEY,
        OPENAI_BASE_URL=upstream.url_for("/v1"),
        OPENAI_TIMEOUT=0.5,
        OPENAI_PROFILES={
            "flaky": {"base_url": upstream.url_for("/flaky/v1"), "api_key": CANARY_KEY},
            "narrow": {"base_url": upstream.url_for("/narrow/v1"), "api_key": CANARY_KEY},
            "keyless": {"base_url": upstream.url_for("/keyless/v1"), "api_key_env": "UNSET_KEY_VARIABLE"},
        },
        LLM_POLICY={
            "flaky": {"breaker_min_calls": 1, "breaker_cooldown": 60},
            "narrow": {"max_concurrency": 1, "bulkhead_max_wait": 0},
        },
        ANTHROPIC_API_KEY=CANARY_KEY,
        ANTHROPIC_BASE_URL=upstream.base_url,
        ANTHROPIC_TIMEOUT=0.5,
        GEMINI_API_KEY=CANARY_GEMINI_KEY,
        GENAI_BASE_URL=upstream.url_for("/"),
        GENAI_API_VERSION="v1beta",
    )


def _error(app: Flask, call: Callable[[], Any]) -> LLMError:
    with app.app_context():
        try:
            call()
        except LLMError as exc:
            return exc
    raise AssertionError("the call did not fail")


def _chat(model: str) -> Callable[[], Any]:
    return lambda: get_llm().chat(MESSAGES, model=model)


def lookup(q: str) -> str:
    """A tool the model keeps asking for."""
    return f"looked up {q}"


def _run(model: str) -> Callable[[], Any]:
    return lambda: get_llm().run(MESSAGES, model=model, tools=[lookup], max_rounds=1)


def _stream(model: str) -> Callable[[], Any]:
    def read() -> None:
        with get_llm().chat_stream(MESSAGES, model=model) as stream:
            list(stream)

    return read


def _bulkhead_full(app: Flask, upstream: ScriptedServer) -> LLMError:
    """A call to a provider whose one slot a slow call holds."""
    upstream.script("/narrow/v1" + "/chat/completions", Reply(body=chat_completion("slow"), delay=1.0))
    holder = threading.Thread(target=lambda: _error_or_none(app, _chat("narrow/m")), daemon=True)
    holder.start()
    upstream.wait_for_requests(1)
    try:
        return _error(app, _chat("narrow/m"))
    finally:
        holder.join(timeout=5)


def _error_or_none(app: Flask, call: Callable[[], Any]) -> None:
    with app.app_context():
        try:
            call()
        except LLMError:
            pass


def _lookup(key: str) -> str:
    """A tool for run(): the model asks for it once too often."""
    return key


def _every_error(app: Flask, upstream: ScriptedServer) -> list[tuple[str, LLMError]]:
    got: list[tuple[str, LLMError]] = []

    def openai(label: str, reply: Reply | Any, call: Callable[[], Any] | None = None) -> None:
        upstream.script(CHAT, reply)
        got.append((f"openai {label}", _error(app, call or _chat("openai/gpt-4o-mini"))))

    openai("400", _openai_status(400, "Invalid value for 'messages'"))
    openai(
        "context",
        _openai_status(400, "This model's maximum context length is 8 tokens", "context_length_exceeded"),
    )
    openai("filter", _openai_status(400, "Flagged by the content_filter", "content_filter"))
    openai("401", _openai_status(401, "Incorrect API key provided", "invalid_api_key"))
    openai("403", _openai_status(403, "Project does not have access"))
    openai("404", _openai_status(404, "The model does not exist"))
    openai("429", _openai_status(429, "Rate limit reached", "rate_limit_exceeded", **{"Retry-After": "3600"}))
    openai("500", _openai_status(500, "The server had an error"))
    openai("timeout", HANG)
    openai("connection", CLOSE)
    openai(
        "malformed tool arguments",
        chat_completion(None, tool_calls=[function_call("c1", "lookup", '{"key": "' + CANARY_KEY)]),
    )
    openai(
        "error in a stream",
        Reply.stream(
            [sse_data({"error": {"message": f"boom {CANARY_KEY}", "type": "server_error"}})], **ECHO
        ),
        _stream("openai/gpt-4o-mini"),
    )
    openai(
        "stream without its end",
        Reply(body=f'{{"truncated": "{CANARY_KEY}', headers=ECHO),
        _stream("openai/m"),
    )
    openai(
        "max rounds of tool calls",
        chat_completion(None, tool_calls=[function_call("c1", "lookup", json.dumps({"key": CANARY_KEY}))]),
        lambda: get_llm().run(MESSAGES, "openai/gpt-4o-mini", tools=[_lookup], max_rounds=1),
    )
    upstream.script(
        CHAT, chat_completion(None, tool_calls=[function_call("c1", "lookup", json.dumps({"q": CANARY_KEY}))])
    )
    got.append(("too many tool rounds", _error(app, _run("openai/gpt-4o-mini"))))
    got.append(("unknown provider", _error(app, _chat("nowhere/m"))))
    got.append(("no key", _error(app, _chat("keyless/m"))))
    upstream.script("/flaky/v1/chat/completions", _openai_status(500, "down"))
    _error(app, _chat("flaky/m"))
    got.append(("breaker open", _error(app, _chat("flaky/m"))))
    got.append(("bulkhead full", _bulkhead_full(app, upstream)))

    upstream.script(
        "/v1/messages", Reply(401, anthropic_error("authentication_error", f"bad key {CANARY_KEY}"))
    )
    got.append(("anthropic 401", _error(app, _chat("anthropic/claude-sonnet-4-6"))))
    upstream.script("/v1/messages", Reply(529, anthropic_error("overloaded_error", f"busy {CANARY_KEY}")))
    got.append(("anthropic 529", _error(app, _chat("anthropic/claude-sonnet-4-6"))))
    upstream.script("/v1/messages", Reply(body={"type": "message", "content": "x", "key": CANARY_KEY}))
    got.append(("anthropic malformed", _error(app, _chat("anthropic/claude-sonnet-4-6"))))

    reason = {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID"}
    body = gemini_error(400, "INVALID_ARGUMENT", f"API key not valid: {CANARY_GEMINI_KEY}", reason)
    upstream.script(GEMINI_CHAT, Reply(400, body))
    got.append(("gemini 400", _error(app, _chat("gemini/gemini-2.5-flash"))))
    upstream.script(
        GEMINI_CHAT, Reply(body={"candidates": [{"content": {"parts": f"no {CANARY_GEMINI_KEY}"}}]})
    )
    got.append(("gemini malformed", _error(app, _chat("gemini/gemini-2.5-flash"))))
    return got


def _chain(error: BaseException) -> Iterator[BaseException]:
    """The chain as tracebacks show it: ``__cause__``, else an unsuppressed ``__context__``."""
    seen: set[int] = set()
    item: BaseException | None = error
    while item is not None and id(item) not in seen:
        seen.add(id(item))
        yield item
        item = item.__cause__ if item.__cause__ is not None or item.__suppress_context__ else item.__context__


def test_no_llm_error_type_shows_the_key_in_its_traceback(make_app, layer, upstream):
    errors = _every_error(layer, upstream)
    budgeted = make_app(
        OPENAI_API_KEY=CANARY_KEY,
        OPENAI_BASE_URL=upstream.url_for("/v1"),
        LLM_BUDGETS={"global": {"daily_usd": 0}},
    )
    errors.append(("no budget left", _error(budgeted, _chat("openai/gpt-4o-mini"))))

    every_type = {
        cls for cls in vars(llm_errors).values() if isinstance(cls, type) and issubclass(cls, LLMError)
    }
    assert {type(error) for _, error in errors} == every_type
    # The key went out, and the upstream echoed it: the SDKs' exceptions did carry it.
    assert any(
        request.headers.get("authorization") == f"Bearer {CANARY_KEY}" for request in upstream.requests
    )
    raw = [error.__cause__ for _, error in errors if error.__cause__ is not None]
    assert raw, "no error kept the SDK's exception"
    for label, error in errors:
        texts = {
            "traceback": "".join(traceback.format_exception(error)),
            "str": str(error),
            "repr": repr(error),
        }
        for index, link in enumerate(_chain(error)):
            texts[f"str of link {index}"] = str(link)
            texts[f"repr of link {index}"] = repr(link)
            texts[f"args of link {index}"] = repr(link.args)
        for where, text in texts.items():
            for key in (CANARY_KEY, CANARY_GEMINI_KEY):
                assert key not in text, f"{label} ({type(error).__name__}): the key shows in its {where}"


def test_errors_name_the_url_they_tried_without_credentials(make_app, upstream):
    base = upstream.url_for("/v1").replace("http://", f"http://user:{CANARY_KEY}@")
    app = make_app(OPENAI_API_KEY="sk-test-0000", OPENAI_BASE_URL=base)
    upstream.script(CHAT, CLOSE)

    error = _error(app, _chat("openai/gpt-4o-mini"))

    assert error.url == f"http://user:***@127.0.0.1:{upstream.port}/v1/chat/completions"
    assert str(error).endswith(f"(http://user:***@127.0.0.1:{upstream.port}/v1/chat/completions)")
    assert "http" not in error.message  # what /api may show its callers: no internal address
    assert CANARY_KEY not in "".join(traceback.format_exception(error))


class _Unscrubbable(Exception):
    """Formats itself from data out of reach, as pydantic's ValidationError does."""

    def __init__(self, data: dict[str, str]) -> None:
        super().__init__("validation failed")
        self._data = SimpleNamespace(**data)  # an object: no scrub reaches into it

    def __str__(self) -> str:
        return f"validation failed for {self._data.input}"


def test_an_exception_that_cannot_be_scrubbed_is_replaced_in_the_chain():
    from app.llm.errors import RedactedCause, safe_cause
    from app.redaction import register_secret

    register_secret(CANARY_KEY)
    inner = _Unscrubbable({"input": CANARY_KEY})
    outer = RuntimeError(f"request failed with {CANARY_KEY}")
    outer.__cause__ = inner

    safe = safe_cause(outer)

    assert safe is outer  # its own message could be scrubbed: kept, for its attributes
    assert str(outer) == "request failed with ***"
    assert isinstance(outer.__cause__, RedactedCause)  # the inner one could not: replaced
    assert outer.__cause__.original_type.endswith("_Unscrubbable")
    assert str(outer.__cause__).endswith("_Unscrubbable: validation failed for ***")
    assert CANARY_KEY not in "".join(traceback.format_exception(outer))
