"""Run every benchmark in this folder and print its figures."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import client_lookup, cold_start, hooks_overhead, llm_overhead, resilience_overhead, usage_overhead
from bench.cache_overhead import main as cache_overhead
from bench.concurrent_streams import main as concurrent_streams

if __name__ == "__main__":
    print(f"python {sys.version.split()[0]}")
    client_lookup.main()
    cold_start.main()
    llm_overhead.main()
    resilience_overhead.main()
    hooks_overhead.main()
    cache_overhead()
    usage_overhead.main()
    concurrent_streams(["--scenario", "all"])
