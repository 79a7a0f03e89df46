"""Fault injection on real parts: each scenario of the resilience policy, with the figure it proves.

Upstreams are real HTTP servers on 127.0.0.1 (a threaded pytest-httpserver,
``local_server``), called through the real ``openai`` SDK; hangs and resets
come from :class:`tests.faultproxy.FaultProxy` placed in front of them and of
PostgreSQL; Redis is a real ``redis-server``, stopped or killed. Every handler
records when each request arrived, so retries, gaps and "no request made" are
counted where they happen: upstream. Nothing inside the SDK is patched. Each
test records its measured figures with ``record_property`` (``--junitxml``
shows them).

Breakers and rate limits are keyed by ``provider/model``: every test uses
models of its own (:func:`unique`), so tests sharing the session's Redis
never see each other's state. Tests that start processes (two app processes,
gunicorn) or kill Redis are marked ``slow``.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import secrets
import select
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import pytest
import redis
from flask import Flask
from werkzeug import Request, Response

from app.llm import (
    LLMBadRequestError,
    LLMCircuitOpenError,
    LLMConnectionError,
    LLMContextLengthError,
    LLMError,
    LLMRateLimitError,
    LLMServerError,
    LLMTimeoutError,
    get_llm,
)
from app.llm.resilience.breaker import CircuitBreakers
from app.llm.resilience.settings import BreakerPolicy
from tests.conftest import ROOT, api_key_for_env
from tests.faultproxy import FaultProxy
from tests.servers import free_port
from tests.test_gunicorn import clean_env, run_gunicorn, wait_until_listening

CHAT_PATH = "/v1/chat/completions"
USER = [{"role": "user", "content": "hi"}]
KEY = "sk-test-resilience-faults"


def unique(prefix: str = "m") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


# --- the upstream ---------------------------------------------------------------------------


def completion(model: str, content: str = "hi") -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1_700_000_000,
        "model": model,
        "choices": [
            {
                "index": 0,
                "finish_reason": "stop",
                "message": {"role": "assistant", "content": content, "refusal": None},
            }
        ],
        "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6},
    }


def ok(model: str, content: str = "hi") -> Response:
    return Response(json.dumps(completion(model, content)), mimetype="application/json")


def failure(status: int, headers: dict[str, str] | None = None, code: str | None = None) -> Response:
    body = {"error": {"message": f"upstream says {status}", "type": "error", "param": None, "code": code}}
    return Response(json.dumps(body), status=status, headers=headers, mimetype="application/json")


def sse_event(data: dict[str, Any] | str) -> bytes:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n".encode()


def sse_chunk(delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1_700_000_000,
        "model": "served-model",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
    }


USAGE_CHUNK = {
    **sse_chunk({}),
    "choices": [],
    "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
}
#: The first event of every stream: the first text delta, "Hel".
FIRST_EVENT = sse_event(sse_chunk({"role": "assistant", "content": "Hel"}))
REST_OF_STREAM = (
    sse_event(sse_chunk({"content": "lo"}))
    + sse_event(sse_chunk({}, "stop"))
    + sse_event(USAGE_CHUNK)
    + sse_event("[DONE]")
)


def stream_body() -> Iterator[bytes]:
    yield FIRST_EVENT
    yield REST_OF_STREAM


class Upstream:
    """A handler that records each chat request (arrival time, model) and answers with ``answer``.

    ``answer(n, model)`` gets the 0-based number of the request for that model.
    """

    def __init__(self, answer: Callable[[int, str], Response]) -> None:
        self.answer = answer
        self.lock = threading.Lock()
        self.arrivals: dict[str, list[float]] = {}
        #: time.monotonic() just before each answer was handed to the server, by model.
        self.answered: dict[str, list[float]] = {}

    def __call__(self, request: Request) -> Response:
        model = json.loads(request.get_data() or b"{}").get("model", "")
        with self.lock:
            seen = self.arrivals.setdefault(model, [])
            seen.append(time.monotonic())
            n = len(seen) - 1
        response = self.answer(n, model)
        with self.lock:
            self.answered.setdefault(model, []).append(time.monotonic())
        return response

    def count(self, model: str) -> int:
        with self.lock:
            return len(self.arrivals.get(model, []))

    def gaps(self, model: str) -> list[float]:
        with self.lock:
            times = self.arrivals.get(model, [])
            return [b - a for a, b in itertools.pairwise(times)]


def serve(server: Any, answer: Callable[[int, str], Response], path: str = CHAT_PATH) -> Upstream:
    upstream = Upstream(answer)
    server.expect_request(path, method="POST").respond_with_handler(upstream)
    return upstream


def openai_app(make_app: Callable[..., Flask], base_url: str, **settings: Any) -> Flask:
    """An app whose default OpenAI profile points at ``base_url``; the SDK's own retries left on
    (``OPENAI_MAX_RETRIES=2``) to show that the layer turns them off underneath its loop."""
    defaults = {
        "OPENAI_API_KEY": KEY,
        "OPENAI_BASE_URL": base_url,
        "OPENAI_MAX_RETRIES": 2,
        "OPENAI_TIMEOUT": 10,
    }
    return make_app(**{**defaults, **settings})


def chat(app: Flask, model: str, **options: Any) -> Any:
    with app.app_context():
        return get_llm().chat(USER, model=model, **options)


def chat_error(app: Flask, model: str, **options: Any) -> LLMError:
    with pytest.raises(LLMError) as excinfo:
        chat(app, model, **options)
    return excinfo.value


def outcomes(attempts: list[Any]) -> list[tuple[str, str]]:
    return [(a.model, a.outcome) for a in attempts]


# --- 1. Retry-After honoured ----------------------------------------------------------------


def rate_limited_twice(retry_after: dict[str, str]) -> Callable[[int, str], Response]:
    def answer(n: int, model: str) -> Response:
        return failure(429, retry_after) if n < 2 else ok(model)

    return answer


def test_429_with_retry_after_1_twice_then_200_is_3_attempts_a_second_apart(
    make_app, local_server, record_property
):
    upstream = serve(local_server, rate_limited_twice({"Retry-After": "1"}))
    app = openai_app(make_app, local_server.url_for("/v1"), LLM_MAX_RETRIES=2)
    model = unique()

    answer = chat(app, f"openai/{model}")

    assert answer.content == "hi"
    assert upstream.count(model) == 3
    gaps = upstream.gaps(model)
    record_property("gaps_s", [round(gap, 3) for gap in gaps])
    assert all(1.0 <= gap < 1.3 for gap in gaps), gaps
    assert outcomes(answer.attempts) == [
        (f"openai/{model}", "LLMRateLimitError"),
        (f"openai/{model}", "LLMRateLimitError"),
        (f"openai/{model}", "ok"),
    ]
    assert [a.status_code for a in answer.attempts] == [429, 429, None]


def test_a_stream_is_retried_after_429_before_its_first_delta(make_app, local_server, record_property):
    def answer(n: int, model: str) -> Response:
        if n < 2:
            return failure(429, {"Retry-After": "1"})
        return Response(stream_body(), mimetype="text/event-stream")

    upstream = serve(local_server, answer)
    app = openai_app(make_app, local_server.url_for("/v1"), LLM_MAX_RETRIES=2)
    model = unique()

    with app.app_context():
        stream = get_llm().chat_stream(USER, model=f"openai/{model}")
        assert upstream.count(model) == 3  # the retries happened when it was opened
        pieces = list(stream)

    assert pieces == ["Hel", "lo"]
    assert stream.response.content == "Hello"
    gaps = upstream.gaps(model)
    record_property("gaps_s", [round(gap, 3) for gap in gaps])
    assert all(1.0 <= gap < 1.3 for gap in gaps), gaps
    assert [a.outcome for a in stream.response.attempts] == ["LLMRateLimitError", "LLMRateLimitError", "ok"]


def test_async_429_with_retry_after_1_twice_then_200_is_3_attempts_a_second_apart(
    make_app, local_server, record_property
):
    upstream = serve(local_server, rate_limited_twice({"Retry-After": "1"}))
    app = openai_app(make_app, local_server.url_for("/v1"), LLM_MAX_RETRIES=2)
    model = unique()

    async def call() -> Any:
        return await get_llm().achat(USER, model=f"openai/{model}")

    with app.app_context():
        answer = asyncio.run(call())

    assert answer.content == "hi"
    assert upstream.count(model) == 3
    gaps = upstream.gaps(model)
    record_property("gaps_s", [round(gap, 3) for gap in gaps])
    assert all(1.0 <= gap < 1.3 for gap in gaps), gaps
    assert [a.outcome for a in answer.attempts] == ["LLMRateLimitError", "LLMRateLimitError", "ok"]


# --- 2. Retry-After above the cap -----------------------------------------------------------


def test_retry_after_above_the_cap_fails_at_once_with_retry_after(make_app, local_server, record_property):
    def answer(n: int, model: str) -> Response:
        return ok(model) if model.startswith("warm") else failure(429, {"Retry-After": "120"})

    upstream = serve(local_server, answer)
    # A deadline far beyond 120 s: only the cap (60 s) can explain failing at once.
    app = openai_app(
        make_app, local_server.url_for("/v1"), LLM_MAX_RETRIES=2, LLM_RETRY_AFTER_MAX=60, LLM_DEADLINE=600
    )
    chat(app, f"openai/{unique('warm')}")  # the SDK imported, the client built: not measured
    model = unique()
    outcome: dict[str, Any] = {}

    def call() -> None:  # in a daemon thread: a regression that waits 120 s fails the test in 5 s
        outcome["started"] = time.monotonic()
        try:
            chat(app, f"openai/{model}")
        except LLMError as exc:
            outcome["error"] = exc
        outcome["raised"] = time.monotonic()

    caller = threading.Thread(target=call, daemon=True)
    caller.start()
    caller.join(timeout=5)
    assert not caller.is_alive(), "the call is waiting out a Retry-After above LLM_RETRY_AFTER_MAX"

    error = outcome["error"]
    assert isinstance(error, LLMRateLimitError)
    assert error.retry_after == 120
    assert upstream.count(model) == 1
    assert [a.outcome for a in error.attempts] == ["LLMRateLimitError"]
    # From the moment the handler handed its 429 to the server to the error in the caller's hands.
    after_response = outcome["raised"] - upstream.answered[model][0]
    whole_call = outcome["raised"] - outcome["started"]
    record_property("after_response_ms", round(after_response * 1000, 1))
    record_property("whole_call_ms", round(whole_call * 1000, 1))
    assert after_response < 0.1, after_response
    assert whole_call < 0.3, whole_call


# --- 3. No nesting; the breaker cuts a failing upstream ------------------------------------


def always_500(n: int, model: str) -> Response:
    return failure(500)


def test_50_calls_to_an_always_failing_upstream_make_at_most_150_attempts(
    make_app, local_server, record_property
):
    upstream = serve(local_server, always_500)
    settings = {"LLM_MAX_RETRIES": 2, "LLM_BACKOFF_BASE": 0.001, "LLM_BACKOFF_MAX": 0.005}
    # Breaker out of reach: our 2 retries, the SDK's OPENAI_MAX_RETRIES=2 underneath turned off.
    app = openai_app(make_app, local_server.url_for("/v1"), LLM_BREAKER_MIN_CALLS=100_000, **settings)
    model = unique()

    errors = [chat_error(app, f"openai/{model}")]
    assert upstream.count(model) == 3  # checked at once: nested retries would make 9 (and take seconds)
    errors += [chat_error(app, f"openai/{model}") for _ in range(49)]

    record_property("attempts_without_breaker", upstream.count(model))
    assert {type(e) for e in errors} == {LLMServerError}
    assert all(len(e.attempts) == 3 for e in errors)
    assert upstream.count(model) == 150  # 50 x (1 + 2): not 50 x 3 x 3 = 450

    # The same with a breaker: min 10 calls, 50 % failures, 30 s cool-down.
    guarded = openai_app(
        make_app,
        local_server.url_for("/v1"),
        LLM_BREAKER_MIN_CALLS=10,
        LLM_BREAKER_FAILURE_RATE=0.5,
        LLM_BREAKER_COOLDOWN=30,
        **settings,
    )
    model = unique()

    errors = [chat_error(guarded, f"openai/{model}") for _ in range(50)]

    record_property("attempts_with_breaker", upstream.count(model))
    assert upstream.count(model) == 10  # the 10th failed attempt opened it
    open_errors = [e for e in errors if isinstance(e, LLMCircuitOpenError)]
    record_property("circuit_open_errors", len(open_errors))
    assert len(open_errors) == 47  # calls 4..50 (call 4 was refused on its second attempt)
    assert all(25 < e.retry_after <= 30 for e in open_errors)


# --- 4. Open, half-open, reopened ----------------------------------------------------------


def in_threads(app: Flask, calls: int, function: Callable[[], Any], workers: int) -> list[Any]:
    """``function`` ``calls`` times over ``workers`` threads, each in an app context; results or errors.

    The threads start together: each waits for the gate, opened once every call is queued.
    """
    gate = threading.Event()

    def one(_: int) -> Any:
        with app.app_context():
            gate.wait(timeout=10)
            try:
                return function()
            except LLMError as exc:
                return exc

    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(one, i) for i in range(calls)]
        gate.set()
        return [future.result() for future in futures]


def test_an_open_breaker_makes_no_request_then_admits_exactly_its_trial_calls(
    make_app, local_server, record_property
):
    behaviour = {"status": 500, "delay": 0.0}

    def answer(n: int, model: str) -> Response:
        time.sleep(behaviour["delay"])
        return ok(model) if behaviour["status"] == 200 else failure(behaviour["status"])

    upstream = serve(local_server, answer)
    cooldown = 0.5
    app = openai_app(
        make_app,
        local_server.url_for("/v1"),
        LLM_MAX_RETRIES=0,
        LLM_BREAKER_MIN_CALLS=4,
        LLM_BREAKER_FAILURE_RATE=0.5,
        LLM_BREAKER_COOLDOWN=cooldown,
        LLM_BREAKER_HALF_OPEN_CALLS=2,
        LLM_MAX_CONCURRENCY=64,
    )
    model = unique()
    address = f"openai/{model}"

    def call() -> Any:
        return get_llm().chat(USER, model=address)

    for _ in range(4):
        assert isinstance(chat_error(app, address), LLMServerError)
    opened = time.monotonic()
    assert upstream.count(model) == 4

    # Open: 200 concurrent calls, 0 requests.
    burst = in_threads(app, 200, call, workers=32)
    burst_took = time.monotonic() - opened
    record_property("burst_of_200_s", round(burst_took, 3))
    record_property("requests_during_burst", upstream.count(model) - 4)
    assert burst_took < cooldown, f"the burst outlived the cool-down ({burst_took:.2f} s)"
    assert all(isinstance(r, LLMCircuitOpenError) for r in burst), {type(r).__name__ for r in burst}
    assert upstream.count(model) == 4

    # Half-open after the cool-down: of 10 concurrent calls exactly 2 reach the (slow, failing) upstream.
    time.sleep(max(0.0, opened + cooldown + 0.05 - time.monotonic()))
    behaviour.update(status=500, delay=0.2)
    trial = in_threads(app, 10, call, workers=10)
    record_property("failing_trials_admitted", upstream.count(model) - 4)
    assert upstream.count(model) == 6
    assert sum(isinstance(r, LLMServerError) for r in trial) == 2
    assert sum(isinstance(r, LLMCircuitOpenError) for r in trial) == 8

    # A failed trial reopened it: refused again, for a full cool-down.
    reopened = chat_error(app, address)
    assert isinstance(reopened, LLMCircuitOpenError)
    record_property("reopened_retry_after_s", round(reopened.retry_after, 3))
    assert 0.2 < reopened.retry_after <= cooldown
    assert upstream.count(model) == 6

    # Next round: 2 trials again, and both succeeding close it.
    time.sleep(reopened.retry_after + 0.05)
    behaviour.update(status=200, delay=0.2)
    trial = in_threads(app, 10, call, workers=10)
    record_property("succeeding_trials_admitted", upstream.count(model) - 6)
    assert upstream.count(model) == 8
    assert sum(not isinstance(r, LLMError) for r in trial) == 2
    assert sum(isinstance(r, LLMCircuitOpenError) for r in trial) == 8
    behaviour.update(delay=0.0)
    assert chat(app, address).content == "hi"  # closed
    assert upstream.count(model) == 9


# --- 5. One breaker for two processes, through Redis ------------------------------------------


class Driver:
    """A ``python -m tests.resilience_app`` process: one chat call per command, answers on stdout."""

    def __init__(self, env: dict[str, str], log: Any) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.resilience_app"],
            cwd=ROOT,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log,
        )
        self.pid: int | None = None

    def _read(self, timeout: float) -> dict[str, Any]:
        assert self.process.stdout is not None
        ready, _, _ = select.select([self.process.stdout], [], [], timeout)
        if not ready:
            pytest.fail(f"driver {self.process.pid} gave no answer within {timeout} s")
        line = self.process.stdout.readline()
        if not line:
            pytest.fail(f"driver {self.process.pid} exited with {self.process.wait(5)}")
        return dict(json.loads(line))

    def ready(self, timeout: float = 30.0) -> None:
        self.pid = self._read(timeout)["pid"]

    def chat(self, model: str, timeout: float = 15.0) -> dict[str, Any]:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps({"model": model}).encode() + b"\n")
        self.process.stdin.flush()
        return self._read(timeout)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=10)
        for pipe in (self.process.stdin, self.process.stdout):
            if pipe is not None:
                pipe.close()


@contextmanager
def drivers(count: int, env: dict[str, str], log_path: Any) -> Iterator[list[Driver]]:
    with open(log_path, "wb") as log:
        started = [Driver(env, log) for _ in range(count)]
        try:
            for driver in started:
                driver.ready()
            yield started
        finally:
            for driver in started:
                driver.stop()


def failing_models(n: int, model: str) -> Response:
    return failure(500) if model.startswith("fail") else ok(model)


@pytest.mark.slow
def test_two_processes_share_one_breaker_through_redis_and_go_local_without_it(
    tmp_path, local_server, disposable_redis, record_property
):
    upstream = serve(local_server, failing_models)
    env = clean_env(
        tmp_path,
        SECRET_KEY=secrets.token_hex(32),
        REDIS_URL=disposable_redis.url,
        OPENAI_API_KEY=KEY,
        OPENAI_BASE_URL=local_server.url_for("/v1"),
        LLM_MAX_RETRIES="0",
        LLM_BREAKER_MIN_CALLS="4",
        LLM_BREAKER_FAILURE_RATE="0.5",
        LLM_BREAKER_COOLDOWN="30",
    )
    failing, healthy, failing_locally = unique("fail"), unique("ok"), unique("fail")
    with drivers(2, env, tmp_path / "drivers.log") as (one, two):
        assert one.pid != two.pid
        # One process fails 4 times: the breaker opens, in Redis.
        for _ in range(4):
            assert one.chat(f"openai/{failing}")["error"] == "LLMServerError"
        assert upstream.count(failing) == 4

        # The other is refused without a request.
        refused = two.chat(f"openai/{failing}")
        assert refused["error"] == "LLMCircuitOpenError"
        assert 25 < refused["retry_after"] <= 30
        assert upstream.count(failing) == 4

        # Redis stops: both carry on from their local state. The open breaker stays open ...
        disposable_redis.stop()
        for driver in (one, two):
            assert driver.chat(f"openai/{failing}")["error"] == "LLMCircuitOpenError"
        assert upstream.count(failing) == 4
        # ... and successful calls keep being served, without waiting on the dead Redis.
        answers = [driver.chat(f"openai/{healthy}") for _ in range(5) for driver in (one, two)]
        assert all(a["ok"] for a in answers), answers
        record_property("slowest_call_without_redis_s", round(max(a["elapsed"] for a in answers), 3))
        assert max(a["elapsed"] for a in answers) < 1.0, answers
        assert upstream.count(healthy) == 10
        # Local now means local: a breaker one process opens is its own.
        for _ in range(4):
            assert one.chat(f"openai/{failing_locally}")["error"] == "LLMServerError"
        assert one.chat(f"openai/{failing_locally}")["error"] == "LLMCircuitOpenError"
        assert two.chat(f"openai/{failing_locally}")["error"] == "LLMServerError"
        assert upstream.count(failing_locally) == 5


# --- 6. A rate limit across two gunicorn workers ----------------------------------------------


@pytest.mark.slow
def test_a_rate_limit_holds_across_two_gunicorn_workers(
    tmp_path, local_server, redis_server, record_property
):
    def answer(n: int, model: str) -> Response:
        time.sleep(0.02)
        return ok(model)

    upstream = serve(local_server, answer)
    limit = 5
    model = unique()
    env = clean_env(
        tmp_path,
        PORT=str(free_port()),
        SECRET_KEY=secrets.token_hex(32),
        REDIS_URL=redis_server.url,
        OPENAI_API_KEY=KEY,
        OPENAI_BASE_URL=local_server.url_for("/v1"),
        LLM_MAX_RETRIES="0",
        LLM_RATE_LIMITS=json.dumps({f"openai/{model}": {"rpm": limit}}),
        LLM_RATE_LIMIT_MAX_WAIT="0",
    )
    url = f"http://127.0.0.1:{env['PORT']}/api/chat"
    payload = json.dumps({"model": f"openai/{model}", "messages": USER}).encode()
    key = api_key_for_env(env, rpm=0)  # /api's own quota off: this test is about the LLM limit

    def post(_: int) -> tuple[int, int, str | None]:
        import urllib.error
        import urllib.request

        request = urllib.request.Request(url, payload, {"Content-Type": "application/json", **key})
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, int(response.headers["X-Worker-Pid"]), None
        except urllib.error.HTTPError as exc:
            return exc.code, int(exc.headers["X-Worker-Pid"]), exc.headers.get("Retry-After")

    with run_gunicorn(env, "-w", "2", "tests.resilience_app:app", log=tmp_path / "g.log") as server:
        wait_until_listening(server)
        answers: list[tuple[int, int, str | None]] = []
        deadline = time.monotonic() + 30
        # Until each worker has served more than the limit (so limits per process would
        # have let 2 x 5 through), bounded by 40 rounds and 30 s.
        with ThreadPoolExecutor(max_workers=4) as pool:
            for _ in range(40):
                answers += pool.map(post, range(4))
                served = [sum(1 for a in answers if a[1] == pid) for pid in {a[1] for a in answers}]
                if (len(served) == 2 and min(served) > limit) or time.monotonic() > deadline:
                    break
        output = server.output()

    pids = {a[1] for a in answers}
    record_property("requests_per_worker", sorted(sum(1 for a in answers if a[1] == pid) for pid in pids))
    record_property("upstream_requests", upstream.count(model))
    assert len(pids) == 2, f"one worker served all {len(answers)} requests:\n{output}"
    assert all(sum(1 for a in answers if a[1] == pid) > limit for pid in pids)
    assert upstream.count(model) == limit  # at most N in the window (and the N it allows)
    assert sum(1 for a in answers if a[0] == 200) == limit
    refused = [a for a in answers if a[0] != 200]
    assert {a[0] for a in refused} == {429}
    assert all(a[2] is not None and 0 < int(a[2]) <= 60 for a in refused)


# --- 7. A hung upstream ------------------------------------------------------------------------


@pytest.fixture
def upstream_proxy(local_server) -> Iterator[FaultProxy]:
    with FaultProxy(("127.0.0.1", local_server.port)) as proxy:
        yield proxy


def test_a_hung_upstream_costs_each_attempt_its_timeout_and_the_call_its_deadline(
    make_app, local_server, upstream_proxy, record_property
):
    serve(local_server, lambda n, model: ok(model))
    base_url = upstream_proxy.url_for("http", "/v1")
    # OPENAI_TIMEOUT=2: were the attempt timeout not applied, each attempt would hang 2 s, not 0.3 s.
    settings = {"LLM_ATTEMPT_TIMEOUT": 0.3, "LLM_MAX_RETRIES": 2, "LLM_BACKOFF_BASE": 0, "OPENAI_TIMEOUT": 2}
    app = openai_app(make_app, base_url, **settings)
    bounded = openai_app(make_app, base_url, LLM_DEADLINE=0.7, **settings)
    for warm in (app, bounded):
        chat(warm, f"openai/{unique('warm')}")  # clients built, connections made: not measured
    upstream_proxy.blackhole()

    started = time.monotonic()
    error = chat_error(app, f"openai/{unique()}")
    took = time.monotonic() - started

    assert isinstance(error, LLMTimeoutError)
    latencies = [a.latency_ms / 1000 for a in error.attempts]
    record_property("attempt_latencies_s", [round(latency, 3) for latency in latencies])
    record_property("call_s", round(took, 3))
    assert [a.outcome for a in error.attempts] == ["LLMTimeoutError"] * 3
    # Each attempt ends at its timeout: 0.3 s + 10 % = 0.33 s, plus 30 ms for building the
    # request and being scheduled on a busy 2-core machine.
    assert all(0.3 <= latency <= 0.33 + 0.03 for latency in latencies), latencies
    assert took < 3 * 0.36 + 0.1, took

    started = time.monotonic()
    error = chat_error(bounded, f"openai/{unique()}")
    took = time.monotonic() - started

    assert isinstance(error, LLMTimeoutError)
    latencies = [a.latency_ms / 1000 for a in error.attempts]
    record_property("deadline_attempt_latencies_s", [round(latency, 3) for latency in latencies])
    record_property("deadline_call_s", round(took, 3))
    assert all(latency <= 0.36 for latency in latencies), latencies
    # The deadline (0.7 s) cut the third attempt short: the call ends by it (+ 10 %, + 30 ms).
    assert len(latencies) == 3 and latencies[-1] < 0.2, latencies
    assert 0.7 <= took <= 0.7 * 1.1 + 0.03, took


# --- 8. A reset mid-stream ---------------------------------------------------------------------


def raw_response(port: int, path: str) -> bytes:
    """The bytes a plain HTTP/1.1 POST to ``path`` gets back, read to the end."""
    body = json.dumps({"model": "probe", "messages": USER, "stream": True}).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(head + body)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    return received


def test_a_reset_after_the_first_delta_is_a_typed_error_with_no_retry(
    make_app, local_server, upstream_proxy, record_property
):
    upstream = serve(local_server, lambda n, model: Response(stream_body(), mimetype="text/event-stream"))
    # n = every byte up to the end of the first SSE event (headers and chunk framing included).
    raw = raw_response(upstream_proxy.port, CHAT_PATH)
    n = raw.index(FIRST_EVENT) + len(FIRST_EVENT) + len(b"\r\n")
    assert raw.index(REST_OF_STREAM) > n  # the cut falls between the two events
    record_property("reset_after_bytes", n)
    app = openai_app(make_app, upstream_proxy.url_for("http", "/v1"), LLM_MAX_RETRIES=2)
    model = unique()
    upstream_proxy.reset_after(n)
    before = upstream_proxy.connections

    received: list[str] = []
    with app.app_context():
        stream = get_llm().chat_stream(USER, model=f"openai/{model}")
        with pytest.raises(LLMError) as excinfo:
            for piece in stream:
                received.append(piece)

    assert isinstance(excinfo.value, LLMConnectionError)
    assert received == ["Hel"]
    assert upstream.count(model) == 1
    assert upstream_proxy.connections - before == 1  # no second attempt, not even a connection
    assert [a.outcome for a in stream.attempts] == ["ok"]  # the one attempt, opened fine
    with pytest.raises(RuntimeError, match="read to the end"):
        _ = stream.response  # the partial "Hel" is not a complete response


# --- 9. Fallbacks ------------------------------------------------------------------------------


def test_a_fallback_answers_for_a_failing_or_open_primary_and_attempts_show_the_path(make_app, local_server):
    def primary(n: int, model: str) -> Response:
        if model.startswith("ctx"):
            return failure(400, code="context_length_exceeded")
        if model.startswith("bad"):
            return failure(400, code="invalid_value")
        return failure(500)

    primary_upstream = serve(local_server, primary)
    backup_upstream = serve(
        local_server, lambda n, model: ok(model, "from backup"), "/backup/v1/chat/completions"
    )
    failing, opened, too_long, bad = unique("fail"), unique("open"), unique("ctx"), unique("bad")
    backup = f"backup/{unique('big')}"
    app = openai_app(
        make_app,
        local_server.url_for("/v1"),
        OPENAI_PROFILES={"backup": {"base_url": local_server.url_for("/backup/v1"), "api_key": KEY}},
        LLM_FALLBACKS={f"openai/{m}": [backup] for m in (failing, opened, too_long, bad)},
        LLM_MAX_RETRIES=1,
        LLM_BACKOFF_BASE=0.001,
        LLM_POLICY={f"openai/{opened}": {"breaker_min_calls": 2, "max_retries": 0}},
    )

    # Primary failing: its retries, then the fallback.
    answer = chat(app, f"openai/{failing}")
    assert (answer.provider, answer.model, answer.content) == ("backup", backup.split("/")[1], "from backup")
    assert outcomes(answer.attempts) == [
        (f"openai/{failing}", "LLMServerError"),
        (f"openai/{failing}", "LLMServerError"),
        (backup, "ok"),
    ]
    assert primary_upstream.count(failing) == 2

    # Primary's breaker open: straight to the fallback, no request to the primary.
    for _ in range(2):
        assert isinstance(chat_error(app, f"openai/{opened}", fallbacks=[]), LLMServerError)
    assert primary_upstream.count(opened) == 2
    answer = chat(app, f"openai/{opened}")
    assert answer.provider == "backup"
    assert outcomes(answer.attempts) == [(f"openai/{opened}", "LLMCircuitOpenError"), (backup, "ok")]
    assert primary_upstream.count(opened) == 2

    # Context too long: to the fallback at once (no retry: a 400 is not retried).
    answer = chat(app, f"openai/{too_long}")
    assert answer.provider == "backup"
    assert outcomes(answer.attempts) == [(f"openai/{too_long}", "LLMContextLengthError"), (backup, "ok")]

    # A plain 400: the caller's mistake, the fallback would fail alike: no fallback.
    served_by_backup = backup_upstream.count(backup.split("/")[1])
    error = chat_error(app, f"openai/{bad}")
    assert type(error) is LLMBadRequestError
    assert not isinstance(error, LLMContextLengthError)
    assert outcomes(error.attempts) == [(f"openai/{bad}", "LLMBadRequestError")]
    assert primary_upstream.count(bad) == 1
    assert backup_upstream.count(backup.split("/")[1]) == served_by_backup == 3


def test_fallbacks_given_per_call_follow_the_chain_in_order(make_app, local_server):
    upstream = serve(local_server, failing_models)
    app = openai_app(make_app, local_server.url_for("/v1"), LLM_MAX_RETRIES=0)
    first, second, third = unique("fail"), unique("fail"), unique("ok")

    answer = chat(
        app, f"openai/{first}", fallbacks=[f"openai/{second}", f"openai/{third}", f"openai/{first}"]
    )

    assert (answer.provider, answer.model) == ("openai", third)
    assert outcomes(answer.attempts) == [
        (f"openai/{first}", "LLMServerError"),
        (f"openai/{second}", "LLMServerError"),
        (f"openai/{third}", "ok"),
    ]
    assert [upstream.count(m) for m in (first, second, third)] == [1, 1, 1]  # each model at most once


# --- 10. Redis killed while serving ---------------------------------------------------------


@pytest.mark.slow
def test_redis_killed_while_serving_every_call_succeeds_and_shared_state_resumes(
    make_app, local_server, disposable_redis, record_property, caplog
):
    caplog.set_level(logging.WARNING, logger="app.llm.resilience")
    upstream = serve(local_server, lambda n, model: ok(model))
    served, watched = unique(), unique()
    app = openai_app(
        make_app,
        local_server.url_for("/v1"),
        REDIS_URL=disposable_redis.url,
        LLM_MAX_RETRIES=0,
        LLM_BREAKER_MIN_CALLS=4,
        LLM_RATE_LIMITS={f"openai/{served}": {"rpm": 100_000}},
    )
    chat(app, f"openai/{served}")
    guards = app.extensions["llm"].guards
    assert guards.limiter.using_redis

    results: list[tuple[float, bool, float]] = []
    stop = threading.Event()

    def serve_calls() -> None:
        with app.app_context():
            while not stop.is_set():
                started = time.monotonic()
                try:
                    get_llm().chat(USER, model=f"openai/{served}")
                except LLMError:
                    results.append((started, False, time.monotonic() - started))
                else:
                    results.append((started, True, time.monotonic() - started))
                time.sleep(0.01)

    caller = threading.Thread(target=serve_calls)
    caller.start()
    try:
        time.sleep(0.3)
        assert disposable_redis.process is not None
        disposable_redis.process.kill()  # SIGKILL: no goodbye to the clients
        disposable_redis.process.wait(timeout=5)
        killed = time.monotonic()
        time.sleep(1.5)
        disposable_redis.start()  # the same port, empty
        restarted = time.monotonic()
        time.sleep(0.3)
    finally:
        stop.set()
        caller.join(timeout=10)

    during = [r for r in results if killed <= r[0] < restarted]
    record_property("calls_total", len(results))
    record_property("calls_while_redis_was_down", len(during))
    record_property("slowest_call_while_down_s", round(max(latency for _, _, latency in during), 3))
    assert len(during) >= 20, len(during)
    assert all(ok for _, ok, _ in results), [r for r in results if not r[1]]
    assert max(latency for _, _, latency in during) < 0.5, max(latency for _, _, latency in during)
    assert upstream.count(served) == len(results) + 1
    # Said once, not once per call nor once per user: breakers and rate limits share one Redis gate.
    down = [r.getMessage() for r in caplog.records if "Redis is unavailable" in r.getMessage()]
    assert len(down) == 1, caplog.text
    assert "circuit breakers and rate limits" in down[0]
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"

    # Shared state resumes: a breaker opened by another instance, through the restarted Redis, is seen.
    client = redis.Redis.from_url(disposable_redis.url, socket_timeout=2)
    other = CircuitBreakers(lambda: client)
    policy = BreakerPolicy(min_calls=4)
    for _ in range(4):
        other.record(f"openai/{watched}", policy, "failure")
    assert other.state(f"openai/{watched}", policy).state == "open"
    seen_open = None
    for _ in range(100):
        try:
            chat(app, f"openai/{watched}")
        except LLMCircuitOpenError:
            seen_open = time.monotonic()
            break
        time.sleep(0.02)
    assert seen_open is not None, "the app never saw the breaker opened in Redis"
    record_property("breaker_shared_again_after_s", round(seen_open - restarted, 3))
    assert seen_open - restarted <= 1.0, seen_open - restarted
    # The rate limits are counted in Redis again too: the limiter retries it every 1.0 s, so
    # within 1 s of Redis answering, plus the spacing of the calls that find out.
    shared_again = None
    for _ in range(100):
        chat(app, f"openai/{served}")
        if sum(int(client.llen(key)) for key in client.keys(f"LIMITS:llm:rate:rpm/openai/{served}/*")):
            shared_again = time.monotonic()
            break
        time.sleep(0.02)
    client.close()
    assert shared_again is not None, "the rate limits never went back to Redis"
    record_property("rate_limits_shared_again_after_s", round(shared_again - restarted, 3))
    assert shared_again - restarted <= 1.1, shared_again - restarted


# --- 11. PostgreSQL stopped ------------------------------------------------------------------


@pytest.mark.postgres
def test_postgresql_down_makes_readyz_503_within_3_s_and_livez_200_then_recovers(
    make_app, postgres_server, record_property
):
    with FaultProxy(("127.0.0.1", postgres_server.port)) as proxy:
        # The defaults: HEALTH_CHECK_TIMEOUT 2 s, DATABASE_CONNECT_TIMEOUT 5 s.
        app = make_app(DATABASE_URL=proxy.rewrite_url(postgres_server.url))
        client = app.test_client()
        assert client.get("/readyz").status_code == 200

        # Stopped: its connections cut, new ones refused.
        proxy.refuse()
        proxy.drop_connections()
        started = time.monotonic()
        response = client.get("/readyz")
        took = time.monotonic() - started
        record_property("readyz_refused_s", round(took, 3))
        assert response.status_code == 503
        assert response.json["checks"]["database:responseTime"][0]["status"] == "fail"
        assert took < 3.0, took
        assert client.get("/livez").status_code == 200

        # Hung: every byte swallowed, and the client would wait 5 s to connect; the check gives up at 2 s.
        proxy.blackhole()
        started = time.monotonic()
        response = client.get("/readyz")
        took = time.monotonic() - started
        record_property("readyz_hung_s", round(took, 3))
        assert response.status_code == 503
        assert response.json["checks"]["database:responseTime"][0]["output"] == "no answer within 2 s"
        assert took < 3.0, took
        started = time.monotonic()
        assert client.get("/livez").status_code == 200
        record_property("livez_hung_s", round(time.monotonic() - started, 3))
        assert time.monotonic() - started < 0.5

        # Back: the very next request succeeds.
        proxy.pass_through()
        response = client.get("/readyz")
        assert response.status_code == 200, response.json
        assert response.json["checks"]["database:responseTime"][0]["status"] == "pass"
