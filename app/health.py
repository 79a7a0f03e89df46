"""Readiness checks shared by ``GET /readyz`` and ``flask services check``.

Every configured dependency is checked concurrently, each with its own
timeout (``HEALTH_CHECK_TIMEOUT``, 2 s by default), so one hung dependency
costs the probe that timeout once, not once per service. The database answers
``SELECT 1`` and Redis ``PING``; LLM providers are only reported as
configured or not, since a real call per probe would cost money.

A failed check is ``fail`` when the service is required and ``warn``
otherwise. The database is required by default; Redis is not, because the
LLM layer's uses of it fail open (breakers, rate limits, quotas, budgets and
the cache carry on in each process), so a Redis outage degrades the app
without stopping ``/api/chat``. ``HEALTH_REQUIRED_SERVICES=redis`` makes Redis
required (media jobs on RQ, or your own code, need it);
``HEALTH_OPTIONAL_SERVICES=database`` makes the database optional. Both are validated at start
(:func:`parse_health_settings`).

``/readyz`` needs no authentication, so what it says about a failure is the
exception's type only (``ConnectionError``), never its message, which may
quote part of a connection string; ``flask services check`` shows the
message too, redacted (:attr:`CheckResult.detail`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal

from flask import Flask

from app.config import closest, get_names, get_seconds
from app.connectors.anthropic_connector import EXTENSION_KEY as ANTHROPIC_KEY
from app.connectors.anthropic_connector import AnthropicConnector
from app.connectors.genai_connector import EXTENSION_KEY as GENAI_KEY
from app.connectors.genai_connector import GenAIConnector
from app.connectors.openai_connector import EXTENSION_KEY as OPENAI_KEY
from app.connectors.openai_connector import OpenAIConnector
from app.connectors.redis_connector import EXTENSION_KEY as REDIS_KEY
from app.connectors.redis_connector import RedisConnector
from app.errors import ConfigError
from app.redaction import redact
from app.services import db_service

if TYPE_CHECKING:
    from concurrent.futures import Future

Status = Literal["pass", "warn", "fail"]
_RANK: dict[Status, int] = {"pass": 0, "warn": 1, "fail": 2}

#: The services readiness checks, by the names the HEALTH_* settings use.
SERVICES = ("database", "redis")
#: Checked services the LLM layer carries on without (its uses fail open): a warning by default.
FAIL_OPEN = frozenset({"redis"})


@dataclass(frozen=True)
class HealthSettings:
    #: Seconds each check may take (HEALTH_CHECK_TIMEOUT).
    timeout: float
    optional: frozenset[str]
    required: frozenset[str]

    def is_required(self, service: str) -> bool:
        """Whether a failure of ``service`` fails readiness (503) rather than warns."""
        if service in self.required:
            return True
        return service not in self.optional and service not in FAIL_OPEN


def parse_health_settings(config: Mapping[str, Any]) -> HealthSettings:
    """HEALTH_CHECK_TIMEOUT, HEALTH_OPTIONAL_SERVICES and HEALTH_REQUIRED_SERVICES, validated."""
    lists = {
        key: _service_names(config, key) for key in ("HEALTH_OPTIONAL_SERVICES", "HEALTH_REQUIRED_SERVICES")
    }
    both = lists["HEALTH_OPTIONAL_SERVICES"] & lists["HEALTH_REQUIRED_SERVICES"]
    if both:
        raise ConfigError(
            "HEALTH_OPTIONAL_SERVICES and HEALTH_REQUIRED_SERVICES both name"
            f" {', '.join(sorted(both))}; keep one"
        )
    return HealthSettings(
        get_seconds(config, "HEALTH_CHECK_TIMEOUT"),
        lists["HEALTH_OPTIONAL_SERVICES"],
        lists["HEALTH_REQUIRED_SERVICES"],
    )


def _service_names(config: Mapping[str, Any], key: str) -> frozenset[str]:
    names = get_names(config, key)
    for name in sorted(names):
        if name not in SERVICES:
            raise ConfigError(
                f"{key} must name services among {', '.join(SERVICES)}, got {name!r}{closest(name, SERVICES)}"
            )
    return names


@dataclass(frozen=True)
class CheckResult:
    component: str
    component_type: str
    measurement: str
    status: Status
    observed_value: float | bool | None = None
    observed_unit: str | None = None
    #: What /readyz says (no authentication): for a failure, the exception's type only.
    output: str | None = None
    #: The failure's message too, redacted, for ``flask services check`` (operators) only.
    detail: str | None = None

    def as_health_json(self) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "componentId": self.component,
            "componentType": self.component_type,
            "status": self.status,
            "time": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        if self.observed_value is not None:
            entry["observedValue"] = self.observed_value
        if self.observed_unit:
            entry["observedUnit"] = self.observed_unit
        if self.output:
            entry["output"] = self.output
        return entry


@dataclass(frozen=True)
class HealthReport:
    status: Status
    checks: list[CheckResult]

    def as_health_json(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "description": "readiness of the app's services",
            "checks": {f"{c.component}:{c.measurement}": [c.as_health_json()] for c in self.checks},
        }


@dataclass(frozen=True)
class _Probe:
    component: str
    component_type: str
    required: bool
    run: Callable[[], None]


def _ping_database() -> None:
    from sqlalchemy import text

    with db_service.engine().connect() as connection:
        connection.execute(text("SELECT 1"))


def _ping_redis() -> None:
    from app.services.redis_service import get_redis_client

    get_redis_client().ping()


def run_checks(app: Flask) -> HealthReport:
    """Check every service of ``app`` now; never raises."""
    settings = parse_health_settings(app.config)
    timeout = settings.timeout
    probes = [_Probe("database", "datastore", settings.is_required("database"), _ping_database)]
    static: list[CheckResult] = []
    redis_connector = app.extensions.get(REDIS_KEY)
    if isinstance(redis_connector, RedisConnector):
        if redis_connector.configured:
            probes.append(_Probe("redis", "datastore", settings.is_required("redis"), _ping_redis))
        else:
            static.append(
                CheckResult(
                    "redis",
                    "datastore",
                    "responseTime",
                    "pass",
                    output="not configured (REDIS_URL)",
                )
            )
    static.extend(_provider_results(app))
    # The first probe in a process may have to import SQLAlchemy and create the
    # engine; that one-off cost is paid here, outside the timed checks, so a
    # cold worker is not reported as having a slow database.
    db_service.get_db()
    results = _run_probes(app, probes, timeout)
    # Breakers live in Redis when it is configured: list them only when Redis
    # just answered, so a hung Redis costs the probe its one check timeout.
    if all(r.status == "pass" for r in results if r.component == "redis"):
        static.extend(_breaker_results(app))
    checks = results + static
    worst: Status = max((c.status for c in checks), key=_RANK.__getitem__, default="pass")
    return HealthReport(status=worst, checks=checks)


def _run_probes(app: Flask, probes: list[_Probe], timeout: float) -> list[CheckResult]:
    def timed(probe: _Probe) -> float:
        with app.app_context():
            started = time.perf_counter()
            probe.run()
            return (time.perf_counter() - started) * 1000

    from concurrent.futures import ThreadPoolExecutor, wait  # only probes need it

    # Threads, not the request thread: a hung probe is abandoned at its
    # timeout (its thread finishes on its own, bounded by the client's own
    # socket timeouts) instead of holding the response.
    executor = ThreadPoolExecutor(max_workers=len(probes), thread_name_prefix="health")
    try:
        futures = [executor.submit(timed, probe) for probe in probes]
        wait(futures, timeout=timeout)
    finally:
        executor.shutdown(wait=False, cancel_futures=True)
    results = []
    for probe, future in zip(probes, futures, strict=True):
        outcome = _outcome(future, timeout, "fail" if probe.required else "warn")
        results.append(CheckResult(probe.component, probe.component_type, "responseTime", *outcome))
    return results


def _outcome(
    future: Future[float], timeout: float, failed: Status
) -> tuple[Status, float | None, str | None, str | None, str | None]:
    """(status, observed value, unit, output, detail) of one finished, failed or unfinished probe."""
    if not future.done():
        return failed, None, None, f"no answer within {timeout:g} s", None
    if (error := future.exception()) is not None:
        lines = redact(f"{type(error).__name__}: {error}").splitlines()
        return failed, None, None, type(error).__name__, lines[0] if lines else None
    return "pass", round(future.result(), 2), "ms", None, None


def _breaker_results(app: Flask) -> list[CheckResult]:
    """An open (or half-open) circuit breaker is a warning: the app serves, one model does not."""
    llm = app.extensions.get("llm")
    if llm is None:
        return []
    try:
        states = llm.guards.breakers.states()
    except Exception:  # the breaker store is not worth failing readiness over
        return []
    return [
        CheckResult(
            f"llm:{state.key}",
            "component",
            "circuitBreaker",
            "warn",
            output=f"circuit {state.state}" + (f", {state.open_for:.0f} s left" if state.open_for else ""),
        )
        for state in states
        if state.state != "closed"
    ]


def _provider_results(app: Flask) -> list[CheckResult]:
    results = []
    for key, prefix in ((OPENAI_KEY, "openai"), (GENAI_KEY, "gemini"), (ANTHROPIC_KEY, "anthropic")):
        connector = app.extensions.get(key)
        if not isinstance(connector, OpenAIConnector | GenAIConnector | AnthropicConnector):
            continue
        for name, info in connector.info().items():
            component = f"{prefix}:{name}" if prefix == "openai" else prefix
            output = "configured" if info["configured"] else f"not configured ({info['missing']})"
            results.append(
                CheckResult(
                    component,
                    "component",
                    "configured",
                    "pass",
                    bool(info["configured"]),
                    output=output,
                )
            )
    return results
