"""Reading usage: GET /api/usage (scoped by API key; admin keys see all) and `flask llm usage`.

Both read the daily rollup only: a test records every SQL statement a report
runs, and a report over rows bulk-inserted into PostgreSQL (not through the
hook) matches the raw rows' sums once the rollup is rebuilt.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import event, text

from app.llm.usage import usage_state
from app.llm.usage.report import rebuild_rollup
from app.services.db_service import db
from tests.conftest import CANARY_KEY, api_key_headers
from tests.payloads import chat_completion

CHAT = "/v1/chat/completions"
TODAY = datetime.now(UTC).date().isoformat()


@pytest.fixture
def usage_app(make_app, upstream) -> Any:
    app = make_app(OPENAI_API_KEY=CANARY_KEY, OPENAI_BASE_URL=upstream.url_for("/v1"))
    with app.app_context():
        db.create_all()
    return app


def _chat(app: Any, headers: dict[str, str], model: str = "openai/gpt-4o-mini") -> None:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
    assert app.test_client().post("/api/chat", json=body, headers=headers).status_code == 200


@contextmanager
def statements(app: Any) -> Iterator[list[str]]:
    """Every SQL statement the app's engine runs meanwhile."""
    seen: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        seen.append(statement)

    with app.app_context():
        engine = db.engine
    event.listen(engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", record)


def test_a_key_sees_its_own_usage_and_an_admin_key_sees_everything(usage_app, upstream):
    alice = api_key_headers(usage_app, "alice", tenant="acme", rpm=0, tpm=0)
    bob = api_key_headers(usage_app, "bob", tenant="acme", rpm=0, tpm=0)
    carol = api_key_headers(usage_app, "carol", tenant="globex", rpm=0, tpm=0)
    admin = api_key_headers(usage_app, "ops", admin=True)
    upstream.script(CHAT, *[chat_completion("ok", usage=(100, 10)) for _ in range(3)])
    upstream.script(CHAT, chat_completion("ok", "gpt-4.1", usage=(1000, 100)))
    _chat(usage_app, alice)
    _chat(usage_app, alice)
    _chat(usage_app, bob)
    _chat(usage_app, carol, "openai/gpt-4.1")
    assert usage_state(usage_app).ledger.flush()
    client = usage_app.test_client()

    mine = client.get("/api/usage", headers=alice).json
    assert mine["scope"] == {"user": "alice", "tenant": "acme"}
    assert mine["rows"] == [
        {
            "day": TODAY,
            "calls": 2,
            "cached_calls": 0,
            "unpriced_calls": 0,
            "input_tokens": 200,
            "output_tokens": 20,
            "reasoning_tokens": 0,
            "cached_input_tokens": 0,
            "cost_usd": "0.000042",  # 2 x (100 x $0.15 + 10 x $0.60) / 1M
        }
    ]
    assert mine["total"]["calls"] == 2

    everything = client.get("/api/usage?group_by=user", headers=admin).json
    assert everything["scope"] == "all"
    assert [(row["user"], row["calls"]) for row in everything["rows"]] == [
        ("alice", 2),
        ("bob", 1),
        ("carol", 1),
    ]
    by_tenant = client.get("/api/usage?group_by=tenant", headers=admin).json
    assert [(row["tenant"], row["calls"]) for row in by_tenant["rows"]] == [("acme", 3), ("globex", 1)]
    by_model = client.get(f"/api/usage?group_by=model&from={TODAY}&to={TODAY}", headers=admin).json
    assert [(row["provider"], row["model"], row["calls"]) for row in by_model["rows"]] == [
        ("openai", "gpt-4.1", 1),
        ("openai", "gpt-4o-mini", 3),
    ]
    assert Decimal(by_model["total"]["cost_usd"]) == Decimal("0.000063") + Decimal("0.0028")

    carols = client.get("/api/usage?group_by=model", headers=carol).json
    assert [(row["model"], row["calls"]) for row in carols["rows"]] == [("gpt-4.1", 1)]


@pytest.mark.parametrize(
    ("query", "field", "message"),
    [
        ("from=yesterday", "from", "from must be a UTC day as YYYY-MM-DD"),
        ("to=2026-13-01", "to", "to must be a UTC day as YYYY-MM-DD"),
        ("from=20260101", "from", "YYYY-MM-DD"),
        ("from=2026-02-01&to=2026-01-01", "from", "is after to"),
        ("from=1990-01-01&to=2026-01-01", "from", "at most 3660 days"),
        ("group_by=week", "group_by", "group_by must be one of day, model, user, tenant"),
    ],
)
def test_bad_parameters_are_400_naming_the_field(usage_app, query, field, message):
    headers = api_key_headers(usage_app, "dora")
    response = usage_app.test_client().get(f"/api/usage?{query}", headers=headers)
    assert response.status_code == 400
    assert response.json["error"]["type"] == "invalid_request"
    assert response.json["error"]["field"] == field
    assert message in response.json["error"]["message"]


@pytest.mark.parametrize(
    ("query", "first", "last"),
    [
        # The first days a date holds: the default first day was 29 days before, an OverflowError.
        ("to=0001-01-05", "0001-01-01", "0001-01-05"),
        ("from=0001-01-01&to=0001-01-01", "0001-01-01", "0001-01-01"),
        ("from=9999-12-31&to=9999-12-31", "9999-12-31", "9999-12-31"),
    ],
)
def test_the_first_and_last_days_a_date_holds_are_a_report_not_a_500(usage_app, query, first, last):
    headers = api_key_headers(usage_app, "dora")
    response = usage_app.test_client().get(f"/api/usage?{query}", headers=headers)
    assert response.status_code == 200, response.get_data(as_text=True)
    assert (response.json["from"], response.json["to"]) == (first, last)


@settings(
    max_examples=300,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],  # one app for all
)
@given(
    query=st.dictionaries(
        st.sampled_from(["from", "to", "group_by", "other"]),
        st.dates().map(date.isoformat) | st.text(max_size=12) | st.sampled_from(["day", "model", "user"]),
        max_size=3,
    )
)
def test_no_query_gets_a_server_error(usage_app, query):
    if "FUZZ_HEADERS" not in usage_app.config:  # one key for every example
        usage_app.config["FUZZ_HEADERS"] = api_key_headers(usage_app, "fuzz")
    headers = usage_app.config["FUZZ_HEADERS"]
    response = usage_app.test_client().get("/api/usage", query_string=query, headers=headers)
    assert response.status_code in (200, 400), response.get_data(as_text=True)
    if response.status_code == 400:
        assert response.json["error"]["field"] in ("from", "to", "group_by")


