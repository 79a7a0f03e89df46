"""The usage ledger: a hook queues one row per call; a background thread writes them in batches.

Off the call's path, by design: the hook only appends to a bounded in-process
queue (no I/O, no lock held across anything slow), and one flusher thread per
process writes each app's rows every ``LLM_USAGE_FLUSH_INTERVAL`` (1 s), or as
soon as ``LLM_USAGE_BATCH`` (500) are waiting, and at process exit. A batch is
one transaction: the rows (``INSERT ... ON CONFLICT DO NOTHING``: the call id is
unique, so a batch written twice adds nothing) and the daily rollup, updated
only for the rows really inserted, so a retried batch never counts twice.

A batch that fails (the database is down, restarting, not migrated) stays at
the head of the queue and is tried again, after 0.5 s, then up to 5 s apart.
While it fails the queue grows up to ``LLM_USAGE_BUFFER`` (10 000) rows; past
that, new rows are dropped and counted: a warning says how many (at most once
a minute), and once the database answers, the count goes into
``llm_usage_drop``, which ``flask llm usage --health`` adds up. A failure never
reaches the call: the warnings are logged by the next call that adds a row (or
at exit), so they land where calls are made, never in a stray thread's log.

Written by hand rather than with a task queue (RQ): a queue needs Redis, and
the ledger must keep working when Redis is down and never cost a call a
network round trip.
"""

from __future__ import annotations

import atexit
import logging
import os
import socket
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any, NamedTuple, cast

from flask import g
from sqlalchemy import bindparam, select

from app.connectors._base import on_fork_in_child
from app.llm.hooks import LLMHook
from app.llm.usage.booking import Booking, booking_for
from app.llm.usage.models import DAILY, DROPS, NAME_LENGTH, USAGE
from app.redaction import redact

if TYPE_CHECKING:
    from sqlalchemy import Connection, Engine

    from app.llm.errors import LLMError
    from app.llm.hooks import EmbedResponse, LLMCall
    from app.llm.types import ChatResponse
    from app.llm.usage.pricing import Pricer, UnitPrices

__all__ = ["LedgerHook", "UsageLedger"]

logger = logging.getLogger(__name__)

#: Seconds between two warnings of one ledger.
WARN_INTERVAL = 60.0
#: Seconds before a failed batch is tried again: doubled on each failure, up to the second.
RETRY_FIRST, RETRY_MAX = 0.5, 5.0
#: Seconds all ledgers together may spend writing at process exit.
EXIT_BUDGET = 5.0
#: The rollup's sums, by column.
_SUMS = (
    "calls",
    "cached_calls",
    "unpriced_calls",
    "input_tokens",
    "output_tokens",
    "reasoning_tokens",
    "cached_input_tokens",
    "cost",
)


class Entry(NamedTuple):
    """One call as queued: plain values, turned into a row by the flusher (a tuple: cheap to make)."""

    call_id: str
    started_at: float
    kind: str
    user: str | None
    tenant: str | None
    api_key: str | None
    provider: str
    model: str
    booking: Booking
    latency_ms: float
    outcome: str
    cached: bool
    attempts: int


#: ``g``'s real object in the current app context (werkzeug's documented ``_get_current_object``,
#: bound to the proxy once): each attribute of the proxy resolves the context again, through
#: several Python frames.
_current_globals: Callable[[], Any] = cast(Any, g)._get_current_object


def _api_key_name() -> str | None:
    """The /api key's name, when the call runs for an /api request (its app context has it)."""
    try:
        app_globals = _current_globals()
    except RuntimeError:  # no app context: a call made outside the app
        return None
    name = getattr(app_globals.get("api_caller"), "name", None)
    return name if isinstance(name, str) else None


class LedgerHook(LLMHook):
    """Queues one row per logical call: answered, failed (its error's kind) or cancelled."""

    def __init__(self, ledger: UsageLedger, pricer: Pricer) -> None:
        self.ledger = ledger
        self.pricer = pricer

    def after_call(self, call: LLMCall, response: ChatResponse | EmbedResponse) -> None:
        self._add(call, "ok", response)

    def on_error(self, call: LLMCall, error: LLMError) -> None:
        self._add(call, error.kind, None)

    def on_cancel(self, call: LLMCall, partial: ChatResponse) -> None:
        self._add(call, "cancelled", partial)

    def _add(self, call: LLMCall, outcome: str, response: ChatResponse | EmbedResponse | None) -> None:
        booking = booking_for(call, response, self.pricer)
        cached = bool(getattr(response, "cached", False))
        self.ledger.add(
            Entry(
                call.id,
                call.started_at,
                call.kind,
                call.user,
                call.tenant,
                _api_key_name(),
                call.provider,
                call.model,
                booking,
                call.latency_ms,
                outcome,
                cached,
                len(call.attempts),
            )
        )


