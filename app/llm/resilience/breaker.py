"""Circuit breakers per ``provider/model``, shared by every worker and host through Redis.

Why shared: a breaker kept per process opens on one gunicorn worker while
the others keep hammering a failing provider. So the state lives in Redis
(:mod:`.breaker_store`: one hash per breaker, each transition one Lua
script), and this module decides, per call, what to ask it.

Why a closed breaker is not asked on every call: two round trips per call
(one before, one after) cost a busy worker more than the rest of the policy
together. So a "closed" answer is trusted for ``sync_interval`` (0.1 s):
calls in that time are admitted from memory, and their successes are
counted in memory and sent as one batch at most once per interval. A
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

Why a local breaker too: Redis must fail open, but "Redis unavailable" must
never mean "closed". Each instance keeps the same state machine in process
(:mod:`.breaker_state`). While Redis answers it mirrors the shared state
(and this process's own outcomes), so that when Redis fails the process
carries on from what it last knew and keeps counting on its own; it can
open by itself. Whether Redis may be used is the app's
:class:`~app.connectors.redis_gate.RedisGate`'s answer, shared with the
rate limits: a failed Redis is skipped and probed once a second in the
background, so it costs the calls in flight when it failed one client
timeout, later calls nothing, and shared state resumes within about a
second of Redis answering again. Before the gate opens again, the breakers
this process opened locally are written to Redis (unless Redis already
holds an open state), so a restarted, empty Redis does not close them.

Limits worth knowing: ``record`` has no per-call token, so a call admitted
while closed that finishes during half-open counts as a trial outcome; and a
trial call that never reports (its process died) would hold its permit, so a
trial round lapses after ``cooldown`` and a new one begins.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING

from app.connectors._base import on_fork_in_child
from app.connectors.redis_gate import RedisGate, redis_failures
from app.llm.errors import LLMCircuitOpenError
from app.llm.resilience.breaker_state import (
    ADMIT,
    OPEN,
    OUTCOMES,
    TRIAL,
    BreakerState,
    LocalBreakers,
    Outcome,
    timing_of,
)
from app.llm.resilience.breaker_store import RedisBreakerStore
from app.llm.resilience.settings import BreakerPolicy

if TYPE_CHECKING:
    from redis import Redis

__all__ = ["BreakerState", "CircuitBreakers", "Outcome"]

logger = logging.getLogger(__name__)

#: How the breakers are named in the gate's log lines.
USER = "circuit breakers"


class _Trust:
    """What this process takes on trust for one breaker between two talks with Redis."""

    __slots__ = ("closed_until", "flush_at", "open_until", "pending", "policy")

    def __init__(self, policy: BreakerPolicy) -> None:
        self.policy = policy
        #: ms before which the last "closed" admits calls without asking again.
        self.closed_until = 0
        #: ms until which the breaker is open: only time ends an open state, so it is exact.
        self.open_until = 0
        #: Successes of calls admitted as closed, not yet counted.
        self.pending = 0
        #: ms from which the pending successes are sent with the next one.
        self.flush_at = 0


class CircuitBreakers:
    """Breakers per ``provider/model``: in Redis when the gate allows, in this process otherwise.

    ``redis``: the app's :class:`~app.connectors.redis_gate.RedisGate`, shared
    with its other Redis users; or a callable returning a Redis client (or
    None), which gets a gate of its own (a breaker used alone: tests, scripts).
    """

    def __init__(
        self,
        redis: RedisGate | Callable[[], Redis | None],
        namespace: str = "llm:breaker",
        clock: Callable[[], float] = time.time,
        *,
        sync_interval: float = 0.1,
    ) -> None:
        self.gate = redis if isinstance(redis, RedisGate) else RedisGate(redis)
        self.gate.join(USER, on_recovery=self._write_local_opens)
        self.namespace = namespace
        self._store = RedisBreakerStore(namespace)
        self._clock = clock
        #: Seconds a "closed" is trusted, and successes are batched (module docstring).
        self.sync_interval = sync_interval
        self._sync_ms = int(sync_interval * 1000)
        self._local = LocalBreakers()
        self._reset_locks()
        self._trust: dict[str, _Trust] = {}
        _instances.add(self)

    def _reset_locks(self) -> None:
        #: Guards ``_local`` (the state machine is not thread-safe by itself).
        self._local_lock = threading.Lock()
        self._trust_lock = threading.Lock()

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
                raise self._open_error(key, OPEN, trust.open_until - now, policy)
        client = self.gate.client()
        if client is not None:
            timing = timing_of(policy)
            try:
                code, ms = self._store.before_call(client, key, policy, timing, now)
            except redis_failures() as exc:
                self.gate.failed(USER, exc)
            else:
                if code == OPEN:
                    with self._local_lock:
                        self._local.mirror_open(key, timing, now, now + ms)
                self._admit(key, policy, now, code, ms, shared=True)
                return
        with self._local_lock:
            code, ms = self._local.before_call(key, policy, now)
        self._admit(key, policy, now, code, ms, shared=False)

    def record(self, key: str, policy: BreakerPolicy, outcome: Outcome) -> None:
        """Count the outcome of a call that ``before_call`` let through.

        ``failure``: a retryable failure (the executor decides). ``ignored``
        (e.g. a 400) counts nothing but gives back a half-open trial permit.
        """
        if outcome not in OUTCOMES:
            raise ValueError(f"outcome must be one of {sorted(OUTCOMES)}, got {outcome!r}")
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
                    trust.closed_until = 0  # ask again: failures are when breakers open
                batch, trust.pending = trust.pending, 0
                own = outcome
        self._send(key, policy, now, own, batch)

    def state(self, key: str, policy: BreakerPolicy) -> BreakerState:
        """The state of one breaker, its window counted with ``policy``."""
        self._flush(key)
        now = self._now()
        window = timing_of(policy).window
        client = self.gate.client()
        if client is not None:
            try:
                return self._store.state(client, key, window, now)
            except redis_failures() as exc:
                self.gate.failed(USER, exc)
        with self._local_lock:
            return self._local.snapshot(key, window, now)

    def states(self) -> list[BreakerState]:
        """Every breaker known: the namespace in Redis (SCAN), else this process's own."""
        for key in list(self._trust):
            self._flush(key)
        now = self._now()
        client = self.gate.client()
        if client is not None:
            try:
                return self._store.states(client, now)
            except redis_failures() as exc:
                self.gate.failed(USER, exc)
        with self._local_lock:
            return self._local.snapshots(now)

    # --- what is taken on trust --------------------------------------------------------

    def _admit(self, key: str, policy: BreakerPolicy, now: int, code: int, ms: int, *, shared: bool) -> None:
        """Act on a ``(code, ms)`` answer from Redis (``shared``) or the local breaker; raise if refused."""
        if code == ADMIT:
            trust = self._trusted(key, policy)
            trust.closed_until, trust.open_until = now + self._sync_ms, 0
            return
        if code == TRIAL:
            return  # half-open is never taken on trust: permits are exact
        if code == OPEN and shared:
            self._trust_open(key, policy, now + ms)
        raise self._open_error(key, code, ms, policy)

    def _trust_open(self, key: str, policy: BreakerPolicy, reopen_at: int) -> None:
        """Remember an open breaker Redis told of until it reopens: only time ends an open state.

        A locally open breaker is not remembered so: its rejected calls keep
        asking the gate, whose probe so brings Redis back (and this breaker
        into it) within a second of Redis answering.
        """
        trust = self._trusted(key, policy)
        trust.closed_until, trust.open_until = 0, reopen_at

    def _trusted(self, key: str, policy: BreakerPolicy) -> _Trust:
        trust = self._trust.get(key)
        if trust is None:
            with self._trust_lock:
                trust = self._trust.setdefault(key, _Trust(policy))
        trust.policy = policy
        return trust

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
        timing = timing_of(policy)
        client = self.gate.client()
        if client is not None:
            try:
                reply = self._store.record(client, key, policy, timing, now, outcome, batch)
            except redis_failures() as exc:
                self.gate.failed(USER, exc)
            else:
                failures = 1 if outcome == "failure" else 0
                calls = batch + (1 if outcome == "success" else failures)
                counted = (calls, failures) if reply.counted else (0, 0)
                with self._local_lock:
                    self._local.mirror_record(
                        key, timing, now, counted, reply.state, reply.reopen_at, reply.transition
                    )
                if reply.state == "open":
                    self._trust_open(key, policy, reply.reopen_at)
                elif reply.state == "half_open":
                    self._stop_trusting(key)
                _log_transition(key, reply.transition, policy, "redis")
                return
        with self._local_lock:
            state, _, transition = self._local.record(key, policy, timing, now, outcome, batch)
        if state != "closed":
            self._stop_trusting(key)  # opened here, while Redis is away: the local breaker decides
        _log_transition(key, transition, policy, "local")

    def _stop_trusting(self, key: str) -> None:
        trust = self._trust.get(key)
        if trust is not None:
            trust.closed_until = 0

    # --- Redis back ----------------------------------------------------------------------

    def _write_local_opens(self, client: Redis) -> None:
        """Before Redis is used again: the breakers this process opened while it was away go into it."""
        now = self._now()
        with self._local_lock:
            opened = self._local.open_breakers(now)
        for key, timing, reopen_at in opened:
            self._store.seed_open(client, key, timing, reopen_at)

    def _now(self) -> int:
        return int(self._clock() * 1000)

    def _open_error(self, key: str, code: int, ms: int, policy: BreakerPolicy) -> LLMCircuitOpenError:
        provider, _, model = key.partition("/")
        seconds = max(ms, 0) / 1000
        if code == OPEN:
            message = f"circuit breaker open: no request made; trial calls in {seconds:.1f} s"
        else:
            message = (
                f"circuit breaker half-open: its {policy.half_open_calls} trial call(s) are in flight;"
                " no request made"
            )
        return LLMCircuitOpenError(
            message, provider=provider or None, model=model or None, retry_after=seconds
        )


def _log_transition(key: str, transition: str, policy: BreakerPolicy, backend: str) -> None:
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


# --- fork safety -------------------------------------------------------------------

_instances: weakref.WeakSet[CircuitBreakers] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    # A lock held by another thread at fork time stays locked forever in the child.
    for breakers in list(_instances):
        breakers._reset_locks()
        breakers._trust = {}  # the parent sends its own pending successes: not twice


on_fork_in_child(_after_fork_in_child)