def test_without_a_key_it_is_401_and_with_keys_off_everything(usage_app, make_app):
    response = usage_app.test_client().get("/api/usage")
    assert response.status_code == 401 and response.json["error"]["type"] == "unauthorized"
    assert response.headers["WWW-Authenticate"] == 'Bearer realm="api"'
    revoked = usage_app.test_client().get("/api/usage", headers={"Authorization": "Bearer fsk_" + "x" * 43})
    assert revoked.status_code == 401
    open_app = make_app(API_AUTH="off")
    with open_app.app_context():
        db.create_all()
    assert open_app.test_client().get("/api/usage").json["scope"] == "all"


def test_unmigrated_database_is_503_not_500(make_app):
    app = make_app(API_AUTH="off")
    response = app.test_client().get("/api/usage")
    assert response.status_code == 503 and response.json["error"]["type"] == "unavailable"


def test_the_report_reads_the_rollup_only(usage_app, upstream):
    admin = api_key_headers(usage_app, "ops", admin=True)
    upstream.script(CHAT, chat_completion("ok"))
    _chat(usage_app, admin)
    assert usage_state(usage_app).ledger.flush()
    for group_by in ("day", "model", "user", "tenant"):
        with statements(usage_app) as seen:
            assert (
                usage_app.test_client().get(f"/api/usage?group_by={group_by}", headers=admin).status_code
                == 200
            )
        usage_reads = [s for s in seen if "llm_usage" in s]
        assert usage_reads and all("llm_usage_daily" in s for s in usage_reads), usage_reads
        assert not any("llm_usage " in s or "llm_usage\n" in s for s in usage_reads)


