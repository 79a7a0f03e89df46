"""Run a measurement in several fresh interpreters and summarise each figure.

Why: a process's timings depend on its memory layout and hash seed (address
space randomisation, ``PYTHONHASHSEED``), which stay fixed for its whole life,
so one process can sit a few per cent off for reasons that interleaving the
two sides call by call cannot cancel. pyperf runs every benchmark in several
processes for this reason; these benches compare two sides call by call, which
pyperf's API does not do, so this module is the small part of its method they
need: the same measurement in ``count`` fresh interpreters, one after the
other, and each figure reported as the median of their results with its range.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
WORKER_FLAG = "--worker"
#: ``BENCH_SMOKE=1``: every bench runs once, on a few calls, to show it still runs (the suite's
#: tests/test_bench_smoke.py); its figures mean nothing.
SMOKE = os.environ.get("BENCH_SMOKE") == "1"
#: Processes per benchmark: enough for a median that one odd process cannot move.
PROCESSES = 1 if SMOKE else 3


def is_worker() -> bool:
    """Whether this interpreter was started by :func:`in_processes` to measure once."""
    return WORKER_FLAG in sys.argv[1:]


def report(result: dict[str, Any]) -> None:
    """A worker's result, as the last line of its output."""
    print(json.dumps(result), flush=True)


def in_processes(module: str, count: int = PROCESSES) -> list[dict[str, Any]]:
    """Run ``python -m module --worker`` ``count`` times in a row; the result each one reported."""
    results = []
    for _ in range(count):
        finished = subprocess.run(
            [sys.executable, "-m", module, WORKER_FLAG],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
            check=True,
        )
        results.append(json.loads(finished.stdout.strip().splitlines()[-1]))
    return results


def spread(results: list[dict[str, Any]], *path: str) -> tuple[float, float, float]:
    """(median, lowest, highest) of one figure, ``path`` being its keys in each result."""
    values = []
    for result in results:
        value: Any = result
        for key in path:
            value = value[key]
        values.append(float(value))
    return statistics.median(values), min(values), max(values)


def ratio_text(results: list[dict[str, Any]], *path: str) -> str:
    """``1.023x (1.019-1.031x over 3 processes)``."""
    median, low, high = spread(results, *path)
    return f"{median:.3f}x ({low:.3f}-{high:.3f}x over {len(results)} processes)"
