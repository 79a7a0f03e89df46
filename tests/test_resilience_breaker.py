"""Circuit breakers on a real redis-server: thresholds, half-open permits across threads,
instances and processes, expiry, and the local fallback while Redis is down.

Time is an injected clock wherever the breaker's own timing matters; Redis
key expiry and the gate's probe interval are real time. The state machine
alone is tested in test_breaker_state.py, the Lua scripts alone in
test_breaker_store.py, the Redis gate in test_redis_gate.py.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import redis

from app.connectors.redis_gate import RedisGate
from app.llm.errors import LLMCircuitOpenError, LLMError
from app.llm.resilience.breaker import BreakerState, CircuitBreakers
from app.llm.resilience.settings import BreakerPolicy
from app.services.redis_service import get_redis_client

KEY = "openai/gpt-4o"
POLICY = BreakerPolicy(window=10, min_calls=4, failure_rate=0.5, cooldown=5, half_open_calls=3)
#: Where "Redis is unavailable" and the like are logged: the gate shared by every Redis user.
LOGGER = "app.connectors.redis_gate"


class Clock:
    """A clock tests move by hand."""

    def __init__(self, now: float | None = None) -> None:
        self.now = time.time() if now is None else now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def counting_client(url: str, timeout: float = 1.0) -> redis.Redis:
    """A client built like the app's (short timeouts, one retry) that counts its TCP connection attempts."""

    class Counting(redis.Connection):
        attempts = 0

        def _connect(self) -> Any:
            type(self).attempts += 1
            return super()._connect()

    from app.connectors.redis_connector import RedisSettings, build_redis_client
    from app.redaction import Secret

    client = build_redis_client(RedisSettings(Secret(url), timeout, timeout, 1, 30))
    client.connection_pool.connection_class = Counting
    return client


def attempts(client: redis.Redis) -> int:
    return int(client.connection_pool.connection_class.attempts)


@pytest.fixture
def namespace() -> str:
    return f"test-breaker-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def shared_client(make_app, redis_server) -> redis.Redis:
    """The app's own Redis client (short timeouts, one retry) on the session's redis-server."""
    app = make_app(REDIS_URL=redis_server.url)
    with app.app_context():
        return get_redis_client()


@pytest.fixture(params=["redis", "local"])
def backend(request, shared_client) -> str:
    return str(request.param)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def breakers(backend, shared_client, namespace, clock) -> CircuitBreakers:
    if backend == "redis":
        return CircuitBreakers(lambda: shared_client, namespace, clock)
    return CircuitBreakers(lambda: None, namespace, clock)


def fail(breakers: CircuitBreakers, times: int, policy: BreakerPolicy = POLICY, key: str = KEY) -> None:
    for _ in range(times):
        breakers.before_call(key, policy)
        breakers.record(key, policy, "failure")


def succeed(breakers: CircuitBreakers, times: int, policy: BreakerPolicy = POLICY, key: str = KEY) -> None:
    for _ in range(times):
        breakers.before_call(key, policy)
        breakers.record(key, policy, "success")


def is_open(breakers: CircuitBreakers, key: str = KEY, policy: BreakerPolicy = POLICY) -> bool:
    try:
        breakers.before_call(key, policy)
    except LLMCircuitOpenError:
        return True
    return False


def admitted(breakers: list[CircuitBreakers], calls: int, policy: BreakerPolicy = POLICY) -> int:
    """How many of ``calls`` concurrent before_call (spread over ``breakers``) were let through."""
    barrier = threading.Barrier(min(calls, 32))

    def one(index: int) -> bool:
        if index < 32:
            barrier.wait()
        try:
            breakers[index % len(breakers)].before_call(KEY, policy)
        except LLMCircuitOpenError:
            return False
        return True

    with ThreadPoolExecutor(32) as pool:
        return sum(pool.map(one, range(calls)))


# --- closed -> open ------------------------------------------------------------------


