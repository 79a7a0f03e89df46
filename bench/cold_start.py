"""A cold ``create_app()`` plus the first ``/livez``, against a bare Flask app.

Each sample is a fresh interpreter, timed from the parent (interpreter start
included for both), alternating between the two programs; the figure is the
ratio of the medians. Target: under 1.5x.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = 21

BARE = """
from flask import Flask
app = Flask(__name__)
@app.get("/livez")
def livez():
    return {"status": "pass"}
assert app.test_client().get("/livez").status_code == 200
"""

OURS = """
from app import create_app
app = create_app()
assert app.test_client().get("/livez").status_code == 200
"""


def _run(code: str, env: dict[str, str]) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, check=True)
    return time.perf_counter() - started


def measure() -> dict[str, float]:
    instance = tempfile.mkdtemp(prefix="bench-instance-")
    env = {
        **os.environ,
        "INSTANCE_PATH": instance,
        "DOTENV_PATH": f"{instance}/none.env",
        "SECRET_KEY": "b" * 64,
        "OPENAI_API_KEY": "sk-bench",
        "REDIS_URL": "redis://127.0.0.1:9/0",
        "GEMINI_API_KEY": "bench-gemini",
    }
    for code in (BARE, OURS):  # warm the page cache and .pyc files
        _run(code, env)
    bare, ours = [], []
    for _ in range(SAMPLES):
        bare.append(_run(BARE, env))
        ours.append(_run(OURS, env))
    bare_median, ours_median = statistics.median(bare), statistics.median(ours)
    return {"bare_ms": bare_median * 1000, "ours_ms": ours_median * 1000, "ratio": ours_median / bare_median}


def main() -> None:
    result = measure()
    print(
        f"cold create_app() + first /livez: {result['ours_ms']:.0f} ms, "
        f"bare Flask app: {result['bare_ms']:.0f} ms, ratio {result['ratio']:.2f}x (target < 1.5x)"
    )


if __name__ == "__main__":
    main()
