"""One process's side of the budgets: what it holds of each budget, and when it asks Redis.

Why not one Redis round trip to reserve and another to settle, per call: a
round trip costs about as much as the rest of the layer's work on a call (60
to 100 µs here), twice. Instead each process holds part of a budget, the way
a quota server lends quota (Google's Doorman, Envoy's rate-limit quota):

* To admit a call the process asks Redis (one script, :mod:`.budget_store`)
  to set its hold to *its calls in flight + this call*, refusing unless that
  fits with what is spent and what the other processes hold. It may be lent
  room ahead: at most 32 calls of this size and 1/16 of what is free, and
  none when less than 16 such calls would be left, so a budget near its end is
  decided call by call, exactly.
* A call that fits in the room the process already holds is admitted in
  memory, with no round trip.
* Settling is in memory too: the actual cost replaces the call's reservation,
  and what was spent goes to Redis with the next script: the next admission
  that needs one, or the sync below. So a call costs at most one round trip,
  and usually none.
* Every 0.5 s a background sync sends what was settled, gives back the room
  lent ahead when the process has been idle, and renews the hold of calls in
  flight. A hold not renewed within ``LLM_BUDGET_RESERVATION_TTL`` (a killed
  worker's) lapses in Redis.

Redis unavailable (not configured, or down: the app's :class:`RedisGate`
decides): each process decides alone, from the totals Redis last told it plus
what it spent since, and sends what it spent once Redis answers again.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from app.connectors._base import on_fork_in_child
from app.connectors.redis_gate import RedisGate, fail_fast_pool, redis_failures
from app.llm.usage.budget_store import CounterReply, RedisBudgetStore, SyncRequest

if TYPE_CHECKING:
    from redis import Redis

__all__ = ["Accounts", "CounterSpec", "Held", "Refusal"]

logger = logging.getLogger(__name__)

#: How the budgets are named in the Redis gate's log lines.
GATE_USER = "LLM budgets"
#: Seconds between two background syncs.
SYNC_INTERVAL = 0.5
#: The most room lent ahead, in calls of the size that asked.
LEND_CALLS = 32
#: Seconds one budget check may wait on Redis before the process decides alone.
REDIS_TIMEOUT = 0.5


@dataclass(frozen=True)
class CounterSpec:
    """One window of one budget, as a call sees it."""

    key: str
    #: For messages: ``user:alice``, ``tenant``, ``global``...
    budget: str
    window: str
    limit: int
    #: Epoch seconds when the window ends (and the counter starts again from zero).
    ends_at: float


class _Counter:
    """This process's state of one counter (nano-USD)."""

    __slots__ = (
        "ends_at",
        "held",
        "in_flight",
        "others",
        "spec",
        "spent",
        "synced_at",
        "trusted_until",
        "unsynced",
        "used_at",
    )

    def __init__(self, spec: CounterSpec) -> None:
        self.spec = spec
        self.ends_at = spec.ends_at
        #: Reservations of this process's calls in flight.
        self.in_flight = 0
        #: Actual costs settled here and not yet added to Redis.
        self.unsynced = 0
        #: What Redis holds for this process (in flight + lent ahead); 0 when unknown.
        self.held = 0
        #: time.monotonic() until which ``held`` may be used without asking Redis.
        self.trusted_until = 0.0
        #: What Redis said at the last script: spent, and the other processes' holds.
        self.spent = 0
        self.others = 0
        self.used_at = 0.0
        self.synced_at = 0.0

    @property
    def room(self) -> int:
        return self.held - self.in_flight - self.unsynced


class Held:
    """A call's reservation: on these counters, of this amount (nano-USD)."""

    __slots__ = ("amount", "at", "by", "counters", "lapsed")

    def __init__(self, counters: tuple[_Counter, ...], amount: int, by: str, at: float) -> None:
        self.counters = counters
        self.amount = amount
        #: Which store admitted it ("memory": room held; "redis"; "local": this process alone).
        self.by = by
        #: time.monotonic() when it was taken.
        self.at = at
        #: Never settled within the TTL (a stream dropped unclosed tells no hook): booked at its amount.
        self.lapsed = False


@dataclass(frozen=True)
class Refusal:
    """A call that does not fit: the first counter without room, and what it holds."""

    spec: CounterSpec
    spent: int
    others: int
    in_flight: int
    amount: int


