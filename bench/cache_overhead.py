"""The response cache: what a hit costs, against the call it saves and against a raw Redis read.

One process holds four apps, on a local OpenAI-protocol server (the one of
:mod:`bench.llm_overhead`, the fastest local upstream there is: a fixed body
from a keep-alive ``http.server``; here in a process of its own, so that its
thread never competes for this one's GIL while a hit is timed) and a private
``redis-server``: no cache, ``LLM_CACHE=memory``, ``disk`` and ``redis``. Each
figure pairs two sides, each timed over a block of calls per round (which
goes first alternates) over 15 rounds; a process's figure is the ratio of
the medians of the rounds' median times,
and the figure reported is the median over 3 fresh processes
(:mod:`bench.processes`), with their range.

* **A hit** is the cache hook's ``before_call`` on a stored answer: all the
  work the cache does for a hit (the key: the canonical request form and its
  SHA-256; the back end's read; the entry decoded into a ``ChatResponse``;
  the counts). Target: a memory hit at least 50x faster than a call to the
  local upstream (``get_llm().chat()`` without a cache). A disk hit is
  reported.
* **A whole Redis hit** (the hook's ``before_call``: key, gate, ``GET``, the
  entry decoded into a ``ChatResponse``, counts) against a raw ``GET`` of the
  same entry plus ``json.loads`` on a plain redis-py client. Target: at most
  1.3x. The read alone (the gate, its fail-fast client, the decoding; no key)
  against the same raw read is reported beside it.
* **A whole call answered by a hit** (``get_llm().chat()`` with the cache on)
  is reported too: it adds to the hit what every call pays before and after
  any hook (validation, the request, the pipeline, the other hooks).
"""

from __future__ import annotations

import gc
import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.apps import bench_app
from bench.llm_overhead import CALLS, MESSAGES, MODEL, ROUNDS, _timed
from bench.processes import in_processes, is_worker, ratio_text, report, spread

ROOT = Path(__file__).resolve().parent.parent
ADDRESS = f"openai/{MODEL}"


def _app(base_url: str, **settings: Any) -> Any:
    return bench_app(OPENAI_API_KEY="sk-bench", OPENAI_BASE_URL=base_url, **settings)


def _pair(first: Any, second: Any, calls: int = CALLS) -> tuple[float, float]:
    """Medians over the rounds of each side's median time per call, in microseconds.

    Within a round each side runs a block of ``calls`` calls (which goes first swaps
    every round), rather than alternating call by call as :mod:`bench.llm_overhead`
    does: a hit timed right after a 1.3 ms call, or a 1.3 ms sleep, takes two to three
    times as long as in a run of hits (the CPU's caches and clock, cold after the
    wait), and a server that answers hits answers them one after another.
    """
    rounds: tuple[list[float], list[float]] = ([], [])
    for index in range(ROUNDS):
        gc.collect()
        order = (0, 1) if index % 2 == 0 else (1, 0)
        for side in order:
            function = (first, second)[side]
            rounds[side].append(statistics.median([_timed(function) for _ in range(calls)]))
    return statistics.median(rounds[0]) * 1e6, statistics.median(rounds[1]) * 1e6


def _upstream() -> tuple[subprocess.Popen[str], str]:
    """The local upstream in a process of its own; its base URL."""
    code = (
        "import http.server, sys\n"
        "from bench.llm_overhead import _Handler\n"
        "server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), _Handler)\n"
        "server.daemon_threads = True\n"
        "print(server.server_address[1], flush=True)\n"
        "server.serve_forever()\n"
    )
    process = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    return process, f"http://127.0.0.1:{int(process.stdout.readline())}/v1"


