"""get_openai_client() against a plain ``current_app.extensions[...]`` lookup.

Both run inside one app context, interleaved in rounds so that machine noise
hits both alike; the figure is the ratio of the medians of the per-call times.
Target: under 3x.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import timeit
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from flask import current_app

from app import create_app
from app.services.openai_service import get_openai_client
from bench.processes import SMOKE

ROUNDS = 2 if SMOKE else 15
CALLS = 1_000 if SMOKE else 200_000


def baseline() -> object:
    return current_app.extensions["openai_service"]


def measure() -> dict[str, float]:
    instance = tempfile.mkdtemp(prefix="bench-instance-")
    app = create_app(
        {
            "TESTING": True,
            "INSTANCE_PATH": instance,
            "DOTENV_PATH": f"{instance}/none.env",
            "OPENAI_API_KEY": "sk-bench",
            "OPENAI_BASE_URL": "http://127.0.0.1:9/v1",
        }
    )
    with app.app_context():
        get_openai_client()  # built once; the benchmark measures the lookup
        dict_times, service_times = [], []
        for _ in range(ROUNDS):
            dict_times.append(timeit.timeit(baseline, number=CALLS) / CALLS)
            service_times.append(timeit.timeit(get_openai_client, number=CALLS) / CALLS)
    dict_median = statistics.median(dict_times)
    service_median = statistics.median(service_times)
    return {
        "extensions_lookup_ns": dict_median * 1e9,
        "get_openai_client_ns": service_median * 1e9,
        "ratio": service_median / dict_median,
    }


def main() -> None:
    result = measure()
    print(
        f"get_openai_client(): {result['get_openai_client_ns']:.0f} ns/call, "
        f"current_app.extensions[...]: {result['extensions_lookup_ns']:.0f} ns/call, "
        f"ratio {result['ratio']:.2f}x (target < 3x)"
    )


if __name__ == "__main__":
    main()
