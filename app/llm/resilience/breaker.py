"""Circuit breakers per ``provider/model``, shared by every worker and host through Redis.

Why Redis, and why Lua: a breaker kept per process opens on one gunicorn
worker while the others keep hammering a failing provider. The state lives
in one Redis hash per breaker and every transition is one Lua script
(EVALSHA), so concurrent workers never race: half-open admits exactly
``half_open_calls`` trial calls across all processes.

Why a closed breaker is not asked on every call: two round trips per call
(one before, one after) cost a busy worker more than the rest of the policy
together. So a "closed" answer from Redis is trusted for ``sync_interval``
(0.1 s): calls in that time are admitted from memory, and their successes
are counted in memory and sent as one batch at most once per interval. A
healthy, busy worker so costs Redis about two round trips per model per
0.1 s; a quiet one (a call per interval or fewer) stays exact, two per call.
What stays exact: every failure is sent at once (with the successes
pending before it) and makes the next call ask Redis again; half-open is
never cached, so trial permits are exact across processes; and an open
breaker is remembered until the time Redis gave (only time ends an open
state), so rejected calls do not ask Redis either. What it costs: a
breaker another process opens is seen here up to ``sync_interval`` late,
and another process's last 0.1 s of successes may be missing from the rate
a failure is judged by. The in-process breaker (no Redis, or Redis down)
takes the same fast path, with the same guarantees, so that a healthy call
costs the same few steps whichever holds the state.

Why a local breaker too: Redis is a dependency that must fail open, but
"Redis unavailable" must never mean "closed". Each instance keeps an
in-process breaker with the same semantics. While Redis answers it mirrors
the shared state (and this process's own outcomes), so that when Redis
fails the process carries on from what it last knew and keeps counting on
its own; it can open by itself. A failed Redis is skipped, and every
``retry_interval`` (0.5 s) one background thread probes it: a dead or hung
Redis costs the calls in flight when it failed one client timeout, later
calls nothing, and shared state resumes within about a second of Redis
answering again. On recovery, the
breakers this process opened locally are written to Redis (unless Redis
already holds an open state), so a restarted, empty Redis does not close them.

Time: the scripts take the caller's clock (milliseconds) rather than Redis
``TIME``, so that tests can inject a clock; hosts are assumed NTP-synced.
Redis key expiry (``window + cooldown + 1 s`` after the last write) is real
time, so a breaker no one calls vanishes.

Limits worth knowing: ``record`` has no per-call token, so a call admitted
while closed that finishes during half-open counts as a trial outcome; and a
trial call that never reports (its process died) would hold its permit, so a
trial round lapses after ``cooldown`` and a new one begins.
"""

from __future__ import annotations

import hashlib
import logging
import math
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING, Any, Literal, cast

from app.connectors._base import on_fork_in_child
from app.errors import ServiceNotConfiguredError
from app.llm.errors import LLMCircuitOpenError
from app.llm.resilience.settings import BreakerPolicy
from app.redaction import redact

if TYPE_CHECKING:
    from redis import Redis

__all__ = ["BreakerState", "CircuitBreakers"]

logger = logging.getLogger(__name__)

Outcome = Literal["success", "failure", "ignored"]
StateName = Literal["closed", "open", "half_open"]
_OUTCOMES = frozenset({"success", "failure", "ignored"})

#: Buckets per window: the window slides in steps of window/20 (5 %).
BUCKETS = 20
#: Added to a key's expiry so that a little clock skew between hosts cannot expire a live breaker.
EXPIRY_MARGIN_MS = 1000
#: Tolerance on the failure-rate comparison (3/10 must reach a rate of 0.3).
RATE_EPSILON = 1e-9

# before_call answers: (code, milliseconds)
_ADMIT, _OPEN, _TRIAL, _FULL = 0, 1, 2, 3


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


class _Lua:
    """A script and its SHA1, computed once: EVALSHA sends 40 bytes instead of the script."""

    __slots__ = ("sha", "source")

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode(), usedforsecurity=False).hexdigest()


