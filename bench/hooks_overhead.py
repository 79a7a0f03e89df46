"""The cost of hooks: ``get_llm().chat(...)`` with three no-op hooks against the same app without them.

Both sides are one app (the call log hook that ships on is there on both)
talking to the local OpenAI-protocol server of :mod:`bench.llm_overhead`;
the hooked side has three more hooks that override every method and do
nothing, so each call pays for three ``before_call`` and three
``after_call`` steps. Calls alternate one by one over 15 rounds; a
process's figure is the ratio of the medians of the rounds' median per-call
times, and the figure reported is the median over 3 fresh processes
(:mod:`bench.processes`), with their range. Target: at most 1.02x.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.apps import bench_app
from bench.llm_overhead import CALLS, MESSAGES, MODEL, _interleaved, _timed, start_server
from bench.processes import in_processes, is_worker, ratio_text, report, spread

HOOKS = 3


def _app(base_url: str) -> Any:
    return bench_app(OPENAI_API_KEY="sk-bench", OPENAI_BASE_URL=base_url)


def measure() -> dict[str, Any]:
    from app.llm import get_llm
    from app.llm.hooks import LLMHook

    class NoOp(LLMHook):
        def before_call(self, call: Any) -> None:
            return None

        def after_call(self, call: Any, response: Any) -> None:
            pass

        def on_error(self, call: Any, error: Any) -> None:
            pass

        def on_cancel(self, call: Any, partial: Any) -> None:
            pass

    server = start_server()
    base_url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    plain, hooked = _app(base_url), _app(base_url)
    with hooked.app_context():
        for _ in range(HOOKS):
            get_llm().add_hook(NoOp())
    model = f"openai/{MODEL}"

    def call(app: Any) -> object:
        with app.app_context():
            return get_llm().chat(MESSAGES, model=model)

    try:
        for _ in range(50):  # warm both: imports, clients, pools
            call(plain), call(hooked)
        plain_rounds, hooked_rounds = _interleaved(
            lambda: _timed(lambda: call(plain)), lambda: _timed(lambda: call(hooked)), CALLS
        )
    finally:
        server.shutdown()
        server.server_close()
    off, on = statistics.median(plain_rounds), statistics.median(hooked_rounds)
    return {"off_ms": off * 1000, "on_ms": on * 1000, "ratio": on / off}


def main() -> None:
    if is_worker():
        report(measure())
        return
    results = in_processes("bench.hooks_overhead")
    on, off = spread(results, "on_ms")[0], spread(results, "off_ms")[0]
    print(
        f"chat() with {HOOKS} no-op hooks: {on:.3f} ms/call, without: {off:.3f} ms/call,"
        f" ratio {ratio_text(results, 'ratio')} (target <= 1.02x)"
    )


if __name__ == "__main__":
    main()
