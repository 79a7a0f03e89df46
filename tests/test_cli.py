"""``flask services check|info`` and ``flask db upgrade``, in process and as the real command."""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import secrets
import sqlite3
import subprocess
from collections.abc import Iterator

import pytest

from app.services.openai_service import get_openai_client
from app.services.redis_service import get_redis_client
from tests.conftest import CANARY_KEY, ROOT

MIGRATIONS = ROOT / "migrations" / "versions"
FLASK = ROOT / ".venv" / "bin" / "flask"


def _head_revision() -> str:
    """The revision no other revision names as its parent."""
    revisions, parents = set(), set()
    for path in MIGRATIONS.glob("*.py"):
        text = path.read_text()
        revisions.add(re.search(r"^revision\s*=\s*['\"](\w+)['\"]", text, re.M).group(1))
        down = re.search(r"^down_revision\s*=\s*['\"](\w+)['\"]", text, re.M)
        if down:
            parents.add(down.group(1))
    heads = revisions - parents
    assert len(heads) == 1, heads
    return heads.pop()


def _rows(output: str) -> dict[str, list[str]]:
    """The table's rows by service, cells split on runs of two or more spaces."""
    rows = {}
    for line in output.splitlines():
        cells = re.split(r"\s{2,}", line.strip())
        if cells and cells[0] and not line.startswith("overall:"):
            rows[cells[0]] = cells
    return rows


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """Flask-Migrate's env.py runs ``logging.config.fileConfig``, which replaces the
    root handlers and disables every logger that exists; undo that for later tests."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    loggers = {
        name: (logger.disabled, logger.level)
        for name, logger in logging.Logger.manager.loggerDict.items()
        if isinstance(logger, logging.Logger)
    }
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    for name, logger in logging.Logger.manager.loggerDict.items():
        if isinstance(logger, logging.Logger):
            disabled, old_level = loggers.get(name, (False, logging.NOTSET))
            logger.disabled = disabled
            logger.setLevel(old_level)


# --- flask services check ------------------------------------------------------------------


def test_services_check_prints_every_service_and_exits_0(make_app, redis_server):
    app = make_app(REDIS_URL=redis_server.url, OPENAI_API_KEY=CANARY_KEY)

    result = app.test_cli_runner().invoke(args=["services", "check"])

    assert result.exit_code == 0, result.output
    rows = _rows(result.output)
    assert rows["SERVICE"] == ["SERVICE", "STATUS", "TIME", "DETAIL"]
    assert rows["database"][1] == "PASS"
    assert rows["database"][2].endswith(" ms")
    assert rows["redis"][1] == "PASS"
    assert rows["redis"][2].endswith(" ms")
    assert rows["openai:default"][1:] == ["PASS", "-", "configured"]
    assert rows["gemini"][1:] == ["PASS", "-", "not configured (GEMINI_API_KEY)"]
    assert "overall: pass" in result.output
    assert CANARY_KEY not in result.output


def test_services_check_exits_1_when_a_required_redis_is_down(make_app, disposable_redis):
    app = make_app(REDIS_URL=disposable_redis.url, HEALTH_REQUIRED_SERVICES="redis")
    disposable_redis.stop()

    result = app.test_cli_runner().invoke(args=["services", "check"])

    assert result.exit_code == 1, result.output
    rows = _rows(result.output)
    assert rows["redis"][1] == "FAIL"
    # The operator sees what went wrong (redacted); /readyz shows the type only.
    assert rows["redis"][3].startswith("ConnectionError: ")
    assert rows["database"][1] == "PASS"
    assert "overall: fail" in result.output


def test_services_check_with_redis_down_warns_and_exits_0_by_default(make_app, disposable_redis):
    app = make_app(REDIS_URL=disposable_redis.url)
    disposable_redis.stop()

    result = app.test_cli_runner().invoke(args=["services", "check"])

    assert result.exit_code == 0, result.output
    assert _rows(result.output)["redis"][1] == "WARN"
    assert "overall: warn" in result.output


# --- flask services info -------------------------------------------------------------------


def test_services_info_when_nothing_is_configured(make_app):
    app = make_app()

    result = app.test_cli_runner().invoke(args=["services", "info"])

    assert result.exit_code == 0, result.output
    rows = _rows(result.output)
    assert rows["SERVICE"] == ["SERVICE", "CONFIGURED", "ENDPOINT", "TIMEOUTS", "RETRIES", "CLIENT BUILT"]
    assert rows["database"][1] == "yes"
    assert rows["database"][2] == f"sqlite:///{app.instance_path}/app.db"
    assert rows["redis"][1:3] == ["no (set REDIS_URL)", "-"]
    assert rows["redis"][3:5] == ["socket 1s, connect 1s", "client 1"]
    assert rows["openai:default"][1:5] == [
        "no (set OPENAI_API_KEY)",
        "https://api.openai.com/v1",
        "read 60s, connect 5s",
        "llm 0, client 2",  # make_app sets LLM_MAX_RETRIES=0; the SDK's 2 are for get_openai_client()
    ]
    assert rows["gemini"][1:5] == [
        "no (set GEMINI_API_KEY)",
        "https://generativelanguage.googleapis.com",
        "read 60s",
        "llm 0, client 0",
    ]
    # (The database is attached as soon as another app in this process has used it.)
    assert [rows[name][-1] for name in ("redis", "openai:default", "gemini")] == ["no", "no", "no"]


@pytest.mark.postgres
def test_services_info_redacts_credentials_and_shows_timeouts(make_app, postgres_server, local_server):
    redis_password = "redis-pw-" + secrets.token_hex(8)
    app = make_app(
        DATABASE_URL=postgres_server.url,
        DATABASE_CONNECT_TIMEOUT=3,
        REDIS_URL=f"redis://cache:{redis_password}@127.0.0.1:6399/2",
        REDIS_SOCKET_TIMEOUT=0.25,
        REDIS_CONNECT_TIMEOUT=0.75,
        REDIS_MAX_RETRIES=0,
        OPENAI_API_KEY=CANARY_KEY,
        OPENAI_BASE_URL=local_server.url_for("/v1"),
        OPENAI_TIMEOUT=12,
        OPENAI_CONNECT_TIMEOUT=2.5,
        OPENAI_MAX_RETRIES=4,
        OPENAI_PROFILES={"groq": {}},
        GEMINI_API_KEY="AIza-" + secrets.token_hex(16),
        GENAI_TIMEOUT=30,
    )

    result = app.test_cli_runner().invoke(args=["services", "info"])

    assert result.exit_code == 0, result.output
    for secret in (postgres_server.password, redis_password, CANARY_KEY, app.config["GEMINI_API_KEY"]):
        assert secret not in result.output
    rows = _rows(result.output)
    port = postgres_server.port
    assert rows["database"][2] == f"postgresql+psycopg://app:***@127.0.0.1:{port}/app"
    assert rows["database"][3:5] == ["connect 3s", "-"]
    assert rows["redis"][1:5] == [
        "yes",
        "redis://cache:***@127.0.0.1:6399/2",
        "socket 0.25s, connect 0.75s",
        "client 0",
    ]
    assert rows["openai:default"][1:5] == [
        "yes",
        local_server.url_for("/v1"),
        "read 12s, connect 2.5s",
        "llm 0, client 4",
    ]
    assert rows["openai:groq"][1:3] == ["no (set GROQ_API_KEY)", "https://api.groq.com/openai/v1"]
    assert rows["gemini"][1:4] == ["yes", "https://generativelanguage.googleapis.com", "read 30s"]


def test_services_info_shows_the_retries_that_really_apply(make_app):
    # The layer turns the SDKs' retries off under it and retries itself: an OpenAI profile
    # with max_retries 2 is retried per LLM_MAX_RETRIES (or its LLM_POLICY override) by the layer.
    app = make_app(
        LLM_MAX_RETRIES=3,
        OPENAI_MAX_RETRIES=2,
        OPENAI_PROFILES={"vllm": {"base_url": "http://127.0.0.1:8000/v1", "max_retries": 5}},
        LLM_POLICY={"vllm": {"max_retries": 1}, "gemini": {"max_retries": 0}},
        ANTHROPIC_MAX_RETRIES=4,
    )

    rows = _rows(app.test_cli_runner().invoke(args=["services", "info"]).output)

    assert rows["openai:default"][4] == "llm 3, client 2"
    assert rows["openai:vllm"][4] == "llm 1, client 5"
    assert rows["gemini"][4] == "llm 0, client 0"
    assert rows["anthropic"][4] == "llm 3, client 4"


def test_services_info_tells_whether_this_process_built_each_client(make_app, redis_server, local_server):
    app = make_app(
        REDIS_URL=redis_server.url,
        OPENAI_API_KEY=CANARY_KEY,
        OPENAI_BASE_URL=local_server.url_for("/v1"),
    )
    runner = app.test_cli_runner()

    before = _rows(runner.invoke(args=["services", "info"]).output)
    assert before["openai:default"][-1] == "no"
    assert before["redis"][-1] == "no"

    with app.app_context():
        get_openai_client()
    middle = _rows(runner.invoke(args=["services", "info"]).output)
    assert middle["openai:default"][-1] == "yes"
    assert middle["redis"][-1] == "no"

    with app.app_context():
        get_redis_client()
    after = _rows(runner.invoke(args=["services", "info"]).output)
    assert after["redis"][-1] == "yes"
    assert local_server.log == []  # building a client sends nothing


# --- flask db upgrade ----------------------------------------------------------------------


def test_db_upgrade_on_a_fresh_sqlite_file(make_app, tmp_path, restore_logging):
    database = tmp_path / "fresh.db"
    app = make_app(DATABASE_URL=f"sqlite:///{database}")
    assert not database.exists()

    result = app.test_cli_runner().invoke(args=["db", "upgrade"])

    assert result.exit_code == 0, result.output
    with sqlite3.connect(database) as connection:
        versions = connection.execute("SELECT version_num FROM alembic_version").fetchall()
    assert versions == [(_head_revision(),)]


@pytest.mark.postgres
def test_db_upgrade_and_downgrade_on_postgresql(make_app, postgres_server, restore_logging):
    name = "migrate_" + secrets.token_hex(4)
    postgres_server.psql(f"CREATE DATABASE {name}")
    fresh = dataclasses.replace(postgres_server, database=name)
    try:
        app = make_app(DATABASE_URL=fresh.url)
        runner = app.test_cli_runner()

        result = runner.invoke(args=["db", "upgrade"])
        assert result.exit_code == 0, result.output
        assert fresh.psql("SELECT version_num FROM alembic_version") == _head_revision()
        assert postgres_server.password not in result.output

        result = runner.invoke(args=["db", "downgrade", "base"])
        assert result.exit_code == 0, result.output
        assert fresh.psql("SELECT count(*) FROM alembic_version") == "0"
    finally:
        postgres_server.psql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def test_the_real_flask_command_upgrades_a_fresh_database(tmp_path):
    env = {
        **os.environ,
        "SECRET_KEY": secrets.token_hex(32),
        "INSTANCE_PATH": str(tmp_path),
        "DOTENV_PATH": str(tmp_path / "no.env"),
    }
    env.pop("FLASK_APP", None)

    result = subprocess.run(
        [str(FLASK), "--app", "wsgi", "db", "upgrade"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )

    assert result.returncode == 0, result.stderr
    with sqlite3.connect(tmp_path / "app.db") as connection:
        versions = connection.execute("SELECT version_num FROM alembic_version").fetchall()
    assert versions == [(_head_revision(),)]
    assert env["SECRET_KEY"] not in result.stdout + result.stderr


def test_the_real_flask_command_refuses_to_start_without_a_secret_key(tmp_path):
    env = {**os.environ, "INSTANCE_PATH": str(tmp_path), "DOTENV_PATH": str(tmp_path / "no.env")}
    env.pop("SECRET_KEY", None)
    env.pop("FLASK_DEBUG", None)

    result = subprocess.run(
        [str(FLASK), "--app", "wsgi", "services", "info"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )

    assert result.returncode != 0
    assert "SECRET_KEY must be set" in result.stderr