def test_opens_at_the_threshold_only_after_min_calls(breakers, backend):
    fail(breakers, 3)  # 100 % failures, but fewer than min_calls
    state = breakers.state(KEY, POLICY)
    assert (state.state, state.calls, state.failures, state.backend) == ("closed", 3, 3, backend)
    assert not is_open(breakers)
    breakers.record(KEY, POLICY, "failure")  # the call is_open just made
    state = breakers.state(KEY, POLICY)
    assert (state.state, state.calls, state.failures) == ("open", 4, 4)
    assert state.failure_rate == 1.0
    assert state.open_for == pytest.approx(5.0)
    assert is_open(breakers)


def test_does_not_open_below_the_rate(breakers):
    succeed(breakers, 5)
    fail(breakers, 4)  # 4/9 < 0.5
    state = breakers.state(KEY, POLICY)
    assert (state.state, state.calls, state.failures) == ("closed", 9, 4)
    assert state.failure_rate == pytest.approx(4 / 9)
    fail(breakers, 1)  # 5/10 == 0.5: the threshold is inclusive
    assert breakers.state(KEY, POLICY).state == "open"


def test_a_rate_reached_exactly_opens_despite_float_rounding(breakers):
    policy = BreakerPolicy(window=10, min_calls=10, failure_rate=0.3, cooldown=5)
    succeed(breakers, 7, policy)
    fail(breakers, 2, policy)
    assert breakers.state(KEY, policy).state == "closed"
    fail(breakers, 1, policy)  # 3/10; 0.3 * 10 is 3.0000000000000004 in floating point
    assert breakers.state(KEY, policy).state == "open"


def test_ignored_outcomes_count_nothing(breakers):
    for _ in range(50):
        breakers.before_call(KEY, POLICY)
        breakers.record(KEY, POLICY, "ignored")
    fail(breakers, 3)
    state = breakers.state(KEY, POLICY)
    assert (state.state, state.calls, state.failures) == ("closed", 3, 3)


def test_old_outcomes_leave_the_sliding_window(breakers, clock):
    fail(breakers, 3)
    clock.advance(POLICY.window + 0.5)
    assert breakers.state(KEY, POLICY).calls == 0
    fail(breakers, 3)  # 6 failures in all, but only 3 in the window
    state = breakers.state(KEY, POLICY)
    assert (state.state, state.calls) == ("closed", 3)
    clock.advance(POLICY.window / 2)
    fail(breakers, 1)  # 4 in the window now
    assert breakers.state(KEY, POLICY).state == "open"


def test_unknown_outcomes_are_refused(breakers):
    with pytest.raises(ValueError, match="outcome"):
        breakers.record(KEY, POLICY, "maybe")  # type: ignore[arg-type]


# --- open ------------------------------------------------------------------------------


def test_open_rejects_at_once_with_the_time_left_and_the_model(breakers, clock):
    key = "openrouter/meta-llama/llama-3.3-70b"
    fail(breakers, 4, key=key)
    clock.advance(2)
    with pytest.raises(LLMCircuitOpenError) as info:
        breakers.before_call(key, POLICY)
    error = info.value
    assert isinstance(error, LLMError)
    assert error.retry_after == pytest.approx(3.0, abs=0.01)
    assert (error.provider, error.model) == ("openrouter", "meta-llama/llama-3.3-70b")
    assert "circuit breaker open" in str(error)
    assert breakers.state(key, POLICY).open_for == pytest.approx(3.0, abs=0.01)
    assert breakers.state(KEY, POLICY).state == "closed"  # one breaker per provider/model


def test_outcomes_of_calls_that_finish_while_open_do_not_extend_it(breakers, clock):
    fail(breakers, 4)
    clock.advance(1)
    breakers.record(KEY, POLICY, "failure")  # a call admitted before it opened
    assert breakers.state(KEY, POLICY).open_for == pytest.approx(4.0, abs=0.01)


# --- half-open -------------------------------------------------------------------------


def test_after_the_cooldown_exactly_the_trial_calls_pass(breakers, clock):
    fail(breakers, 4)
    assert admitted([breakers], 200) == 0
    clock.advance(POLICY.cooldown)
    assert breakers.state(KEY, POLICY).state == "half_open"
    assert admitted([breakers], 200) == POLICY.half_open_calls
    with pytest.raises(LLMCircuitOpenError, match="half-open") as info:
        breakers.before_call(KEY, POLICY)
    assert 0 < info.value.retry_after <= POLICY.cooldown