class UsageLedger:
    """One app's ledger in one process: the queue, its writer, and what went wrong."""

    def __init__(
        self,
        engine: Callable[[], Engine],
        *,
        buffer: int,
        batch: int,
        flush_interval: float,
        unit_prices: Callable[[str, str], UnitPrices] | None = None,
    ) -> None:
        self._engine = engine
        #: The catalogue's unit prices of a model, looked up by the flusher (off the call's path).
        self.unit_prices = unit_prices
        self.buffer = buffer
        self.batch = batch
        self.flush_interval = flush_interval
        self._reset()
        _flusher.join(self)

    def _reset(self) -> None:
        self._rows: deque[Entry] = deque()
        #: Held while a batch is written (the flusher, an explicit flush, the exit flush).
        self._writing = threading.Lock()
        #: Rows taken off the queue by the batch being written (they still count against the buffer).
        self._taken = 0
        #: Guards the drop counts, which calls and the writer both change.
        self._drops = threading.Lock()
        self.written = 0
        #: Rows dropped since start, and those not yet reported in llm_usage_drop.
        self.dropped = 0
        self._unreported = 0
        self._first_drop: float | None = None
        self._last_drop: float | None = None
        #: time.monotonic() of the first failure of the current outage; None while writes succeed.
        self.failing_since: float | None = None
        self.last_error: str | None = None
        #: The last write failed for want of the table: waiting will not bring it (flush gives up).
        self._no_table = False
        self._retry_at = 0.0
        self._backoff = RETRY_FIRST
        self._warned_at = -WARN_INTERVAL
        self._recovered: tuple[float, int] | None = None  # (seconds failing, rows then waiting)

    # --- the call's path -------------------------------------------------------------------

    def add(self, entry: Entry) -> None:
        """Queue a row (never blocks on I/O, never raises); drop it, counted, when the buffer is full."""
        rows = self._rows
        if len(rows) + self._taken >= self.buffer:
            now = time.time()
            with self._drops:
                self.dropped += 1
                self._unreported += 1
                self._first_drop = self._first_drop or now
                self._last_drop = now
        else:
            rows.append(entry)
            if len(rows) == self.batch:
                _flusher.wake()
        if self.failing_since is not None or self._recovered is not None or self._unreported:
            self._tell()
        _flusher.ensure_running()

    @property
    def pending(self) -> int:
        """Rows waiting to be written."""
        return len(self._rows)

    # --- writing -----------------------------------------------------------------------------

    def flush(self, timeout: float = 10.0) -> bool:
        """Write every waiting row now, retrying until ``timeout``; whether the queue is empty."""
        deadline = time.monotonic() + timeout
        while self._rows:
            if self._write_batch():
                continue
            if self._no_table or time.monotonic() + 0.2 > deadline:
                return False
            time.sleep(0.2)
        if self._unreported:
            self._write_batch()
        return not self._rows

    def tick(self, now: float) -> None:
        """The flusher's turn: write what was waiting when it began, batch by batch, unless a failure
        is waited out.

        Rows that arrive meanwhile wait for the next turn (or a full batch): chasing them wrote a
        busy process's rows a few at a time, one transaction each, and a batch's fixed cost (about
        1.5 ms of CPU on SQLite, the commit's) per handful of rows took the GIL from its calls.
        """
        if now < self._retry_at:
            return
        left = len(self._rows)
        while left > 0 or self._unreported:
            most = min(self.batch, left)
            if not self._write_batch(most):
                return
            left -= most

    def _write_batch(self, most: int | None = None) -> bool:
        """Write the oldest rows (at most a batch, or ``most``) and the drops not yet reported;
        whether it worked."""
        with self._writing:
            rows = self._rows
            count = min(self.batch if most is None else most, len(rows))
            # Taken off the queue (rows are only ever appended meanwhile) and put back if the write fails.
            entries = [rows.popleft() for _ in range(count)]
            self._taken = len(entries)
            unreported = self._unreported
            if not entries and not unreported:
                return True
            try:
                inserted = self._insert(entries, unreported)
            except Exception as exc:  # the database failed: keep the rows, try again later
                rows.extendleft(reversed(entries))
                self._failed(exc)
                return False
            finally:
                self._taken = 0
            with self._drops:
                self._unreported -= unreported
                if not self._unreported:
                    self._first_drop = None
            self.written += inserted
            if self.failing_since is not None:
                self._recovered = (time.monotonic() - self.failing_since, len(rows))
                self.failing_since = None
            self._backoff = RETRY_FIRST
            self._retry_at = 0.0
            self._no_table = False
            return True

    def _failed(self, exc: Exception) -> None:
        now = time.monotonic()
        self.failing_since = self.failing_since or now
        text = redact(f"{type(exc).__name__}: {exc}").splitlines()[0][:250]
        self._no_table = "llm_usage" in text and ("no such table" in text or "does not exist" in text)
        if self._no_table:
            text += " (run `flask db upgrade`)"
        self.last_error = text
        self._retry_at = now + self._backoff
        self._backoff = min(self._backoff * 2, RETRY_MAX)

    def _insert(self, entries: list[Entry], unreported: int) -> int:
        engine = self._engine()
        inserted = 0
        with engine.begin() as connection:
            if entries:
                inserted = _insert_entries(connection, entries, self.unit_prices)
            if unreported:
                assert self._first_drop is not None and self._last_drop is not None
                connection.execute(
                    DROPS.insert(),
                    {
                        "reported_at": _utc(time.time()),
                        "host": socket.gethostname()[:255],
                        "pid": os.getpid(),
                        "dropped_rows": unreported,
                        "first_dropped_at": _utc(self._first_drop),
                        "last_dropped_at": _utc(self._last_drop),
                        "reason": (self.last_error or "the buffer was full")[:300],
                    },
                )
        return inserted

    # --- telling ------------------------------------------------------------------------------

    def _tell(self) -> None:
        """The ledger's state in the log, at most once a minute, from the path of a call."""
        now = time.monotonic()
        recovered, self._recovered = self._recovered, None
        if recovered is not None:
            seconds, waiting = recovered
            logger.warning(
                "the usage ledger writes again after %.1f s of failures (%d rows still waiting)",
                seconds,
                waiting,
            )
        if now - self._warned_at < WARN_INTERVAL or (self.failing_since is None and not self._unreported):
            return
        self._warned_at = now
        if self.failing_since is not None:
            logger.warning(
                "the usage ledger cannot write for %.0f s (%s): %d rows buffered of %d, %d dropped since"
                " start; calls are not affected (this warning repeats at most every %.0f s)",
                now - self.failing_since,
                self.last_error,
                len(self._rows),
                self.buffer,
                self.dropped,
                WARN_INTERVAL,
            )
        else:
            logger.warning("the usage ledger dropped %d rows (its buffer was full)", self.dropped)

    def drain(self, timeout: float = 2.0) -> None:
        """Write what is waiting (the app's services are being closed: a worker's exit, a test's
        end); what cannot be written within ``timeout`` is reported lost now and let go, rather
        than at the process's exit, long after, for every app at once. The ledger stays usable."""
        if self._rows or self._unreported:
            self.flush(timeout=timeout)
        if not self._rows and not self._unreported:
            return
        lost = 0
        with self._writing:
            rows = self._rows
            while rows:  # one pop at a time: a row a running call adds meanwhile is counted too
                rows.popleft()
                lost += 1
            unreported, self._unreported = self._unreported, 0
        logger.error(
            "the usage ledger could not write before its app closed: %d rows lost, and %d dropped rows"
            " not reported (%s)",
            lost,
            unreported,
            self.last_error or "out of time",
        )

    def exit_report(self) -> tuple[int, int, str | None] | None:
        """What is lost at exit: (rows not written, dropped rows not reported, why); None: nothing."""
        if not self._rows and not self._unreported:
            return None
        return len(self._rows), self._unreported, self.last_error


