"""The Redis gate on a real redis-server: fail open, one probe per interval, one line per outage.

The gate is shared by every user of Redis as shared state (breakers, rate
limits), so these tests also check that two users on one gate see one
outage: one warning, one probe, one recovery.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from app.connectors.redis_connector import RedisSettings, build_redis_client
from app.connectors.redis_gate import RedisGate, fail_fast_pool
from app.errors import ServiceNotConfiguredError
from app.llm.errors import LLMCircuitOpenError
from app.llm.resilience.breaker import CircuitBreakers
from app.llm.resilience.ratelimit import RateLimiter
from app.llm.resilience.settings import BreakerPolicy, LimitPolicy
from app.redaction import Secret
from tests.servers import RedisServer, start_redis

LOGGER = "app.connectors.redis_gate"
KEY = "openai/gpt-gate"


def app_client(url: str, timeout: float = 1.0) -> redis.Redis:
    """A client built as the app's connector builds it, that counts its TCP connection attempts."""

    class Counting(redis.Connection):
        attempts = 0

        def _connect(self) -> Any:
            type(self).attempts += 1
            return super()._connect()

    client = build_redis_client(RedisSettings(Secret(url), timeout, timeout, 1, 30))
    client.connection_pool.connection_class = Counting
    return client


def attempts(client: redis.Redis) -> int:
    return int(client.connection_pool.connection_class.attempts)


def messages(caplog: pytest.LogCaptureFixture, start: str) -> list[str]:
    """The gate's log lines that begin with ``start``."""
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.getMessage().startswith(start)]


def wait_until(condition: Any, timeout: float = 3.0) -> float:
    """Seconds until ``condition()`` held, calling it every 10 ms; fails the test after ``timeout``."""
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout, "the condition never held"
        time.sleep(0.01)
    return time.monotonic() - started


@pytest.fixture
def down_client(disposable_redis: RedisServer) -> Iterator[redis.Redis]:
    client = app_client(disposable_redis.url)
    yield client
    client.close()


# --- configured or not ------------------------------------------------------------