def test_trial_calls_are_shared_by_two_instances(shared_client, make_app, redis_server, namespace):
    clock = Clock()
    app = make_app(REDIS_URL=redis_server.url)
    with app.app_context():
        other_client = get_redis_client()
    assert other_client is not shared_client
    worker_a = CircuitBreakers(lambda: shared_client, namespace, clock)
    worker_b = CircuitBreakers(lambda: other_client, namespace, clock)
    fail(worker_a, 4)
    assert is_open(worker_b)  # opened by A, seen by B
    clock.advance(POLICY.cooldown)
    assert admitted([worker_a, worker_b], 200) == POLICY.half_open_calls
    assert worker_b.state(KEY, POLICY).state == "half_open"


def _child(url: str, namespace: str, now: float, start: Any, results: Any) -> None:
    clock = Clock(now)
    client = redis.Redis.from_url(url, socket_timeout=2)
    breakers = CircuitBreakers(lambda: client, namespace, clock)
    try:
        start.wait(10)
        results.put(("ok", os.getpid(), admitted([breakers], 100)))
    except BaseException as exc:
        results.put(("error", os.getpid(), repr(exc)))


def test_trial_calls_are_shared_by_two_processes(shared_client, redis_server, namespace):
    clock = Clock()
    parent = CircuitBreakers(lambda: shared_client, namespace, clock)
    fail(parent, 4)
    context = multiprocessing.get_context("fork")
    trial_time = clock.now + POLICY.cooldown  # the children's clock: the cool-down is over
    start, results = context.Barrier(2), context.Queue()
    children = [
        context.Process(target=_child, args=(redis_server.url, namespace, trial_time, start, results))
        for _ in range(2)
    ]
    for child in children:
        child.start()
    outcomes = [results.get(timeout=30) for _ in children]
    for child in children:
        child.join(10)
    assert [kind for kind, _, _ in outcomes] == ["ok", "ok"], outcomes
    assert len({pid for _, pid, _ in outcomes} | {os.getpid()}) == 3
    assert sum(count for _, _, count in outcomes) == POLICY.half_open_calls
    assert parent.state(KEY, POLICY).state == "half_open"


def test_one_failure_in_half_open_reopens_it(breakers, clock):
    fail(breakers, 4)
    clock.advance(POLICY.cooldown)
    breakers.before_call(KEY, POLICY)
    breakers.before_call(KEY, POLICY)
    breakers.record(KEY, POLICY, "success")
    breakers.record(KEY, POLICY, "failure")
    clock.advance(1)
    with pytest.raises(LLMCircuitOpenError) as info:
        breakers.before_call(KEY, POLICY)
    assert info.value.retry_after == pytest.approx(POLICY.cooldown - 1, abs=0.01)
    assert breakers.state(KEY, POLICY).state == "open"


def test_successful_trials_close_it_with_a_fresh_window(breakers, clock):
    fail(breakers, 4)
    clock.advance(POLICY.cooldown)
    for _ in range(POLICY.half_open_calls):
        breakers.before_call(KEY, POLICY)
    for _ in range(POLICY.half_open_calls - 1):
        breakers.record(KEY, POLICY, "success")
    assert breakers.state(KEY, POLICY).state == "half_open"
    assert is_open(breakers)  # every permit is out
    breakers.record(KEY, POLICY, "success")
    state = breakers.state(KEY, POLICY)
    assert (state.state, state.calls, state.failures) == ("closed", 0, 0)
    fail(breakers, 3)  # the four failures before it opened are forgotten
    assert breakers.state(KEY, POLICY).state == "closed"
    fail(breakers, 1)
    assert breakers.state(KEY, POLICY).state == "open"