# --- rows ---------------------------------------------------------------------------------------


def _insert_entries(
    connection: Connection, entries: list[Entry], unit_prices: Callable[[str, str], UnitPrices] | None
) -> int:
    """The entries' rows, each at most once, and the rollup of those really inserted; how many.

    The ids already there are read first, in the same transaction (only this process writes its
    calls' ids, so none can arrive meanwhile), and the rest go to the driver's ``executemany``
    as one ``INSERT ... ON CONFLICT DO NOTHING``. The rows are built column by column, straight
    in the driver's form: SQLAlchemy's per-row parameter processing cost about 0.1 ms a row, as
    much as the call the row records, and a dict per row a quarter of that.
    """
    ids = [entry.call_id for entry in entries]
    existing = set(connection.execute(_EXISTING, {"ids": ids}).scalars())
    if existing:
        entries = [entry for entry in entries if entry.call_id not in existing]
        if not entries:
            return 0
    started = [_utc(entry.started_at) for entry in entries]
    columns = _columns(entries, started, unit_prices)
    sql, names, processors, positional = _insert_sql(connection)
    values = []
    for name, process in zip(names, processors, strict=True):
        column = columns[name]
        values.append(column if process is None else list(map(process, column)))
    rows: list[Any] = list(zip(*values, strict=True))
    if not positional:
        rows = [dict(zip(names, row, strict=True)) for row in rows]
    connection.exec_driver_sql(sql, rows)
    _add_to_rollup(connection, _rollup(entries, started, columns["cost"]))
    return len(entries)


