"""The cost of the usage ledger and the budgets on a call, and /api/usage over a million ledger rows.

(a) ``get_llm().chat(...)`` with the ledger (SQLite, written by its background
thread) and a per-user budget in Redis (a private ``redis-server``), against
the same app with both off (``LLM_USAGE_LEDGER=false``, no ``LLM_BUDGETS``);
both use the same Redis for their breakers and talk to the local OpenAI
server of :mod:`bench.llm_overhead`. Calls alternate one by one over 15
rounds; a process's figure is the ratio of the medians of the rounds' median
per-call times, and the figure reported is the median over 3 fresh processes
(:mod:`bench.processes`), with their range. Target: at most 1.05x.

Two budgets: one far from its limit (a day's budget of $1000: the process is
lent room ahead and asks Redis about twice a second), and one with no room to
lend (every call asks Redis: the worst case). For each, the round trips the
budgets make per call, counted by Redis itself: ``MONITOR`` over 200 calls,
counting the runs of the budgets' script (each is one EVALSHA, its own round
trip; nothing else of the budgets or the ledger goes to Redis, which the
count of every other command but the breakers' shows). Target: at most one
round trip per call.

(b) ``GET /api/usage`` over 1,000,000 ledger rows in PostgreSQL (a private
cluster from :mod:`tests.servers`), bulk-inserted by SQL (not through the
hook) over 90 days, 20 tenants, 200 users and 4 models (72,000 rollup rows:
every user used every model every day), the rollup rebuilt from them; the median
time of 20 requests through the app (key check included) for an admin key by
day, model, user and tenant over the 90 days, and for one user's key by day.
Target: within 100 ms.
"""

from __future__ import annotations

import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from functools import partial
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.llm_overhead import CALLS, MESSAGES, MODEL, _interleaved, _timed, start_server  # noqa: E402
from bench.processes import SMOKE, in_processes, is_worker, ratio_text, report, spread  # noqa: E402
from bench.resilience_overhead import private_redis  # noqa: E402

ADDRESS = f"openai/{MODEL}"
USER = "bench"
#: Budgets: far from the limit, and with no room to lend (each call then asks Redis).
FAR = {"user": {"daily_usd": 1000}}
NEAR = {"user": {"daily_usd": "0.09"}}  # under 16 calls' reservations (about $0.0098 each)
ROWS = 1_000 if SMOKE else 1_000_000


def _app(base_url: str, redis_url: str, **settings: Any) -> Any:
    from app import create_app
    from app.services.db_service import db

    instance = tempfile.mkdtemp(prefix="bench-instance-")
    app = create_app(
        {
            "TESTING": True,
            "INSTANCE_PATH": instance,
            "DOTENV_PATH": f"{instance}/none.env",
            "OPENAI_API_KEY": "sk-bench",
            "OPENAI_BASE_URL": base_url,
            "OPENAI_MAX_RETRIES": 0,
            "REDIS_URL": redis_url,
            **settings,
        }
    )
    with app.app_context():
        db.create_all()
    return app


def _seen_by_redis(redis_url: str, work: Any) -> list[str]:
    """Every command clients sent Redis while ``work()`` ran, as MONITOR shows them (Redis's own count)."""
    import redis

    client = redis.Redis.from_url(redis_url, decode_responses=True)
    marker = "bench-usage-" + os.urandom(4).hex()
    seen: list[str] = []
    with client.monitor() as monitor:

        def read() -> None:
            for command in monitor.listen():
                if marker in command["command"]:
                    return
                if command.get("client_type") != "lua":  # a script's own commands: inside its round trip
                    seen.append(command["command"])

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        work()
        other = redis.Redis.from_url(redis_url)
        other.echo(marker)
        other.close()
        reader.join(timeout=30)
    client.close()
    return seen