def test_an_ignored_trial_gives_its_permit_back_without_closing(breakers, clock):
    policy = BreakerPolicy(window=10, min_calls=2, failure_rate=0.5, cooldown=5, half_open_calls=1)
    fail(breakers, 2, policy)
    clock.advance(policy.cooldown)
    breakers.before_call(KEY, policy)
    assert is_open(breakers, policy=policy)
    breakers.record(KEY, policy, "ignored")  # e.g. a 400: says nothing about the provider
    assert breakers.state(KEY, policy).state == "half_open"
    breakers.before_call(KEY, policy)  # the permit is free again
    assert is_open(breakers, policy=policy)
    breakers.record(KEY, policy, "success")
    assert breakers.state(KEY, policy).state == "closed"


def test_a_trial_round_that_never_reports_lapses_after_a_cooldown(breakers, clock):
    policy = BreakerPolicy(window=10, min_calls=2, failure_rate=0.5, cooldown=5, half_open_calls=1)
    fail(breakers, 2, policy)
    clock.advance(policy.cooldown)
    breakers.before_call(KEY, policy)  # its process dies: no record
    clock.advance(policy.cooldown - 0.1)
    assert is_open(breakers, policy=policy)
    clock.advance(0.1)
    breakers.before_call(KEY, policy)  # a new round
    assert is_open(breakers, policy=policy)


# --- expiry and listing ---------------------------------------------------------------------


def test_redis_keys_expire(shared_client, namespace):
    policy = BreakerPolicy(window=0.2, min_calls=2, failure_rate=0.5, cooldown=0.2)
    breakers = CircuitBreakers(lambda: shared_client, namespace)
    fail(breakers, 2, policy)
    name = f"{namespace}:{KEY}"
    assert 0 < shared_client.pttl(name) <= 1400  # window + cooldown + 1 s
    assert breakers.state(KEY, policy).state == "open"
    deadline = time.monotonic() + 3
    while shared_client.exists(name) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not shared_client.exists(name)
    assert breakers.states() == []


def test_local_breakers_expire_too(namespace, clock):
    breakers = CircuitBreakers(lambda: None, namespace, clock)
    fail(breakers, 1)
    assert len(breakers.states()) == 1
    clock.advance(POLICY.window + POLICY.cooldown + 1.01)
    assert breakers.states() == []


def test_states_lists_every_breaker(breakers, backend, clock, shared_client, namespace):
    fail(breakers, 4, key="openai/gpt-4o")
    fail(breakers, 1, key="gemini/gemini-2.5-flash")
    succeed(breakers, 2, key="groq/llama-3.3-70b-versatile")
    shared_client.set(f"{namespace}x:other", "not a breaker", ex=30)  # another namespace: not listed
    clock.advance(1)
    states = {state.key: state for state in breakers.states()}
    left = pytest.approx(4.0, abs=0.01)
    assert states == {
        "openai/gpt-4o": BreakerState("openai/gpt-4o", "open", 4, 4, 1.0, left, backend),
        "gemini/gemini-2.5-flash": BreakerState("gemini/gemini-2.5-flash", "closed", 1, 1, 1.0, 0.0, backend),
        "groq/llama-3.3-70b-versatile": BreakerState(
            "groq/llama-3.3-70b-versatile", "closed", 2, 0, 0.0, 0.0, backend
        ),
    }


