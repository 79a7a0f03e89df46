"""API keys for ``/api``: made by ``flask api-keys``, stored hashed, checked on every request.

The keys are made as an operator makes them (the CLI), in the app's real
SQLite file, against a local OpenAI upstream; the database file's bytes are
searched for the key.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import inspect, select, update

from app import create_app
from app.api_keys import ApiKey, binds_to_loopback, create_api_key
from app.errors import ConfigError
from app.llm import get_llm
from app.llm.hooks import LLMCall, LLMHook
from app.services.db_service import db
from tests.conftest import CANARY_KEY, api_key_headers
from tests.servers import ScriptedServer

MESSAGES = [{"role": "user", "content": "Hi"}]
CHAT = {"model": "openai/gpt-4o-mini", "messages": MESSAGES}


@pytest.fixture
def keyed_app(make_app, upstream: ScriptedServer):
    """An app on a local OpenAI upstream, with its tables made as `flask db upgrade` makes them."""
    app = make_app(OPENAI_API_KEY=CANARY_KEY, OPENAI_BASE_URL=upstream.url_for("/v1"))
    result = app.test_cli_runner().invoke(args=["db", "upgrade"])
    assert result.exit_code == 0, result.output
    return app


def cli(app, *args: str):
    return app.test_cli_runner().invoke(args=["api-keys", *args])


def create_key(app, *args: str) -> str:
    result = cli(app, "create", *args)
    assert result.exit_code == 0, result.output
    return result.stdout.strip()


def assert_401(response, *words: str) -> dict:
    assert response.status_code == 401, response.get_data(as_text=True)
    assert response.mimetype == "application/json"
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    error = response.json["error"]
    assert error["type"] == "unauthorized"
    for word in words:
        assert word in error["message"]
    return error


# --- the acceptance: no key, a created key, a revoked key, the database file ---------------------


def test_no_key_gets_401_and_nothing_reaches_the_provider(keyed_app, upstream):
    client = keyed_app.test_client()

    assert_401(client.post("/api/chat", json=CHAT), "API key is required")
    assert_401(client.post("/api/embeddings", json={"model": "openai/m", "input": ["a"]}))
    assert upstream.requests == []


def test_a_created_key_gets_200_by_bearer_and_by_x_api_key(keyed_app, upstream):
    key = create_key(keyed_app, "alice")
    client = keyed_app.test_client()

    by_bearer = client.post("/api/chat", json=CHAT, headers={"Authorization": f"Bearer {key}"})
    by_header = client.post("/api/chat", json=CHAT, headers={"X-API-Key": key})

    assert by_bearer.status_code == 200, by_bearer.get_data(as_text=True)
    assert by_header.status_code == 200, by_header.get_data(as_text=True)
    assert len(upstream.requests) == 2


def test_a_revoked_key_gets_401(keyed_app, upstream):
    key = create_key(keyed_app, "alice")
    headers = {"Authorization": f"Bearer {key}"}
    client = keyed_app.test_client()
    assert client.post("/api/chat", json=CHAT, headers=headers).status_code == 200

    result = cli(keyed_app, "revoke", "1")
    assert result.exit_code == 0, result.output
    assert result.output == "revoked API key 1\n"

    assert_401(client.post("/api/chat", json=CHAT, headers=headers), "revoked")
    assert len(upstream.requests) == 1
    assert cli(keyed_app, "revoke", "1").output == "API key 1 was already revoked\n"
    unknown = cli(keyed_app, "revoke", "99")
    assert unknown.exit_code != 0
    assert "no API key has the id 99" in unknown.output


@pytest.mark.parametrize(
    "args",
    [
        ["create", "alice", "--rpm", "99999999999999999999"],  # an OverflowError in the driver before
        ["create", "alice", "--tpm", "2147483648"],
        ["revoke", "99999999999999999999"],
        ["revoke", "0"],
    ],
)
def test_numbers_the_columns_cannot_hold_are_refused_by_click(keyed_app, args):
    result = cli(keyed_app, *args)
    assert result.exit_code == 2, result.output
    assert "Invalid value" in result.output and "Traceback" not in result.output
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit)


@pytest.mark.parametrize("args", [["create", "alice"], ["list"], ["revoke", "1"]])
def test_an_unmigrated_database_is_one_line_not_a_traceback(make_app, args):
    result = cli(make_app(), *args)
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), result.exception
    assert result.output.strip().splitlines() == [
        "Error: the api_key table cannot be read (OperationalError; run `flask db upgrade`?)"
    ]


def test_the_database_file_holds_no_key_in_clear(keyed_app):
    keys = [create_key(keyed_app, f"user-{n}", "--tenant", "acme") for n in range(3)]
    with keyed_app.app_context():
        hashes = list(db.session.scalars(select(ApiKey.key_hash)))
        db.session.remove()
        path = db.engine.url.database
    data = Path(path).read_bytes()

    assert all(h.encode() in data for h in hashes)  # this is the file the keys went to
    for key in keys:
        secret = key.removeprefix("fsk_")
        assert key.encode() not in data
        assert secret.encode() not in data
        assert secret[:12].encode() not in data  # not even a part of it
        assert key not in "\n".join(hashes)


def test_an_expired_key_and_a_bad_key_get_401_and_never_see_themselves(keyed_app):
    key = create_key(keyed_app, "alice", "--expires", "2999-01-01")
    with keyed_app.app_context():
        db.session.execute(update(ApiKey).values(expires_at=datetime(2000, 1, 1)))
        db.session.commit()
    client = keyed_app.test_client()

    expired = client.post("/api/chat", json=CHAT, headers={"Authorization": f"Bearer {key}"})
    wrong = key[:-4] + "AAAA"
    bad = client.post("/api/chat", json=CHAT, headers={"X-API-Key": wrong})
    not_ours = client.post("/api/chat", json=CHAT, headers={"Authorization": f"Bearer {CANARY_KEY}"})

    assert_401(expired, "expired")
    assert_401(bad, "not valid")
    assert_401(not_ours, "not valid")
    for response, presented in ((expired, key), (bad, wrong), (not_ours, CANARY_KEY)):
        assert presented not in response.get_data(as_text=True)
        assert presented not in json.dumps(dict(response.headers))


# --- who is calling: the key's name and tenant -------------------------------------------------


class Recorder(LLMHook):
    def __init__(self) -> None:
        self.calls: list[LLMCall] = []

    def after_call(self, call: LLMCall, response: object) -> None:
        self.calls.append(call)


def test_the_keys_name_and_tenant_are_the_calls_user_and_tenant(keyed_app, upstream):
    key = create_key(keyed_app, "alice", "--tenant", "acme")
    recorder = Recorder()
    with keyed_app.app_context():
        get_llm().add_hook(recorder)

    response = keyed_app.test_client().post("/api/chat", json=CHAT, headers={"X-API-Key": key})

    assert response.status_code == 200, response.get_data(as_text=True)
    ((call),) = recorder.calls
    assert (call.user, call.tenant) == ("alice", "acme")
    assert upstream.only_request().json["user"] == "alice"  # OpenAI's own user field; never the tenant


# --- the CLI ----------------------------------------------------------------------------


def test_create_prints_the_key_once_and_list_never(keyed_app):
    result = cli(keyed_app, "create", "bob", "--tenant", "acme", "--rpm", "5", "--tpm", "0")
    assert result.exit_code == 0, result.output
    key = result.stdout.strip()
    assert key.startswith("fsk_") and len(key) == 47
    assert "shown only now" in result.stderr
    assert key not in result.stderr

    listing = cli(keyed_app, "list")
    assert listing.exit_code == 0
    assert key not in listing.output
    header, row = listing.output.splitlines()
    assert header.split() == ["id", "name", "tenant", "rpm", "tpm", "created", "expires", "state"]
    assert row.split()[:6] == ["1", "bob", "acme", "5", "no", "limit"]
    assert row.endswith("active")


def test_create_refuses_a_past_expiry_and_a_bad_name(keyed_app):
    past = cli(keyed_app, "create", "bob", "--expires", "2001-01-01")
    assert past.exit_code != 0
    assert "expires must be in the future" in past.output
    assert cli(keyed_app, "create", " ").exit_code != 0
    assert cli(keyed_app, "list").output.startswith("no API keys yet")


# --- the table: a migration, and a database that does not have it ---------------------------


def test_the_migration_makes_the_table_the_model_describes(keyed_app):
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    with keyed_app.app_context():
        with db.engine.connect() as connection:
            assert "api_key" in inspect(connection).get_table_names()
            differences = compare_metadata(MigrationContext.configure(connection), db.metadata)
    assert [d for d in differences if "api_key" in repr(d)] == []


def test_without_the_table_api_answers_503_json_not_500(make_app, caplog):
    app = make_app()  # no `flask db upgrade`
    response = app.test_client().post("/api/chat", json=CHAT, headers={"X-API-Key": "fsk_" + "x" * 43})

    assert response.status_code == 503
    assert response.json["error"]["type"] == "unavailable"
    assert "not migrated" in response.json["error"]["message"]
    assert any("API keys cannot be checked" in r.getMessage() for r in caplog.records)


def test_changing_secret_key_invalidates_the_keys(make_app, tmp_path):
    first = make_app(SECRET_KEY="a" * 40, DATABASE_URL=f"sqlite:///{tmp_path}/keys.db")
    headers = api_key_headers(first)
    second = make_app(SECRET_KEY="b" * 40, DATABASE_URL=f"sqlite:///{tmp_path}/keys.db")

    assert_401(second.test_client().post("/api/chat", json=CHAT, headers=headers), "not valid")


# --- API_AUTH=off: debug, testing or loopback only ------------------------------------------


def test_api_auth_off_in_testing_lets_requests_through(make_app, upstream):
    app = make_app(API_AUTH="off", OPENAI_API_KEY=CANARY_KEY, OPENAI_BASE_URL=upstream.url_for("/v1"))

    assert app.test_client().post("/api/chat", json=CHAT).status_code == 200


@pytest.mark.parametrize("bind", ["0.0.0.0:8000", "[::]:8000", "10.1.2.3:80", "unix:/run/app.sock"])
def test_api_auth_off_on_a_public_bind_stops_start_up(tmp_path, monkeypatch, bind):
    monkeypatch.setenv("BIND", bind)
    with pytest.raises(ConfigError, match="API_AUTH=off is allowed only") as error:
        create_app(_production(tmp_path, API_AUTH="off"))
    assert bind in str(error.value)


@pytest.mark.parametrize("bind", [None, "127.0.0.1:8000", "localhost:9000", "[::1]:8000"])
def test_api_auth_off_on_loopback_starts(tmp_path, monkeypatch, bind):
    if bind is not None:
        monkeypatch.setenv("BIND", bind)
    app = create_app(_production(tmp_path, API_AUTH="off"))
    assert app.extensions["api_auth"] is False


def test_keys_are_on_by_default_in_production(tmp_path):
    assert create_app(_production(tmp_path)).extensions["api_auth"] is True


def _production(tmp_path, **settings: str) -> dict[str, str]:
    return {
        "SECRET_KEY": "s" * 40,
        "INSTANCE_PATH": str(tmp_path),
        "DOTENV_PATH": str(tmp_path / "no.env"),
        **settings,
    }


@pytest.mark.parametrize(
    ("bind", "loopback"),
    [("127.0.0.1:8000", True), ("127.0.0.2", True), ("[::1]:1", True), ("::1", True), ("localhost:8", True),
     ("0.0.0.0:8000", False), ("[::]:8000", False), ("example.com:80", False), ("unix:/tmp/s", False),
     ("fd://3", False), (":8000", False)],
)  # fmt: skip
def test_binds_to_loopback(bind, loopback):
    assert binds_to_loopback(bind) is loopback


def test_create_api_key_returns_the_key_without_showing_it(keyed_app):
    with keyed_app.app_context():
        created = create_api_key("carol", expires_at=datetime.now(UTC) + timedelta(days=1))
    key_id, secret = created
    assert secret not in repr(created)
    assert key_id == created.id == 1


# --- as the README says: the key made by the CLI in a process of its own -----------------------


@pytest.mark.slow
def test_the_readmes_key_command_makes_a_key_the_app_takes(tmp_path):
    import re
    import secrets
    import subprocess

    from app.llm.testing import install_fake_llm
    from tests.conftest import ROOT
    from tests.readme import section
    from tests.test_gunicorn import clean_env

    (line,) = [ln for ln in section("Two commands").splitlines() if "api-keys create" in ln]
    instance = tmp_path / "instance"
    instance.mkdir()
    # What `make run` leaves behind: instance/config.py with a SECRET_KEY, and the migrated database.
    (instance / "config.py").write_text(f"SECRET_KEY = {secrets.token_hex(32)!r}\n")
    env = clean_env(tmp_path)
    flask = str(ROOT / ".venv" / "bin" / "flask")
    upgrade = subprocess.run(
        [flask, "--app", "wsgi", "db", "upgrade"], cwd=ROOT, env=env, capture_output=True
    )
    assert upgrade.returncode == 0, upgrade.stderr.decode()

    made = subprocess.run(
        ["bash", "-c", f'{line}\necho "$KEY"'], cwd=ROOT, env=env, capture_output=True, text=True
    )

    assert made.returncode == 0, made.stderr
    key = made.stdout.strip()
    assert re.fullmatch(r"fsk_[A-Za-z0-9_-]{43}", key)
    assert "created API key 1 for 'me'" in made.stderr
    app = create_app({"INSTANCE_PATH": str(instance), "DOTENV_PATH": str(tmp_path / "no.env")})
    install_fake_llm(app, echo=True)
    response = app.test_client().post(
        "/api/chat", json={**CHAT, "model": "fake/m"}, headers={"Authorization": f"Bearer {key}"}
    )
    assert response.status_code == 200, response.get_data(as_text=True)
