"""``flask llm usage`` (the rollup as a table, ``--health``, ``--rebuild``) and ``flask llm budgets``.

Importing this module registers both on the ``flask llm`` group
(:func:`app.llm.usage.install` imports it). Neither prints a key.
"""

from __future__ import annotations

import sys
import time
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

import click
from flask import current_app
from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError

from app.llm.cli import llm_cli
from app.llm.usage.models import DAILY, DROPS, USAGE
from app.llm.usage.report import GROUPS, default_start, rebuild_rollup, usage_report
from app.llm.usage.settings import usd_text
from app.redaction import redact
from app.services.db_service import db

__all__ = ["budgets_command", "usage_command"]

_DATE = click.DateTime(formats=["%Y-%m-%d"])


def _today() -> date:
    return datetime.now(UTC).date()


def _fail(message: str) -> None:
    click.echo(f"error: {redact(message)}", err=True)
    sys.exit(1)


@llm_cli.command("usage")
@click.option("--from", "start", type=_DATE, help="First UTC day (default: 30 days before --to).")
@click.option("--to", "end", type=_DATE, help="Last UTC day, included (default: today).")
@click.option("--by", "group_by", type=click.Choice(list(GROUPS)), default="day", show_default=True)
@click.option("--health", is_flag=True, help="The ledger's state: rows, newest row, rows dropped.")
@click.option("--rebuild", is_flag=True, help="Recompute the rollup of the days from the ledger's rows.")
def usage_command(
    start: datetime | None, end: datetime | None, group_by: str, health: bool, rebuild: bool
) -> None:
    """Calls, billed tokens and cost per day, model, user or tenant, from the daily rollup."""
    if health:
        _health()
        return
    last = end.date() if end else _today()
    first = start.date() if start else default_start(last)
    if first > last:
        _fail(f"--from ({first}) is after --to ({last})")
    try:
        if rebuild:
            with db.engine.begin() as connection:
                made = rebuild_rollup(connection, first, last)
            click.echo(f"rebuilt the rollup of {first} to {last}: {made} rows", err=True)
        report = usage_report(db.session, first, last, group_by)
    except SQLAlchemyError as exc:
        db.session.rollback()
        _fail(f"the usage tables cannot be read ({type(exc).__name__}; run `flask db upgrade`?)")
        return
    from app.cli import _table

    label = [column if column != "user_name" else "user" for column in GROUPS[group_by]]
    headers = [
        *(name.upper() for name in label),
        "CALLS",
        "CACHED",
        "UNPRICED",
        "INPUT",
        "OUTPUT",
        "REASONING",
        "COST",
    ]

    def line(row: dict[str, Any], keys: list[str]) -> list[str]:
        cells = [str(row.get(name) if row.get(name) is not None else "-") for name in keys]
        counts = (
            "calls",
            "cached_calls",
            "unpriced_calls",
            "input_tokens",
            "output_tokens",
            "reasoning_tokens",
        )
        return [*cells, *(str(row[name]) for name in counts), usd_text(Decimal(row["cost_usd"]))]

    rows = [line(row, label) for row in report["rows"]]
    rows.append(["total", *[""] * (len(label) - 1), *line(report["total"], [])])
    click.echo(
        f"usage from {first} to {last} (UTC), by {group_by}; USD; billed tokens (cache hits not counted)"
    )
    click.echo(_table(headers, rows))


def _health() -> None:
    """Rows, the newest, the rollup, rows dropped (as reported by the processes that dropped them)."""
    from app.llm.usage import usage_state

    state = usage_state(current_app._get_current_object())  # type: ignore[attr-defined]
    click.echo(f"ledger: {'on' if state.settings.ledger else 'off (LLM_USAGE_LEDGER=false)'}")
    try:
        usage = USAGE
        rows, newest = db.session.execute(select(func.count(), func.max(usage.c.started_at))).one()
        rollup = db.session.scalar(select(func.count()).select_from(DAILY))
        drops = DROPS
        dropped, reports, last = db.session.execute(
            select(
                func.coalesce(func.sum(drops.c.dropped_rows), 0),
                func.count(),
                func.max(drops.c.last_dropped_at),
            )
        ).one()
        reason = db.session.scalar(select(drops.c.reason).order_by(drops.c.id.desc()).limit(1))
    except SQLAlchemyError as exc:
        db.session.rollback()
        _fail(f"the usage tables cannot be read ({type(exc).__name__}; is the database up, and migrated?)")
        return
    click.echo(f"rows: {rows}; newest: {_when(newest)}")
    click.echo(f"rollup rows: {rollup}")
    click.echo(
        f"dropped rows: {dropped}"
        + (f" (in {reports} reports; last dropped {_when(last)}: {reason})" if reports else "")
    )
    if state.ledger is not None:
        click.echo(f"this process: {state.ledger.pending} rows waiting, {state.ledger.dropped} dropped")


