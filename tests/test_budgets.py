"""Budgets: reserved before the call in Redis (one Lua script), settled after, refused as 429.

Real parts: redis-server (the session's, with a user name of each test's own,
or a disposable one for global budgets and outages), SQLite for the ledger,
the scripted upstream, and a separate Python process killed with SIGKILL while
it holds a reservation.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from decimal import Decimal
from typing import Any

import pytest
from sqlalchemy import func, select

from app.errors import ConfigError
from app.llm import LLMBadRequestError, get_llm
from app.llm.errors import LLMBudgetExceededError
from app.llm.usage import LlmUsage, usage_state
from app.llm.usage.booking import prompt_tokens
from app.llm.usage.budget_store import PREFIX
from app.llm.usage.settings import nano, parse_budgets
from app.services.db_service import db
from tests.conftest import CANARY_KEY, ROOT, api_key_headers
from tests.payloads import chat_completion, openai_role_chunk, openai_sse, openai_text_chunks
from tests.servers import HANG, Reply

CHAT = "/v1/chat/completions"
MODEL = "openai/gpt-4o-mini"
MESSAGES = [{"role": "user", "content": "What does this cost?"}]
MAX_TOKENS = 1000


def budget_app(
    make_app: Any, upstream: Any, budgets: dict[str, Any], redis_url: str | None, **settings: Any
) -> Any:
    config = {
        "OPENAI_API_KEY": CANARY_KEY,
        "OPENAI_BASE_URL": upstream.url_for("/v1"),
        "LLM_BUDGETS": budgets,
    }
    if redis_url is not None:
        config["REDIS_URL"] = redis_url
    app = make_app(config, **settings)
    with app.app_context():
        db.create_all()
    return app


def one_call_nano(app: Any, max_tokens: int = MAX_TOKENS) -> tuple[int, int]:
    """(the reservation of one MESSAGES call, in nano-USD; its prompt estimate in tokens)."""
    with app.app_context():
        _provider, request = get_llm()._request(MESSAGES, MODEL, {"max_tokens": max_tokens})
    prompt = prompt_tokens(request)
    cost = usage_state(app).pricer.cost("openai", "gpt-4o-mini", prompt, max_tokens)
    return nano(cost), prompt


def usd(nano_amount: int) -> str:
    return str(Decimal(nano_amount) / 1_000_000_000)


def exact_answers(upstream: Any, prompt: int, count: int, max_tokens: int = MAX_TOKENS) -> None:
    """Answers whose usage is what the reservation assumed: each call costs exactly its reservation."""
    upstream.script(CHAT, *[chat_completion("ok", usage=(prompt, max_tokens)) for _ in range(count)])


@pytest.fixture
def rclient(redis_server: Any) -> Any:
    """A client of the session's redis-server (the kit's ``redis`` fixture is another server's)."""
    import redis as redis_py

    client = redis_py.Redis.from_url(redis_server.url)
    yield client
    client.close()


def unique(name: str) -> str:
    return f"{name}-{os.urandom(4).hex()}"


def redis_spent(redis_client: Any, scope: str, subject: str) -> int:
    keys = [
        k
        for k in redis_client.keys(
            f"{PREFIX}{scope}:{subject}:daily:*".replace("{", "\\{").replace("}", "\\}")
        )
    ]
    assert len(keys) == 1, keys
    return int(redis_client.hget(keys[0], "spent") or 0)


# --- LLM_BUDGETS ------------------------------------------------------------------------------------