# KEYS[1] = breaker; ARGV = now_ms, cooldown_ms, half_open_calls, ttl_ms.
# Returns {code, ms}: admit / open (ms left) / trial admitted / half-open full (ms until the round lapses).
_BEFORE = _Lua(
    """
local key = KEYS[1]
local s = redis.call('HMGET', key, 'state', 'until', 'permits', 'since')
local state = s[1]
if not state or state == 'closed' then return {0, 0} end
local now = tonumber(ARGV[1])
local cooldown = tonumber(ARGV[2])
if state == 'open' then
  local left = (tonumber(s[2]) or 0) - now
  if left > 0 then return {1, left} end
  redis.call('HSET', key, 'state', 'half_open', 'permits', 1, 'successes', 0, 'since', now)
  redis.call('PEXPIRE', key, ARGV[4])
  return {2, 0}
end
local since = tonumber(s[4]) or now
if now - since >= cooldown then
  redis.call('HSET', key, 'permits', 1, 'successes', 0, 'since', now)
  redis.call('PEXPIRE', key, ARGV[4])
  return {2, 0}
end
if (tonumber(s[3]) or 0) < tonumber(ARGV[3]) then
  redis.call('HINCRBY', key, 'permits', 1)
  return {2, 0}
end
return {3, since + cooldown - now}
"""
)

# KEYS[1] = breaker; ARGV = now_ms, outcome, window_ms, bucket_ms, min_calls, failure_rate,
# cooldown_ms, half_open_calls, ttl_ms, batch.
# outcome: success / failure / ignored, or none (only the batch); batch: successes of calls
# admitted while closed, counted only while it still is (they say nothing about trial calls).
# Returns {state, until_ms, counted (0/1), transition ('' / opened / reopened / closed)}.
_RECORD = _Lua(
    """
local key = KEYS[1]
local now = tonumber(ARGV[1])
local outcome = ARGV[2]
local ttl = ARGV[9]
local batch = tonumber(ARGV[10])
local s = redis.call('HMGET', key, 'state', 'until', 'permits')
local state = s[1] or 'closed'
if state == 'open' then return {'open', tonumber(s[2]) or 0, 0, ''} end
if state == 'half_open' then
  if outcome == 'failure' then
    local reopen = now + tonumber(ARGV[7])
    redis.call('HSET', key, 'state', 'open', 'until', reopen, 'permits', 0, 'successes', 0)
    redis.call('PEXPIRE', key, ttl)
    return {'open', reopen, 0, 'reopened'}
  end
  if outcome == 'success' then
    if redis.call('HINCRBY', key, 'successes', 1) >= tonumber(ARGV[8]) then
      redis.call('DEL', key)
      redis.call('HSET', key, 'state', 'closed', 'window', ARGV[3])
      redis.call('PEXPIRE', key, ttl)
      return {'closed', 0, 0, 'closed'}
    end
    return {'half_open', 0, 0, ''}
  end
  if outcome == 'ignored' and (tonumber(s[3]) or 0) > 0 then
    redis.call('HINCRBY', key, 'permits', -1)
  end
  return {'half_open', 0, 0, ''}
end
local added = batch
if outcome == 'success' or outcome == 'failure' then added = added + 1 end
if added == 0 then return {'closed', 0, 0, ''} end
local bucket = tonumber(ARGV[4])
local start = string.format('%d', math.floor(now / bucket) * bucket)
redis.call('HINCRBY', key, 'c:' .. start, added)
if outcome == 'failure' then redis.call('HINCRBY', key, 'f:' .. start, 1) end
local horizon = now - tonumber(ARGV[3])
local calls, failures = 0, 0
local fields = redis.call('HGETALL', key)
for i = 1, #fields, 2 do
  local name = fields[i]
  local kind = string.sub(name, 1, 2)
  if kind == 'c:' or kind == 'f:' then
    if (tonumber(string.sub(name, 3)) or 0) <= horizon then
      redis.call('HDEL', key, name)
    elseif kind == 'c:' then
      calls = calls + tonumber(fields[i + 1])
    else
      failures = failures + tonumber(fields[i + 1])
    end
  end
end
redis.call('HSET', key, 'state', 'closed', 'window', ARGV[3])
redis.call('PEXPIRE', key, ttl)
if calls >= tonumber(ARGV[5]) and failures / calls >= tonumber(ARGV[6]) - 1e-9 then
  local reopen = now + tonumber(ARGV[7])
  redis.call('HSET', key, 'state', 'open', 'until', reopen, 'permits', 0, 'successes', 0)
  return {'open', reopen, 1, 'opened'}
end
return {'closed', 0, 1, ''}
"""
)

