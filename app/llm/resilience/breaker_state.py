"""The circuit breaker state machine, in this process's memory: no Redis, no threads, no locks.

Why apart: the same machine runs in two places. The Lua scripts in
:mod:`.breaker_store` run it in Redis, shared by every worker; this one runs
it in-process when Redis is absent or failing, and mirrors what Redis said
while it answers, so that a Redis failure carries on from what was last
known. Kept pure (times are the caller's milliseconds, the caller holds the
lock) so that every transition can be tested without a clock or a server.

Per breaker: closed (outcomes counted in a sliding window of ``BUCKETS``
buckets; it opens once ``min_calls`` calls reach ``failure_rate``), open
(until ``reopen_at``), half-open (``half_open_calls`` trial permits; a failure
reopens it, that many successes close it with a fresh window; a round that
never reports lapses after ``cooldown``). An entry nobody touches for its
``ttl`` is forgotten, as its Redis key would expire.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from app.llm.resilience.settings import BreakerPolicy

__all__ = [
    "ADMIT",
    "BUCKETS",
    "FULL",
    "OPEN",
    "OUTCOMES",
    "TRIAL",
    "BreakerState",
    "LocalBreakers",
    "Outcome",
    "StateName",
    "Timing",
    "make_state",
    "timing_of",
]

Outcome = Literal["success", "failure", "ignored"]
StateName = Literal["closed", "open", "half_open"]
OUTCOMES = frozenset({"success", "failure", "ignored"})

#: Buckets per window: the window slides in steps of window/20 (5 %).
BUCKETS = 20
#: Added to a key's expiry so that a little clock skew between hosts cannot expire a live breaker.
EXPIRY_MARGIN_MS = 1000
#: Tolerance on the failure-rate comparison (3/10 must reach a rate of 0.3).
RATE_EPSILON = 1e-9

#: before_call answers (code, milliseconds): admitted (closed) / open (ms left) / a trial call admitted /
#: half-open with every permit out (ms until the round lapses).
ADMIT, OPEN, TRIAL, FULL = 0, 1, 2, 3


@dataclass(frozen=True)
class BreakerState:
    """What operators see of one breaker (``flask llm breakers``, ``/readyz``)."""

    key: str  #: "provider/model"
    state: StateName
    calls: int  #: calls counted in the window
    failures: int
    failure_rate: float
    open_for: float  #: seconds left open (0 unless open)
    backend: Literal["redis", "local"]


def _ms(seconds: float) -> int:
    return max(1, math.ceil(seconds * 1000))


@dataclass(frozen=True)
class Timing:
    """A policy in the milliseconds the state machines work in."""

    window: int
    bucket: int
    cooldown: int
    ttl: int

    @staticmethod
    def of(policy: BreakerPolicy) -> Timing:
        window, cooldown = _ms(policy.window), _ms(policy.cooldown)
        return Timing(window, max(1, window // BUCKETS), cooldown, window + cooldown + EXPIRY_MARGIN_MS)


#: id(policy) -> (policy, its timing). By identity: the settings hand out the same policy objects,
#: and hashing a frozen dataclass hashes all its fields on every call.
_timings: dict[int, tuple[BreakerPolicy, Timing]] = {}


def timing_of(policy: BreakerPolicy) -> Timing:
    """``Timing.of(policy)``, computed once per policy object (policies are few and immutable)."""
    cached = _timings.get(id(policy))
    if cached is not None and cached[0] is policy:
        return cached[1]
    if len(_timings) >= 256:  # policies made on the fly (tests): keep the cache small
        _timings.clear()
    result = Timing.of(policy)
    _timings[id(policy)] = (policy, result)  # the policy is kept, so its id is not reused
    return result


def _rate(calls: int, failures: int) -> float:
    return failures / calls if calls else 0.0


def _trips(calls: int, failures: int, policy: BreakerPolicy) -> bool:
    return calls >= policy.min_calls and failures / calls >= policy.failure_rate - RATE_EPSILON


class _Entry:
    """One breaker in this process: its state and its window of outcomes.

    The window is kept as buckets plus their running totals, so that counting
    an outcome is O(1): buckets are dropped from the oldest as they leave the
    window (the clock moves forward, so insertion order is time order).
    """

    __slots__ = ("buckets", "calls", "failures", "permits", "reopen_at", "since", "state", "successes",
                 "timing", "touched")  # fmt: skip

    def __init__(self, timing: Timing, touched: int) -> None:
        self.timing = timing
        self.touched = touched
        self.state: StateName = "closed"
        self.reopen_at = 0
        self.permits = 0
        self.successes = 0
        self.since = 0
        #: bucket start (ms) -> [calls, failures]
        self.buckets: dict[int, list[int]] = {}
        #: The totals of ``buckets``.
        self.calls = 0
        self.failures = 0

    def count(self, now: int, window: int) -> tuple[int, int]:
        """Calls and failures in the ``window`` ms before ``now`` (for operators: any window)."""
        horizon = now - window
        calls = failures = 0
        for start, (c, f) in self.buckets.items():
            if start > horizon:
                calls += c
                failures += f
        return calls, failures

    def add(self, now: int, calls: int, failures: int) -> tuple[int, int]:
        """Count outcomes in the window, drop buckets that left it; the window's totals."""
        timing, buckets = self.timing, self.buckets
        start = now - now % timing.bucket
        bucket = buckets.get(start)
        if bucket is None:
            bucket = buckets[start] = [0, 0]
        bucket[0] += calls
        bucket[1] += failures
        self.calls += calls
        self.failures += failures
        horizon = now - timing.window
        while True:  # ends at the first bucket still in the window: at worst, the one just counted in
            oldest = next(iter(buckets))
            if oldest > horizon:
                return self.calls, self.failures
            gone_calls, gone_failures = buckets.pop(oldest)
            self.calls -= gone_calls
            self.failures -= gone_failures

    def clear_window(self) -> None:
        self.buckets.clear()
        self.calls = self.failures = 0

    def open(self, reopen_at: int) -> None:
        self.state, self.reopen_at, self.permits, self.successes = "open", reopen_at, 0, 0