def _columns(
    entries: list[Entry], started: list[datetime], unit_prices: Callable[[str, str], UnitPrices] | None
) -> dict[str, list[Any]]:
    """The ledger's columns (names -> values, one per entry), names and strings cut to their columns."""
    bookings = [entry.booking for entry in entries]
    prices: list[UnitPrices | None] = [None] * len(entries)
    if unit_prices is not None:
        seen: dict[tuple[str, str], UnitPrices] = {}  # a batch has a handful of models
        for index, entry in enumerate(entries):
            if bookings[index].billed:
                key = (entry.provider, entry.model)
                found = seen.get(key)
                if found is None:
                    found = seen[key] = unit_prices(*key)
                prices[index] = found
    return {
        "call_id": [entry.call_id for entry in entries],
        "started_at": started,
        "kind": [entry.kind for entry in entries],
        "user_name": [_cut(entry.user) for entry in entries],
        "tenant": [_cut(entry.tenant) for entry in entries],
        "api_key": [_cut(entry.api_key, 100) for entry in entries],
        "provider": [entry.provider[:100] for entry in entries],
        "model": [entry.model[:NAME_LENGTH] for entry in entries],
        "input_tokens": [booking.input_tokens for booking in bookings],
        "output_tokens": [booking.output_tokens for booking in bookings],
        "reasoning_tokens": [booking.reasoning_tokens for booking in bookings],
        "cached_input_tokens": [booking.cached_input_tokens for booking in bookings],
        "cache_write_tokens": [booking.cache_write_tokens for booking in bookings],
        "usage_estimated": [booking.estimated for booking in bookings],
        "cost": [booking.cost for booking in bookings],
        "input_price": [price.input if price else None for price in prices],
        "output_price": [price.output if price else None for price in prices],
        "cached_input_price": [price.cached_input if price else None for price in prices],
        "cache_write_price": [price.cache_write if price else None for price in prices],
        "latency_ms": [round(entry.latency_ms, 3) for entry in entries],
        "outcome": [entry.outcome[:40] for entry in entries],
        "cached": [entry.cached for entry in entries],
        "attempts": [entry.attempts for entry in entries],
    }


def _utc(timestamp: float) -> datetime:
    return datetime.fromtimestamp(timestamp, UTC).replace(tzinfo=None)


def _cut(value: str | None, length: int = NAME_LENGTH) -> str | None:
    return value[:length] if value is not None else None


def _dialect_insert(name: str) -> Any:
    """The dialect's INSERT, which has ON CONFLICT (PostgreSQL and SQLite alike)."""
    if name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as postgresql_insert

        return postgresql_insert
    from sqlalchemy.dialects.sqlite import insert as sqlite_insert

    return sqlite_insert


#: The call ids of a batch already in the ledger.
_EXISTING = select(USAGE.c.call_id).where(USAGE.c.call_id.in_(bindparam("ids", expanding=True)))
_INSERT_SQL: dict[str, tuple[str, list[str], list[Any], bool]] = {}


def _insert_sql(connection: Connection) -> tuple[str, list[str], list[Any], bool]:
    """The dialect's INSERT of a ledger row as its driver takes it: the SQL, the parameters' names in
    order, their types' bind processors (SQLite keeps dates as text, numbers as floats), positional or not."""
    dialect = connection.dialect
    found = _INSERT_SQL.get(dialect.name)
    if found is None:
        statement = _dialect_insert(dialect.name)(USAGE).on_conflict_do_nothing(index_elements=["call_id"])
        compiled = statement.compile(dialect=dialect, column_keys=[column.name for column in USAGE.columns])
        positional = bool(compiled.positional)
        names = list(compiled.positiontup or []) if positional else [column.name for column in USAGE.columns]
        processors = [USAGE.c[name].type.dialect_impl(dialect).bind_processor(dialect) for name in names]
        found = _INSERT_SQL[dialect.name] = (str(compiled), names, processors, positional)
    return found


