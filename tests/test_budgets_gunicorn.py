"""The concurrency acceptance: 50 concurrent /api/chat calls from 2 gunicorn workers, a budget for 10.

Real gunicorn (``--preload``-less, 2 gthread workers of ``tests.resilience_app``,
which adds ``X-Worker-Pid``), one real redis-server holding the budget, a SQLite
file for keys and the ledger, and the scripted upstream, which counts the
requests that really reach it. Each answer's usage is exactly what its
reservation assumed, so a budget of ten reservations fits exactly ten calls.
"""

from __future__ import annotations

import http.client
import json
import os
import secrets
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from typing import Any

import pytest
from sqlalchemy import create_engine, text

from app.llm import get_llm
from app.llm.usage import usage_state
from app.llm.usage.booking import prompt_tokens
from app.llm.usage.settings import nano
from tests.conftest import CANARY_KEY, api_key_for_env
from tests.payloads import chat_completion
from tests.servers import Recorded, Reply, free_port
from tests.test_gunicorn import clean_env, run_gunicorn, wait_until_listening

MODEL = "openai/gpt-4o-mini"
MESSAGES = [{"role": "user", "content": "Count me against the budget"}]
MAX_TOKENS = 800
CALLS = 50
FITS = 10


def _post(port: int, headers: dict[str, str]) -> tuple[int, int, str | None]:
    """POST /api/chat; (status, the worker's pid, Retry-After)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        body = {"model": MODEL, "messages": MESSAGES, "max_tokens": MAX_TOKENS}
        connection.request(
            "POST", "/api/chat", json.dumps(body), {"Content-Type": "application/json", **headers}
        )
        response = connection.getresponse()
        response.read()
        return response.status, int(response.headers["X-Worker-Pid"]), response.headers.get("Retry-After")
    finally:
        connection.close()


@pytest.mark.slow
def test_50_concurrent_calls_from_2_workers_against_a_budget_for_10_make_10_requests(
    tmp_path, make_app, upstream, redis_server
):
    user = "concurrent-" + os.urandom(4).hex()
    probe = make_app(OPENAI_API_KEY="sk-probe", OPENAI_BASE_URL=upstream.url_for("/v1"))
    with probe.app_context():
        _provider, request = get_llm()._request(MESSAGES, MODEL, {"max_tokens": MAX_TOKENS})
    prompt = prompt_tokens(request)
    one = nano(usage_state(probe).pricer.cost("openai", "gpt-4o-mini", prompt, MAX_TOKENS))
    budget = Decimal(FITS * one) / 1_000_000_000

    def answer(_request: Recorded) -> Reply:
        time.sleep(0.3)  # every admitted call is still in flight when the others arrive
        return Reply(body=chat_completion("counted", usage=(prompt, MAX_TOKENS)))

    upstream.responder = answer
    database = tmp_path / "budget.db"
    env = clean_env(
        tmp_path,
        PORT=str(free_port()),
        SECRET_KEY=secrets.token_hex(32),
        REDIS_URL=redis_server.url,
        DATABASE_URL=f"sqlite:///{database}",
        OPENAI_API_KEY=CANARY_KEY,
        OPENAI_BASE_URL=upstream.url_for("/v1"),
        LLM_BUDGETS=json.dumps({f"user:{user}": {"daily_usd": str(budget)}}),
        LLM_USAGE_FLUSH_INTERVAL="0.2",
        # A gthread worker accepts only as many connections as it has threads: with 8 each, one
        # worker cannot take all 50 calls at once, so both serve some on a busy machine too.
        GUNICORN_THREADS="8",
    )
    headers = api_key_for_env(env, user, rpm=0, tpm=0)
    with run_gunicorn(env, "-w", "2", "tests.resilience_app:app", log=tmp_path / "g.log") as server:
        wait_until_listening(server)
        with ThreadPoolExecutor(max_workers=CALLS) as pool:
            answers = list(pool.map(lambda _: _post(server.port, headers), range(CALLS)))
        rows = _ledger_rows(database, user, CALLS)
        output = server.output()

    statuses = Counter(status for status, _, _ in answers)
    assert len(upstream.requests) == FITS, statuses
    assert statuses == {200: FITS, 429: CALLS - FITS}
    assert len({pid for _, pid, _ in answers}) == 2, "one worker served every call"
    assert all(retry for status, _, retry in answers if status == 429)
    outcomes = Counter(outcome for outcome, _ in rows)
    assert outcomes == {"ok": FITS, "budget_exceeded": CALLS - FITS}
    total = sum(Decimal(str(cost)) for _, cost in rows if cost is not None)
    assert total <= budget + Decimal(one) / 1_000_000_000  # at most the budget plus one call's maximum
    assert nano(total) == FITS * one
    assert "Traceback" not in output


def _ledger_rows(database: Any, user: str, expected: int, timeout: float = 15.0) -> list[tuple[str, Any]]:
    """The ledger's rows of ``user``, once the workers wrote all ``expected`` of them."""
    engine = create_engine(f"sqlite:///{database}")
    deadline = time.monotonic() + timeout
    try:
        while True:
            with engine.connect() as connection:
                rows = connection.execute(
                    text("SELECT outcome, cost FROM llm_usage WHERE user_name = :user"), {"user": user}
                ).all()
            if len(rows) >= expected or time.monotonic() > deadline:
                return [(outcome, cost) for outcome, cost in rows]
            time.sleep(0.1)
    finally:
        engine.dispose()