def _when(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S UTC") if value is not None else "-"


@llm_cli.command("budgets")
def budgets_command() -> None:
    """Each budget of LLM_BUDGETS in its current windows: limit, spent, reserved, left, when it resets.

    From Redis (every process's counters). Without Redis, or when it does not answer, spent comes
    from the usage ledger's rollup and reserved is unknown ("-"); this says so on stderr.
    """
    from app.cli import _table
    from app.llm.usage import usage_state

    state = usage_state(current_app._get_current_object())  # type: ignore[attr-defined]
    hook = state.budget_hook
    if hook is None or state.accounts is None:
        click.echo("no budgets: LLM_BUDGETS is not set")
        return
    now = time.time()
    rows = _redis_rows(state, now)
    if rows is None:
        click.echo("Redis is not configured or not answering: spent is read from the usage ledger", err=True)
        rows = _ledger_rows(state, now)
    table = [
        [
            name,
            window,
            usd_text(limit),
            usd_text(spent),
            usd_text(reserved) if reserved is not None else "-",
            usd_text(max(Decimal(0), limit - spent - (reserved or 0))),
            datetime.fromtimestamp(ends, UTC).strftime("%Y-%m-%d %H:%M UTC"),
        ]
        for name, window, limit, spent, reserved, ends in rows
    ]
    click.echo(_table(["BUDGET", "WINDOW", "LIMIT", "SPENT", "RESERVED", "LEFT", "RESETS"], table))


_Row = tuple[str, str, Decimal, Decimal, Decimal | None, float]
NANO = Decimal(1_000_000_000)


def _windows(state: Any, now: float) -> list[tuple[Any, str | None, str, Decimal, str, float]]:
    """(rule, subject, window, limit, period, ends) of every rule's current windows."""
    from app.llm.usage.budgets import window_period

    moment = datetime.fromtimestamp(now, UTC)
    found = []
    for rule in state.budget_hook.budgets.rules:
        for window, limit in rule.limits:
            period, ends = window_period(window, moment)
            found.append((rule, rule.subject, window, limit, period, ends.timestamp()))
    return found


def _redis_rows(state: Any, now: float) -> list[_Row] | None:
    from app.connectors.redis_gate import redis_failures
    from app.llm.usage.budget_store import counter_key, parse_counter_key

    accounts = state.accounts
    client = accounts._client()
    if client is None:
        return None
    accounts.sync()  # this process's own settled costs first
    try:
        counters = accounts.store.read(client, int(now * 1000))
    except redis_failures():
        return None
    rows: list[_Row] = []
    for rule, subject, window, limit, period, ends in _windows(state, now):
        if subject is not None or rule.scope == "global":
            spent, held = counters.get(counter_key(rule.scope, subject, window, period), (0, 0))
            rows.append((rule.name, window, limit, Decimal(spent) / NANO, Decimal(held) / NANO, ends))
            continue
        for key, (spent, held) in sorted(counters.items()):  # a default rule: each user or tenant seen
            parsed = parse_counter_key(key)
            if parsed is None or parsed[0] != rule.scope or parsed[2:] != (window, period):
                continue
            if state.budget_hook.budgets.rule_for(rule.scope, parsed[1]) is not rule:
                continue  # it has a budget of its own
            rows.append(
                (
                    f"{rule.scope}:{parsed[1]}",
                    window,
                    limit,
                    Decimal(spent) / NANO,
                    Decimal(held) / NANO,
                    ends,
                )
            )
    return rows


def _ledger_rows(state: Any, now: float) -> list[_Row]:
    daily = DAILY
    rows: list[_Row] = []
    for rule, subject, window, limit, period, ends in _windows(state, now):
        first = date.fromisoformat(period if window == "daily" else f"{period}-01")
        where = [daily.c.day >= first, daily.c.day < datetime.fromtimestamp(ends, UTC).date()]
        column = daily.c.user_name if rule.scope == "user" else daily.c.tenant
        try:
            if subject is not None or rule.scope == "global":
                if subject is not None:
                    where.append(column == subject)
                spent = db.session.scalar(select(func.coalesce(func.sum(daily.c.cost), 0)).where(*where))
                rows.append((rule.name, window, limit, Decimal(spent or 0), None, ends))
                continue
            query = select(column, func.sum(daily.c.cost)).where(*where, column != "").group_by(column)
            for name, spent in db.session.execute(query):
                if state.budget_hook.budgets.rule_for(rule.scope, name) is rule:
                    rows.append((f"{rule.scope}:{name}", window, limit, Decimal(spent or 0), None, ends))
        except SQLAlchemyError as exc:
            db.session.rollback()
            _fail(f"the usage tables cannot be read ({type(exc).__name__})")
    return rows
