"""``make bench`` still runs: every bench once, on a few calls (``BENCH_SMOKE=1``).

The benches are outside the suite (their figures go in the README, never in a
test), so nothing ran them between two measuring sessions: one stopped at a
private method whose signature had changed, and ``make bench`` printed nothing
after it. This runs ``bench/run_all.py`` as ``make bench`` does, scaled down;
its figures mean nothing and are not looked at, only that each bench printed
its lines and none failed.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

#: The start of a line each bench prints (run_all.py's order).
LINES = [
    "get_openai_client()",  # client_lookup
    "cold create_app() + first /livez",  # cold_start
    "get_llm().chat():",  # llm_overhead
    "policy on a healthy chat() (local breakers)",  # resilience_overhead
    "chat() with 3 no-op hooks",  # hooks_overhead
    "memory hit:",  # cache_overhead
    "chat() with the usage ledger and a budget far from its limit",  # usage_overhead
    "  gunicorn gevent -w 2",  # concurrent_streams, acceptance
    "  gunicorn gthread -w 2",  # concurrent_streams, make run
    "first /api/chat in a new worker",  # concurrent_streams, first call
]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_make_bench_runs_every_bench_to_its_end(tmp_path):
    env = {**os.environ, "BENCH_SMOKE": "1", "COVERAGE_PROCESS_START": ""}
    done = subprocess.run(
        [sys.executable, "bench/run_all.py"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=280
    )
    assert done.returncode == 0, done.stderr[-3000:]
    output = done.stdout
    missing = [line for line in LINES if not any(printed.startswith(line) for printed in output.splitlines())]
    assert not missing, output[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