def _rollup(
    entries: list[Entry], started: list[datetime], costs: list[Decimal | None]
) -> list[dict[str, Any]]:
    """The entries' sums per (day, tenant, user, provider, model), in key order (one lock order for all)."""
    sums: dict[tuple[date, str, str, str, str], dict[str, Any]] = {}
    for entry, at, cost in zip(entries, started, costs, strict=True):
        key = (
            at.date(),
            _cut(entry.tenant) or "",
            _cut(entry.user) or "",
            entry.provider[:100],
            entry.model[:NAME_LENGTH],
        )
        total = sums.get(key)
        if total is None:
            total = sums[key] = dict.fromkeys(_SUMS, 0)
            total["cost"] = Decimal(0)
        booking = entry.booking
        total["calls"] += 1
        if entry.cached:
            total["cached_calls"] += 1
        if cost is None:
            total["unpriced_calls"] += 1
        else:
            total["cost"] += cost
        if not entry.cached:  # billed tokens only: a cache hit's tokens were paid for once already
            total["input_tokens"] += booking.input_tokens or 0
            total["output_tokens"] += booking.output_tokens or 0
            total["reasoning_tokens"] += booking.reasoning_tokens or 0
            total["cached_input_tokens"] += booking.cached_input_tokens or 0
    return [
        {"day": day, "tenant": tenant, "user_name": user, "provider": provider, "model": model, **total}
        for (day, tenant, user, provider, model), total in sorted(sums.items())
    ]


_ROLLUP: dict[str, Any] = {}


def _add_to_rollup(connection: Connection, deltas: list[dict[str, Any]]) -> None:
    name = connection.dialect.name
    statement = _ROLLUP.get(name)
    if statement is None:  # built once: building it took about 0.7 ms a batch
        insert = _dialect_insert(name)(DAILY)
        statement = _ROLLUP[name] = insert.on_conflict_do_update(
            index_elements=["day", "tenant", "user_name", "provider", "model"],
            set_={column: DAILY.c[column] + insert.excluded[column] for column in _SUMS},
        )
    for delta in deltas:  # one statement each, in key order: concurrent writers lock rows alike
        connection.execute(statement, delta)


# --- the flusher: one thread per process for every app's ledger ------------------------------


class _Flusher:
    def __init__(self) -> None:
        self._ledgers: weakref.WeakSet[UsageLedger] = weakref.WeakSet()
        self._reset()

    def _reset(self) -> None:
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()

    def join(self, ledger: UsageLedger) -> None:
        self._ledgers.add(ledger)

    def wake(self) -> None:
        self._wake.set()

    def ensure_running(self) -> None:
        if self._thread is not None:
            return
        with self._start_lock:
            if self._thread is None:
                thread = threading.Thread(target=self._run, name="llm-usage-ledger", daemon=True)
                try:
                    thread.start()
                except RuntimeError:  # the interpreter is shutting down: the exit flush writes
                    return
                self._thread = thread

    def _run(self) -> None:
        wake = self._wake
        while True:
            ledgers = list(self._ledgers)
            interval = min((ledger.flush_interval for ledger in ledgers), default=1.0)
            wake.wait(interval)
            wake.clear()
            now = time.monotonic()
            for ledger in ledgers:
                try:
                    ledger.tick(now)
                except Exception:  # a bug must not end the thread that writes every app's rows
                    logger.exception("the usage ledger's flusher failed")
            del ledgers

    def at_exit(self) -> None:
        """Write what is waiting, within :data:`EXIT_BUDGET` seconds for all ledgers together."""
        deadline = time.monotonic() + EXIT_BUDGET
        rows = unreported = ledgers = 0
        reasons: dict[str, None] = {}
        for ledger in list(self._ledgers):
            left = deadline - time.monotonic()
            if left > 0 and (ledger.pending or ledger._unreported):
                ledger.flush(timeout=min(left, 2.0))
            report = ledger.exit_report()
            if report is not None:
                ledgers += 1
                rows, unreported = rows + report[0], unreported + report[1]
                reasons[report[2] or "out of time"] = None
        if ledgers:
            logger.error(
                "the usage ledger could not write at exit: %d rows lost, and %d dropped rows not reported,"
                " of %d app(s) (%s)",
                rows,
                unreported,
                ledgers,
                "; ".join(list(reasons)[:3]),
            )


_flusher = _Flusher()
atexit.register(_flusher.at_exit)


def _after_fork_in_child() -> None:
    # The parent's thread does not exist here, and its rows are the parent's to write.
    _flusher._reset()
    for ledger in list(_flusher._ledgers):
        ledger._reset()


on_fork_in_child(_after_fork_in_child)