def _budget_commands(seen: list[str]) -> tuple[int, int]:
    """(the budgets' script runs, commands of anyone but the budgets and the breakers)."""
    from app.llm.usage.budget_store import _SYNC_SHA

    budgets = sum(1 for line in seen if _SYNC_SHA in line or ("EVAL" in line and "'h:' .. lease" in line))
    breakers = sum(1 for line in seen if line.startswith(("EVALSHA", "EVAL")) and "llm:breaker:" in line)
    return budgets, len(seen) - budgets - breakers


def measure() -> dict[str, Any]:
    from app.llm import get_llm

    server = start_server()
    base_url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    results: dict[str, Any] = {}
    try:
        with private_redis() as redis_url:
            if redis_url is None:
                raise SystemExit("redis-server is not on PATH: this benchmark needs it")
            plain = _app(base_url, redis_url, LLM_USAGE_LEDGER=False)
            for name, budgets in (("far", FAR), ("near", NEAR)):
                counted = _app(base_url, redis_url, LLM_BUDGETS=budgets)
                user = f"{USER}-{name}"  # a counter of its own: the other case's held room is not in it

                def call(app: Any, user: str = user) -> object:
                    with app.app_context():
                        return get_llm().chat(MESSAGES, model=ADDRESS, user=user)

                def timed(app: Any) -> float:
                    return _timed(lambda: call(app))

                for _ in range(50):  # warm both: imports, clients, pools, the pricer's line
                    call(plain), call(counted)
                off, on = _interleaved(partial(timed, plain), partial(timed, counted), CALLS)
                time.sleep(0.6)  # the background sync's last turn, outside the count below
                accounts = counted.extensions["llm_usage"].accounts
                trips = accounts.round_trips
                started = time.monotonic()

                def calls(app: Any = counted) -> None:
                    for _ in range(CALLS):
                        call(app)

                seen = _seen_by_redis(redis_url, calls)
                elapsed = time.monotonic() - started
                budget_commands, others = _budget_commands(seen)
                ledger = counted.extensions["llm_usage"].ledger
                assert ledger.flush(), ledger.last_error
                off_median, on_median = statistics.median(off), statistics.median(on)
                results[name] = {
                    "off_ms": off_median * 1000,
                    "on_ms": on_median * 1000,
                    "ratio": on_median / off_median,
                    "budget_commands_per_call": budget_commands / CALLS,
                    "other_commands_per_call": others / CALLS,
                    "round_trips_per_call": (accounts.round_trips - trips) / CALLS,
                    "seconds": elapsed,
                }
    finally:
        server.shutdown()
        server.server_close()
    return results


# --- (b) /api/usage over a million rows ---------------------------------------------------------


def report_speed() -> dict[str, float] | None:
    """Median ms of /api/usage requests over ROWS bulk-inserted rows; None without PostgreSQL."""
    try:
        from tests.servers import start_postgres

        postgres = start_postgres()
    except Exception as exc:  # no PostgreSQL binaries here
        print(f"/api/usage over {ROWS:,} rows: skipped ({type(exc).__name__}: {exc})")
        return None
    instance = tempfile.mkdtemp(prefix="bench-usage-")
    try:
        return _report_speed(postgres.url, instance)
    finally:
        postgres.stop()
        shutil.rmtree(postgres.datadir.parent, ignore_errors=True)
        shutil.rmtree(instance, ignore_errors=True)