# KEYS[1] = breaker; ARGV = until_ms, ttl_ms, window_ms. Opens it unless Redis already holds it open.
_SEED = _Lua(
    """
local state = redis.call('HGET', KEYS[1], 'state')
if state == 'open' or state == 'half_open' then return 0 end
redis.call('HSET', KEYS[1], 'state', 'open', 'until', ARGV[1], 'permits', 0, 'successes', 0,
  'window', ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""
)


@cache
def _redis_failures() -> tuple[type[BaseException], ...]:
    """What a Redis call raises when Redis (or the network) fails; imported on first use."""
    from redis.exceptions import RedisError

    return (RedisError, OSError)


@cache
def _no_script() -> type[BaseException]:
    from redis.exceptions import NoScriptError

    return NoScriptError


def _ms(seconds: float) -> int:
    return max(1, math.ceil(seconds * 1000))


@dataclass(frozen=True)
class _Timing:
    """A policy in the milliseconds the scripts work in."""

    window: int
    bucket: int
    cooldown: int
    ttl: int

    @staticmethod
    def of(policy: BreakerPolicy) -> _Timing:
        window, cooldown = _ms(policy.window), _ms(policy.cooldown)
        return _Timing(window, max(1, window // BUCKETS), cooldown, window + cooldown + EXPIRY_MARGIN_MS)


#: id(policy) -> (policy, its timing). By identity: the settings hand out the same policy objects,
#: and hashing a frozen dataclass hashes all its fields on every call.
_timings: dict[int, tuple[BreakerPolicy, _Timing]] = {}


def _timing(policy: BreakerPolicy) -> _Timing:
    """``_Timing.of(policy)``, computed once per policy object (policies are few and immutable)."""
    cached = _timings.get(id(policy))
    if cached is not None and cached[0] is policy:
        return cached[1]
    if len(_timings) >= 256:  # policies made on the fly (tests): keep the cache small
        _timings.clear()
    timing = _Timing.of(policy)
    _timings[id(policy)] = (policy, timing)  # the policy is kept, so its id is not reused
    return timing


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _split(key: str) -> tuple[str | None, str | None]:
    provider, _, model = key.partition("/")
    return provider or None, model or None


def _rate(calls: int, failures: int) -> float:
    return failures / calls if calls else 0.0


def _trips(calls: int, failures: int, policy: BreakerPolicy) -> bool:
    return calls >= policy.min_calls and failures / calls >= policy.failure_rate - RATE_EPSILON


# --- the process-local breaker ---------------------------------------------------


class _Entry:
    """One breaker in this process: its state and its window of outcomes.

    The window is kept as buckets plus their running totals, so that counting
    an outcome is O(1): buckets are dropped from the oldest as they leave the
    window (the clock moves forward, so insertion order is time order).
    """

    __slots__ = ("buckets", "calls", "failures", "permits", "reopen_at", "since", "state", "successes",
                 "timing", "touched")  # fmt: skip

    def __init__(self, timing: _Timing, touched: int) -> None:
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


class _LocalBreakers:
    """The same state machine as the Lua scripts, in this process's memory, under one lock."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self._entries: dict[str, _Entry] = {}

    def _live(self, key: str, now: int) -> _Entry | None:
        entry = self._entries.get(key)
        if entry is not None and now - entry.touched > entry.timing.ttl:
            del self._entries[key]  # expired, as its Redis key would have
            return None
        return entry

    def _entry(self, key: str, timing: _Timing, now: int) -> _Entry:
        entry = self._live(key, now)
        if entry is None:
            entry = self._entries[key] = _Entry(timing, now)
        entry.timing, entry.touched = timing, now
        return entry

    def before_call(self, key: str, policy: BreakerPolicy, now: int) -> tuple[int, int]:
        entry = self._entries.get(key)
        if entry is None or entry.state == "closed":
            return _ADMIT, 0  # a closed breaker admits without the lock (one dict read)
        timing = _timing(policy)
        with self.lock:
            entry = self._live(key, now)
            if entry is None or entry.state == "closed":
                return _ADMIT, 0
            if entry.state == "open":
                left = entry.reopen_at - now
                if left > 0:
                    return _OPEN, left
                entry.state = "half_open"
            elif entry.permits < policy.half_open_calls and now - entry.since < timing.cooldown:
                entry.permits += 1
                return _TRIAL, 0
            elif now - entry.since < timing.cooldown:
                return _FULL, entry.since + timing.cooldown - now
            # a new trial round: just half-open, or the last round lapsed
            entry.permits, entry.successes, entry.since, entry.touched = 1, 0, now, now
            return _TRIAL, 0

    def record(
        self, key: str, policy: BreakerPolicy, timing: _Timing, now: int, outcome: Outcome | None, batch: int
    ) -> tuple[StateName, int, str]:
        """``outcome`` (None: no call of its own) plus ``batch`` successes of calls admitted as closed."""
        with self.lock:
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

    def mirror_open(self, key: str, timing: _Timing, now: int, reopen_at: int) -> None:
        """Redis said open: remember it, so that a Redis failure now does not close it here."""
        with self.lock:
            entry = self._live(key, now)
            if entry is None or entry.state != "open" or entry.reopen_at != reopen_at:
                self._entry(key, timing, now).open(reopen_at)

    def mirror_record(
        self,
        key: str,
        timing: _Timing,
        now: int,
        counted: tuple[int, int],
        state: StateName,
        reopen_at: int,
        transition: str,
    ) -> None:
        """Take the shared state after a record, and count this process's outcomes in its own window.

        ``counted``: the calls and failures Redis counted in its window (none outside closed).
        """
        with self.lock:
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

    def open_breakers(self, now: int) -> list[tuple[str, _Timing, int]]:
        with self.lock:
            return [
                (key, entry.timing, entry.reopen_at)
                for key, entry in list(self._entries.items())
                if self._live(key, now) is not None and entry.state == "open" and entry.reopen_at > now
            ]

    def snapshot(self, key: str, window: int | None, now: int) -> BreakerState:
        with self.lock:
            entry = self._live(key, now)
            return _local_state(key, entry, window, now)

    def snapshots(self, now: int) -> list[BreakerState]:
        with self.lock:
            keys = [key for key in list(self._entries) if self._live(key, now) is not None]
            return [_local_state(key, self._entries[key], None, now) for key in keys]


def _local_state(key: str, entry: _Entry | None, window: int | None, now: int) -> BreakerState:
    if entry is None:
        return BreakerState(key, "closed", 0, 0, 0.0, 0.0, "local")
    calls, failures = entry.count(now, window if window is not None else entry.timing.window)
    return _make_state(key, entry.state, entry.reopen_at, calls, failures, now, "local")


def _make_state(
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


# --- fork safety -------------------------------------------------------------------

_instances: weakref.WeakSet[CircuitBreakers] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    # A lock held by another thread at fork time stays locked forever in the child.
    for breakers in list(_instances):
        breakers._gate = threading.Lock()
        breakers._local.lock = threading.Lock()
        breakers._trust_lock = threading.Lock()
        breakers._trust = {}  # the parent sends its own pending successes: not twice
        breakers._probing = False  # the parent's probe thread does not exist here


on_fork_in_child(_after_fork_in_child)


# --- the shared breakers ----------------------------------------------------------------


class _Trust:
    """What this process takes on trust for one breaker between two talks with Redis."""

    __slots__ = ("closed_until", "flush_at", "open_until", "pending", "policy")

    def __init__(self, policy: BreakerPolicy) -> None:
        self.policy = policy
        #: ms before which Redis's last "closed" admits calls without asking again.
        self.closed_until = 0
        #: ms until which Redis said open: only time ends an open state, so it is exact.
        self.open_until = 0
        #: Successes of calls admitted as closed, not yet sent to Redis.
        self.pending = 0
        #: ms from which the pending successes are sent with the next one.
        self.flush_at = 0


class CircuitBreakers:
    """Breakers per ``provider/model``: in Redis when it answers, in this process otherwise.

    ``redis_client()`` returns the app's Redis client, or None (or raises
    :class:`~app.errors.ServiceNotConfiguredError`) when REDIS_URL is unset.
    It is called on each use, so a reset or reconfigured client is picked up.
    """

    def __init__(
        self,
        redis_client: Callable[[], Redis | None],
        namespace: str = "llm:breaker",
        clock: Callable[[], float] = time.time,
        *,
        retry_interval: float = 0.5,
        warn_interval: float = 30.0,
        sync_interval: float = 0.1,
    ) -> None:
        self._redis_client = redis_client
        self.namespace = namespace
        self._prefix = f"{namespace}:"
        self._clock = clock
        #: Seconds a failed (or absent) Redis is skipped before a background probe tries it again.
        self.retry_interval = retry_interval
        #: Seconds between two warnings that the state is local.
        self.warn_interval = warn_interval
        #: Seconds a "closed" from Redis is trusted, and successes are batched (module docstring).
        self.sync_interval = sync_interval
        self._sync_ms = int(sync_interval * 1000)
        self._local = _LocalBreakers()
        self._gate = threading.Lock()
        self._trust: dict[str, _Trust] = {}
        self._trust_lock = threading.Lock()
        #: time.monotonic() before which Redis is not tried; 0 while Redis answers.
        self._skip_until = 0.0
        self._down = False
        #: Whether a thread is probing Redis now.
        self._probing = False
        self._last_warning = -math.inf
        self._told_unconfigured = False
        _instances.add(self)

    # --- the calls ------------------------------------------------------------------

    def before_call(self, key: str, policy: BreakerPolicy) -> None:
        """Return if a call to ``key`` may go ahead; raise :class:`LLMCircuitOpenError` if not.

        Closed: at most one EVALSHA per ``sync_interval`` (pure memory in local
        mode). Open: rejected with the time left. After the cool-down:
        half-open, and exactly ``policy.half_open_calls`` trial calls pass,
        across every process.
        """
        now = self._now()
        trust = self._trust.get(key)
        if trust is not None:
            if trust.closed_until > now:
                return
            if trust.open_until > now:
                raise self._open_error(key, _OPEN, trust.open_until - now, policy)
        client = self._acquire()
        if client is not None:
            timing = _timing(policy)
            try:
                reply = self._run(
                    client, _BEFORE, key, now, timing.cooldown, policy.half_open_calls, timing.ttl
                )
            except _redis_failures() as exc:
                self._failed(exc)
            else:
                code, ms = int(reply[0]), int(reply[1])
                if code == _ADMIT:
                    self._trust_closed(key, policy, now)
                    return
                if code == _TRIAL:
                    return
                if code == _OPEN:
                    self._local.mirror_open(key, timing, now, now + ms)
                    self._trust_open(key, policy, now + ms)
                raise self._open_error(key, code, ms, policy)
        code, ms = self._local.before_call(key, policy, now)
        if code == _ADMIT:
            self._trust_closed(key, policy, now)  # the in-process breaker batches successes too
            return
        if code == _TRIAL:
            return
        raise self._open_error(key, code, ms, policy)

    def record(self, key: str, policy: BreakerPolicy, outcome: Outcome) -> None:
        """Count the outcome of a call that ``before_call`` let through.

        ``failure``: a retryable failure (the executor decides). ``ignored``
        (e.g. a 400) counts nothing but gives back a half-open trial permit.
        """
        if outcome not in _OUTCOMES:
            raise ValueError(f"outcome must be one of {sorted(_OUTCOMES)}, got {outcome!r}")
        now = self._now()
        trust = self._trust.get(key)
        if trust is None:
            self._send(key, policy, now, outcome, 0)
            return
        with self._trust_lock:
            if outcome != "failure" and trust.closed_until > now:  # admitted as closed
                if outcome == "ignored":
                    return  # nothing to count, and no trial permit to give back
                trust.pending += 1
                if now < trust.flush_at:
                    return
                trust.flush_at = now + self._sync_ms
                batch, trust.pending = trust.pending, 0
                own: Outcome | None = None
            else:
                if outcome == "failure":
                    trust.closed_until = 0  # ask Redis again: failures are when breakers open
                batch, trust.pending = trust.pending, 0
                own = outcome
        self._send(key, policy, now, own, batch)

    def state(self, key: str, policy: BreakerPolicy) -> BreakerState:
        """The state of one breaker, its window counted with ``policy``."""
        self._flush(key)
        now = self._now()
        window = _timing(policy).window
        client = self._acquire()
        if client is not None:
            try:
                fields = cast(dict[Any, Any], client.hgetall(self._prefix + key))
            except _redis_failures() as exc:
                self._failed(exc)
            else:
                return _redis_state(key, fields, window, now)
        return self._local.snapshot(key, window, now)

    def states(self) -> list[BreakerState]:
        """Every breaker known: the namespace in Redis (SCAN), else this process's own."""
        for key in list(self._trust):
            self._flush(key)
        now = self._now()
        client = self._acquire()
        if client is not None:
            try:
                names = [_text(name) for name in client.scan_iter(match=_glob(self._prefix) + "*", count=500)]
                pipe = client.pipeline(transaction=False)
                for name in names:
                    pipe.hgetall(name)
                replies = pipe.execute()
            except _redis_failures() as exc:
                self._failed(exc)
            else:
                return [
                    _redis_state(name[len(self._prefix) :], fields, None, now)
                    for name, fields in zip(names, replies, strict=True)
                    if fields
                ]
        return self._local.snapshots(now)

    # --- what is taken on trust --------------------------------------------------------

    def _trusted(self, key: str, policy: BreakerPolicy) -> _Trust:
        trust = self._trust.get(key)
        if trust is None:
            with self._trust_lock:
                trust = self._trust.setdefault(key, _Trust(policy))
        trust.policy = policy
        return trust

    def _trust_closed(self, key: str, policy: BreakerPolicy, now: int) -> None:
        trust = self._trusted(key, policy)
        trust.closed_until, trust.open_until = now + self._sync_ms, 0

    def _trust_open(self, key: str, policy: BreakerPolicy, reopen_at: int) -> None:
        trust = self._trusted(key, policy)
        trust.closed_until, trust.open_until = 0, reopen_at

    def _flush(self, key: str) -> None:
        """Send this process's pending successes of ``key`` (before the state is read)."""
        trust = self._trust.get(key)
        if trust is None or not trust.pending:
            return
        with self._trust_lock:
            batch, trust.pending = trust.pending, 0
        if batch:
            self._send(key, trust.policy, self._now(), None, batch)

    def _send(self, key: str, policy: BreakerPolicy, now: int, outcome: Outcome | None, batch: int) -> None:
        """Count ``outcome`` (None: only the batch) and ``batch`` successes: in Redis, else locally."""
        timing = _timing(policy)
        client = self._acquire()
        if client is not None:
            try:
                reply = self._run(
                    client,
                    _RECORD,
                    key,
                    now,
                    outcome or "none",
                    timing.window,
                    timing.bucket,
                    policy.min_calls,
                    repr(float(policy.failure_rate)),
                    timing.cooldown,
                    policy.half_open_calls,
                    timing.ttl,
                    batch,
                )
            except _redis_failures() as exc:
                self._failed(exc)
            else:
                state = cast(StateName, _text(reply[0]))
                reopen_at, transition = int(reply[1]), _text(reply[3])
                failures = 1 if outcome == "failure" else 0
                calls = batch + (1 if outcome == "success" else failures)
                counted = (calls, failures) if int(reply[2]) else (0, 0)
                self._local.mirror_record(key, timing, now, counted, state, reopen_at, transition)
                if state == "open":
                    self._trust_open(key, policy, reopen_at)
                elif state == "half_open":
                    self._stop_trusting(key)
                self._log_transition(key, transition, policy, "redis")
                return
        state, _, transition = self._local.record(key, policy, timing, now, outcome, batch)
        if state != "closed":
            self._stop_trusting(key)  # opened here, while Redis is away: the local breaker decides
        if transition:
            self._log_transition(key, transition, policy, "local")

    def _stop_trusting(self, key: str) -> None:
        trust = self._trust.get(key)
        if trust is not None:
            trust.closed_until = 0

    # --- Redis, or why not ---------------------------------------------------------

    def _now(self) -> int:
        return int(self._clock() * 1000)

    def _run(self, client: Redis, script: _Lua, key: str, *args: Any) -> list[Any]:
        keys_and_args = (self._prefix + key, *(str(arg) for arg in args))
        try:
            reply = client.evalsha(script.sha, 1, *keys_and_args)
        except _no_script():  # a restarted (or flushed) Redis forgot it: EVAL caches it again
            reply = client.eval(script.source, 1, *keys_and_args)
        return cast(list[Any], reply)

    def _acquire(self) -> Redis | None:
        """The Redis client to use now, or None to use the local breaker.

        While Redis is skipped, one probe at a time runs in a thread of its own
        every ``retry_interval``: no call waits for a dead or hung Redis, except
        those already in flight when it died.
        """
        probe = False
        if self._skip_until:
            now = time.monotonic()
            if now < self._skip_until:
                return None
            with self._gate:
                if now < self._skip_until or self._probing:
                    return None
                self._skip_until = now + self.retry_interval
                self._probing = probe = True
        client: Redis | None = None
        try:
            client = self._redis_client()  # opens no connection; called here, in the caller's context
        except ServiceNotConfiguredError:
            self._unconfigured()
        except Exception as exc:  # the client could not even be built: as good as down
            self._failed(exc)
        else:
            if client is None:
                self._unconfigured()
        if probe:
            if client is None:
                self._probing = False
            else:
                self._start_probe(client)
            return None
        return client

    def _start_probe(self, client: Redis) -> None:
        try:
            threading.Thread(
                target=self._probe, args=(client,), name="llm-breaker-redis-probe", daemon=True
            ).start()
        except RuntimeError:  # no new threads (the interpreter is shutting down): stay local
            self._probing = False

    def _probe(self, client: Redis) -> None:
        try:
            self._reconnect(client)
        finally:
            self._probing = False

    def _reconnect(self, client: Redis) -> bool:
        """Probe Redis; if it answers, write this process's open breakers into it and use it again."""
        now = self._now()
        try:
            opened = self._local.open_breakers(now)
            for key, timing, reopen_at in opened:
                self._run(client, _SEED, key, reopen_at, timing.ttl, timing.window)
            if not opened:
                client.ping()
        except _redis_failures() as exc:
            self._failed(exc)
            return False
        with self._gate:
            was_down, self._down, self._skip_until = self._down, False, 0.0
        if was_down:
            logger.warning("Redis answers again: circuit breaker state is shared across processes again")
        return True

    def _failed(self, exc: BaseException) -> None:
        now = time.monotonic()
        with self._gate:
            self._down = True
            self._skip_until = now + self.retry_interval
            warn = now - self._last_warning >= self.warn_interval
            if warn:
                self._last_warning = now
        if warn:  # one line per interval, never a traceback per call
            logger.warning(
                "Redis is unavailable (%s: %s): circuit breaker state is local to this process"
                " until Redis answers again (retried every %.1f s)",
                type(exc).__name__,
                redact(str(exc)),
                self.retry_interval,
            )

    def _unconfigured(self) -> None:
        with self._gate:
            self._skip_until = time.monotonic() + self.retry_interval
            tell, self._told_unconfigured = not self._told_unconfigured, True
        if tell:
            logger.warning(
                "REDIS_URL is not set: circuit breaker state is local to each process,"
                " so each worker opens its breakers on its own"
            )

    def _open_error(self, key: str, code: int, ms: int, policy: BreakerPolicy) -> LLMCircuitOpenError:
        provider, model = _split(key)
        seconds = max(ms, 0) / 1000
        if code == _OPEN:
            message = f"circuit breaker open: no request made; trial calls in {seconds:.1f} s"
        else:
            message = (
                f"circuit breaker half-open: its {policy.half_open_calls} trial call(s) are in flight;"
                " no request made"
            )
        return LLMCircuitOpenError(message, provider=provider, model=model, retry_after=seconds)

    def _log_transition(self, key: str, transition: str, policy: BreakerPolicy, backend: str) -> None:
        if transition in ("opened", "reopened"):
            logger.warning(
                "circuit breaker %s %s (%s): no calls for %g s, then %d trial call(s)",
                key,
                transition,
                backend,
                policy.cooldown,
                policy.half_open_calls,
            )
        elif transition == "closed":
            logger.info("circuit breaker %s closed (%s): its trial calls succeeded", key, backend)


def _redis_state(key: str, raw: dict[Any, Any], window: int | None, now: int) -> BreakerState:
    fields = {_text(name): _text(value) for name, value in raw.items()}
    if window is None:
        window = int(fields.get("window") or 0)
    horizon = now - window
    calls = failures = 0
    for name, value in fields.items():
        kind, _, start = name.partition(":")
        if kind in ("c", "f") and start.lstrip("-").isdigit() and int(start) > horizon:
            if kind == "c":
                calls += int(value)
            else:
                failures += int(value)
    reopen_at = int(float(fields.get("until") or 0))
    return _make_state(key, fields.get("state", "closed"), reopen_at, calls, failures, now, "redis")


def _glob(text: str) -> str:
    """``text`` as a literal in a Redis MATCH pattern."""
    return "".join(f"\\{char}" if char in "*?[]\\" else char for char in text)