def test_the_issue_example_parses():
    rules = parse_budgets(
        '{"user": {"daily_usd": 2}, "tenant": {"monthly_usd": 500},'
        ' "tenant:acme": {"monthly_usd": 5000}, "global": {"daily_usd": 100}}'
    )
    assert [(r.name, r.scope, r.subject, r.limits) for r in rules] == [
        ("user", "user", None, (("daily", Decimal(2)),)),
        ("tenant", "tenant", None, (("monthly", Decimal(500)),)),
        ("tenant:acme", "tenant", "acme", (("monthly", Decimal(5000)),)),
        ("global", "global", None, (("daily", Decimal(100)),)),
    ]


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"LLM_BUDGETS": "{not json"}, "LLM_BUDGETS must be a JSON object, got invalid JSON"),
        ({"LLM_BUDGETS": '{"users": {"daily_usd": 1}}'}, "'users' is not a budget name; use 'user'"),
        ({"LLM_BUDGETS": '{"global:x": {"daily_usd": 1}}'}, "'global:x' is not a budget name"),
        (
            {"LLM_BUDGETS": '{"user": {"daily": 1}}'},
            "LLM_BUDGETS['user']: unknown field 'daily'; did you mean",
        ),
        (
            {"LLM_BUDGETS": '{"user": {"daily_usd": -1}}'},
            "LLM_BUDGETS['user'].daily_usd must be a finite number",
        ),
        ({"LLM_BUDGETS": '{"user": {}}'}, "LLM_BUDGETS['user'] must be a JSON object with daily_usd"),
        ({"LLM_BUDGETS": '["user"]'}, "LLM_BUDGETS must be a JSON object of budget -> limits"),
        ({"LLM_BUDGET_UNKNOWN_PRICE": "maybe"}, "LLM_BUDGET_UNKNOWN_PRICE must be 'refuse' or 'allow'"),
        (
            {"LLM_BUDGET_MAX_RESERVE_USD": "0"},
            "LLM_BUDGET_MAX_RESERVE_USD must be a finite number of USD, more than 0",
        ),
        (
            {"LLM_BUDGET_RESERVATION_TTL": "0"},
            "LLM_BUDGET_RESERVATION_TTL must be a positive number of seconds",
        ),
        ({"LLM_USAGE_BATCH": "0"}, "LLM_USAGE_BATCH must be 1 or more rows"),
        ({"LLM_USAGE_BUFFER": "-1"}, "LLM_USAGE_BUFFER must be a whole number"),
    ],
)
def test_bad_settings_stop_start_up_naming_the_key(make_app, settings, message):
    with pytest.raises(
        ConfigError, match=message.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(")
    ):
        make_app(**settings)


def test_without_redis_start_up_warns_that_budgets_are_per_process(make_app, caplog):
    make_app(LLM_BUDGETS={"user": {"daily_usd": 1}})
    assert any("each process keeps its own budget counters" in r.getMessage() for r in caplog.records)


# --- over budget: refused before any request -----------------------------------------------------


def test_over_budget_api_answers_429_json_with_retry_after_and_makes_no_request(
    make_app, upstream, redis_server
):
    user = unique("alice")
    probe = budget_app(make_app, upstream, {}, redis_server.url)
    one, prompt = one_call_nano(probe)
    app = budget_app(make_app, upstream, {f"user:{user}": {"daily_usd": usd(2 * one)}}, redis_server.url)
    headers = api_key_headers(app, user, rpm=0, tpm=0)
    exact_answers(upstream, prompt, 2)
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": MAX_TOKENS}
    client = app.test_client()
    assert [client.post("/api/chat", json=body, headers=headers).status_code for _ in range(2)] == [200, 200]

    refused = client.post("/api/chat", json=body, headers=headers)
    assert refused.status_code == 429
    error = refused.json["error"]
    assert error["type"] == "budget_exceeded"
    assert f"'user:{user}'" in error["message"] and "is spent" in error["message"]
    midnight = 86400 - time.time() % 86400
    assert abs(int(refused.headers["Retry-After"]) - midnight) <= 2
    assert len(upstream.requests) == 2
    with app.app_context():
        assert (
            db.session.scalar(select(func.count()).select_from(LlmUsage).filter_by(outcome="budget_exceeded"))
            == 0
        )
    assert usage_state(app).ledger.flush()
    with app.app_context():
        outcomes = db.session.scalars(select(LlmUsage.outcome).filter_by(user_name=user)).all()
    assert sorted(outcomes) == ["budget_exceeded", "ok", "ok"]


def test_the_error_carries_budget_window_and_retry_after(make_app, upstream, redis_server):
    tenant = unique("acme")
    app = budget_app(make_app, upstream, {"tenant": {"monthly_usd": 0}}, redis_server.url)
    with app.app_context(), pytest.raises(LLMBudgetExceededError) as refused:
        get_llm().chat(MESSAGES, MODEL, tenant=tenant, max_tokens=10)
    error = refused.value
    assert (error.budget, error.window, error.limit_usd) == (f"tenant:{tenant}", "monthly", Decimal(0))
    assert error.http_status == 429 and error.kind == "budget_exceeded"
    assert 0 < error.retry_after <= 31 * 86400
    assert not upstream.requests


def test_which_budgets_apply_a_named_one_replaces_the_default(make_app, upstream, redis_server):
    vip, other = unique("vip"), unique("other")
    app = budget_app(
        make_app, upstream, {"user": {"daily_usd": 0}, f"user:{vip}": {"daily_usd": 5}}, redis_server.url
    )
    upstream.script(CHAT, chat_completion("ok"))
    with app.app_context():
        specs = usage_state(app).budget_hook.budgets.specs(vip, "acme")
        assert [(s.budget, s.window) for s in specs] == [(f"user:{vip}", "daily")]
        assert get_llm().chat(MESSAGES, MODEL, user=vip).content == "ok"
        with pytest.raises(LLMBudgetExceededError, match=f"'user:{other}'"):
            get_llm().chat(MESSAGES, MODEL, user=other)
        assert (
            usage_state(app).budget_hook.budgets.specs(None, None) == ()
        )  # no user: the user budgets skip it
        assert get_llm().chat(MESSAGES, MODEL).content == "hi"


# --- what is reserved ------------------------------------------------------------------------------


def test_the_reservation_is_the_prompt_plus_max_tokens_capped_by_the_model_and_the_setting(
    make_app, upstream, redis_server
):
    app = budget_app(make_app, upstream, {"user": {"daily_usd": 1}}, redis_server.url)
    hook = usage_state(app).budget_hook
    pricer = usage_state(app).pricer
    with app.app_context():
        llm = get_llm()

        def reserved(max_tokens: int | None, model: str = MODEL) -> int:
            call, _chain, _build = llm._prepare(
                "chat", False, MESSAGES, model, {"max_tokens": max_tokens, "user": "x"}
            )
            return hook.estimate(call)

        prompt = one_call_nano(app)[1]
        assert reserved(50) == nano(pricer.cost("openai", "gpt-4o-mini", prompt, 50))
        # No max_tokens: the model's maximum output (16384 for gpt-4o-mini), not a guess.
        assert reserved(None) == nano(pricer.cost("openai", "gpt-4o-mini", prompt, 16384))

    capped = budget_app(
        make_app, upstream, {"user": {"daily_usd": 1}}, redis_server.url, LLM_BUDGET_MAX_RESERVE_USD="0.001"
    )
    with capped.app_context():
        call, _chain, _build = get_llm()._prepare("chat", False, MESSAGES, MODEL, {"user": "x"})
        assert usage_state(capped).budget_hook.estimate(call) == nano(Decimal("0.001"))


def test_a_worst_case_reservation_does_not_pin_a_small_budget_with_the_cap(make_app, upstream, redis_server):
    """A budget smaller than one call's worst case refuses it at $0 spent, unless reservations are capped."""
    user = unique("small")
    worst = nano(Decimal("0.6") * 16384 / 1_000_000)  # gpt-4o-mini's whole maximum output
    budgets = {f"user:{user}": {"daily_usd": usd(worst // 2)}}
    pinned = budget_app(make_app, upstream, budgets, redis_server.url)
    with pinned.app_context(), pytest.raises(LLMBudgetExceededError, match="more than the whole budget"):
        get_llm().chat(MESSAGES, MODEL, user=user)
    upstream.script(CHAT, chat_completion("ok", usage=(10, 10)))
    capped = budget_app(make_app, upstream, budgets, redis_server.url, LLM_BUDGET_MAX_RESERVE_USD="0.0001")
    with capped.app_context():
        assert get_llm().chat(MESSAGES, MODEL, user=user).content == "ok"


# --- settled to the actual cost ----------------------------------------------------------------------


def test_spent_in_redis_is_the_sum_of_the_ledgers_costs(make_app, upstream, redis_server, rclient):
    user = unique("settle")
    app = budget_app(make_app, upstream, {"user": {"daily_usd": 10}}, redis_server.url)
    upstream.script(CHAT, *[chat_completion("ok", usage=(100 + i, 7 * i)) for i in range(5)])
    with app.app_context():
        for _ in range(5):
            get_llm().chat(MESSAGES, MODEL, user=user, max_tokens=500)
    usage_state(app).accounts.sync(final=True)
    assert usage_state(app).ledger.flush()
    with app.app_context():
        costs = db.session.scalars(select(LlmUsage.cost).filter_by(user_name=user)).all()
    assert redis_spent(rclient, "user", user) == sum(nano(cost) for cost in costs)
    counter = next(iter(usage_state(app).accounts._counters.values()))
    assert counter.in_flight == 0 and counter.held == 0  # the final sync gave back all room


def test_a_failure_without_usage_releases_its_reservation(make_app, upstream, redis_server, rclient):
    user = unique("fails")
    app = budget_app(make_app, upstream, {"user": {"daily_usd": 10}}, redis_server.url)
    upstream.script(CHAT, Reply(500, {"error": {"message": "boom"}}))
    with app.app_context(), pytest.raises(Exception, match=r"failed|500"):
        get_llm().chat(MESSAGES, MODEL, user=user, max_tokens=500)
    accounts = usage_state(app).accounts
    accounts.sync(final=True)
    assert redis_spent(rclient, "user", user) == 0
    assert all(c.in_flight == 0 for c in accounts._counters.values())


def test_a_stream_cancelled_after_three_deltas_settles_to_its_partial_usage(
    make_app, upstream, redis_server, rclient
):
    user = unique("partial")
    app = budget_app(make_app, upstream, {"user": {"daily_usd": 10}}, redis_server.url)
    chunks = [openai_sse(openai_role_chunk(), done=False)]
    chunks += [openai_sse(c, done=False) for c in openai_text_chunks("one ", "two ", "three ", "four ")]
    upstream.script(CHAT, Reply.stream([*chunks, threading.Event()]))
    with app.app_context():
        stream = get_llm().chat_stream(MESSAGES, MODEL, user=user, max_tokens=4000)
        assert [next(stream) for _ in range(3)] == ["one ", "two ", "three "]
        stream.close()
    usage_state(app).accounts.sync(final=True)
    assert usage_state(app).ledger.flush()
    with app.app_context():
        row = db.session.scalars(select(LlmUsage).filter_by(user_name=user)).one()
    assert row.outcome == "cancelled" and row.output_tokens == 4  # "one two three " / 4, rounded up
    assert redis_spent(rclient, "user", user) == nano(row.cost) > 0  # not the 4000-token reservation


def test_an_async_stream_closed_early_settles_to_its_partial_usage(make_app, upstream, redis_server, rclient):
    user = unique("astream")
    app = budget_app(make_app, upstream, {"user": {"daily_usd": 10}}, redis_server.url)
    chunks = [openai_sse(openai_role_chunk(), done=False)]
    chunks += [openai_sse(c, done=False) for c in openai_text_chunks("alpha ", "beta ", "gamma ")]
    upstream.script(CHAT, Reply.stream([*chunks, threading.Event()]))

    async def read_two() -> list[str]:
        stream = get_llm().achat_stream(MESSAGES, MODEL, user=user, max_tokens=2000)
        got = [await stream.__anext__(), await stream.__anext__()]
        await stream.aclose()
        return got

    with app.app_context():
        assert asyncio.run(read_two()) == ["alpha ", "beta "]
    usage_state(app).accounts.sync(final=True)
    assert usage_state(app).ledger.flush()
    with app.app_context():
        row = db.session.scalars(select(LlmUsage).filter_by(user_name=user)).one()
    assert (row.outcome, row.kind, row.output_tokens) == ("cancelled", "stream", 3)
    assert redis_spent(rclient, "user", user) == nano(row.cost) > 0


def test_async_calls_reserve_and_settle_alike(make_app, upstream, redis_server, rclient):
    user = unique("async")
    app = budget_app(make_app, upstream, {"user": {"daily_usd": 10}}, redis_server.url)
    upstream.script(CHAT, *[chat_completion("ok", usage=(40, 9)) for _ in range(3)])

    async def calls() -> None:
        llm = get_llm()
        for _ in range(3):
            await llm.achat(MESSAGES, MODEL, user=user, max_tokens=100)

    with app.app_context():
        asyncio.run(calls())
    usage_state(app).accounts.sync(final=True)
    assert redis_spent(rclient, "user", user) == 3 * nano(
        usage_state(app).pricer.cost("openai", "gpt-4o-mini", 40, 9)
    )


def test_a_stream_dropped_unclosed_lapses_after_the_ttl_booked_at_its_reservation(
    make_app, upstream, redis_server, rclient, caplog
):
    """No hook hears of a stream garbage-collected unclosed: its reservation must not hold forever."""
    import gc

    user = unique("dropped")
    app = budget_app(
        make_app, upstream, {"user": {"daily_usd": 10}}, redis_server.url, LLM_BUDGET_RESERVATION_TTL=1
    )
    chunks = [
        openai_sse(openai_role_chunk(), done=False),
        openai_sse(openai_text_chunks("one ")[0], done=False),
    ]
    upstream.script(CHAT, Reply.stream([*chunks, threading.Event()]))
    accounts = usage_state(app).accounts
    with app.app_context():
        stream = get_llm().chat_stream(MESSAGES, MODEL, user=user, max_tokens=100)
        assert next(stream) == "one "
        (held,) = accounts._open.values()
        del stream
        gc.collect()
    counter = held.counters[0]
    assert counter.in_flight == held.amount  # nobody settled it
    time.sleep(1.2)
    accounts.sync(final=True)
    assert counter.in_flight == 0 and held.lapsed
    assert redis_spent(rclient, "user", user) == held.amount
    assert any("without ending" in r.getMessage() for r in caplog.records)


# --- cache hits, unknown prices ------------------------------------------------------------------------


def test_a_cache_hit_passes_a_spent_budget_without_asking_redis(make_app, upstream, redis_server):
    user = unique("hit")
    app = budget_app(
        make_app,
        upstream,
        {f"user:{user}": {"daily_usd": 0}},
        redis_server.url,
        LLM_HOOKS="tests.test_llm_usage_ledger:CacheHit",
    )
    with app.app_context():
        answer = get_llm().chat([{"role": "user", "content": "cached"}], MODEL, user=user)
        assert answer.content == "from the cache"
        with pytest.raises(LLMBudgetExceededError):
            get_llm().chat(MESSAGES, MODEL, user=user)
    assert usage_state(app).accounts.round_trips == 1  # the refused call's; the hit made none
    assert not upstream.requests


def test_an_unknown_price_is_refused_by_default_naming_the_settings(make_app, upstream, redis_server):
    profiles = {"local": {"base_url": upstream.url_for("/v1"), "api_key": "x"}}
    app = budget_app(
        make_app, upstream, {"user": {"daily_usd": 1}}, redis_server.url, OPENAI_PROFILES=profiles
    )
    with app.app_context(), pytest.raises(LLMBadRequestError) as refused:
        get_llm().chat(MESSAGES, "local/unpriced", user=unique("u"))
    assert refused.value.field == "model" and refused.value.kind == "invalid_request"
    assert "LLM_MODELS" in refused.value.message and "LLM_BUDGET_UNKNOWN_PRICE=allow" in refused.value.message
    assert not upstream.requests
    with app.app_context():  # a call no budget applies to is not refused
        upstream.script(CHAT, chat_completion("free"))
        assert get_llm().chat(MESSAGES, "local/unpriced").content == "free"


def test_an_unknown_price_allowed_is_booked_at_zero_with_one_warning(
    make_app, upstream, redis_server, rclient, caplog
):
    user = unique("allowed")
    profiles = {"local": {"base_url": upstream.url_for("/v1"), "api_key": "x"}}
    app = budget_app(
        make_app,
        upstream,
        {"user": {"daily_usd": 1}},
        redis_server.url,
        OPENAI_PROFILES=profiles,
        LLM_BUDGET_UNKNOWN_PRICE="allow",
    )
    upstream.script(CHAT, chat_completion("a"), chat_completion("b"))
    with app.app_context():
        get_llm().chat(MESSAGES, "local/unpriced", user=user)
        get_llm().chat(MESSAGES, "local/unpriced", user=user)
    warnings = [r.getMessage() for r in caplog.records if "no known price" in r.getMessage()]
    assert warnings == [
        "local/unpriced has no known price: budgets book its calls at 0 (LLM_BUDGET_UNKNOWN_PRICE=allow)"
    ]
    usage_state(app).accounts.sync(final=True)
    assert redis_spent(rclient, "user", user) == 0


# --- Redis: shared, lapsing, failing open -----------------------------------------------------------------


def test_two_processes_share_one_budget_through_redis(make_app, upstream, redis_server):
    """Two apps stand for two workers: together they admit exactly what the budget holds."""
    user = unique("shared")
    probe = budget_app(make_app, upstream, {}, redis_server.url)
    one, prompt = one_call_nano(probe)
    budgets = {f"user:{user}": {"daily_usd": usd(5 * one)}}
    apps = [budget_app(make_app, upstream, budgets, redis_server.url) for _ in range(2)]
    exact_answers(upstream, prompt, 5)
    admitted = refused = 0
    for index in range(10):
        with apps[index % 2].app_context():
            try:
                get_llm().chat(MESSAGES, MODEL, user=user, max_tokens=MAX_TOKENS)
                admitted += 1
            except LLMBudgetExceededError:
                refused += 1
    assert (admitted, refused, len(upstream.requests)) == (5, 5, 5)


_HOLDER = """
import sys, json
from app import create_app
from app.llm import get_llm
app = create_app({settings!r})
with app.app_context():
    print(json.dumps({{"ready": True}}), flush=True)
    messages = [{{"role": "user", "content": "hold"}}]
    get_llm().chat(messages, "openai/gpt-4o-mini", user={user!r}, max_tokens=1000)
"""


def test_a_killed_workers_reservation_lapses_after_the_ttl(make_app, upstream, redis_server, tmp_path):
    user = unique("killed")
    ttl = 2.0
    probe = budget_app(make_app, upstream, {}, redis_server.url)
    one, _prompt = one_call_nano(probe)
    settings = {
        "TESTING": True,
        "INSTANCE_PATH": str(tmp_path),
        "DOTENV_PATH": str(tmp_path / "no.env"),
        "REDIS_URL": redis_server.url,
        "OPENAI_API_KEY": "sk-holder",
        "OPENAI_BASE_URL": upstream.url_for("/v1"),
        "LLM_BUDGETS": {f"user:{user}": {"daily_usd": usd(one + one // 2)}},
        "LLM_BUDGET_RESERVATION_TTL": ttl,
        "LLM_USAGE_LEDGER": False,
    }
    upstream.script(CHAT, HANG)
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER.format(settings=settings, user=user)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert json.loads(holder.stdout.readline()) == {"ready": True}
        upstream.wait_for_requests(1, timeout=20)  # its call is upstream: its reservation is in Redis
        os.kill(holder.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        holder.wait(timeout=10)
    finally:
        if holder.poll() is None:
            holder.kill()
    app = budget_app(make_app, upstream, settings["LLM_BUDGETS"], redis_server.url)
    upstream.script(CHAT, chat_completion("mine"))
    with app.app_context():
        with pytest.raises(LLMBudgetExceededError, match="held by calls in flight") as refused:
            get_llm().chat([{"role": "user", "content": "hold"}], MODEL, user=user, max_tokens=1000)
        assert refused.value.retry_after == 1.0
        while True:
            try:
                answer = get_llm().chat(
                    [{"role": "user", "content": "hold"}], MODEL, user=user, max_tokens=1000
                )
                break
            except LLMBudgetExceededError:
                assert time.monotonic() - killed_at < ttl + 1.5, (
                    "the dead worker's reservation outlived its TTL"
                )
                time.sleep(0.1)
    assert answer.content == "mine"
    assert time.monotonic() - killed_at > ttl / 2  # it did hold the budget for a while


def test_when_redis_fails_each_process_goes_on_from_what_redis_last_said(
    make_app, upstream, disposable_redis
):
    import redis as redis_py

    user = unique("down")
    probe = budget_app(make_app, upstream, {}, disposable_redis.url)
    one, prompt = one_call_nano(probe)
    app = budget_app(make_app, upstream, {f"user:{user}": {"daily_usd": usd(3 * one)}}, disposable_redis.url)
    exact_answers(upstream, prompt, 3)
    with app.app_context():
        get_llm().chat(MESSAGES, MODEL, user=user, max_tokens=MAX_TOKENS)
        usage_state(app).accounts.sync(final=True)  # Redis now says: one call spent
        disposable_redis.stop()
        get_llm().chat(MESSAGES, MODEL, user=user, max_tokens=MAX_TOKENS)
        get_llm().chat(MESSAGES, MODEL, user=user, max_tokens=MAX_TOKENS)
        with pytest.raises(LLMBudgetExceededError):  # decided here: 1 spent in Redis + 2 here = 3
            get_llm().chat(MESSAGES, MODEL, user=user, max_tokens=MAX_TOKENS)
    assert len(upstream.requests) == 3
    accounts = usage_state(app).accounts
    assert accounts.pending() == 2 * one  # kept until Redis answers
    disposable_redis.start()
    deadline = time.monotonic() + 10
    while accounts.pending():
        assert time.monotonic() < deadline, "what was spent while Redis was down never reached it"
        accounts.sync()
        time.sleep(0.2)
    client = redis_py.Redis.from_url(disposable_redis.url)
    assert (
        redis_spent(client, "user", user) == 2 * one
    )  # it came back empty: what was spent while it was away


def test_without_redis_each_process_counts_alone(make_app, upstream):
    user = unique("alone")
    probe = budget_app(make_app, upstream, {}, None)
    one, prompt = one_call_nano(probe)
    budgets = {f"user:{user}": {"daily_usd": usd(one)}}
    first, second = (budget_app(make_app, upstream, budgets, None) for _ in range(2))
    exact_answers(upstream, prompt, 2)
    for app in (first, second):  # each "process" spends the whole budget: why REDIS_URL matters
        with app.app_context():
            get_llm().chat(MESSAGES, MODEL, user=user, max_tokens=MAX_TOKENS)
            with pytest.raises(LLMBudgetExceededError):
                get_llm().chat(MESSAGES, MODEL, user=user, max_tokens=MAX_TOKENS)
    assert len(upstream.requests) == 2


def test_room_is_lent_ahead_only_far_from_the_limit(make_app, upstream, redis_server):
    """A large budget: calls are admitted in memory (one round trip for many); a small one: each asks."""
    big, small = unique("big"), unique("small")
    probe = budget_app(make_app, upstream, {}, redis_server.url)
    one, prompt = one_call_nano(probe)
    app = budget_app(
        make_app,
        upstream,
        {f"user:{big}": {"daily_usd": usd(10_000 * one)}, f"user:{small}": {"daily_usd": usd(10 * one)}},
        redis_server.url,
    )
    exact_answers(upstream, prompt, 20)
    accounts = usage_state(app).accounts
    with app.app_context():
        for _ in range(10):
            get_llm().chat(MESSAGES, MODEL, user=big, max_tokens=MAX_TOKENS)
        big_trips = accounts.round_trips
        for _ in range(10):
            get_llm().chat(MESSAGES, MODEL, user=small, max_tokens=MAX_TOKENS)
    assert big_trips <= 2  # the first call's, and at most one background sync
    assert accounts.round_trips - big_trips >= 10  # fewer than 16 calls left: none is lent ahead


def test_flask_llm_budgets_shows_spent_reserved_and_left(make_app, upstream, redis_server):
    user = unique("cli")
    app = budget_app(
        make_app,
        upstream,
        {f"user:{user}": {"daily_usd": 2}, "tenant": {"monthly_usd": 500}},
        redis_server.url,
    )
    upstream.script(CHAT, chat_completion("ok", usage=(1_000_000, 0)))  # $0.15
    with app.app_context():
        get_llm().chat(MESSAGES, MODEL, user=user, tenant="cli-tenant-" + user, max_tokens=10)
    result = app.test_cli_runner().invoke(args=["llm", "budgets"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split() == ["BUDGET", "WINDOW", "LIMIT", "SPENT", "RESERVED", "LEFT", "RESETS"]
    mine = next(line for line in lines if line.startswith(f"user:{user}"))
    assert mine.split()[:6] == [f"user:{user}", "daily", "$2.00", "$0.15", "$0.00", "$1.85"]
    assert any(line.startswith(f"tenant:cli-tenant-{user}") and "monthly" in line for line in lines)
    assert CANARY_KEY not in result.output


def test_flask_llm_budgets_without_redis_reads_spent_from_the_ledger(make_app, upstream):
    user = unique("ledger")
    app = budget_app(make_app, upstream, {f"user:{user}": {"daily_usd": 2}}, None)
    upstream.script(CHAT, chat_completion("ok", usage=(1_000_000, 0)))
    with app.app_context():
        get_llm().chat(MESSAGES, MODEL, user=user, max_tokens=10)
    assert usage_state(app).ledger.flush()
    result = app.test_cli_runner().invoke(args=["llm", "budgets"])
    assert result.exit_code == 0, result.output
    assert "spent is read from the usage ledger" in result.output
    mine = next(line for line in result.output.splitlines() if line.startswith(f"user:{user}"))
    assert mine.split()[:6] == [f"user:{user}", "daily", "$2.00", "$0.15", "-", "$1.85"]


def test_flask_llm_budgets_without_budgets_says_so(make_app):
    result = make_app().test_cli_runner().invoke(args=["llm", "budgets"])
    assert result.exit_code == 0 and "LLM_BUDGETS is not set" in result.output


# --- the README ------------------------------------------------------------------------------------


def test_the_readme_example_runs_as_written(make_app, upstream, redis_server, capsys):
    """The "Usage and budgets" example with a user's settings: answered with room, refused without."""
    from tests.readme import python_blocks

    (example,) = python_blocks("Usage and budgets")
    alice = unique("alice")
    code = compile(example.replace('"alice"', repr(alice)), "README.md", "exec")
    upstream.script(CHAT, chat_completion("Paris.", usage=(14, 2)))
    roomy = budget_app(
        make_app, upstream, {"user": {"daily_usd": 2}, "tenant:acme": {"monthly_usd": 5000}}, redis_server.url
    )
    with roomy.app_context():
        exec(code, {})
    assert capsys.readouterr().out == f"Paris. {Decimal('0.0000033')}\n"
    spent = budget_app(make_app, upstream, {f"user:{alice}": {"daily_usd": 0}}, redis_server.url)
    with spent.app_context():
        exec(code, {})
    budget, window, retry_after = capsys.readouterr().out.split()
    assert (budget, window) == (f"user:{alice}", "daily") and float(retry_after) > 0
    assert len(upstream.requests) == 1