class Commands:
    """Counts the commands a redis-server ran, from its INFO (the INFO itself not counted)."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self.before = client.info("commandstats")

    def __call__(self, name: str) -> int:
        after = self.client.info("commandstats")
        count = int(after.get(f"cmdstat_{name}", {"calls": 0})["calls"])
        return count - int(self.before.get(f"cmdstat_{name}", {"calls": 0})["calls"])


def test_a_busy_closed_breaker_asks_redis_once_per_sync_interval(disposable_redis, namespace, clock):
    client = redis.Redis.from_url(disposable_redis.url)
    breakers = CircuitBreakers(lambda: client, namespace, clock)
    assert breakers.sync_interval == 0.1
    succeed(breakers, 1)  # loads the scripts; Redis said "closed" and has this success
    commands = Commands(client)
    succeed(breakers, 100)  # within the interval: admitted and counted in memory
    assert commands("evalsha") == 0
    state = breakers.state(KEY, POLICY)  # sends the 100 pending successes first, in one script
    assert (state.state, state.calls, state.failures) == ("closed", 101, 0)
    assert commands("evalsha") == 1
    clock.advance(breakers.sync_interval)
    succeed(breakers, 1)  # the interval is over: Redis is asked again, and this success is sent
    assert commands("evalsha") == 3
    assert breakers.state(KEY, POLICY).calls == 102


def test_a_failure_is_sent_at_once_with_the_successes_before_it(disposable_redis, namespace, clock):
    client = redis.Redis.from_url(disposable_redis.url)
    breakers = CircuitBreakers(lambda: client, namespace, clock)
    succeed(breakers, 5)  # one sent, four pending
    commands = Commands(client)
    breakers.before_call(KEY, POLICY)
    breakers.record(KEY, POLICY, "failure")
    assert commands("evalsha") == 1
    fields = {k.decode(): int(v) for k, v in client.hgetall(f"{namespace}:{KEY}").items() if b":" in k}
    assert (
        sum(v for k, v in fields.items() if k[0] == "c"),
        sum(v for k, v in fields.items() if k[0] == "f"),
    ) == (
        6,
        1,
    )
    breakers.before_call(KEY, POLICY)  # after a failure, the next call asks Redis again
    assert commands("evalsha") == 2


def test_a_breaker_opened_elsewhere_is_seen_within_the_sync_interval(
    shared_client, disposable_redis, namespace, clock
):
    client = redis.Redis.from_url(disposable_redis.url)
    busy = CircuitBreakers(lambda: client, namespace, clock)
    other = CircuitBreakers(lambda: client, namespace, clock)
    succeed(busy, 1)
    fail(other, 3)  # 3 failures of 4 calls
    assert is_open(other)
    clock.advance(busy.sync_interval - 0.001)
    assert not is_open(busy)  # Redis's "closed" of a moment ago is still trusted
    clock.advance(0.001)
    assert is_open(busy)


def test_an_open_breaker_rejects_from_memory_until_its_cooldown_ends(disposable_redis, namespace, clock):
    client = redis.Redis.from_url(disposable_redis.url)
    opener = CircuitBreakers(lambda: client, namespace, clock)
    other = CircuitBreakers(lambda: client, namespace, clock)
    fail(opener, 4)
    commands = Commands(client)
    assert is_open(other)  # told by Redis, once
    assert commands("evalsha") == 1
    clock.advance(1)
    for breakers in (opener, other):
        for _ in range(50):
            with pytest.raises(LLMCircuitOpenError) as info:
                breakers.before_call(KEY, POLICY)
            assert info.value.retry_after == pytest.approx(POLICY.cooldown - 1, abs=0.01)
    assert commands("evalsha") == 1  # only time ends an open state: nothing to ask
    clock.advance(POLICY.cooldown - 1)
    other.before_call(KEY, POLICY)  # a trial call: Redis hands out the permits
    assert commands("evalsha") == 2
    assert other.state(KEY, POLICY).state == "half_open"


def test_batched_successes_never_count_as_trial_calls(disposable_redis, namespace, clock):
    client = redis.Redis.from_url(disposable_redis.url)
    busy = CircuitBreakers(lambda: client, namespace, clock)
    other = CircuitBreakers(lambda: client, namespace, clock)
    succeed(busy, 1 + POLICY.half_open_calls)  # all but the first pending in memory
    fail(other, 3)  # 3 failures of 4 calls in Redis
    clock.advance(POLICY.cooldown)
    other.before_call(KEY, POLICY)  # half-open: one trial call out
    state = busy.state(KEY, POLICY)  # busy's pending successes are sent now: dropped, not trials
    assert state.state == "half_open"
    assert client.hget(f"{namespace}:{KEY}", "successes") == b"0"
    for _ in range(POLICY.half_open_calls):
        other.record(KEY, POLICY, "success")
    assert busy.state(KEY, POLICY).state == "closed"


def test_local_breakers_count_a_busy_window_exactly(namespace):
    clock = Clock(1_000_000.0)  # on a bucket boundary: the window is counted in buckets of 0.5 s
    breakers = CircuitBreakers(lambda: None, namespace, clock)
    policy = BreakerPolicy(window=10, min_calls=4, failure_rate=0.5, cooldown=5)
    for call in range(40):  # 0.25 s apart: buckets come and go
        clock.advance(0.25 if call else 0)
        succeed(breakers, 1, policy)
    state = breakers.state(KEY, policy)
    assert (state.calls, state.failures) == (40, 0)
    clock.advance(5)
    assert breakers.state(KEY, policy).calls == 20
    fail(breakers, 19, policy)  # 19 of 39 in the window
    assert breakers.state(KEY, policy).state == "closed"
    fail(breakers, 1, policy)  # 20 of 40
    assert breakers.state(KEY, policy).state == "open"


def test_without_redis_url_breakers_are_local_and_it_is_said_once(make_app, namespace, caplog):
    app = make_app()
    clock = Clock()
    with app.app_context(), caplog.at_level(logging.WARNING, LOGGER):
        breakers = CircuitBreakers(get_redis_client, namespace, clock)  # raises ServiceNotConfiguredError
        for _ in range(10):
            succeed(breakers, 1)
        fail(breakers, 10)
        assert breakers.state(KEY, POLICY).backend == "local"
        assert is_open(breakers)
    told = [r for r in caplog.records if "REDIS_URL is not set" in r.getMessage()]
    assert len(told) == 1


@pytest.fixture
def down_client(disposable_redis) -> Iterator[redis.Redis]:
    client = counting_client(disposable_redis.url)
    yield client
    client.close()


def test_redis_stopped_falls_back_to_local_and_still_opens(disposable_redis, down_client, namespace, caplog):
    clock = Clock()
    breakers = CircuitBreakers(RedisGate(lambda: down_client, probe_interval=60), namespace, clock)
    succeed(breakers, 2)
    assert breakers.state(KEY, POLICY).backend == "redis"
    disposable_redis.stop()
    before = attempts(down_client)
    rejected = 0
    with caplog.at_level(logging.WARNING, LOGGER):
        for _ in range(300):
            try:
                breakers.before_call(KEY, POLICY)
            except LLMCircuitOpenError:
                rejected += 1
            else:
                breakers.record(KEY, POLICY, "failure")
    # The two successes seen through Redis were mirrored locally: 2 failures of 4 calls open it
    # (a local breaker starting from nothing would have needed 4 calls of its own).
    assert rejected == 300 - 2
    state = breakers.state(KEY, POLICY)
    assert (state.state, state.backend, state.calls, state.failures) == ("open", "local", 4, 2)
    assert breakers.states() == [state]
    warnings = [r for r in caplog.records if "Redis is unavailable" in r.getMessage()]
    assert len(warnings) == 1, [r.getMessage() for r in caplog.records]
    assert warnings[0].exc_info is None
    assert "seen by circuit breakers" in warnings[0].getMessage()
    assert "circuit breakers keep their state in this process" in warnings[0].getMessage()
    # One failed command (one retry, each connect retried once) for ~600 breaker calls.
    assert attempts(down_client) - before <= 4


def test_an_open_breaker_stays_open_when_redis_dies(disposable_redis, namespace):
    clock = Clock()
    client_a = counting_client(disposable_redis.url)
    worker_a = CircuitBreakers(lambda: client_a, namespace, clock)
    client_b = counting_client(disposable_redis.url)
    worker_b = CircuitBreakers(lambda: client_b, namespace, clock)
    fail(worker_a, 4)
    assert is_open(worker_b)  # B never saw a failure itself; it knows from Redis
    disposable_redis.stop()
    clock.advance(1)
    with pytest.raises(LLMCircuitOpenError) as info:
        worker_b.before_call(KEY, POLICY)
    assert info.value.retry_after == pytest.approx(POLICY.cooldown - 1, abs=0.01)
    assert worker_b.state(KEY, POLICY).backend == "local"


def test_a_dead_redis_costs_one_attempt_per_probe_interval(disposable_redis, down_client, namespace):
    breakers = CircuitBreakers(RedisGate(lambda: down_client, probe_interval=0.2), namespace, Clock())
    disposable_redis.stop()
    before = attempts(down_client)
    started = time.monotonic()
    calls = 0
    while time.monotonic() - started < 1.0:
        breakers.before_call(KEY, POLICY)
        breakers.record(KEY, POLICY, "success")
        calls += 1
    probes = 1 + 1.0 / 0.2 + 1
    assert calls > 1000
    assert attempts(down_client) - before <= probes * 4


@pytest.fixture
def black_hole() -> Iterator[int]:
    """A port whose kernel completes the TCP handshake, and no one ever answers: a hung Redis."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(512)
        yield server.getsockname()[1]


