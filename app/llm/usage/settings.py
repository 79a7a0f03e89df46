"""The usage ledger's and the budgets' settings, validated at start (each error names its key).

``LLM_USAGE_LEDGER`` (true): one row per call in ``llm_usage``.
``LLM_USAGE_BUFFER`` (10000): rows held in memory while the database cannot be written;
past it, new rows are dropped and counted. ``LLM_USAGE_BATCH`` (500): rows per write.
``LLM_USAGE_FLUSH_INTERVAL`` (1 s): how long a row may wait for its batch.

``LLM_BUDGETS``: JSON, see :func:`parse_budgets`. ``LLM_BUDGET_MAX_RESERVE_USD``
(unset): the most one call reserves. ``LLM_BUDGET_UNKNOWN_PRICE`` (``refuse``;
``allow`` books such calls at 0). ``LLM_BUDGET_RESERVATION_TTL`` (300 s): how long
the reservations of a worker that stopped answering hold a budget.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any, Literal

from app.config import closest, get_bool, get_count, get_seconds, get_str
from app.errors import ConfigError

__all__ = [
    "WINDOWS",
    "BudgetRule",
    "UsageSettings",
    "parse_budgets",
    "parse_usage_settings",
]

Scope = Literal["user", "tenant", "global"]
#: A budget's limits: field -> window.
WINDOWS: dict[str, str] = {"daily_usd": "daily", "monthly_usd": "monthly"}
_SCOPES: tuple[Scope, ...] = ("user", "tenant", "global")


@dataclass(frozen=True)
class BudgetRule:
    """One entry of ``LLM_BUDGETS``: ``user`` (each user), ``user:alice`` (that one), ``global``..."""

    name: str
    scope: Scope
    #: ``alice`` for ``user:alice``; None for the scope's default (each user, each tenant) and global.
    subject: str | None
    #: (window, USD), in the order of :data:`WINDOWS`.
    limits: tuple[tuple[str, Decimal], ...]


@dataclass(frozen=True)
class UsageSettings:
    ledger: bool
    buffer: int
    batch: int
    flush_interval: float
    budgets: tuple[BudgetRule, ...]
    max_reserve_usd: Decimal | None
    unknown_price: Literal["refuse", "allow"]
    reservation_ttl: float


def parse_usage_settings(config: Mapping[str, Any]) -> UsageSettings:
    buffer = get_count(config, "LLM_USAGE_BUFFER")
    batch = get_count(config, "LLM_USAGE_BATCH")
    if batch < 1:
        raise ConfigError(f"LLM_USAGE_BATCH must be 1 or more rows, got {batch}")
    if batch > 5000:  # one INSERT's bound parameters stay far below the drivers' limits
        raise ConfigError(f"LLM_USAGE_BATCH must be at most 5000 rows, got {batch}")
    unknown = (get_str(config, "LLM_BUDGET_UNKNOWN_PRICE") or "refuse").lower()
    if unknown not in ("refuse", "allow"):
        raise ConfigError(f"LLM_BUDGET_UNKNOWN_PRICE must be 'refuse' or 'allow', got {unknown!r}")
    cap = config.get("LLM_BUDGET_MAX_RESERVE_USD")
    return UsageSettings(
        ledger=get_bool(config, "LLM_USAGE_LEDGER"),
        buffer=buffer,
        batch=batch,
        flush_interval=get_seconds(config, "LLM_USAGE_FLUSH_INTERVAL"),
        budgets=parse_budgets(config.get("LLM_BUDGETS")),
        max_reserve_usd=None
        if cap is None or cap == ""
        else _usd("LLM_BUDGET_MAX_RESERVE_USD", cap, zero=False),
        unknown_price="allow" if unknown == "allow" else "refuse",
        reservation_ttl=get_seconds(config, "LLM_BUDGET_RESERVATION_TTL"),
    )


def parse_budgets(value: Any) -> tuple[BudgetRule, ...]:
    """``LLM_BUDGETS``: ``{"user": {"daily_usd": 2}, "tenant:acme": {"monthly_usd": 5000}, ...}``.

    Keys: ``user`` (every user, each counted apart), ``user:<name>`` (that user,
    instead of ``user``), ``tenant`` and ``tenant:<name>`` likewise, ``global``
    (every call together). Values: ``daily_usd`` and/or ``monthly_usd``, USD of 0 or
    more (0 refuses every call the budget applies to).
    """
    if value is None or value == "":
        return ()
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"LLM_BUDGETS must be a JSON object, got invalid JSON ({exc.msg})") from None
    if not isinstance(value, Mapping):
        raise ConfigError(
            f"LLM_BUDGETS must be a JSON object of budget -> limits, got {type(value).__name__}"
        )
    rules: list[BudgetRule] = []
    for name, limits in value.items():
        scope, subject = _budget_name(name)
        where = f"LLM_BUDGETS[{name!r}]"
        if not isinstance(limits, Mapping) or not limits:
            raise ConfigError(f"{where} must be a JSON object with daily_usd and/or monthly_usd")
        unknown = sorted(str(key) for key in limits if key not in WINDOWS)
        if unknown:
            raise ConfigError(
                f"{where}: unknown field {unknown[0]!r}{closest(unknown[0], WINDOWS)};"
                f" known: {', '.join(WINDOWS)}"
            )
        parsed = tuple(
            (window, _usd(f"{where}.{field}", limits[field], zero=True))
            for field, window in WINDOWS.items()
            if field in limits
        )
        rules.append(BudgetRule(str(name), scope, subject, parsed))
    return tuple(rules)


def _budget_name(name: Any) -> tuple[Scope, str | None]:
    text = str(name)
    scope, sep, subject = text.partition(":")
    for known in _SCOPES:
        if scope == known and (not sep or (subject and known != "global")):
            return known, subject or None
    raise ConfigError(
        f"LLM_BUDGETS: {text!r} is not a budget name; use 'user', 'user:<name>', 'tenant',"
        f" 'tenant:<name>' or 'global'{closest(scope, _SCOPES) if not sep else ''}"
    )


def _usd(where: str, raw: Any, *, zero: bool) -> Decimal:
    if isinstance(raw, bool) or not isinstance(raw, int | float | str):
        raise ConfigError(f"{where} must be a number of USD, got {raw!r}")
    try:
        amount = Decimal(str(raw).strip())
    except InvalidOperation:
        amount = Decimal("NaN")
    if not amount.is_finite() or amount < 0 or (not zero and amount == 0) or amount > 10**6:
        least = "0 or more" if zero else "more than 0"
        raise ConfigError(f"{where} must be a finite number of USD, {least} (at most 1e6), got {raw!r}")
    return amount


def usd_text(amount: Decimal | None) -> str:
    """``$1.2345`` with at least two decimals, for messages and tables."""
    if amount is None:
        return "-"
    text = f"{amount.normalize():f}"
    whole, _, decimals = text.partition(".")
    return f"${whole}.{(decimals or '').ljust(2, '0')}"


def nano(amount: Decimal) -> int:
    """USD as whole nano-dollars, rounded up (the budgets' integer unit in Redis)."""
    return math.ceil(amount * 1_000_000_000)
