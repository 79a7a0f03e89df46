"""A call with its own key (``api_key=``) against the same call with the platform's key.

Same local server and harness as :mod:`bench.llm_overhead`: calls alternate
one by one over 15 rounds, the figure is the ratio of the medians, reported
as the median over 3 fresh processes with their range. Three figures:

- a known key (its client copy already made) vs the platform's key: what a
  per-call key costs on every call (validation, the copy's lookup by hash, the
  masking of each step); target under 1.05x;
- ``run()`` of one round (the model answers at once) vs ``chat()``: what the
  tool loop adds around a call; no target;
- a new key's first call: the ``with_options`` copy made for it, in µs over a
  call with a known key; no target (made once per key, kept while in use).
"""

from __future__ import annotations

import statistics
import sys
from functools import partial
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.llm_overhead import CALLS, MESSAGES, MODEL, _interleaved, _timed, start_server  # noqa: E402
from bench.processes import SMOKE, in_processes, is_worker, ratio_text, report, spread  # noqa: E402

NEW_KEYS = 3 if SMOKE else 300


def weather(city: str) -> str:
    """A tool the model never calls here."""
    return city


def measure() -> dict[str, Any]:
    from app.llm import get_llm
    from bench.apps import bench_app

    server = start_server()
    base_url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    app = bench_app(OPENAI_API_KEY="sk-bench-platform", OPENAI_BASE_URL=base_url, LLM_CALL_LOG=False)
    model = f"openai/{MODEL}"
    tenant = "sk-bench-tenant-0123456789abcdef"

    def platform() -> object:
        return get_llm().chat(MESSAGES, model=model)

    def keyed() -> object:
        return get_llm().chat(MESSAGES, model=model, api_key=tenant)

    def run() -> object:
        return get_llm().run(MESSAGES, model=model, tools=[weather])

    try:
        with app.app_context():
            for _ in range(20):  # warm both paths: imports, clients, the tenant's copy
                platform(), keyed(), run()
            platform_calls, keyed_calls = _interleaved(lambda: _timed(platform), lambda: _timed(keyed), CALLS)
            chat_calls, run_calls = _interleaved(lambda: _timed(platform), lambda: _timed(run), CALLS // 2)
            fresh, known = [], []
            for number in range(NEW_KEYS):  # each new key's first call, beside a known key's call
                key = f"sk-bench-new-{number:06d}-0123456789"
                new_key = partial(get_llm().chat, MESSAGES, model=model, api_key=key)
                fresh.append(_timed(new_key))
                known.append(_timed(keyed))
    finally:
        server.shutdown()
        server.server_close()
    plain, own = statistics.median(platform_calls), statistics.median(keyed_calls)
    chat, loop = statistics.median(chat_calls), statistics.median(run_calls)
    return {
        "platform_ms": plain * 1000,
        "keyed_ms": own * 1000,
        "keyed_ratio": own / plain,
        "run_ratio": loop / chat,
        "run_us": (loop - chat) * 1e6,
        "new_key_us": (statistics.median(fresh) - statistics.median(known)) * 1e6,
    }


def main() -> None:
    if is_worker():
        report(measure())
        return
    results = in_processes("bench.byok_overhead")
    keyed_ms, platform_ms = spread(results, "keyed_ms")[0], spread(results, "platform_ms")[0]
    print(
        f"chat() with a known per-call key: {keyed_ms:.3f} ms/call, with the platform's key:"
        f" {platform_ms:.3f} ms/call, ratio {ratio_text(results, 'keyed_ratio')} (target < 1.05x)"
    )
    run_us, low, high = spread(results, "run_us")
    print(
        f"run() of one round vs chat(): ratio {ratio_text(results, 'run_ratio')},"
        f" {run_us:.0f} µs ({low:.0f}-{high:.0f}) more per call (no target)"
    )
    new_us, low, high = spread(results, "new_key_us")
    print(f"a new key's first call: {new_us:.0f} µs ({low:.0f}-{high:.0f}) more: its client copy (no target)")


if __name__ == "__main__":
    main()
