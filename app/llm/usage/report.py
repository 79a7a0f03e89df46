"""Reading usage: sums from the daily rollup (never the ledger's rows), for /api/usage and the CLI.

A report over a year of a busy app reads one row per day, tenant, user and
model that had calls, through the rollup's primary key (by day) or its
``(tenant, user_name, day)`` index (one caller's own usage): its time does not
grow with the number of calls.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, timedelta
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from sqlalchemy import Date, and_, case, delete, func, insert, select

from app.llm.usage.models import DAILY, USAGE

if TYPE_CHECKING:
    from sqlalchemy import Connection
    from sqlalchemy.orm import Session, scoped_session

__all__ = ["DEFAULT_DAYS", "GROUPS", "Scope", "default_start", "rebuild_rollup", "usage_report"]

#: ``group_by`` -> the rollup's columns it groups on.
GROUPS: dict[str, tuple[str, ...]] = {
    "day": ("day",),
    "model": ("provider", "model"),
    "user": ("user_name",),
    "tenant": ("tenant",),
}
_SUMS = (
    "calls",
    "cached_calls",
    "unpriced_calls",
    "input_tokens",
    "output_tokens",
    "reasoning_tokens",
    "cached_input_tokens",
)


@dataclass(frozen=True)
class Scope:
    """One caller's own usage: its user name within its tenant (``""``: none)."""

    tenant: str
    user: str


#: Days a report covers when it is given no first day.
DEFAULT_DAYS = 30


def default_start(end: date) -> date:
    """The first day of a report ending on ``end`` that names none: ``DEFAULT_DAYS`` days, fewer
    near the first day a ``date`` can hold (``to=0001-01-05`` was an OverflowError, and a 500)."""
    return date.fromordinal(max(1, end.toordinal() - (DEFAULT_DAYS - 1)))


def usage_report(
    session: Session | Connection | scoped_session[Any],
    start: date,
    end: date,
    group_by: str,
    scope: Scope | None = None,
) -> dict[str, Any]:
    """Calls, billed tokens and cost per ``group_by`` over the UTC days ``start`` to ``end`` (inclusive).

    ``scope``: only that caller's usage (None: everything). Costs are strings of exact USD.
    """
    table = DAILY
    keys = [table.c[name] for name in GROUPS[group_by]]
    conditions = [table.c.day >= start, table.c.day <= end]
    if scope is not None:
        conditions += [table.c.tenant == scope.tenant, table.c.user_name == scope.user]
    query = (
        select(*keys, *(func.sum(table.c[name]) for name in _SUMS), func.sum(table.c.cost))
        .where(and_(*conditions))
        .group_by(*keys)
        .order_by(*keys)
    )
    rows = []
    totals: dict[str, Any] = dict.fromkeys(_SUMS, 0)
    total_cost = Decimal(0)
    for record in session.execute(query):
        values = list(record)
        row: dict[str, Any] = {}
        for name, value in zip(GROUPS[group_by], values, strict=False):
            row[_label(name)] = _key(name, value)
        counts = values[len(keys) : len(keys) + len(_SUMS)]
        for name, value in zip(_SUMS, counts, strict=True):
            row[name] = int(value or 0)
            totals[name] += row[name]
        cost = Decimal(values[-1] or 0)
        total_cost += cost
        row["cost_usd"] = _usd(cost)
        rows.append(row)
    return {
        "from": start.isoformat(),
        "to": end.isoformat(),
        "group_by": group_by,
        "rows": rows,
        "total": {**totals, "cost_usd": _usd(total_cost)},
    }


def _label(column: str) -> str:
    return "user" if column == "user_name" else column


def _key(column: str, value: Any) -> Any:
    if column == "day":
        return value.isoformat() if isinstance(value, date) else str(value)
    if column in ("tenant", "user_name"):
        return value or None  # "" in the rollup: calls without one
    return value


def _usd(amount: Decimal) -> str:
    """Exact USD as a string (a JSON number would round it): ``"0.0000036"``, ``"12.5"``, ``"0"``."""
    text = f"{amount.normalize():f}"
    return text if text != "-0" else "0"


def rebuild_rollup(connection: Connection, start: date, end: date) -> int:
    """Recompute the rollup of the days ``start`` to ``end`` from the ledger's rows; the rows made.

    For rows that reached the ledger another way (a bulk import, a manual fix); the
    ledger itself keeps the rollup current as it writes.
    """
    usage = USAGE
    daily = DAILY
    connection.execute(delete(daily).where(daily.c.day >= start, daily.c.day <= end))
    billed = ~usage.c.cached

    def billed_sum(column: Any) -> Any:
        return func.coalesce(func.sum(case((billed, func.coalesce(column, 0)), else_=0)), 0)

    day = func.date(usage.c.started_at, type_=Date)
    tenant = func.coalesce(usage.c.tenant, "")
    user = func.coalesce(usage.c.user_name, "")
    source = (
        select(
            day,
            tenant,
            user,
            usage.c.provider,
            usage.c.model,
            func.count(),
            func.coalesce(func.sum(case((usage.c.cached, 1), else_=0)), 0),
            func.coalesce(func.sum(case((usage.c.cost.is_(None), 1), else_=0)), 0),
            billed_sum(usage.c.input_tokens),
            billed_sum(usage.c.output_tokens),
            billed_sum(usage.c.reasoning_tokens),
            billed_sum(usage.c.cached_input_tokens),
            func.coalesce(func.sum(usage.c.cost), 0),
        )
        .where(usage.c.started_at >= start, *_before_day_after(usage.c.started_at, end))
        .group_by(day, tenant, user, usage.c.provider, usage.c.model)
    )
    columns = ["day", "tenant", "user_name", "provider", "model", *_SUMS, "cost"]
    result = connection.execute(insert(daily).from_select(columns, source))
    return int(result.rowcount or 0)


def _before_day_after(column: Any, end: date) -> list[Any]:
    """``column`` before the day after ``end`` (none to compare with after the last day a date holds)."""
    return [column < end + timedelta(days=1)] if end < date.max else []
