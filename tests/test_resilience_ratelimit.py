"""Client-side rate limits on a real redis-server: they hold across threads and processes.

Every limiter gets a namespace of its own, so tests sharing the session's
redis-server never see each other's windows. Short windows (1-2 s) stand in
for the 60 s default where a test waits one out. Limiters get a Redis client
built as the app's connector builds it (1 s timeouts, one retry), as in the app.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import replace

import pytest
import redis

from app.connectors.redis_connector import RedisSettings, build_redis_client
from app.llm.errors import LLMRateLimitError
from app.llm.providers.base import ChatRequest
from app.llm.resilience.ratelimit import DEFAULT_ANSWER_TOKENS, RateLimiter, Reservation, estimate_tokens
from app.llm.resilience.settings import LimitPolicy
from app.llm.resilience.steps import Flow, Step, run_sync
from app.llm.tools import normalise_tools
from app.llm.types import normalise_messages
from app.redaction import Secret
from tests.conftest import ROOT
from tests.servers import RedisServer, start_redis

KEY = "openai/gpt-test"
#: Where "Redis is unavailable" and the like are logged: the gate shared by every Redis user.
LOGGER = "app.connectors.redis_gate"


def namespace() -> str:
    return f"test:{uuid.uuid4().hex[:12]}"


def app_client(url: str) -> Callable[[], redis.Redis]:
    """The app's Redis client, as the connector builds it (1 s timeouts, one retry), for a gate."""
    client = build_redis_client(RedisSettings(Secret(url), 1.0, 1.0, 1, 30))
    return lambda: client


def rpm_entries(url: str, limiter: RateLimiter) -> int:
    """Requests in the limiter's RPM moving windows in Redis (0 when none)."""
    client = redis.Redis.from_url(url)
    try:
        return sum(int(client.llen(key)) for key in client.keys(f"LIMITS:{limiter.namespace}:rpm/*"))
    finally:
        client.close()


def redis_keys(url: str, limiter: RateLimiter) -> list[str]:
    client = redis.Redis.from_url(url, decode_responses=True)
    try:
        return [str(key) for key in client.keys(f"LIMITS:*{limiter.namespace}:*")]  # TPM keys are in {braces}
    finally:
        client.close()


def read_child(pid: int, read: int, timeout: float = 10) -> dict[str, object]:
    """What a forked child wrote to the pipe; a child that hangs is killed and fails the test."""
    try:
        ready, _, _ = select.select([read], [], [], timeout)
        if not ready:
            os.kill(pid, signal.SIGKILL)
            pytest.fail("the forked child hung (on a lock inherited from the parent?)")
        return dict(json.loads(os.read(read, 65536)))
    finally:
        os.close(read)
        os.waitpid(pid, 0)


# --- the estimate ---------------------------------------------------------------