def test_a_configured_redis_is_handed_out_and_nothing_is_logged(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    client = app_client(redis_server.url)
    gate = RedisGate(lambda: client)
    caplog.set_level(logging.INFO, LOGGER)
    assert gate.client() is client
    assert gate.available
    assert not caplog.records


def test_without_redis_url_the_gate_answers_none_says_so_once_and_looks_again_later(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    configured: list[redis.Redis] = []

    def redis_client() -> redis.Redis:
        if not configured:
            raise ServiceNotConfiguredError("Redis", "REDIS_URL", "e.g. redis://127.0.0.1:6379/0")
        return configured[0]

    gate = RedisGate(redis_client, probe_interval=0.1)
    gate.join("circuit breakers")
    gate.join("rate limits")
    caplog.set_level(logging.WARNING, LOGGER)
    assert [gate.client() for _ in range(100)] == [None] * 100
    assert not gate.available
    told = messages(caplog, "REDIS_URL is not set")
    assert told == [
        "REDIS_URL is not set: circuit breakers and rate limits keep their state in each process,"
        " so each worker counts alone"
    ]
    configured.append(app_client(redis_server.url))  # configured since (a reset connector)
    assert gate.client() is None  # not asked again within the interval
    time.sleep(0.1)
    assert gate.client() is configured[0]
    assert len(messages(caplog, "REDIS_URL is not set")) == 1
    assert not messages(caplog, "Redis is unavailable")


def test_a_client_that_cannot_be_built_is_a_failure(caplog: pytest.LogCaptureFixture) -> None:
    def unbuildable() -> redis.Redis:
        raise ValueError("Redis URL must specify one of the schemes")

    gate = RedisGate(unbuildable)
    caplog.set_level(logging.WARNING, LOGGER)
    assert gate.client() is None
    assert gate.client() is None
    (warning,) = messages(caplog, "Redis is unavailable")
    assert "ValueError" in warning and "seen by the Redis connector" in warning


# --- failing ----------------------------------------------------------------------


def test_after_a_failure_nobody_touches_redis_until_the_interval_then_one_probe_does(
    disposable_redis: RedisServer, down_client: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    gate = RedisGate(lambda: down_client, probe_interval=0.3)
    gate.join("rate limits")
    caplog.set_level(logging.WARNING, LOGGER)
    disposable_redis.stop()
    client = gate.client()
    assert client is down_client
    with pytest.raises(redis.ConnectionError) as failure:
        client.ping()
    gate.failed("rate limits", failure.value)
    before = attempts(down_client)
    failed_at = time.monotonic()
    handed_out = 0
    while time.monotonic() - failed_at < 0.25:
        handed_out += gate.client() is not None
    assert handed_out == 0
    assert attempts(down_client) == before  # not one connection attempt within the interval
    assert not gate.available
    time.sleep(0.1)
    threads = [threading.Thread(target=gate.client) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wait_until(lambda: not gate._probing)
    assert 1 <= attempts(down_client) - before <= 2  # one probe: a connect and redis-py's one retry
    (warning,) = messages(caplog, "Redis is unavailable")
    assert "seen by rate limits" in warning
    assert "rate limits keep their state in this process" in warning
    assert "tried every 0.3 s" in warning


def test_one_warning_per_warn_interval_and_no_traceback(
    disposable_redis: RedisServer, down_client: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    gate = RedisGate(lambda: down_client, warn_interval=0.2)
    gate.join("circuit breakers")
    caplog.set_level(logging.WARNING, LOGGER)
    error = redis.ConnectionError("Error 111 connecting to 127.0.0.1. Connection refused.")
    for _ in range(50):
        gate.failed("circuit breakers", error)
    assert len(messages(caplog, "Redis is unavailable")) == 1
    time.sleep(0.2)
    for _ in range(50):
        gate.failed("circuit breakers", error)
    assert len(messages(caplog, "Redis is unavailable")) == 2
    assert not [r for r in caplog.records if r.exc_info]


def test_a_hung_redis_stalls_no_caller_the_probe_waits_in_the_background() -> None:
    with socket.socket() as black_hole:  # completes the handshake, never answers
        black_hole.bind(("127.0.0.1", 0))
        black_hole.listen(64)
        client = app_client(f"redis://127.0.0.1:{black_hole.getsockname()[1]}/0", timeout=0.3)
        # A caller that waited on the peer would take the client's timeout (0.3 s) at least.
        gate = RedisGate(lambda: client, probe_interval=0.05)
        gate.failed("rate limits", TimeoutError("Timeout reading from socket"))
        slowest, until = 0.0, time.monotonic() + 0.8
        while time.monotonic() < until:
            started = time.monotonic()
            assert gate.client() is None
            slowest = max(slowest, time.monotonic() - started)
        assert attempts(client) >= 1  # probes ran, each waiting on the hung peer
        assert slowest < 0.15
        wait_until(lambda: not gate._probing, timeout=5)


# --- recovering ---------------------------------------------------------------------


def test_recovery_runs_the_hooks_first_then_opens_and_says_so_once(
    disposable_redis: RedisServer, down_client: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    gate = RedisGate(lambda: down_client, probe_interval=0.1)
    written: list[str] = []
    failing_hook = [True]

    def write_back(client: redis.Redis) -> None:
        if failing_hook[0]:
            failing_hook[0] = False
            raise redis.ResponseError("NOSCRIPT")  # the hook's failure keeps the gate shut
        client.set("gate-test-written", "1", ex=30)
        written.append("before the gate opened" if gate.client() is None else "too late")

    gate.join("circuit breakers", on_recovery=write_back)
    gate.join("rate limits")
    caplog.set_level(logging.INFO, LOGGER)
    disposable_redis.stop()
    gate.failed("circuit breakers", redis.ConnectionError("refused"))
    time.sleep(0.1)
    assert gate.client() is None  # a probe starts: Redis is still down
    disposable_redis.start()
    wait_until(lambda: gate.client() is not None)
    assert written == ["before the gate opened"]
    assert down_client.get("gate-test-written") == b"1"
    assert messages(caplog, "Redis answers again") == [
        "Redis answers again: circuit breakers and rate limits share their state across processes again"
    ]
    for _ in range(20):
        assert gate.client() is down_client
    assert len(messages(caplog, "Redis answers again")) == 1


# --- one gate, two users ---------------------------------------------------------------


def test_breakers_and_rate_limits_on_one_gate_see_one_outage(
    disposable_redis: RedisServer, down_client: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    gate = RedisGate(lambda: down_client)
    namespace = f"test-gate-{uuid.uuid4().hex[:8]}"
    breakers = CircuitBreakers(gate, f"{namespace}:breaker")
    limiter = RateLimiter(gate, f"{namespace}:rate")
    policy, limits = BreakerPolicy(min_calls=4), LimitPolicy(rpm=100_000)
    caplog.set_level(logging.INFO, LOGGER)

    breakers.before_call(KEY, policy)
    limiter.acquire(KEY, limits, 1, 0)
    assert limiter.using_redis
    assert breakers.state(KEY, policy).backend == "redis"

    disposable_redis.stop()
    limiter.acquire(KEY, limits, 1, 0)  # fails in Redis: counted in memory, and the gate shuts
    before = attempts(down_client)
    rejected = 0
    for _ in range(200):
        try:
            breakers.before_call(KEY, policy)
        except LLMCircuitOpenError:
            rejected += 1
        else:
            breakers.record(KEY, policy, "failure")  # the breaker does not try Redis: it opens locally
        limiter.acquire(KEY, limits, 1, 0)
    assert rejected == 200 - policy.min_calls  # opened by its own failures, without Redis
    assert attempts(down_client) == before
    assert not limiter.using_redis
    state = breakers.state(KEY, policy)
    assert (state.state, state.backend) == ("open", "local")
    (warning,) = messages(caplog, "Redis is unavailable")
    assert "seen by rate limits" in warning
    assert "circuit breakers and rate limits keep their state in this process" in warning

    disposable_redis.start()
    elapsed = wait_until(lambda: limiter.acquire(KEY, limits, 1, 0) is not None and limiter.using_redis)
    assert elapsed <= 1.1
    assert breakers.state(KEY, policy).backend == "redis"
    # The breaker this process opened while Redis was away was written back before the gate opened.
    assert down_client.hget(f"{namespace}:breaker:{KEY}", "state") == b"open"
    assert len(messages(caplog, "Redis answers again")) == 1


# --- fork ---------------------------------------------------------------------------------


def test_a_forked_child_starts_fresh(redis_server: RedisServer) -> None:
    client = app_client(redis_server.url)
    gate = RedisGate(lambda: client, probe_interval=60)
    gate.failed("rate limits", redis.ConnectionError("refused"))  # the parent thinks Redis is down
    assert gate.client() is None
    held = gate._lock
    held.acquire()  # as if another thread were inside the gate at fork time
    try:
        pid = os.fork()
        if pid == 0:  # the child: never return into pytest
            status = 1
            try:
                signal.alarm(5)  # a deadlock ends the child instead of hanging the suite
                fresh = gate.client() is client and gate.available  # not down, as a new process
                gate.failed("rate limits", redis.ConnectionError("refused"))  # takes the lock: not held here
                status = 0 if fresh and gate.client() is None else 2
            finally:
                os._exit(status)
        _, wait_status = os.waitpid(pid, 0)
    finally:
        held.release()
    assert os.waitstatus_to_exitcode(wait_status) == 0
    assert gate.client() is None  # the parent's own state is its own


# --- fail-fast connections ------------------------------------------------------------------


def test_fail_fast_pool_keeps_the_address_and_credentials_and_cuts_timeouts_and_retries() -> None:
    server = start_redis(password="gate-pw")
    try:
        client = build_redis_client(RedisSettings(Secret(server.url.replace("/0", "/2")), 0.2, 1.0, 1, 30))
        pool = fail_fast_pool(client, 0.5)
        connection = pool.get_connection()
        try:
            # the shorter of the two wins: a fail-fast pool never waits longer than the app's client
            assert (connection.socket_timeout, connection.socket_connect_timeout) == (0.2, 0.5)
            assert connection.retry.get_retries() == 0
            assert (connection.db, connection.password) == (2, "gate-pw")
        finally:
            pool.release(connection)
        fast = redis.Redis(connection_pool=pool)
        fast.set("gate-test", "1")
        assert client.get("gate-test") == b"1"  # the same server and database
        pool.disconnect()
    finally:
        server.stop()