def test_a_hung_redis_stalls_no_call_after_the_first(black_hole, namespace):
    client = counting_client(f"redis://127.0.0.1:{black_hole}/0", timeout=0.2)
    # The real clock: a closed breaker is trusted for sync_interval, so only time passing
    # brings the calls back to Redis (and to the probes).
    breakers = CircuitBreakers(RedisGate(lambda: client, probe_interval=0.1), namespace)
    started = time.monotonic()
    breakers.before_call(KEY, POLICY)  # in flight when Redis hung: it pays the client's timeout
    assert time.monotonic() - started >= 0.2
    after_first = attempts(client)
    slowest, calls, until = 0.0, 0, time.monotonic() + 1.0
    while time.monotonic() < until:
        started = time.monotonic()
        breakers.before_call(KEY, POLICY)
        breakers.record(KEY, POLICY, "success")
        slowest = max(slowest, time.monotonic() - started)
        calls += 1
    # Probes (each waiting >= 0.2 s for the hung peer) ran meanwhile, in the background.
    assert attempts(client) > after_first
    assert slowest < 0.15
    assert calls > 1000
    assert breakers.state(KEY, POLICY).backend == "local"


def test_redis_back_shares_state_again_within_a_second(disposable_redis, down_client, namespace, caplog):
    clock = Clock()
    worker_a = CircuitBreakers(lambda: down_client, namespace, clock)
    observer_client = redis.Redis.from_url(disposable_redis.url, socket_timeout=1)
    observer = CircuitBreakers(lambda: observer_client, namespace, clock)
    disposable_redis.stop()
    fail(worker_a, 4)  # opens locally while Redis is down
    assert worker_a.state(KEY, POLICY).backend == "local"
    assert is_open(worker_a)
    disposable_redis.start()
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, LOGGER):
        while True:
            is_open(worker_a)
            shared = observer.state(KEY, POLICY)
            if (shared.backend == "redis" and shared.state == "open") or time.monotonic() - started > 1.0:
                break
            time.sleep(0.02)
    elapsed = time.monotonic() - started
    assert elapsed <= 1.0
    # The breaker A opened on its own was written to the restarted (empty) Redis: still open.
    assert (shared.state, shared.backend) == ("open", "redis")
    assert shared.open_for == pytest.approx(POLICY.cooldown, abs=0.01)
    assert worker_a.state(KEY, POLICY).backend == "redis"
    assert any("Redis answers again" in r.getMessage() for r in caplog.records)
    # And outcomes flow through Redis again: B sees what A records.
    worker_a.record("gemini/gemini-2.5-flash", POLICY, "failure")
    assert observer.state("gemini/gemini-2.5-flash", POLICY).calls == 1


# --- fork -------------------------------------------------------------------------------------------


def test_a_forked_child_gets_fresh_locks(namespace):
    breakers = CircuitBreakers(lambda: None, namespace, Clock())
    fail(breakers, 1)
    held = breakers._local_lock
    held.acquire()  # as if another thread were inside the breaker at fork time
    try:
        pid = os.fork()
        if pid == 0:  # the child: never return into pytest
            status = 1
            try:
                signal.alarm(5)  # a deadlock ends the child instead of hanging the suite
                fail(breakers, 3)
                status = 0 if is_open(breakers) else 2
            finally:
                os._exit(status)
        _, wait_status = os.waitpid(pid, 0)
    finally:
        held.release()
    assert os.waitstatus_to_exitcode(wait_status) == 0
    assert breakers.state(KEY, POLICY).calls == 1  # the parent's own state is its own