def measure() -> dict[str, Any]:
    import redis

    from app.llm import get_llm
    from app.llm.cache import current_cache
    from app.llm.cache.codec import decode
    from app.llm.cache.redis_store import PREFIX
    from app.llm.hooks import LLMCall
    from app.testing.servers import start_redis

    upstream, base_url = _upstream()
    redis_server = start_redis()
    plain = _app(base_url)
    cached = {
        "memory": _app(base_url, LLM_CACHE="memory"),
        "disk": _app(base_url, LLM_CACHE="disk"),
        "redis": _app(base_url, LLM_CACHE="redis", REDIS_URL=redis_server.url),
    }
    raw = redis.Redis.from_url(redis_server.url)
    figures: dict[str, Any] = {}

    def call(app: Any) -> Any:
        with app.app_context():
            return get_llm().chat(MESSAGES, model=ADDRESS)

    try:
        for _ in range(50):  # warm: imports, clients, pools; and store the answer in each cache
            call(plain)
            for app in cached.values():
                call(app)
        for backend, app in cached.items():
            with app.app_context():
                cache: Any = current_cache()
                request = get_llm()._request(MESSAGES, ADDRESS, {})[1]
                name = cache.name_of(LLMCall("chat", "openai", MODEL, request))

                def hit(cache: Any = cache, request: Any = request) -> Any:
                    answer = cache.before_call(LLMCall("chat", "openai", MODEL, request))
                    assert answer is not None and answer.cached
                    return answer

                call_us, hit_us = _pair(lambda: call(plain), hit)
                upstream_us, whole_us = _pair(lambda: call(plain), lambda app=app: call(app))
                figures[backend] = {
                    "call_us": call_us,
                    "hit_us": hit_us,
                    "faster": call_us / hit_us,
                    "whole_call_us": whole_us,
                    "whole_faster": upstream_us / whole_us,
                }
                if backend == "redis":
                    entry, store = PREFIX + name, cache.store
                    assert raw.get(entry) is not None

                    def read(store: Any = store, name: str = name, request: Any = request) -> Any:
                        return decode("chat", store.get(name), request)

                    raw_us, read_us = _pair(lambda: json.loads(raw.get(entry)), read)  # noqa: B023
                    raw_again_us, hit_again_us = _pair(lambda: json.loads(raw.get(entry)), hit)  # noqa: B023
                    figures["redis_raw"] = {
                        "raw_us": raw_us,
                        "read_us": read_us,
                        "ratio": read_us / raw_us,
                        "hit_us": hit_again_us,
                        "hit_ratio": hit_again_us / raw_again_us,
                    }
    finally:
        raw.close()
        redis_server.stop()
        upstream.terminate()
        upstream.wait(timeout=10)
    return figures


def main() -> None:
    if is_worker():
        report(measure())
        return
    results = in_processes("bench.cache_overhead")
    call_us = spread(results, "memory", "call_us")[0]
    for backend in ("memory", "disk", "redis"):
        hit_us = spread(results, backend, "hit_us")[0]
        whole = spread(results, backend, "whole_call_us")[0]
        target = " (target >= 50x)" if backend == "memory" else ""
        print(
            f"{backend} hit: {hit_us:.1f} us, {ratio_text(results, backend, 'faster')} faster than a call to"
            f" the local upstream ({call_us:.0f} us){target}; the whole call answered by it: {whole:.1f} us,"
            f" {ratio_text(results, backend, 'whole_faster')} faster"
        )
    raw_us = spread(results, "redis_raw", "raw_us")[0]
    read_us = spread(results, "redis_raw", "read_us")[0]
    hit_us = spread(results, "redis_raw", "hit_us")[0]
    print(
        f"the whole redis hit (key, gate, GET, entry decoded, counts) vs a raw GET + json.loads of the"
        f" same entry ({hit_us:.1f} us vs {raw_us:.1f} us): {ratio_text(results, 'redis_raw', 'hit_ratio')}"
        f" (target <= 1.3x); its read alone (gate, GET, entry decoded; {read_us:.1f} us):"
        f" {ratio_text(results, 'redis_raw', 'ratio')}"
    )


if __name__ == "__main__":
    main()
