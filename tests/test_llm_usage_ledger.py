"""The usage ledger: one row per logical call, written off the call's path, never lost quietly.

Real parts: SQLite files and the session's PostgreSQL (stopped and restarted
for the outage tests), the scripted upstream speaking OpenAI and Gemini, so
the number of calls is counted where they arrive.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from decimal import Decimal
from typing import Any

import pytest
from sqlalchemy import func, select, text

from app.llm import LLMRateLimitError, get_llm
from app.llm.hooks import LLMHook
from app.llm.usage import LlmUsage, LlmUsageDaily, LlmUsageDrop, usage_state
from app.llm.usage.models import USAGE
from app.services.db_service import db
from tests.conftest import CANARY_KEY
from tests.payloads import (
    chat_completion,
    openai_embeddings,
    openai_error,
    openai_role_chunk,
    openai_sse,
    openai_text_chunks,
    openai_text_stream,
)
from tests.servers import Reply

CHAT = "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "Say hello to the ledger"}]
MODEL = "openai/gpt-4o-mini"


def ledger_app(make_app: Any, upstream: Any, **settings: Any) -> Any:
    app = make_app(OPENAI_API_KEY=CANARY_KEY, OPENAI_BASE_URL=upstream.url_for("/v1"), **settings)
    with app.app_context():
        db.create_all()
    return app


def flushed_rows(app: Any, **where: Any) -> list[LlmUsage]:
    """Every row, once the ledger wrote what it holds."""
    assert usage_state(app).ledger.flush(timeout=20), usage_state(app).ledger.last_error
    with app.app_context():
        query = select(LlmUsage).filter_by(**where).order_by(LlmUsage.started_at)
        rows = list(db.session.scalars(query))
        db.session.expunge_all()
        return rows


# --- one row per logical call ----------------------------------------------------------------------


def test_each_kind_of_call_leaves_one_row_with_who_what_and_how(make_app, upstream):
    app = ledger_app(make_app, upstream)
    upstream.script(CHAT, chat_completion("hi", usage=(12, 3)), chat_completion("again", usage=(20, 4)))
    upstream.script(CHAT, Reply.stream([openai_text_stream("Hel", "lo", usage=(9, 2))]))
    upstream.script("/v1/embeddings", openai_embeddings([0.1, 0.2]))
    with app.app_context():
        llm = get_llm()
        first = llm.chat(MESSAGES, MODEL, user="alice", tenant="acme")
        asyncio.run(llm.achat(MESSAGES, MODEL, user="alice", tenant="acme"))
        with llm.chat_stream(MESSAGES, MODEL, user="bob") as stream:
            assert "".join(stream) == "Hello"
        llm.embed(["some text to embed"], "openai/text-embedding-3-small", tenant="acme")

    rows = flushed_rows(app)
    assert len(rows) == len(upstream.requests) == 4
    assert [(r.kind, r.user_name, r.tenant, r.outcome) for r in rows] == [
        ("chat", "alice", "acme", "ok"),
        ("chat", "alice", "acme", "ok"),
        ("stream", "bob", None, "ok"),
        ("embed", None, "acme", "ok"),
    ]
    chat = rows[0]
    assert (chat.provider, chat.model, chat.input_tokens, chat.output_tokens) == (
        "openai",
        "gpt-4o-mini",
        12,
        3,
    )
    assert chat.call_id and len(chat.call_id) == 32
    assert chat.cost == first.cost == Decimal("0.0000036")  # 12 x $0.15/M + 3 x $0.60/M
    assert (chat.input_price, chat.output_price) == (Decimal("0.15"), Decimal("0.6"))
    assert chat.attempts == 1 and chat.cached is False and chat.usage_estimated is False
    assert chat.latency_ms > 0
    assert (rows[2].input_tokens, rows[2].output_tokens) == (9, 2)
    embedded = rows[3]  # the layer reports no usage for embeddings: estimated, and priced
    assert embedded.usage_estimated and embedded.input_tokens == len("some text to embed") // 4 + 1
    assert embedded.cost == Decimal("0.02") * embedded.input_tokens / 1_000_000


def test_failures_and_refusals_are_rows_with_their_error_kind(make_app, upstream):
    app = ledger_app(make_app, upstream)
    upstream.script(CHAT, Reply(429, openai_error("slow down", "rate_limit_exceeded", None)))

    class Refuse(LLMHook):
        def before_call(self, call: Any) -> None:
            if call.user == "mallory":
                raise LLMRateLimitError("refused by policy", retry_after=1)

    with app.app_context():
        get_llm().add_hook(Refuse())
        for user in ("carol", "mallory"):
            with pytest.raises(LLMRateLimitError):
                get_llm().chat(MESSAGES, MODEL, user=user)

    carol, mallory = flushed_rows(app)
    assert (carol.outcome, carol.attempts, carol.input_tokens, carol.cost) == ("rate_limited", 1, None, 0)
    assert (mallory.outcome, mallory.attempts) == ("rate_limited", 0)
    assert len(upstream.requests) == 1


def test_a_stream_cancelled_after_three_deltas_books_its_partial_usage(make_app, upstream):
    """OpenAI sends usage only at the end: what arrived is estimated (characters / 4) and priced."""
    app = ledger_app(make_app, upstream)
    never = threading.Event()
    deltas = ["Once upon ", "a time, ", "there was ", "a ledger ", "that counted."]
    chunks = [openai_sse(openai_role_chunk(), done=False)]
    chunks += [openai_sse(chunk, done=False) for chunk in openai_text_chunks(*deltas)]
    upstream.script(CHAT, Reply.stream([*chunks, never]))
    with app.app_context():
        stream = get_llm().chat_stream(MESSAGES, MODEL, user="dave")
        received = [next(stream) for _ in range(3)]
        stream.close()
    assert received == deltas[:3]

    (row,) = flushed_rows(app)
    assert row.outcome == "cancelled" and row.usage_estimated
    assert row.output_tokens == -(-len("".join(deltas[:3])) // 4)
    assert row.input_tokens == 4 + -(-len(MESSAGES[0]["content"]) // 4)  # the rate limiter's estimate
    priced = usage_state(app).pricer.cost("openai", "gpt-4o-mini", row.input_tokens, row.output_tokens)
    assert row.cost == priced > 0
    assert upstream.requests[0].finished.wait(5) and upstream.requests[0].outcome == "client_closed"


def test_a_cache_hit_costs_nothing_and_adds_no_billed_tokens(make_app, upstream):
    app = ledger_app(make_app, upstream, LLM_HOOKS="tests.test_llm_usage_ledger:CacheHit")
    upstream.script(CHAT, chat_completion("fresh", usage=(30, 10)))
    with app.app_context():
        assert get_llm().chat(MESSAGES, MODEL, user="erin").content == "fresh"
        hit = get_llm().chat([{"role": "user", "content": "cached"}], MODEL, user="erin")
    assert hit.content == "from the cache"

    fresh, cached = flushed_rows(app)
    assert (cached.cached, cached.cost, cached.attempts, cached.input_tokens) == (True, 0, 0, 30)
    assert fresh.cost > 0
    with app.app_context():
        day = db.session.scalars(select(LlmUsageDaily).filter_by(user_name="erin")).one()
    assert (day.calls, day.cached_calls, day.input_tokens, day.output_tokens) == (2, 1, 30, 10)
    assert day.cost == fresh.cost
    assert len(upstream.requests) == 1


class CacheHit(LLMHook):
    """Stands in for the response cache: answers a prompt of "cached" with ``cached=True``."""

    def before_call(self, call: Any) -> Any:
        from app.llm.types import ChatResponse

        if call.request.messages[-1].text == "cached":
            answer = ChatResponse(
                "from the cache", call.model, call.provider, input_tokens=30, output_tokens=10
            )
            answer.cached = True
            return answer
        return None


def test_unpriced_calls_are_counted_apart_in_the_rollup(make_app, upstream):
    app = ledger_app(
        make_app, upstream, OPENAI_PROFILES={"local": {"base_url": upstream.url_for("/v1"), "api_key": "x"}}
    )
    upstream.script(CHAT, chat_completion("a", usage=(5, 5)))
    with app.app_context():
        get_llm().chat(MESSAGES, "local/my-model", user="frank")
    (row,) = flushed_rows(app)
    assert row.cost is None and row.input_price is None
    with app.app_context():
        day = db.session.scalars(select(LlmUsageDaily).filter_by(user_name="frank")).one()
    assert (day.calls, day.unpriced_calls, day.cost) == (1, 1, 0)


# --- what a row never holds ---------------------------------------------------------------------


def test_no_row_holds_content_or_keys(make_app, upstream, tmp_path):
    secret_prompt = "the launch code is 0451-" + os.urandom(4).hex()
    app = ledger_app(make_app, upstream, DATABASE_URL=f"sqlite:///{tmp_path}/ledger.db")
    upstream.script(CHAT, chat_completion("the answer " + secret_prompt))
    with app.app_context():
        get_llm().chat([{"role": "user", "content": secret_prompt}], MODEL, user="gina")
    flushed_rows(app)
    data = (tmp_path / "ledger.db").read_bytes()
    assert secret_prompt.encode() not in data
    assert CANARY_KEY.encode() not in data
    assert b"gina" in data


# --- batches: idempotent, with the rollup ---------------------------------------------------------


def test_a_batch_written_twice_adds_nothing_to_rows_or_rollup(make_app, upstream):
    from app.llm.usage import ledger as ledger_module

    app = ledger_app(make_app, upstream)
    upstream.script(CHAT, *[chat_completion("x", usage=(10, 1)) for _ in range(3)])
    with app.app_context():
        for _ in range(3):
            get_llm().chat(MESSAGES, MODEL, user="hank")
    ledger = usage_state(app).ledger
    entries = list(ledger._rows)
    assert ledger.flush()
    with app.app_context():
        before = _rollup_of(app, "hank")
        ledger._rows.extend(entries)  # as if the commit's answer had been lost and the batch retried
        assert ledger.flush()
        assert _rollup_of(app, "hank") == before == (3, 30, 3)
        assert db.session.scalar(select(func.count()).select_from(USAGE)) == 3
    assert ledger.written == 3
    assert ledger_module.RETRY_FIRST > 0


def _rollup_of(app: Any, user: str) -> tuple[int, int, int]:
    day = db.session.scalars(select(LlmUsageDaily).filter_by(user_name=user)).one()
    db.session.expunge_all()
    return day.calls, day.input_tokens, day.output_tokens


def test_rows_are_written_in_the_background_within_the_flush_interval(make_app, upstream):
    app = ledger_app(make_app, upstream, LLM_USAGE_FLUSH_INTERVAL=0.1)
    upstream.script(CHAT, chat_completion("x"))
    with app.app_context():
        get_llm().chat(MESSAGES, MODEL, user="ivy")
        deadline = time.monotonic() + 5
        while db.session.scalar(select(func.count()).select_from(USAGE)) == 0:
            assert time.monotonic() < deadline, "the flusher wrote nothing within 5 s"
            db.session.rollback()
            time.sleep(0.05)
    assert usage_state(app).ledger.pending == 0


def test_a_full_buffer_drops_new_rows_counts_them_and_reports_them_once_the_database_answers(
    make_app, upstream, caplog
):
    app = ledger_app(make_app, upstream, LLM_USAGE_BUFFER=3, LLM_USAGE_FLUSH_INTERVAL=60)
    with app.app_context():
        db.drop_all()  # the database cannot take the rows: as an outage, or `flask db upgrade` not run
    upstream.script(CHAT, *[chat_completion("x") for _ in range(8)])
    ledger = usage_state(app).ledger
    with app.app_context():
        for index in range(8):
            get_llm().chat(MESSAGES, MODEL, user="jack")
            if index == 4:
                assert not ledger.flush(timeout=0)  # fails: the rows stay
                ledger._warned_at = -1e9
    assert (ledger.pending, ledger.dropped) == (3, 5)
    warnings = [r.getMessage() for r in caplog.records if r.name == "app.llm.usage.ledger"]
    assert any("cannot write" in m and "run `flask db upgrade`" in m and "dropped" in m for m in warnings)

    with app.app_context():
        db.create_all()
    assert ledger.flush()
    with app.app_context():
        assert db.session.scalar(select(func.count()).select_from(USAGE)) == 3
        assert db.session.scalar(select(func.sum(LlmUsageDrop.dropped_rows))) == 5
    result = app.test_cli_runner().invoke(args=["llm", "usage", "--health"])
    assert result.exit_code == 0, result.output
    assert "rows: 3" in result.output and "dropped rows: 5" in result.output
    assert len(upstream.requests) == 8  # every call went through: the ledger never fails one


def test_rows_waiting_at_exit_are_written_by_the_exit_flush(make_app, upstream, tmp_path):
    """A worker that stops writes what it holds (gunicorn's worker exit runs atexit)."""
    import subprocess
    import sys

    database = tmp_path / "exit.db"
    script = f"""
import json
from app import create_app
from app.llm import get_llm
from app.services.db_service import db
app = create_app({{"TESTING": True, "INSTANCE_PATH": {str(tmp_path)!r}, "DOTENV_PATH": "none.env",
    "DATABASE_URL": "sqlite:///{database}", "OPENAI_API_KEY": "sk-x",
    "OPENAI_BASE_URL": {upstream.url_for("/v1")!r},
    "LLM_USAGE_FLUSH_INTERVAL": 3600}})
with app.app_context():
    db.create_all()
    for _ in range(5):
        get_llm().chat([{{"role": "user", "content": "hi"}}], "openai/gpt-4o-mini", user="kim")
print(json.dumps({{"pending": app.extensions["llm_usage"].ledger.pending}}))
"""
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=str(tmp_path.parent), capture_output=True, text=True, timeout=60,
        env={**os.environ, "PYTHONPATH": str(os.getcwd())},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {"pending": 5}
    app = make_app(DATABASE_URL=f"sqlite:///{database}")
    with app.app_context():
        assert db.session.scalar(select(func.count()).select_from(USAGE)) == 5


def test_rows_that_cannot_be_written_at_exit_are_counted_in_one_error_line(upstream, tmp_path):
    import subprocess
    import sys

    script = f"""
from app import create_app
from app.llm import get_llm
app = create_app({{"TESTING": True, "INSTANCE_PATH": {str(tmp_path)!r}, "DOTENV_PATH": "none.env",
    "OPENAI_API_KEY": "sk-x", "OPENAI_BASE_URL": {upstream.url_for("/v1")!r},
    "LLM_USAGE_FLUSH_INTERVAL": 3600}})
with app.app_context():  # no `flask db upgrade`: the table is missing
    for _ in range(3):
        get_llm().chat([{{"role": "user", "content": "hi"}}], "openai/gpt-4o-mini")
"""
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=str(tmp_path), capture_output=True, text=True, timeout=60,
        env={**os.environ, "PYTHONPATH": str(os.getcwd())},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "the usage ledger could not write at exit: 3 rows lost" in done.stderr
    assert "no such table: llm_usage (run `flask db upgrade`)" in done.stderr
    assert len(upstream.requests) == 3


def test_closing_an_apps_services_writes_its_rows_or_reports_them_lost_then(make_app, upstream, caplog):
    """reset_services (a worker's exit, a test's end) drains the app's ledger: rows are written,
    or, with no table to write them to, reported lost at once (no 2 s of retries for a table that
    will not come) and let go, so the process's exit has nothing left to say about this app."""
    from app.services import reset_services

    written = ledger_app(make_app, upstream, LLM_USAGE_FLUSH_INTERVAL=3600)
    missing = make_app(
        OPENAI_API_KEY=CANARY_KEY, OPENAI_BASE_URL=upstream.url_for("/v1"), LLM_USAGE_FLUSH_INTERVAL=3600
    )
    upstream.script(CHAT, *(chat_completion("hi") for _ in range(4)))
    for app in (written, missing):
        with app.app_context():
            for _ in range(2):
                get_llm().chat(MESSAGES, MODEL)
    ledgers = [app.extensions["llm_usage"].ledger for app in (written, missing)]
    assert [ledger.pending for ledger in ledgers] == [2, 2]
    started = time.monotonic()
    for app in (written, missing):
        reset_services(app)
    assert time.monotonic() - started < 1.5
    assert [ledger.pending for ledger in ledgers] == [0, 0]
    assert [ledger.exit_report() for ledger in ledgers] == [None, None]
    with written.app_context():
        assert db.session.scalar(select(func.count()).select_from(USAGE)) == 2
    lost = [r.getMessage() for r in caplog.records if "before its app closed" in r.getMessage()]
    assert lost == [
        "the usage ledger could not write before its app closed: 2 rows lost, and 0 dropped rows not"
        " reported (OperationalError: (sqlite3.OperationalError) no such table: llm_usage"
        " (run `flask db upgrade`))"
    ]


# --- PostgreSQL stopped for 5 s ------------------------------------------------------------------


def _paced_calls(app: Any, user: str, count: int, pause: float) -> None:
    with app.app_context():
        for _ in range(count):
            get_llm().chat(MESSAGES, MODEL, user=user)
            time.sleep(pause)


def _outage(postgres_server: Any, after: float, seconds: float) -> threading.Thread:
    def run() -> None:
        time.sleep(after)
        postgres_server.stop()
        try:
            time.sleep(seconds)
        finally:
            postgres_server.start()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


@pytest.mark.postgres
def test_500_calls_through_a_5_s_postgresql_outage_lose_no_row(make_app, upstream, postgres_server):
    user = "outage-" + os.urandom(4).hex()
    app = ledger_app(make_app, upstream, DATABASE_URL=postgres_server.url, LLM_USAGE_FLUSH_INTERVAL=0.2)
    outage = _outage(postgres_server, after=1.0, seconds=5.0)
    try:
        _paced_calls(app, user, 500, pause=0.015)
    finally:
        outage.join(timeout=30)
    ledger = usage_state(app).ledger
    assert ledger.flush(timeout=30), ledger.last_error
    with app.app_context():
        rows = db.session.scalar(select(func.count()).select_from(USAGE).where(USAGE.c.user_name == user))
        day = db.session.scalars(select(LlmUsageDaily).filter_by(user_name=user)).one()
    assert rows == len(upstream.requests) == 500
    assert day.calls == 500 and ledger.dropped == 0
    assert ledger.failing_since is None and ledger.last_error is not None  # it did fail, and recovered


@pytest.mark.postgres
def test_a_small_buffer_through_an_outage_reports_every_dropped_row(make_app, upstream, postgres_server):
    user = "drops-" + os.urandom(4).hex()
    app = ledger_app(
        make_app,
        upstream,
        DATABASE_URL=postgres_server.url,
        LLM_USAGE_BUFFER=40,
        LLM_USAGE_FLUSH_INTERVAL=0.2,
    )
    with app.app_context():
        before = db.session.scalar(select(func.coalesce(func.sum(LlmUsageDrop.dropped_rows), 0)))
    outage = _outage(postgres_server, after=0.5, seconds=3.0)
    try:
        _paced_calls(app, user, 200, pause=0.02)
    finally:
        outage.join(timeout=30)
    ledger = usage_state(app).ledger
    assert ledger.flush(timeout=30), ledger.last_error
    with app.app_context():
        rows = db.session.scalar(select(func.count()).select_from(USAGE).where(USAGE.c.user_name == user))
        reported = db.session.scalar(select(func.sum(LlmUsageDrop.dropped_rows))) - before
    assert ledger.dropped > 0
    assert rows + reported == len(upstream.requests) == 200
    assert reported == ledger.dropped
    with app.app_context():
        reasons = db.session.scalars(select(LlmUsageDrop.reason)).all()
    assert ledger.last_error and all(
        postgres_server.password not in text for text in [*reasons, ledger.last_error]
    )


# --- the migration --------------------------------------------------------------------------------


def test_the_migration_makes_the_tables_the_models_describe(make_app, tmp_path):
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    app = make_app(DATABASE_URL=f"sqlite:///{tmp_path}/migrated.db")
    result = app.test_cli_runner().invoke(args=["db", "upgrade"])
    assert result.exit_code == 0, result.output
    with app.app_context(), db.engine.connect() as connection:
        differences = compare_metadata(MigrationContext.configure(connection), db.metadata)
        names = set(connection.execute(text("select name from sqlite_master where type='table'")).scalars())
    mine = ("llm_usage", "api_key")
    assert [d for d in differences if any(name in repr(d) for name in mine)] == []
    assert {"llm_usage", "llm_usage_daily", "llm_usage_drop"} <= names
    result = app.test_cli_runner().invoke(args=["db", "downgrade", "3f7c2a9d41b6"])
    assert result.exit_code == 0, result.output
