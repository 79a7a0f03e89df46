"""The breakers' Lua scripts alone, on a real redis-server: replies, expiry, listing, script reloads,
and the same answers as the in-process state machine for the same calls.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
import redis

from app.llm.resilience.breaker_state import ADMIT, FULL, OPEN, TRIAL, BreakerState, LocalBreakers, timing_of
from app.llm.resilience.breaker_store import RecordReply, RedisBreakerStore
from app.llm.resilience.settings import BreakerPolicy
from tests.servers import RedisServer

KEY = "openai/gpt-4o"
POLICY = BreakerPolicy(window=10, min_calls=4, failure_rate=0.5, cooldown=5, half_open_calls=2)
TIMING = timing_of(POLICY)
T0 = 1_000_000_000  # ms, on a bucket boundary


@pytest.fixture
def client(redis_server: RedisServer) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_server.url)
    yield client
    client.close()


@pytest.fixture
def store() -> RedisBreakerStore:
    return RedisBreakerStore(f"test-store-{uuid.uuid4().hex[:8]}")


def record(store: RedisBreakerStore, client: redis.Redis, now: int, outcome: str | None, batch: int = 0):
    return store.record(client, KEY, POLICY, TIMING, now, outcome, batch)  # type: ignore[arg-type]


def test_record_replies_with_the_state_what_was_counted_and_the_transition(store, client):
    assert record(store, client, T0, "ignored") == RecordReply("closed", 0, False, "")
    assert client.exists(f"{store.namespace}:{KEY}") == 0  # nothing written for nothing counted
    for _ in range(3):
        assert record(store, client, T0, "failure") == RecordReply("closed", 0, True, "")
    assert record(store, client, T0, "failure") == RecordReply("open", T0 + 5000, True, "opened")
    assert record(store, client, T0 + 1, "failure") == RecordReply("open", T0 + 5000, False, "")
    assert 0 < client.pttl(f"{store.namespace}:{KEY}") <= TIMING.ttl


def test_before_call_codes_through_a_whole_cycle(store, client):
    assert store.before_call(client, KEY, POLICY, TIMING, T0) == (ADMIT, 0)
    for _ in range(4):
        record(store, client, T0, "failure")
    assert store.before_call(client, KEY, POLICY, TIMING, T0 + 1000) == (OPEN, 4000)
    now = T0 + 5000
    assert store.before_call(client, KEY, POLICY, TIMING, now) == (TRIAL, 0)
    assert store.before_call(client, KEY, POLICY, TIMING, now) == (TRIAL, 0)
    assert store.before_call(client, KEY, POLICY, TIMING, now + 1000) == (FULL, 4000)
    assert record(store, client, now, None, batch=10) == RecordReply("half_open", 0, False, "")
    assert client.hget(f"{store.namespace}:{KEY}", "successes") == b"0"  # batches are no trials
    assert record(store, client, now, "success") == RecordReply("half_open", 0, False, "")
    assert record(store, client, now, "success") == RecordReply("closed", 0, False, "closed")
    assert store.state(client, KEY, TIMING.window, now) == BreakerState(
        KEY, "closed", 0, 0, 0.0, 0.0, "redis"
    )


def test_seed_open_opens_unless_redis_already_holds_an_open_state(store, client):
    assert store.seed_open(client, KEY, TIMING, T0 + 3000)
    assert store.before_call(client, KEY, POLICY, TIMING, T0) == (OPEN, 3000)
    assert not store.seed_open(client, KEY, TIMING, T0 + 9000)  # open already: Redis's time stands
    assert store.before_call(client, KEY, POLICY, TIMING, T0) == (OPEN, 3000)
    store.before_call(client, KEY, POLICY, TIMING, T0 + 3000)  # half-open now
    assert not store.seed_open(client, KEY, TIMING, T0 + 9000)
    assert store.state(client, KEY, TIMING.window, T0 + 3000).state == "half_open"


def test_a_redis_that_forgot_the_scripts_gets_them_again(store, client):
    record(store, client, T0, "failure")
    client.script_flush()
    assert record(store, client, T0, "failure") == RecordReply("closed", 0, True, "")
    client.script_flush()
    assert store.before_call(client, KEY, POLICY, TIMING, T0) == (ADMIT, 0)
    assert store.state(client, KEY, TIMING.window, T0).calls == 2


def test_states_lists_the_namespace_only_even_with_glob_characters_in_it(client):
    tricky = RedisBreakerStore(f"test-store-{uuid.uuid4().hex[:8]}[*]?")
    lookalike = RedisBreakerStore(tricky.namespace.replace("[*]?", "x*x"))
    tricky.record(client, KEY, POLICY, TIMING, T0, "failure", 0)
    tricky.record(client, "gemini/flash", POLICY, TIMING, T0, "success", 0)
    lookalike.record(client, KEY, POLICY, TIMING, T0, "success", 0)
    states = sorted(tricky.states(client, T0), key=lambda state: state.key)
    assert states == [
        BreakerState("gemini/flash", "closed", 1, 0, 0.0, 0.0, "redis"),
        BreakerState(KEY, "closed", 1, 1, 1.0, 0.0, "redis"),
    ]


#: (time offset in ms, call): "before", or an outcome to record ("batch:N" for N batched successes).
SCENARIO = [
    (0, "success"),
    (0, "batch:3"),
    (100, "failure"),
    (200, "ignored"),
    (300, "failure"),
    (400, "failure"),
    (450, "failure"),  # 4 of 8: opens
    (500, "before"),
    (600, "failure"),  # finished while open: no effect
    (5450, "before"),  # half-open: a trial
    (5450, "before"),
    (5460, "before"),  # full
    (5470, "ignored"),  # a permit back
    (5480, "before"),
    (5490, "success"),
    (5500, "failure"),  # reopens
    (6000, "before"),
    (10_500, "before"),
    (10_500, "before"),
    (10_600, "success"),
    (10_700, "success"),  # closes, with a fresh window
    (10_800, "failure"),
    (10_900, "before"),
    (25_000, "batch:2"),  # the old window has left
    (25_100, "failure"),
]


def test_the_scripts_and_the_local_state_machine_give_the_same_answers(store, client):
    book = LocalBreakers()
    for offset, call in SCENARIO:
        now = T0 + offset
        if call == "before":
            shared, local = (
                store.before_call(client, KEY, POLICY, TIMING, now),
                book.before_call(KEY, POLICY, now),
            )
        else:
            outcome, batch = (None, int(call[6:])) if call.startswith("batch:") else (call, 0)
            reply = store.record(client, KEY, POLICY, TIMING, now, outcome, batch)  # type: ignore[arg-type]
            shared = (reply.state, reply.reopen_at, reply.transition)
            local = book.record(KEY, POLICY, TIMING, now, outcome, batch)  # type: ignore[arg-type]
        assert shared == local, (offset, call)
        redis_state = store.state(client, KEY, TIMING.window, now)
        local_state = book.snapshot(KEY, TIMING.window, now)
        assert redis_state.state == local_state.state, (offset, call)
        assert (redis_state.calls, redis_state.failures) == (local_state.calls, local_state.failures), (
            offset,
            call,
        )