def _report_speed(database_url: str, instance: str) -> dict[str, float]:
    from datetime import UTC, datetime, timedelta

    from sqlalchemy import text

    from app import create_app
    from app.api_keys import create_api_key
    from app.llm.usage.report import rebuild_rollup
    from app.services.db_service import db

    app = create_app(
        {
            "TESTING": True,
            "INSTANCE_PATH": instance,
            "DOTENV_PATH": f"{instance}/none.env",
            "DATABASE_URL": database_url,
        }
    )
    end = datetime.now(UTC).date()
    start = end - timedelta(days=89)
    with app.app_context():
        db.create_all()
        admin = create_api_key("ops", admin=True).secret
        user = create_api_key("user7", tenant="tenant7").secret
        loading = time.monotonic()
        with db.engine.begin() as connection:
            connection.execute(
                text(
                    "INSERT INTO llm_usage (call_id, started_at, kind, user_name, tenant, provider, model,"
                    " input_tokens, output_tokens, reasoning_tokens, cached_input_tokens, usage_estimated,"
                    " cost, latency_ms, outcome, cached, attempts)"
                    " SELECT md5(n::text),"
                    " :start + (n / 200 % 90) * interval '1 day' + (n % 86399) * interval '1 second',"
                    " 'chat', 'user' || (n % 200), 'tenant' || (n % 20), 'openai',"
                    " (ARRAY['gpt-4o-mini', 'gpt-4.1', 'o4-mini', 'gpt-4o'])[1 + n / 18000 % 4],"
                    " 100 + n % 900, 10 + n % 300, 0, 0, false, (100 + n % 900) * 0.00000015,"
                    " 800, 'ok', false, 1"
                    " FROM generate_series(1, :rows) AS n"
                ),
                {"start": start, "rows": ROWS},
            )
            rebuild_rollup(connection, start, end)
            rollup_rows = connection.execute(text("SELECT count(*) FROM llm_usage_daily")).scalar_one()
        connection_time = time.monotonic() - loading
        with db.engine.begin() as connection:
            connection.execute(text("ANALYZE"))
            ledger_rows = connection.execute(text("SELECT count(*) FROM llm_usage")).scalar_one()
    client = app.test_client()
    cases = {
        "admin by day": ("day", admin),
        "admin by model": ("model", admin),
        "admin by user": ("user", admin),
        "admin by tenant": ("tenant", admin),
        "one user's key by day": ("day", user),
    }
    figures: dict[str, float] = {
        "ledger_rows": ledger_rows,
        "rollup_rows": rollup_rows,
        "load_s": connection_time,
    }
    for name, (group_by, key) in cases.items():
        url = f"/api/usage?group_by={group_by}&from={start}&to={end}"
        headers = {"Authorization": f"Bearer {key}"}
        assert client.get(url, headers=headers).status_code == 200  # warm
        times = []
        for _ in range(20):
            started = time.perf_counter()
            response = client.get(url, headers=headers)
            times.append(time.perf_counter() - started)
            assert response.status_code == 200
        figures[name] = statistics.median(times) * 1000
    return figures


def main() -> None:
    if is_worker():
        report(measure())
        return
    results = in_processes("bench.usage_overhead")
    for name, label in (("far", "a budget far from its limit"), ("near", "a budget with no room to lend")):
        on, off = spread(results, name, "on_ms")[0], spread(results, name, "off_ms")[0]
        extra = spread(results, name, "budget_commands_per_call")
        others = spread(results, name, "other_commands_per_call")[2]
        print(
            f"chat() with the usage ledger and {label}: {on:.3f} ms/call, without: {off:.3f} ms/call,"
            f" ratio {ratio_text(results, name, 'ratio')} (target <= 1.05x);"
            f" Redis round trips per call (MONITOR: the budgets' script) {extra[0]:.3f}"
            f" ({extra[1]:.3f}-{extra[2]:.3f}) (target <= 1), other commands per call at most {others:.3f}"
        )
    figures = report_speed()
    if figures is not None:
        cases = ", ".join(
            f"{name} {value:.1f} ms" for name, value in figures.items() if name.startswith(("admin", "one"))
        )
        print(
            f"/api/usage over {int(figures['ledger_rows']):,} ledger rows"
            f" ({int(figures['rollup_rows']):,} rollup rows; loaded and rolled up in"
            f" {figures['load_s']:.0f} s),"
            f" median of 20: {cases} (target < 100 ms)"
        )


if __name__ == "__main__":
    main()