class Accounts:
    """One app's budget counters in one process (see the module docstring)."""

    def __init__(self, gate: Callable[[], RedisGate | None], ttl: float) -> None:
        self._gate = gate
        self.ttl = ttl
        self.store = RedisBudgetStore()
        self._reset()
        _syncer.join(self)

    def _reset(self) -> None:
        self._lock = threading.Lock()
        self._counters: dict[str, _Counter] = {}
        self._settled: deque[tuple[Held, int]] = deque()
        #: Reservations not settled yet, by id (see :meth:`_lapse`).
        self._open: dict[int, Held] = {}
        self._lapse_warned = -60.0
        #: This process's name in Redis: renewed after a fork, so parent and child hold apart.
        self.lease = f"{os.getpid()}-{os.urandom(6).hex()}"
        self._redis: tuple[Redis, Redis] | None = None  # (the gate's client, our fail-fast one)
        self._joined: RedisGate | None = None
        self.round_trips = 0

    # --- the call's path ----------------------------------------------------------------

    def admit_in_memory(self, specs: Sequence[CounterSpec], amount: int) -> Held | None:
        """The call, admitted in the room this process holds; None when Redis must be asked."""
        with self._lock:
            if self._settled:
                self._fold()
            counters = self._of(specs)
            now = time.monotonic()
            for counter in counters:
                if counter.room < amount or now >= counter.trusted_until:
                    return None
            return self._take(counters, amount, "memory", now)

    def reserve(self, specs: Sequence[CounterSpec], amount: int) -> Held | Refusal:
        """Admit a call of ``amount`` on every counter of ``specs``, or say which one refuses it."""
        held = self.admit_in_memory(specs, amount)
        if held is not None:
            return held
        _syncer.ensure_running()
        with self._lock:
            self._fold()
            counters = self._of(specs)
            now = time.monotonic()
            if all(c.room >= amount and now < c.trusted_until for c in counters):  # renewed meanwhile
                return self._take(counters, amount, "memory", now)
            client = self._client()
            if client is not None:
                try:
                    refused, replies = self._sync(
                        client,
                        counters,
                        admit=True,
                        amount=amount,
                        want=[LEND_CALLS * amount] * len(counters),
                    )
                except redis_failures() as exc:
                    self._failed(exc)
                else:
                    if refused:
                        counter, reply = counters[refused - 1], replies[refused - 1]
                        return Refusal(counter.spec, reply.spent, reply.others, counter.in_flight, amount)
                    return self._take(counters, amount, "redis", time.monotonic())
            for counter in counters:  # alone: what Redis last said, plus what was spent here since
                used = counter.spent + counter.unsynced + counter.others + counter.in_flight
                if used + amount > counter.spec.limit:
                    return Refusal(
                        counter.spec,
                        counter.spent + counter.unsynced,
                        counter.others,
                        counter.in_flight,
                        amount,
                    )
            for counter in counters:
                counter.trusted_until = 0.0  # held room is Redis's to give: ask it again when it answers
            return self._take(counters, amount, "local", time.monotonic())

    def settle(self, held: Held, actual: int) -> None:
        """The call cost ``actual`` (nano-USD; 0 releases it): booked in memory, sent with the next sync."""
        self._settled.append((held, actual))
        if self._lock.acquire(blocking=False):
            try:
                self._fold()
            finally:
                self._lock.release()

    # --- inside the lock ------------------------------------------------------------------

    def _fold(self) -> None:
        settled = self._settled
        while settled:
            held, actual = settled.popleft()
            self._open.pop(id(held), None)
            for counter in held.counters:
                if held.lapsed:  # booked at its amount already: only the difference is left
                    counter.unsynced += actual - held.amount
                else:
                    counter.in_flight -= held.amount
                    counter.unsynced += actual

    def _lapse(self, now: float) -> None:
        """Reservations not settled within the TTL are booked at their amount (the most they could cost).

        A call always ends in a hook (answer, error, cancel), except a stream dropped without
        being closed: without this, its reservation would hold the budget for the process's life.
        A call that ends after all is corrected to its actual cost then.
        """
        lapsed = 0
        for key, held in list(self._open.items()):
            if now - held.at > self.ttl:
                del self._open[key]
                held.lapsed = True
                lapsed += 1
                for counter in held.counters:
                    counter.in_flight -= held.amount
                    counter.unsynced += held.amount
        if lapsed and now - self._lapse_warned > 60:
            self._lapse_warned = now
            logger.warning(
                "%d LLM call(s) held a budget reservation for over %.0f s without ending (a stream dropped"
                " without being closed?): each is booked at what it reserved (LLM_BUDGET_RESERVATION_TTL)",
                lapsed,
                self.ttl,
            )

    def _of(self, specs: Sequence[CounterSpec]) -> tuple[_Counter, ...]:
        counters = []
        for spec in specs:
            counter = self._counters.get(spec.key)
            if counter is None:
                counter = self._counters[spec.key] = _Counter(spec)
            elif counter.spec is not spec and counter.spec != spec:  # LLM_BUDGETS changed (tests)
                counter.spec = spec
            counters.append(counter)
        return tuple(counters)

    def _take(self, counters: tuple[_Counter, ...], amount: int, by: str, now: float) -> Held:
        for counter in counters:
            counter.in_flight += amount
            counter.used_at = now
        held = Held(counters, amount, by, now)
        self._open[id(held)] = held
        return held

    def _sync(
        self, client: Redis, counters: Sequence[_Counter], *, admit: bool, amount: int, want: Sequence[int]
    ) -> tuple[int, list[CounterReply]]:
        now = time.time()
        requests = [
            SyncRequest(
                c.spec.key,
                c.spec.limit,
                c.unsynced,
                c.in_flight,
                wanted,
                int((c.spec.ends_at + 3600) * 1000),
            )
            for c, wanted in zip(counters, want, strict=True)
        ]
        self.round_trips += 1
        refused, replies = self.store.sync(
            client,
            requests,
            now_ms=int(now * 1000),
            lease_until_ms=int((now + self.ttl) * 1000),
            lease=self.lease,
            admit=admit,
            amount=amount,
            min_lend=amount,
        )
        synced = time.monotonic()
        for counter, request, reply in zip(counters, requests, replies, strict=True):
            counter.unsynced -= request.push
            counter.held = reply.held
            counter.spent, counter.others = reply.spent, reply.others
            counter.synced_at = synced
            # A hold is used in memory for half its time to live at most: renewed well before it lapses.
            counter.trusted_until = synced + self.ttl / 2 if not refused else 0.0
        return refused, replies

    def _client(self) -> Redis | None:
        gate = self._gate()
        if gate is not None and gate is not self._joined:
            gate.join(GATE_USER)  # named in the gate's log lines
            self._joined = gate
        source = gate.client() if gate is not None else None
        if source is None:
            return None
        held = self._redis
        if held is None or held[0] is not source:
            from redis import Redis

            held = self._redis = (source, Redis(connection_pool=fail_fast_pool(source, REDIS_TIMEOUT)))
        return held[1]

    def _failed(self, exc: BaseException) -> None:
        gate = self._gate()
        if gate is not None:
            gate.failed(GATE_USER, exc)

    # --- the background sync ------------------------------------------------------------------

    def sync(self, *, final: bool = False) -> None:
        """Send what was settled, give back idle room, renew holds (``final``: give back all room)."""
        with self._lock:
            self._fold()
            now = time.monotonic()
            self._lapse(now)
            wall = time.time()
            due: list[_Counter] = []
            want: list[int] = []
            for key, counter in list(self._counters.items()):
                idle = final or now - counter.used_at > SYNC_INTERVAL
                lent = counter.held - counter.in_flight
                renew = counter.held > 0 and now - counter.synced_at > self.ttl / 3
                if counter.unsynced or (lent > 0 and idle) or renew:
                    due.append(counter)
                    want.append(0 if idle else max(0, counter.room))
                elif counter.ends_at + 3600 < wall and not counter.in_flight and not counter.held:
                    del self._counters[key]  # a window long over, with nothing left to send
            if not due:
                return
            client = self._client()
            if client is None:
                return  # alone: what was spent here stays here until Redis answers
            try:
                self._sync(client, due, admit=False, amount=0, want=want)
            except redis_failures() as exc:
                self._failed(exc)

    def pending(self) -> int:
        """Nano-USD settled here and not yet in Redis."""
        with self._lock:
            self._fold()
            return sum(counter.unsynced for counter in self._counters.values())