def test_estimate_tokens_counts_text_tools_and_the_answer() -> None:
    messages = normalise_messages(
        [{"role": "system", "content": "s" * 40}, {"role": "user", "content": "u" * 360}]
    )
    request = ChatRequest(provider="openai", model="m", messages=messages)
    assert estimate_tokens(request) == 400 // 4 + 2 * 4 + DEFAULT_ANSWER_TOKENS

    assert estimate_tokens(replace(request, max_tokens=50)) == 100 + 8 + 50

    schema = {"type": "object", "properties": {"city": {"type": "string", "description": "c" * 200}}}
    tools = normalise_tools([{"name": "weather", "description": "d" * 100, "parameters": schema}])
    with_tools = replace(request, max_tokens=50, tools=tools)
    tool_chars = len("weather") + 100 + len(json.dumps(tools[0].parameters))
    assert estimate_tokens(with_tools) == -(-(400 + tool_chars) // 4) + 8 + 50
    assert estimate_tokens(with_tools) > estimate_tokens(replace(request, max_tokens=50)) + 70


# --- no limits, memory ----------------------------------------------------------


def test_a_policy_without_rpm_or_tpm_takes_nothing() -> None:
    limiter = RateLimiter(lambda: None, namespace())
    assert limiter.acquire(KEY, LimitPolicy(), 10_000, 0) is None
    assert asyncio.run(limiter.aacquire(KEY, LimitPolicy(), 10_000, 0)) is None
    limiter.settle(None, 10_000)  # a no-op


def test_without_redis_each_limiter_counts_in_memory() -> None:
    policy = LimitPolicy(rpm=3)
    limiter = RateLimiter(lambda: None, namespace())
    assert not limiter.using_redis
    taken = [limiter.acquire(KEY, policy, 1, 0) for _ in range(3)]
    assert all(isinstance(r, Reservation) for r in taken)
    with pytest.raises(LLMRateLimitError) as caught:
        limiter.acquire(KEY, policy, 1, 0)
    assert 59 < caught.value.retry_after <= 60  # type: ignore[operator]
    # Another process (here: another limiter) has memory of its own.
    other = RateLimiter(lambda: None, limiter.namespace)
    assert other.acquire(KEY, policy, 1, 0) is not None
    # Another model has a window of its own.
    assert limiter.acquire("openai/other-model", policy, 1, 0) is not None


# --- RPM under concurrency ----------------------------------------------------------


def test_rpm_across_eight_threads_admits_exactly_n(redis_server: RedisServer) -> None:
    limiter = RateLimiter(app_client(redis_server.url), namespace())
    policy = LimitPolicy(rpm=5)
    admitted: list[Reservation | None] = []
    refused: list[LLMRateLimitError] = []
    barrier = threading.Barrier(8)

    def worker() -> None:
        barrier.wait()
        for _ in range(3):
            try:
                admitted.append(limiter.acquire(KEY, policy, 1, 0))
            except LLMRateLimitError as exc:
                refused.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert len(admitted) == 5
    assert len(refused) == 19
    assert time.monotonic() - started < 2  # max_wait 0: refused at once
    for exc in refused:
        assert exc.retry_after is not None and 55 < exc.retry_after <= 60
        assert (exc.provider, exc.model) == ("openai", "gpt-test")
    assert rpm_entries(redis_server.url, limiter) == 5  # counted in Redis, not in memory


TWO_PROCESSES = r"""
import logging, sys, threading, time
from app.connectors.redis_connector import RedisSettings, build_redis_client
from app.llm.errors import LLMRateLimitError
from app.llm.resilience.ratelimit import RateLimiter
from app.llm.resilience.settings import LimitPolicy
from app.redaction import Secret

class Count(logging.Handler):
    records = 0
    def emit(self, record):
        Count.records += 1

logging.getLogger("app.connectors.redis_gate").addHandler(Count())
url, ns, start_at = sys.argv[1], sys.argv[2], float(sys.argv[3])
client = build_redis_client(RedisSettings(Secret(url), 1.0, 1.0, 1, 30))
limiter = RateLimiter(lambda: client, ns)
policy = LimitPolicy(rpm=5)
admitted, refused = [], []

def work():
    while time.time() < start_at:
        time.sleep(0.001)
    for _ in range(5):
        try:
            limiter.acquire("openai/gpt-test", policy, 1, 0)
            admitted.append(1)
        except LLMRateLimitError:
            refused.append(1)

threads = [threading.Thread(target=work) for _ in range(4)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print(len(admitted), len(refused), Count.records)
"""


def test_rpm_across_two_processes_sharing_redis_admits_at_most_n(redis_server: RedisServer) -> None:
    ns = namespace()
    start_at = time.time() + 3  # both interpreters up before either starts
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", TWO_PROCESSES, redis_server.url, ns, str(start_at)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    results = []
    for process in processes:
        out, err = process.communicate(timeout=60)
        assert process.returncode == 0, err
        admitted, refused, gate_lines = map(int, out.split())
        assert gate_lines == 0  # Redis never failed: they used it throughout
        results.append((admitted, refused))
    assert sum(admitted for admitted, _ in results) == 5
    assert sum(admitted + refused for admitted, refused in results) == 40
    limiter = RateLimiter(app_client(redis_server.url), ns)
    assert rpm_entries(redis_server.url, limiter) == 5
    with pytest.raises(LLMRateLimitError):  # this process sees the same full window
        limiter.acquire(KEY, LimitPolicy(rpm=5), 1, 0)


# --- TPM ----------------------------------------------------------------------


def test_tpm_counts_the_cost_of_each_request(redis_server: RedisServer) -> None:
    limiter = RateLimiter(app_client(redis_server.url), namespace())
    policy = LimitPolicy(tpm=100)
    for _ in range(3):
        reservation = limiter.acquire(KEY, policy, 30, 0)
        assert reservation is not None and reservation.tokens == 30
    with pytest.raises(LLMRateLimitError) as caught:
        limiter.acquire(KEY, policy, 30, 0)  # 120 > 100
    assert caught.value.retry_after is not None and caught.value.retry_after > 0
    assert limiter.acquire(KEY, policy, 10, 0) is not None  # exactly 100
    with pytest.raises(LLMRateLimitError):
        limiter.acquire(KEY, policy, 1, 0)


def test_a_tpm_refusal_does_not_spend_a_request(redis_server: RedisServer) -> None:
    limiter = RateLimiter(app_client(redis_server.url), namespace())
    policy = LimitPolicy(rpm=10, tpm=100)
    assert limiter.acquire(KEY, policy, 60, 0) is not None
    for _ in range(5):
        with pytest.raises(LLMRateLimitError):
            limiter.acquire(KEY, policy, 60, 0)
    assert rpm_entries(redis_server.url, limiter) == 1
    assert limiter.acquire(KEY, policy, 40, 0) is not None
    assert rpm_entries(redis_server.url, limiter) == 2


def test_a_request_larger_than_the_tpm_limit_is_charged_the_limit(redis_server: RedisServer) -> None:
    limiter = RateLimiter(app_client(redis_server.url), namespace())
    reservation = limiter.acquire(KEY, LimitPolicy(tpm=100), 500, 0)
    assert reservation is not None and reservation.tokens == 100
    with pytest.raises(LLMRateLimitError):
        limiter.acquire(KEY, LimitPolicy(tpm=100), 1, 0)


def test_settle_takes_the_tokens_above_the_estimate(redis_server: RedisServer) -> None:
    limiter = RateLimiter(app_client(redis_server.url), namespace())
    policy = LimitPolicy(tpm=100)
    reservation = limiter.acquire(KEY, policy, 20, 0)
    limiter.settle(reservation, 90)  # 70 more than estimated
    with pytest.raises(LLMRateLimitError):
        limiter.acquire(KEY, policy, 20, 0)  # 90 + 20 > 100
    assert limiter.acquire(KEY, policy, 10, 0) is not None  # 90 + 10 = 100
    limiter.settle(limiter.acquire("openai/other", policy, 1, 0), 500)  # past the limit: spent is spent
    with pytest.raises(LLMRateLimitError):
        limiter.acquire("openai/other", policy, 1, 0)


def test_asettle_takes_the_tokens_above_the_estimate(redis_server: RedisServer) -> None:
    limiter = RateLimiter(app_client(redis_server.url), namespace())
    policy = LimitPolicy(tpm=100)

    async def main() -> None:
        reservation = await limiter.aacquire(KEY, policy, 20, 0)
        await limiter.asettle(reservation, 90)
        await limiter.asettle(reservation, 1)  # no refund
        await limiter.asettle(None, 90)  # nothing was taken

    asyncio.run(main())
    with pytest.raises(LLMRateLimitError):
        limiter.acquire(KEY, policy, 11, 0)
    assert limiter.acquire(KEY, policy, 10, 0) is not None


def test_settle_keeps_an_over_estimate(redis_server: RedisServer) -> None:
    limiter = RateLimiter(app_client(redis_server.url), namespace())
    policy = LimitPolicy(tpm=100)
    reservation = limiter.acquire(KEY, policy, 20, 0)
    limiter.settle(reservation, 5)  # no refund: conservative
    limiter.settle(reservation, None)  # no usage reported: nothing to correct
    with pytest.raises(LLMRateLimitError):
        limiter.acquire(KEY, policy, 81, 0)
    assert limiter.acquire(KEY, policy, 80, 0) is not None


# --- waiting --------------------------------------------------------------------


def test_a_call_waits_for_the_window_then_succeeds(redis_server: RedisServer) -> None:
    limiter = RateLimiter(app_client(redis_server.url), namespace(), window=1)
    policy = LimitPolicy(rpm=2)
    limiter.acquire(KEY, policy, 1, 0)
    limiter.acquire(KEY, policy, 1, 0)
    started = time.monotonic()
    reservation = limiter.acquire(KEY, policy, 1, 2.0)
    elapsed = time.monotonic() - started
    assert reservation is not None
    assert 0.8 < elapsed < 1.6
    assert reservation.waited == pytest.approx(elapsed, abs=0.05)


def test_a_wait_longer_than_max_wait_fails_at_once_with_retry_after(redis_server: RedisServer) -> None:
    limiter = RateLimiter(app_client(redis_server.url), namespace(), window=2)
    policy = LimitPolicy(rpm=1)
    limiter.acquire(KEY, policy, 1, 0)
    started = time.monotonic()
    with pytest.raises(LLMRateLimitError) as caught:
        limiter.acquire(KEY, policy, 1, 0.5)
    assert time.monotonic() - started < 0.3
    assert caught.value.retry_after is not None and 1.5 < caught.value.retry_after <= 2.0
    assert "would fit in" in str(caught.value)


def test_a_call_waits_for_tokens_to_free(redis_server: RedisServer) -> None:
    limiter = RateLimiter(app_client(redis_server.url), namespace(), window=1)
    policy = LimitPolicy(tpm=100)
    limiter.acquire(KEY, policy, 100, 0)
    with pytest.raises(LLMRateLimitError) as caught:
        limiter.acquire(KEY, policy, 50, 0)
    expected = caught.value.retry_after
    assert expected is not None and 0.3 < expected <= 2.0
    started = time.monotonic()
    reservation = limiter.acquire(KEY, policy, 50, expected + 1.0)
    assert reservation is not None
    assert time.monotonic() - started >= expected - 0.3


def test_many_waiting_threads_never_exceed_the_limit(redis_server: RedisServer) -> None:
    limiter = RateLimiter(app_client(redis_server.url), namespace(), window=1)
    policy = LimitPolicy(rpm=3)
    admitted_at: list[float] = []
    refused: list[LLMRateLimitError] = []
    lock = threading.Lock()

    def worker() -> None:
        try:
            limiter.acquire(KEY, policy, 1, 1.5)
        except LLMRateLimitError as exc:
            refused.append(exc)
        else:
            with lock:
                admitted_at.append(time.time())

    threads = [threading.Thread(target=worker) for _ in range(10)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    admitted_at.sort()
    assert 6 <= len(admitted_at) <= 9  # 3 at once, 3 more a second later; the rest may fit in 1.5 s
    assert len(admitted_at) + len(refused) == 10
    for i in range(3, len(admitted_at)):  # no 4 within any 1 s window
        assert admitted_at[i] - admitted_at[i - 3] >= 0.9  # times taken after the call returned


# --- Redis failing ---------------------------------------------------------------


def test_redis_stopped_falls_back_to_memory_with_one_warning_then_recovers(
    disposable_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    url = disposable_redis.url
    limiter = RateLimiter(app_client(url), namespace())
    policy = LimitPolicy(rpm=10_000, tpm=10_000_000)
    limiter.settle(limiter.acquire(KEY, policy, 10, 0), 20)
    assert rpm_entries(url, limiter) == 1

    disposable_redis.stop()
    caplog.set_level(logging.INFO, logger=LOGGER)
    calls = 0
    slowest = 0.0
    outage = time.monotonic()
    while time.monotonic() - outage < 2.5:  # spans two retries of Redis
        started = time.monotonic()
        limiter.settle(limiter.acquire(KEY, policy, 10, 0), 20)
        slowest = max(slowest, time.monotonic() - started)
        calls += 1
        time.sleep(0.01)
    assert calls > 50
    assert slowest < 0.4
    warnings = [r for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert "Redis is unavailable" in warnings[0].getMessage()
    assert "seen by rate limits" in warnings[0].getMessage()

    disposable_redis.start()
    back = time.monotonic()
    while rpm_entries(url, limiter) == 0:  # the restarted server is empty until the limiter writes again
        assert time.monotonic() - back < 1.5, "Redis not used again within 1.5 s"
        limiter.acquire(KEY, policy, 10, 0)
        time.sleep(0.05)
    assert time.monotonic() - back < 1.5
    assert any("answers again" in r.getMessage() for r in caplog.records if r.name == LOGGER)


def test_redis_down_from_the_start_uses_memory(caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    limiter = RateLimiter(app_client(f"redis://127.0.0.1:{port}/0"), namespace())
    caplog.set_level(logging.WARNING, logger=LOGGER)
    policy = LimitPolicy(rpm=2)
    assert limiter.acquire(KEY, policy, 1, 0) is not None
    assert limiter.acquire(KEY, policy, 1, 0) is not None
    with pytest.raises(LLMRateLimitError):
        limiter.acquire(KEY, policy, 1, 0)  # the memory window holds the limit meanwhile
    assert len([r for r in caplog.records if r.name == LOGGER]) == 1


def test_a_redis_that_never_answers_costs_one_socket_timeout_per_retry() -> None:
    with socket.socket() as black_hole:  # accepts connections (backlog), never answers
        black_hole.bind(("127.0.0.1", 0))
        black_hole.listen(16)
        url = f"redis://127.0.0.1:{black_hole.getsockname()[1]}/0"
        limiter = RateLimiter(app_client(url), namespace(), socket_timeout=0.2)
        policy = LimitPolicy(rpm=100)
        started = time.monotonic()
        assert limiter.acquire(KEY, policy, 1, 0) is not None
        first = time.monotonic() - started
        started = time.monotonic()
        for _ in range(20):
            limiter.acquire(KEY, policy, 1, 0)
        rest = time.monotonic() - started
    assert 0.15 < first < 0.6  # one socket timeout, then memory
    assert rest < 0.3  # Redis is not tried again within the retry interval


# --- async ---------------------------------------------------------------------


def test_aacquire_waits_without_blocking_the_event_loop(redis_server: RedisServer) -> None:
    limiter = RateLimiter(app_client(redis_server.url), namespace(), window=1)
    policy = LimitPolicy(rpm=1)
    limiter.acquire(KEY, policy, 1, 0)

    async def main() -> tuple[Reservation | None, float, int]:
        ticks = 0
        done = asyncio.Event()

        async def ticker() -> None:
            nonlocal ticks
            while not done.is_set():
                ticks += 1
                await asyncio.sleep(0.01)

        task = asyncio.create_task(ticker())
        started = time.monotonic()
        reservation = await limiter.aacquire(KEY, policy, 1, 2.0)
        elapsed = time.monotonic() - started
        done.set()
        await task
        return reservation, elapsed, ticks

    reservation, elapsed, ticks = asyncio.run(main())
    assert reservation is not None
    assert 0.7 < elapsed < 1.4
    assert ticks >= 40  # the other task kept running all along

    async def refused() -> float:
        started = time.monotonic()
        with pytest.raises(LLMRateLimitError) as caught:
            await limiter.aacquire(KEY, policy, 1, 0.1)
        assert caught.value.retry_after is not None and caught.value.retry_after > 0.1
        return time.monotonic() - started

    assert asyncio.run(refused()) < 0.3


# --- fork ----------------------------------------------------------------------


def test_a_forked_child_has_its_own_redis_connections_memory_and_locks(redis_server: RedisServer) -> None:
    url = redis_server.url
    shared = RateLimiter(app_client(url), namespace())
    policy = LimitPolicy(rpm=3)
    shared.acquire(KEY, policy, 1, 0)  # the parent's Redis client is built and connected
    assert shared._redis is not None
    parent_pool = shared._redis.storage.get_connection().connection_pool  # type: ignore[union-attr]
    local = RateLimiter(lambda: None, namespace())
    local.acquire(KEY, LimitPolicy(rpm=1), 1, 0)  # the parent's memory window is full

    held = shared._key_lock(KEY)
    held.acquire()  # as if a parent thread were checking the limit at the moment of the fork
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through the pipe
        result: dict[str, object] = {}
        try:
            result["forgot"] = shared._redis is None
            result["admitted"] = shared.acquire(KEY, policy, 1, 0) is not None
            assert shared._redis is not None
            pool = shared._redis.storage.get_connection().connection_pool  # type: ignore[union-attr]
            result["own_pool"] = pool is not parent_pool and pool.pid == os.getpid()
            result["memory_empty"] = local.acquire(KEY, LimitPolicy(rpm=1), 1, 0) is not None
        except BaseException as exc:
            result["error"] = repr(exc)
        os.write(write, json.dumps(result).encode())
        os._exit(0)
    held.release()
    os.close(write)
    result = read_child(pid, read)
    assert result == {"forgot": True, "admitted": True, "own_pool": True, "memory_empty": True}
    # Parent and child share the Redis window: 2 of 3 taken.
    assert rpm_entries(url, shared) == 2
    assert shared.acquire(KEY, policy, 1, 0) is not None
    with pytest.raises(LLMRateLimitError):
        shared.acquire(KEY, policy, 1, 0)
    with pytest.raises(LLMRateLimitError):  # the parent's memory window is still its own, full
        local.acquire(KEY, LimitPolicy(rpm=1), 1, 0)


def test_importing_the_module_imports_neither_limits_nor_redis() -> None:
    code = (
        "import sys\n"
        "import app.llm.resilience.ratelimit, app.llm.resilience.bulkhead\n"
        "print(sorted(m for m in ('limits', 'redis') if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip() == "[]"


def test_keys_in_redis_are_namespaced(redis_server: RedisServer) -> None:
    limiter = RateLimiter(app_client(redis_server.url), namespace())
    limiter.acquire(KEY, LimitPolicy(rpm=5, tpm=1000), 10, 0)
    keys = redis_keys(redis_server.url, limiter)
    assert any(f"{limiter.namespace}:rpm/{KEY}/" in k for k in keys)
    assert any(f"{limiter.namespace}:tpm/{KEY}/" in k for k in keys)


# --- one loop, two drivers ---------------------------------------------------------


def test_acquire_flow_yields_a_check_then_a_sleep_of_the_wait_then_a_check(redis_server: RedisServer) -> None:
    limiter = RateLimiter(app_client(redis_server.url), namespace(), window=1)
    policy = LimitPolicy(rpm=1)
    limiter.acquire(KEY, policy, 1, 0)  # the window is full for about a second
    took: list[float] = []

    def timed(flow: Flow[Reservation | None]) -> Flow[Reservation | None]:
        """Runs each step of ``flow`` itself and records how long it took (a driver of its own)."""
        step = next(flow)
        while True:
            started = time.monotonic()
            result = step.sync()
            took.append(time.monotonic() - started)
            try:
                step = flow.send(result)
            except StopIteration as stop:
                return stop.value
            yield Step(lambda: None, lambda: asyncio.sleep(0))  # nothing left to do for the outer driver

    reservation = run_sync(timed(limiter.acquire_flow(KEY, policy, 1, 2.0)))
    assert reservation is not None
    assert len(took) == 3, took  # check (refused), sleep, check (admitted)
    assert took[0] < 0.1 and took[2] < 0.1
    assert 0.5 < took[1] < 1.2
    assert reservation.waited == pytest.approx(sum(took), abs=0.05)


def test_acquire_flow_without_limits_yields_nothing() -> None:
    flow = RateLimiter(lambda: None, namespace()).acquire_flow(KEY, LimitPolicy(), 10, 0)
    with pytest.raises(StopIteration) as stop:
        next(flow)
    assert stop.value.value is None


def test_a_call_pipeline_can_run_acquire_flow_inside_its_own_flow(redis_server: RedisServer) -> None:
    limiter = RateLimiter(app_client(redis_server.url), namespace())
    policy = LimitPolicy(rpm=1)

    def pipeline() -> Flow[str]:
        reservation = yield from limiter.acquire_flow(KEY, policy, 1, 0)
        assert reservation is not None
        try:
            yield from limiter.acquire_flow(KEY, policy, 1, 0)
        except LLMRateLimitError:
            return "refused the second"
        return "admitted both"

    assert run_sync(pipeline()) == "refused the second"
    assert rpm_entries(redis_server.url, limiter) == 1


# --- the app's client ------------------------------------------------------------------


def test_the_limiter_talks_to_the_app_clients_server_with_fail_fast_connections() -> None:
    secured = start_redis(password="s3cret-limits")
    try:
        url = secured.url.replace("/0", "/3")  # a password and a database only the app's client knows
        limiter = RateLimiter(app_client(url), namespace(), socket_timeout=0.25)
        assert limiter.acquire(KEY, LimitPolicy(rpm=1), 1, 0) is not None
        with pytest.raises(LLMRateLimitError):
            limiter.acquire(KEY, LimitPolicy(rpm=1), 1, 0)  # counted in Redis database 3
        assert rpm_entries(url, limiter) == 1
        assert rpm_entries(secured.url, limiter) == 0
        assert limiter._redis is not None
        pool = limiter._redis.storage.get_connection().connection_pool  # type: ignore[union-attr]
        assert pool is not limiter._redis.source.connection_pool  # type: ignore[union-attr]
        connection = pool.get_connection()
        try:
            assert (connection.socket_timeout, connection.socket_connect_timeout) == (0.25, 0.25)
            assert connection.retry.get_retries() == 0
            assert (connection.db, connection.password) == (3, "s3cret-limits")
        finally:
            pool.release(connection)
    finally:
        secured.stop()


def test_a_new_app_client_gets_a_new_pool_and_the_old_one_is_closed(redis_server: RedisServer) -> None:
    clients = [build_redis_client(RedisSettings(Secret(redis_server.url), 1.0, 1.0, 1, 30)) for _ in range(2)]
    current = [clients[0]]
    limiter = RateLimiter(lambda: current[0], namespace())
    limiter.acquire(KEY, LimitPolicy(rpm=5), 1, 0)
    assert limiter._redis is not None
    first = limiter._redis.storage.get_connection().connection_pool  # type: ignore[union-attr]
    (connection,) = first._available_connections
    assert connection._sock is not None  # connected
    current[0] = clients[1]  # as after reset_redis_client(): the connector built a new client
    limiter.acquire(KEY, LimitPolicy(rpm=5), 1, 0)
    second = limiter._redis.storage.get_connection().connection_pool  # type: ignore[union-attr]
    assert second is not first
    assert connection._sock is None  # the old pool was disconnected
    assert rpm_entries(redis_server.url, limiter) == 2  # one window, in the same Redis
