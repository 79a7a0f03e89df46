"""The cost of the resilience policy: on a healthy call, and for a call an open breaker rejects.

(a) ``get_llm().chat(...)`` (the call pipeline: hooks, with the call log hook
that ships on (the usage ledger, on by default, is off here: its cost is
:mod:`bench.usage_overhead`'s figure), the fallback chain, and the policy: rate limit -> deadline ->
retry -> breaker -> bulkhead -> attempt, plus the attempts record) against the
same layer with all that off: ``llm._request(...)``, then
``provider.chat(request)`` on the provider adapter and the latency stamped on
the response, i.e. the same validation, translation, SDK call and response
without the pipeline. Both hit the local
OpenAI-protocol server of :mod:`bench.llm_overhead`, alternating call by call
over 15 rounds; a process's figure is the ratio of the medians of the rounds'
median per-call times, and the figure reported is the median over 3 fresh
processes (:mod:`bench.processes`), with their range (target: under 1.05x).
It is measured with breakers in this process (no ``REDIS_URL``) and with
breakers in Redis (a private ``redis-server`` the bench starts, when one is on
PATH): there a busy closed breaker asks Redis about twice per
``sync_interval`` (0.1 s) rather than twice per call (see
:mod:`app.llm.resilience.breaker`).

(b) A call rejected by an open breaker: the breaker of the model is opened by
recording failures, then ``get_llm().chat(...)`` is timed until it raises
``LLMCircuitOpenError`` (no request is made, and an open breaker is
remembered until its cool-down ends, so Redis is not asked either); the
figure is the median in µs.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.apps import bench_app  # noqa: E402
from bench.llm_overhead import MESSAGES, MODEL, _interleaved, _timed, start_server  # noqa: E402
from bench.processes import SMOKE, in_processes, is_worker, ratio_text, report, spread  # noqa: E402

CALLS = 4 if SMOKE else 200
REJECTED_CALLS = 110 if SMOKE else 3000
ADDRESS = f"openai/{MODEL}"


@contextlib.contextmanager
def private_redis() -> Iterator[str | None]:
    """A throwaway redis-server on a free port (its URL), or None when redis-server is not on PATH."""
    binary = shutil.which("redis-server")
    if binary is None:
        yield None
        return
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    workdir = tempfile.mkdtemp(prefix="bench-redis-")
    args = ["--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", workdir]
    process = subprocess.Popen(
        [binary, *args, "--daemonize", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise RuntimeError(f"redis-server did not start on port {port}") from None
                time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.terminate()
        process.wait(timeout=10)
        shutil.rmtree(workdir, ignore_errors=True)


def _app(base_url: str, redis_url: str | None) -> Any:
    # The usage ledger, on by default, is a hook too: its cost is the usage bench's row, not this one's.
    config: dict[str, Any] = {
        "OPENAI_API_KEY": "sk-bench",
        "OPENAI_BASE_URL": base_url,
        "OPENAI_MAX_RETRIES": 0,
        "LLM_USAGE_LEDGER": False,
    }
    if redis_url is not None:
        config["REDIS_URL"] = redis_url
    return bench_app(**config)


def _backend(app: Any, key: str) -> str:
    """Where the breaker of ``key`` lives now ("redis" or "local"): a bench on a fallen-back Redis is void."""
    states = {state.key: state for state in app.extensions["llm"].guards.breakers.states()}
    return states[key].backend if key in states else "none"


def healthy(app: Any, expected_backend: str) -> dict[str, float]:
    """(a): the policy on a healthy call, against the layer with the policy off."""
    from app.llm import get_llm

    def with_policy() -> object:
        return get_llm().chat(MESSAGES, model=ADDRESS)

    def policy_off() -> object:
        started = time.perf_counter()
        llm = get_llm()
        provider, request = llm._request(MESSAGES, ADDRESS, {})
        response = provider.chat(request)
        response.latency_ms = (time.perf_counter() - started) * 1000  # the layer's own last step
        return response

    with app.app_context():
        assert get_llm().chat(MESSAGES, model=ADDRESS).content == "Hello!"
        for _ in range(50):  # warm both paths: imports, clients, pools, Redis scripts
            with_policy(), policy_off()
        backend = _backend(app, ADDRESS)
        if backend != expected_backend:
            raise SystemExit(f"the breaker of {ADDRESS} is {backend}, expected {expected_backend}")
        off_rounds, on_rounds = _interleaved(lambda: _timed(policy_off), lambda: _timed(with_policy), CALLS)
    off, on = statistics.median(off_rounds), statistics.median(on_rounds)
    return {"off_ms": off * 1000, "on_ms": on * 1000, "ratio": on / off}


def rejected(app: Any, expected_backend: str) -> float:
    """(b): median µs of a call an open breaker rejects."""
    from app.llm import LLMCircuitOpenError, get_llm

    model = "gpt-4o-open"
    key = f"openai/{model}"
    with app.app_context():
        guards = get_llm().guards
        policy = guards.settings.policy("openai", model).breaker
        for _ in range(policy.min_calls):
            guards.breakers.record(key, policy, "failure")
        backend = _backend(app, key)
        if backend != expected_backend:
            raise SystemExit(f"the breaker of {key} is {backend}, expected {expected_backend}")
        times = []
        for _ in range(REJECTED_CALLS):
            started = time.perf_counter()
            try:
                get_llm().chat(MESSAGES, model=key)
            except LLMCircuitOpenError:
                times.append(time.perf_counter() - started)
            else:
                raise SystemExit(f"the breaker of {key} let a call through")
    return statistics.median(times[100:]) * 1e6  # the first ones warm the path


def redis_round_trip(app: Any) -> float:
    """Median µs of a PING on the app's Redis client: what a breaker script waits for when it runs."""
    from app.services.redis_service import get_redis_client

    with app.app_context():
        client = get_redis_client()
        times = []
        for _ in range(REJECTED_CALLS):
            started = time.perf_counter()
            client.ping()
            times.append(time.perf_counter() - started)
    return statistics.median(times[100:]) * 1e6