class LocalBreakers:
    """The same state machine as the Lua scripts, for every breaker of this process.

    Not thread-safe by itself: the caller holds one lock around each call.
    """

    def __init__(self) -> None:
        self._entries: dict[str, _Entry] = {}

    def _live(self, key: str, now: int) -> _Entry | None:
        entry = self._entries.get(key)
        if entry is not None and now - entry.touched > entry.timing.ttl:
            del self._entries[key]  # expired, as its Redis key would have
            return None
        return entry

    def _entry(self, key: str, timing: Timing, now: int) -> _Entry:
        entry = self._live(key, now)
        if entry is None:
            entry = self._entries[key] = _Entry(timing, now)
        entry.timing, entry.touched = timing, now
        return entry

    def before_call(self, key: str, policy: BreakerPolicy, now: int) -> tuple[int, int]:
        """Whether a call may go ahead: ``(code, ms)``, the codes and milliseconds of the Lua script."""
        entry = self._live(key, now)
        if entry is None or entry.state == "closed":
            return ADMIT, 0
        timing = timing_of(policy)
        if entry.state == "open":
            left = entry.reopen_at - now
            if left > 0:
                return OPEN, left
            entry.state = "half_open"
        elif entry.permits < policy.half_open_calls and now - entry.since < timing.cooldown:
            entry.permits += 1
            return TRIAL, 0
        elif now - entry.since < timing.cooldown:
            return FULL, entry.since + timing.cooldown - now
        # a new trial round: just half-open, or the last round lapsed
        entry.permits, entry.successes, entry.since, entry.touched = 1, 0, now, now
        return TRIAL, 0

    def record(
        self, key: str, policy: BreakerPolicy, timing: Timing, now: int, outcome: Outcome | None, batch: int
    ) -> tuple[StateName, int, str]:
        """``outcome`` (None: no call of its own) plus ``batch`` successes of calls admitted as closed."""
        entry = self._live(key, now)
        if entry is not None and entry.state == "open":
            return "open", entry.reopen_at, ""
        if entry is not None and entry.state == "half_open":
            entry.timing, entry.touched = timing, now
            if outcome == "failure":
                entry.open(now + timing.cooldown)
                return "open", entry.reopen_at, "reopened"
            if outcome == "success":
                entry.successes += 1
                if entry.successes >= policy.half_open_calls:
                    self._entries[key] = _Entry(timing, now)  # closed, with a fresh window
                    return "closed", 0, "closed"
            elif outcome == "ignored" and entry.permits > 0:
                entry.permits -= 1
            return "half_open", 0, ""
        failures = 1 if outcome == "failure" else 0
        calls = batch + (1 if outcome == "success" else failures)
        if not calls:
            return "closed", 0, ""
        if entry is None:
            entry = self._entries[key] = _Entry(timing, now)
        else:
            entry.timing, entry.touched = timing, now
        calls, failures = entry.add(now, calls, failures)
        if failures and _trips(calls, failures, policy):  # no failure, no rate to reach
            entry.open(now + timing.cooldown)
            return "open", entry.reopen_at, "opened"
        return "closed", 0, ""

    def mirror_open(self, key: str, timing: Timing, now: int, reopen_at: int) -> None:
        """Redis said open: remember it, so that a Redis failure now does not close it here."""
        entry = self._live(key, now)
        if entry is None or entry.state != "open" or entry.reopen_at != reopen_at:
            self._entry(key, timing, now).open(reopen_at)

    def mirror_record(
        self,
        key: str,
        timing: Timing,
        now: int,
        counted: tuple[int, int],
        state: StateName,
        reopen_at: int,
        transition: str,
    ) -> None:
        """Take the shared state after a record, and count this process's outcomes in its own window.

        ``counted``: the calls and failures Redis counted in its window (none outside closed).
        """
        if state == "closed" and not counted[0] and self._live(key, now) is None:
            return  # nothing worth remembering (an ignored call on a fresh breaker)
        entry = self._entry(key, timing, now)
        if transition == "closed":
            entry.clear_window()  # closed from half-open: a fresh window, as in Redis
        if counted[0]:
            entry.add(now, *counted)
        if state == "open":
            if entry.state != "open" or entry.reopen_at != reopen_at:
                entry.open(reopen_at)
        elif state == "half_open":
            if entry.state != "half_open":
                entry.state, entry.permits, entry.successes, entry.since = "half_open", 0, 0, now
        else:
            entry.state, entry.permits, entry.successes = "closed", 0, 0

    def open_breakers(self, now: int) -> list[tuple[str, Timing, int]]:
        """The breakers open here now: ``(key, timing, reopen_at)``, to be written to a recovered Redis."""
        return [
            (key, entry.timing, entry.reopen_at)
            for key, entry in list(self._entries.items())
            if self._live(key, now) is not None and entry.state == "open" and entry.reopen_at > now
        ]

    def snapshot(self, key: str, window: int | None, now: int) -> BreakerState:
        """One breaker for operators, its window counted over ``window`` ms (None: its own)."""
        entry = self._live(key, now)
        return _local_state(key, entry, window, now)

    def snapshots(self, now: int) -> list[BreakerState]:
        keys = [key for key in list(self._entries) if self._live(key, now) is not None]
        return [_local_state(key, self._entries[key], None, now) for key in keys]


def _local_state(key: str, entry: _Entry | None, window: int | None, now: int) -> BreakerState:
    if entry is None:
        return BreakerState(key, "closed", 0, 0, 0.0, 0.0, "local")
    calls, failures = entry.count(now, window if window is not None else entry.timing.window)
    return make_state(key, entry.state, entry.reopen_at, calls, failures, now, "local")


def make_state(
    key: str,
    state: str,
    reopen_at: int,
    calls: int,
    failures: int,
    now: int,
    backend: Literal["redis", "local"],
) -> BreakerState:
    name: StateName = "open" if state == "open" else "half_open" if state == "half_open" else "closed"
    open_for = 0.0
    if name == "open":
        if reopen_at > now:
            open_for = (reopen_at - now) / 1000
        else:
            name = "half_open"  # the cool-down is over: the next call is a trial
    return BreakerState(key, name, calls, failures, _rate(calls, failures), open_for, backend)
