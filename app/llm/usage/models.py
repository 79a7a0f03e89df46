"""The ledger's tables: one row per call, a daily rollup that reports read, and dropped-row reports.

Times are naive UTC, as elsewhere in the app. No row holds message content,
a prompt, an answer or a key: only who, what, how much and how it went.
"""

from __future__ import annotations

from datetime import date, datetime
from decimal import Decimal
from typing import cast

from sqlalchemy import BigInteger, Date, DateTime, Float, Index, Integer, Numeric, String, Table
from sqlalchemy.orm import Mapped, mapped_column

from app.services.db_service import Base

__all__ = ["COST", "DAILY", "DROPS", "PRICE", "USAGE", "LlmUsage", "LlmUsageDaily", "LlmUsageDrop"]

#: USD, exact to a picodollar (genai-prices' figures have fewer decimals than that).
COST = Numeric(24, 12)
#: USD per million tokens.
PRICE = Numeric(18, 9)
#: Longest user, tenant and model names kept (longer ones are cut).
NAME_LENGTH = 200


class LlmUsage(Base):
    """One logical call (retries and fallbacks included), written by the ledger hook."""

    __tablename__ = "llm_usage"

    #: The call's id (``LLMCall.id``): unique, so a batch written twice adds nothing.
    call_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    started_at: Mapped[datetime] = mapped_column(DateTime(), index=True)
    kind: Mapped[str] = mapped_column(String(10))
    user_name: Mapped[str | None] = mapped_column(String(NAME_LENGTH))
    tenant: Mapped[str | None] = mapped_column(String(NAME_LENGTH))
    #: The /api key's name the call came through (None: not through /api).
    api_key: Mapped[str | None] = mapped_column(String(100))
    provider: Mapped[str] = mapped_column(String(100))
    #: The model that answered (after fallbacks), as it was asked for.
    model: Mapped[str] = mapped_column(String(NAME_LENGTH))
    input_tokens: Mapped[int | None]
    output_tokens: Mapped[int | None]
    reasoning_tokens: Mapped[int | None]
    cached_input_tokens: Mapped[int | None]
    cache_write_tokens: Mapped[int | None]
    #: Some count was estimated (a stream closed early, a server that reports no usage).
    usage_estimated: Mapped[bool]
    #: USD (genai-prices' figure for the usage above); NULL when the model has no known price.
    cost: Mapped[Decimal | None] = mapped_column(COST)
    #: The catalogue's unit prices (USD per million tokens; a tiered price's base tier).
    input_price: Mapped[Decimal | None] = mapped_column(PRICE)
    output_price: Mapped[Decimal | None] = mapped_column(PRICE)
    cached_input_price: Mapped[Decimal | None] = mapped_column(PRICE)
    cache_write_price: Mapped[Decimal | None] = mapped_column(PRICE)
    latency_ms: Mapped[float] = mapped_column(Float())
    #: ``ok``, ``cancelled``, or the error's kind (``budget_exceeded``, ``upstream_timeout``...).
    outcome: Mapped[str] = mapped_column(String(40))
    #: Answered by the response cache (cost 0).
    cached: Mapped[bool]
    attempts: Mapped[int] = mapped_column(Integer())


class LlmUsageDaily(Base):
    """Calls, billed tokens and cost per UTC day, tenant, user and model: what reports read.

    ``tenant`` and ``user_name`` are ``""`` for calls without one (a key column cannot be NULL).
    Updated in the same transaction as the ledger rows it counts, for the rows really inserted.
    """

    __tablename__ = "llm_usage_daily"
    __table_args__ = (Index("ix_llm_usage_daily_scope", "tenant", "user_name", "day"),)

    day: Mapped[date] = mapped_column(Date(), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(NAME_LENGTH), primary_key=True)
    user_name: Mapped[str] = mapped_column(String(NAME_LENGTH), primary_key=True)
    provider: Mapped[str] = mapped_column(String(100), primary_key=True)
    model: Mapped[str] = mapped_column(String(NAME_LENGTH), primary_key=True)
    calls: Mapped[int] = mapped_column(BigInteger())
    #: Calls the response cache answered (their tokens are not counted below: not billed).
    cached_calls: Mapped[int] = mapped_column(BigInteger())
    #: Calls with no known price (their cost is not in ``cost``).
    unpriced_calls: Mapped[int] = mapped_column(BigInteger())
    input_tokens: Mapped[int] = mapped_column(BigInteger())
    output_tokens: Mapped[int] = mapped_column(BigInteger())
    reasoning_tokens: Mapped[int] = mapped_column(BigInteger())
    cached_input_tokens: Mapped[int] = mapped_column(BigInteger())
    cost: Mapped[Decimal] = mapped_column(COST)


class LlmUsageDrop(Base):
    """Rows a process could not keep (its buffer was full while the database failed), reported
    once the database answered again: ``flask llm usage --health`` adds them up."""

    __tablename__ = "llm_usage_drop"

    id: Mapped[int] = mapped_column(Integer(), primary_key=True)
    reported_at: Mapped[datetime] = mapped_column(DateTime())
    host: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer())
    dropped_rows: Mapped[int] = mapped_column(BigInteger())
    first_dropped_at: Mapped[datetime] = mapped_column(DateTime())
    last_dropped_at: Mapped[datetime] = mapped_column(DateTime())
    #: The database error that filled the buffer (its type and message, redacted).
    reason: Mapped[str] = mapped_column(String(300))


#: The tables, typed as tables (``Model.__table__`` is typed as any FROM clause).
USAGE = cast(Table, LlmUsage.__table__)
DAILY = cast(Table, LlmUsageDaily.__table__)
DROPS = cast(Table, LlmUsageDrop.__table__)