def measure() -> dict[str, Any]:
    server = start_server()
    base_url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    result: dict[str, Any] = {}
    try:
        from app.services import reset_services

        app = _app(base_url, None)
        try:
            result["local"] = healthy(app, "local")
            result["local_rejected_us"] = rejected(app, "local")
        finally:
            reset_services(app)
        with private_redis() as redis_url:
            result["redis_available"] = redis_url is not None
            if redis_url is not None:
                app = _app(base_url, redis_url)
                try:
                    result["redis"] = healthy(app, "redis")
                    result["redis_rejected_us"] = rejected(app, "redis")
                    result["redis_ping_us"] = redis_round_trip(app)
                finally:
                    reset_services(app)
    finally:
        server.shutdown()
        server.server_close()
    return result


def main() -> None:
    if is_worker():
        import logging

        # Neither "REDIS_URL is not set" nor "circuit breaker ... opened" in the figures.
        logging.getLogger("app.llm.resilience").setLevel(logging.ERROR)
        logging.getLogger("app.connectors.redis_gate").setLevel(logging.ERROR)
        report(measure())
        return
    results = in_processes("bench.resilience_overhead")

    def ms(*path: str) -> float:
        return spread(results, *path)[0]

    print(
        f"policy on a healthy chat() (local breakers): {ms('local', 'on_ms'):.3f} ms/call, "
        f"policy off: {ms('local', 'off_ms'):.3f} ms/call, ratio {ratio_text(results, 'local', 'ratio')}"
        " (target < 1.05x)"
    )
    if all(result["redis_available"] for result in results):
        print(
            f"policy on a healthy chat() (Redis breakers): {ms('redis', 'on_ms'):.3f} ms/call, "
            f"policy off: {ms('redis', 'off_ms'):.3f} ms/call, ratio {ratio_text(results, 'redis', 'ratio')}"
            " (target < 1.05x)"
        )
        print(
            f"chat() rejected by an open breaker: {ms('local_rejected_us'):.1f} µs local, "
            f"{ms('redis_rejected_us'):.1f} µs Redis (median of {REJECTED_CALLS - 100} calls)"
        )
        print(
            f"Redis PING round trip on this machine: {ms('redis_ping_us'):.1f} µs"
            " (a busy closed breaker asks Redis about twice per 0.1 s;"
            " an open one not until its cool-down ends)"
        )
    else:
        print("policy with Redis breakers: not measured (redis-server is not on PATH)")
        print(
            f"chat() rejected by an open breaker: {ms('local_rejected_us'):.1f} µs local "
            f"(median of {REJECTED_CALLS - 100} calls); Redis not measured"
        )


if __name__ == "__main__":
    main()
