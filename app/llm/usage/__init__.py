"""Usage, cost and budgets: a ledger of every call in the database, and budgets checked before it.

:func:`install` (called by :func:`app.llm.client.init_app`) reads the
settings (:mod:`.settings`, validated at start) and adds two hooks to the
app's LLM layer, last, so that they see a call only when no other hook
answered it first (a response-cache hit is never reserved):

* :class:`~.ledger.LedgerHook` (``LLM_USAGE_LEDGER``, on by default): one row
  per call in ``llm_usage`` and the daily rollup ``llm_usage_daily``, written in
  batches by a background thread (:mod:`.ledger`).
* :class:`~.budgets.BudgetHook` (when ``LLM_BUDGETS`` is set): reserves a
  call's estimated cost before it, settles it after (:mod:`.budgets`,
  :mod:`.accounts`, :mod:`.budget_store`).

Reading it: ``GET /api/usage`` (:mod:`app.usage_api`), ``flask llm usage`` and
``flask llm budgets`` (:mod:`.cli`), all from the rollup (:mod:`.report`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from app.config import get_count
from app.llm.usage.models import LlmUsage, LlmUsageDaily, LlmUsageDrop
from app.llm.usage.settings import UsageSettings, parse_usage_settings

if TYPE_CHECKING:
    from flask import Flask

    from app.connectors.redis_gate import RedisGate
    from app.llm.client import LLM
    from app.llm.usage.accounts import Accounts
    from app.llm.usage.budgets import BudgetHook
    from app.llm.usage.ledger import LedgerHook, UsageLedger
    from app.llm.usage.pricing import Pricer

__all__ = [
    "EXTENSION_KEY",
    "LlmUsage",
    "LlmUsageDaily",
    "LlmUsageDrop",
    "UsageState",
    "install",
    "usage_state",
]

logger = logging.getLogger(__name__)

EXTENSION_KEY = "llm_usage"


@dataclass
class UsageState:
    """What :func:`install` set up on one app (``app.extensions["llm_usage"]``)."""

    settings: UsageSettings
    pricer: Pricer
    ledger: UsageLedger | None
    ledger_hook: LedgerHook | None
    accounts: Accounts | None
    budget_hook: BudgetHook | None


def install(app: Flask, llm: LLM) -> UsageState:
    """Validate the settings and add the ledger and budget hooks to ``llm`` (after every other hook)."""
    from app.llm.usage.pricing import Pricer

    settings = parse_usage_settings(app.config)
    pricer = Pricer(llm.catalogue)
    ledger = ledger_hook = accounts = budget_hook = None
    if settings.ledger:
        from app.llm.usage.ledger import LedgerHook, UsageLedger
        from app.services.db_service import db

        with app.app_context():
            engine = db.engine  # built at start by Flask-SQLAlchemy; no connection until the first write
        ledger = UsageLedger(
            lambda: engine,
            buffer=settings.buffer,
            batch=settings.batch,
            flush_interval=settings.flush_interval,
            unit_prices=pricer.unit_prices,
        )
        ledger_hook = LedgerHook(ledger, pricer)
        llm.add_hook(ledger_hook)
    if settings.budgets:
        from app.llm.usage.accounts import Accounts
        from app.llm.usage.budgets import BudgetHook, Budgets

        if not _redis_configured(app):
            logger.warning(
                "LLM_BUDGETS is set but REDIS_URL is not: each process keeps its own budget counters,"
                " so every worker may spend each budget in full; set REDIS_URL to share them"
            )

        def gate() -> RedisGate:
            return llm.guards.breakers.gate  # the app's one gate: budgets fail open with the rest

        accounts = Accounts(gate, settings.reservation_ttl)
        budget_hook = BudgetHook(
            Budgets(settings.budgets),
            accounts,
            pricer,
            llm.catalogue,
            max_reserve_usd=settings.max_reserve_usd,
            unknown_price=settings.unknown_price,
            default_output_tokens=get_count(app.config, "LLM_MAX_TOKENS_LIMIT"),
        )
        llm.add_hook(budget_hook)
    from app.llm.usage import cli  # noqa: F401 (registers `flask llm usage` and `flask llm budgets`)

    state = app.extensions[EXTENSION_KEY] = UsageState(
        settings, pricer, ledger, ledger_hook, accounts, budget_hook
    )
    return state


def usage_state(app: Flask) -> UsageState:
    state = app.extensions.get(EXTENSION_KEY)
    if not isinstance(state, UsageState):
        raise RuntimeError(
            "the usage ledger and budgets are not installed on this app (app.llm.init_app does it)"
        )
    return state


def _redis_configured(app: Flask) -> bool:
    from app.connectors.redis_connector import EXTENSION_KEY as REDIS_KEY
    from app.connectors.redis_connector import RedisConnector

    connector = app.extensions.get(REDIS_KEY)
    return isinstance(connector, RedisConnector) and connector.configured