@pytest.mark.postgres
def test_a_bulk_inserted_ledger_reports_its_own_sums_once_the_rollup_is_rebuilt(make_app, postgres_server):
    """Rows inserted by SQL (not the hook): the rollup is rebuilt, and the report matches the rows."""
    app = make_app(DATABASE_URL=postgres_server.url, API_AUTH="off")
    tenant = "bulk-" + os.urandom(4).hex()
    start = datetime.now(UTC).date() - timedelta(days=9)
    with app.app_context():
        db.create_all()
        with db.engine.begin() as connection:
            connection.execute(
                text(
                    "INSERT INTO llm_usage (call_id, started_at, kind, user_name, tenant, provider, model,"
                    " input_tokens, output_tokens, reasoning_tokens, cached_input_tokens, usage_estimated,"
                    " cost, latency_ms, outcome, cached, attempts)"
                    " SELECT md5(:tenant || n::text),"
                    " :start + (n % 10) * interval '1 day' + interval '1 hour',"
                    " 'chat', 'user' || (n % 7), :tenant, 'openai', 'gpt-4o-mini', 100 + n % 50, 10, 0, 0,"
                    " false, CASE WHEN n % 100 = 0 THEN NULL ELSE 0.000001 * (n % 9) END, 5, 'ok',"
                    " n % 13 = 0, 1 FROM generate_series(1, 20000) AS n"
                ),
                {"tenant": tenant, "start": start},
            )
            rebuild_rollup(connection, start, start + timedelta(days=9))
            raw = connection.execute(
                text(
                    "SELECT count(*), sum(CASE WHEN cached THEN 0 ELSE input_tokens END), sum(cost),"
                    " sum(CASE WHEN cost IS NULL THEN 1 ELSE 0 END) FROM llm_usage WHERE tenant = :tenant"
                ),
                {"tenant": tenant},
            ).one()
    end = start + timedelta(days=9)
    report = app.test_client().get(f"/api/usage?group_by=tenant&from={start}&to={end}").json
    (row,) = [r for r in report["rows"] if r["tenant"] == tenant]
    assert (row["calls"], row["input_tokens"], Decimal(row["cost_usd"]), row["unpriced_calls"]) == tuple(raw)
    by_day = app.test_client().get(f"/api/usage?from={start}&to={end}").json
    assert len(by_day["rows"]) == 10


def test_flask_llm_usage_prints_a_table(usage_app, upstream):
    headers = api_key_headers(usage_app, "erin", tenant="acme", rpm=0, tpm=0)
    upstream.script(
        CHAT, chat_completion("ok", usage=(1_000_000, 0)), chat_completion("ok", usage=(0, 1_000_000))
    )
    _chat(usage_app, headers)
    _chat(usage_app, headers)
    assert usage_state(usage_app).ledger.flush()
    runner = usage_app.test_cli_runner()
    result = runner.invoke(args=["llm", "usage", "--by", "model"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[1].split() == [
        "PROVIDER",
        "MODEL",
        "CALLS",
        "CACHED",
        "UNPRICED",
        "INPUT",
        "OUTPUT",
        "REASONING",
        "COST",
    ]
    assert lines[2].split() == ["openai", "gpt-4o-mini", "2", "0", "0", "1000000", "1000000", "0", "$0.75"]
    assert lines[3].split()[0] == "total"
    by_user = runner.invoke(args=["llm", "usage", "--by", "user", "--from", TODAY, "--to", TODAY])
    assert "erin" in by_user.output
    backwards = runner.invoke(args=["llm", "usage", "--from", "2026-02-01", "--to", "2026-01-01"])
    assert backwards.exit_code == 1 and "is after --to" in backwards.output
    rebuilt = runner.invoke(args=["llm", "usage", "--rebuild", "--from", TODAY, "--to", TODAY])
    assert rebuilt.exit_code == 0 and "rebuilt the rollup" in rebuilt.output
    assert rebuilt.output.count("$0.75") == 2  # the same sums, from the rows
    last_day = runner.invoke(args=["llm", "usage", "--rebuild", "--from", "9999-12-31", "--to", "9999-12-31"])
    assert last_day.exit_code == 0, last_day.output  # no day after it to bound the rows by
    assert CANARY_KEY not in result.output + by_user.output + rebuilt.output


def test_flask_llm_usage_on_an_unmigrated_database_fails_in_one_line(make_app):
    result = make_app().test_cli_runner().invoke(args=["llm", "usage"])
    assert result.exit_code == 1
    assert "the usage tables cannot be read" in result.output and "Traceback" not in result.output
    health = make_app().test_cli_runner().invoke(args=["llm", "usage", "--health"])
    assert health.exit_code == 1 and "the usage tables cannot be read" in health.output


def test_flask_api_keys_create_admin(make_app):
    app = make_app()
    with app.app_context():
        db.create_all()
    result = app.test_cli_runner().invoke(args=["api-keys", "create", "ops", "--admin"])
    assert result.exit_code == 0, result.output
    assert ", admin." in result.output
    key = result.output.strip().splitlines()[-1]
    answer = app.test_client().get("/api/usage", headers={"Authorization": f"Bearer {key}"})
    assert answer.json["scope"] == "all"