class _Syncer:
    """One thread per process syncing every app's accounts every :data:`SYNC_INTERVAL` seconds."""

    def __init__(self) -> None:
        self._accounts: weakref.WeakSet[Accounts] = weakref.WeakSet()
        self._reset()

    def _reset(self) -> None:
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()

    def join(self, accounts: Accounts) -> None:
        self._accounts.add(accounts)

    def ensure_running(self) -> None:
        """Started by the first call a budget applies to (none at start-up, none in a --preload master)."""
        if self._thread is not None:
            return
        with self._start_lock:
            if self._thread is None:
                thread = threading.Thread(target=self._run, name="llm-budget-sync", daemon=True)
                try:
                    thread.start()
                except RuntimeError:  # the interpreter is shutting down
                    return
                self._thread = thread

    def _run(self) -> None:
        while True:
            time.sleep(SYNC_INTERVAL)
            for accounts in list(self._accounts):
                try:
                    accounts.sync()
                except Exception:  # noqa: S112 (a failure here is the gate's to log; the next sync tries again)
                    continue

    def at_exit(self) -> None:
        for accounts in list(self._accounts):
            try:
                accounts.sync(final=True)
            except Exception:  # noqa: S112 (exiting: nothing more to do)
                continue


_syncer = _Syncer()
atexit.register(_syncer.at_exit)


def _after_fork_in_child() -> None:
    # The parent's thread does not exist here; its holds and unsent costs are the parent's.
    _syncer._reset()
    for accounts in list(_syncer._accounts):
        accounts._reset()


on_fork_in_child(_after_fork_in_child)
