"""Client-side rate limits per provider/model: requests and tokens per minute, shared through Redis.

Each ``provider/model`` key has up to two windows of 60 s, kept by the
`limits <https://limits.readthedocs.io>`_ library's atomic strategies:

* **RPM** in a *moving window* (one timestamp per request, a Lua script in
  Redis): exact, at most ``rpm`` admitted in any 60 s, across threads,
  processes and hosts sharing one Redis.
* **TPM** in a *sliding window counter* (a cost per request, weighted over the
  current and the previous window): the library's strategy for costs, an
  approximation that assumes the previous window's tokens were spread evenly.
  A moving window would store one entry per token.

A request takes 1 from RPM and its estimated tokens (:func:`estimate_tokens`)
from TPM. When either is full the call sleeps until the window would admit
it and checks again, up to ``max_wait``; when the wait would be longer it
raises :class:`LLMRateLimitError` at once, with ``retry_after`` set. With
both limits set, TPM is tested before an RPM entry is taken (under a lock per
key in the process), so a waiting call does not spend a request while TPM
refuses it; a race with another process between the test and the hits can
still spend an RPM entry (the library has no refund): conservative.

:meth:`RateLimiter.settle` corrects TPM by the response's usage: tokens above
the estimate are taken (even past the limit: they were spent). Tokens below
the estimate are **not** given back, because neither window of the library
supports a refund: an over-estimate is kept, which is conservative. A request
estimated above the whole TPM limit is charged the limit (it waits for an
empty window) rather than refused forever; the provider has the last word.

Storage: Redis when the app's :class:`~app.connectors.redis_gate.RedisGate`
hands out a client, else a :class:`limits.storage.MemoryStorage` per process.
The checks run on every call, so they use a pool of their own to the
connector's server (:func:`~app.connectors.redis_gate.fail_fast_pool`:
``socket_timeout`` 0.5 s, no retries inside redis-py), not the connector's
client (1 s, one retry). When Redis fails, the process falls back to its
memory storage (so the limit then holds per process, not across them) and
tells the gate, which logs, probes Redis every second and opens again when it
answers, for the breakers and the limits alike. A forked child forgets the
parent's Redis pool (held, never closed) and memory storage (its locks and
timer thread) and builds its own.

:meth:`RateLimiter.acquire_flow` is the waiting loop, written once as a flow
of :mod:`.steps`: :meth:`~RateLimiter.acquire` runs it in the calling
thread, :meth:`~RateLimiter.aacquire` on the event loop, and the call
pipeline runs it inside its own flow.

Neither ``limits`` nor ``redis`` is imported until a limit is first checked.
"""

from __future__ import annotations

import json
import logging
import math
import random
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

from app.connectors._base import keep_inherited, on_fork_in_child
from app.connectors.redis_gate import RedisGate, fail_fast_pool
from app.llm.errors import LLMRateLimitError
from app.llm.resilience.steps import Flow, blocking, run_async, run_sync, sleep
from app.llm.types import ImagePart

if TYPE_CHECKING:
    from limits import RateLimitItem
    from limits.storage import MemoryStorage, RedisStorage
    from limits.strategies import MovingWindowRateLimiter, SlidingWindowCounterRateLimiter
    from redis import Redis

    from app.llm.providers.base import ChatRequest
    from app.llm.resilience.settings import LimitPolicy

logger = logging.getLogger(__name__)

#: How the rate limits are named in the gate's log lines.
USER = "rate limits"

#: Tokens assumed for the answer when the request sets no ``max_tokens``.
DEFAULT_ANSWER_TOKENS = 512
#: Characters per token, a rough average for English text and JSON.
CHARS_PER_TOKEN = 4
#: Tokens of framing per message (role, separators).
MESSAGE_OVERHEAD_TOKENS = 4
#: Tokens assumed for an image part (a mid-sized image on OpenAI's and Anthropic's scales).
IMAGE_TOKENS = 800

#: The shortest sleep between two checks, so that a race lost at the boundary does not spin.
_MIN_WAIT = 0.01
#: A limit no request reaches: used to add tokens to a TPM window past its limit.
_UNBOUNDED = 2**53


def estimate_tokens(request: ChatRequest) -> int:
    """Tokens a request will use: about ``len(text) / 4`` of its input, plus the answer's budget.

    Counted: every message's text and tool calls, the tool schemas and a
    structured-output schema, a few tokens per message, a flat
    :data:`IMAGE_TOKENS` per image; plus ``max_tokens`` (or
    :data:`DEFAULT_ANSWER_TOKENS`) for the answer. An estimate, corrected
    after the call by :meth:`RateLimiter.settle`.
    """
    chars = 0
    images = 0
    for message in request.messages:
        chars += len(message.text)
        images += sum(1 for part in message.parts if isinstance(part, ImagePart))
        for call in message.tool_calls:
            chars += len(call.name) + len(json.dumps(call.arguments, default=str))
    for tool in request.tools:
        chars += len(tool.name) + len(tool.description) + len(json.dumps(tool.parameters, default=str))
    if isinstance(request.response_format, dict):
        chars += len(json.dumps(request.response_format, default=str))
    prompt = math.ceil(chars / CHARS_PER_TOKEN) + MESSAGE_OVERHEAD_TOKENS * len(request.messages)
    answer = request.max_tokens if request.max_tokens is not None else DEFAULT_ANSWER_TOKENS
    return prompt + images * IMAGE_TOKENS + max(answer, 0)


@dataclass(frozen=True)
class Reservation:
    """What :meth:`RateLimiter.acquire` took, for :meth:`RateLimiter.settle`."""

    #: ``provider/model``.
    key: str
    #: Tokens taken from the TPM window (the estimate, at most the limit; 0 without a TPM limit).
    tokens: int
    rpm: int | None
    tpm: int | None
    #: Seconds the call waited for the limit.
    waited: float = 0.0


@dataclass
class _Backend:
    """One storage and the two strategies over it."""

    storage: RedisStorage | MemoryStorage
    moving: MovingWindowRateLimiter
    sliding: SlidingWindowCounterRateLimiter
    #: The app's client this Redis storage was derived from (None: memory).
    source: Redis | None = None


def _backend(storage: RedisStorage | MemoryStorage, source: Redis | None = None) -> _Backend:
    from limits.strategies import MovingWindowRateLimiter, SlidingWindowCounterRateLimiter

    return _Backend(
        storage, MovingWindowRateLimiter(storage), SlidingWindowCounterRateLimiter(storage), source
    )


class RateLimiter:
    """RPM and TPM limits per ``provider/model``, in Redis when the gate allows, else in memory.

    ``redis``: the app's :class:`~app.connectors.redis_gate.RedisGate`, shared
    with its other Redis users; or a callable returning a Redis client (or
    None), which gets a gate of its own (a limiter used alone: tests,
    scripts). ``window`` (whole seconds) is the length of both windows: 60 s,
    shorter only in tests. ``socket_timeout`` bounds one check's wait on Redis.
    """

    def __init__(
        self,
        redis: RedisGate | Callable[[], Redis | None],
        namespace: str = "llm:rate",
        *,
        window: int = 60,
        socket_timeout: float = 0.5,
    ) -> None:
        if window < 1 or int(window) != window:
            raise ValueError(f"window must be a whole number of seconds of 1 or more, got {window!r}")
        self.gate = redis if isinstance(redis, RedisGate) else RedisGate(redis)
        self.gate.join(USER)
        self.namespace = namespace
        self.window = int(window)
        self.socket_timeout = socket_timeout
        self._reset_state()
        _live_limiters.add(self)

    def _reset_state(self) -> None:
        self._lock = threading.Lock()
        self._key_locks: dict[str, threading.Lock] = {}
        self._redis: _Backend | None = None
        self._memory: _Backend | None = None

    # --- the public API -------------------------------------------------------

    def acquire(self, key: str, policy: LimitPolicy, tokens: int, max_wait: float) -> Reservation | None:
        """Take one request and ``tokens`` from the limits of ``key``, waiting up to ``max_wait`` seconds.

        None when the policy sets neither ``rpm`` nor ``tpm``. Raises
        :class:`LLMRateLimitError` (``retry_after``: seconds until it would
        fit) as soon as the wait is known to exceed ``max_wait``.
        """
        return run_sync(self.acquire_flow(key, policy, tokens, max_wait))

    async def aacquire(
        self, key: str, policy: LimitPolicy, tokens: int, max_wait: float
    ) -> Reservation | None:
        """:meth:`acquire` for async callers: checks run in a worker thread, waits are ``asyncio.sleep``."""
        return await run_async(self.acquire_flow(key, policy, tokens, max_wait))

    def acquire_flow(
        self, key: str, policy: LimitPolicy, tokens: int, max_wait: float
    ) -> Flow[Reservation | None]:
        """:meth:`acquire` as a flow: a blocking step per storage check, a sleep step per wait."""
        if not policy.rpm and not policy.tpm:
            return None
        cost = self._cost(policy, tokens)
        started = time.monotonic()
        deadline = started + max(0.0, max_wait)
        while True:
            wait: float = yield blocking(partial(self._attempt, key, policy.rpm, policy.tpm, cost))
            now = time.monotonic()
            if wait <= 0:
                return Reservation(key, cost, policy.rpm, policy.tpm, waited=now - started)
            if wait > deadline - now:
                raise self._error(key, policy, wait, max_wait)
            yield sleep(self._sleep_for(wait, deadline - now))

    def settle(self, reservation: Reservation | None, actual_tokens: int | None) -> None:
        """Correct the TPM window by the tokens the call really used.

        Tokens above the estimate are taken, even past the limit. Tokens below
        it are kept (no refund: the library's windows have none), which only
        makes the limit stricter. Never raises for a storage failure.
        """
        if reservation is None or not reservation.tpm or actual_tokens is None:
            return
        extra = int(actual_tokens) - reservation.tokens
        if extra <= 0:
            return
        item = self._item("tpm", reservation.tpm)
        backend = self._redis_backend()
        if backend is not None:
            try:
                self._force(backend, item, reservation.key, extra)
                return
            except Exception as exc:  # any storage failure: fall back, never fail the call
                self.gate.failed(USER, exc)
        self._force(self._memory_backend(), item, reservation.key, extra)

    async def asettle(self, reservation: Reservation | None, actual_tokens: int | None) -> None:
        """:meth:`settle` for async callers: a Redis write, when one is needed, runs in a worker thread."""
        if reservation is None or not reservation.tpm or actual_tokens is None:
            return
        if int(actual_tokens) > reservation.tokens:
            import asyncio

            await asyncio.to_thread(self.settle, reservation, actual_tokens)

    @property
    def using_redis(self) -> bool:
        """Whether the next check would go to Redis (configured, and not known to be down)."""
        return self.gate.available

    # --- one check --------------------------------------------------------------

    def _cost(self, policy: LimitPolicy, tokens: int) -> int:
        if not policy.tpm:
            return 0
        return max(1, min(int(tokens), policy.tpm))

    def _item(self, kind: str, amount: int) -> RateLimitItem:
        from limits import RateLimitItemPerSecond

        return RateLimitItemPerSecond(amount, self.window, namespace=f"{self.namespace}:{kind}")

    def _attempt(self, key: str, rpm: int | None, tpm: int | None, cost: int) -> float:
        """0 when admitted, else the seconds until it would fit (> 0); in Redis, or in memory if it fails."""
        rpm_item = self._item("rpm", rpm) if rpm else None
        tpm_item = self._item("tpm", tpm) if tpm else None
        with self._key_lock(key):
            backend = self._redis_backend()
            if backend is not None:
                try:
                    wait = self._check(backend, key, rpm_item, tpm_item, cost)
                except Exception as exc:  # any storage failure: this process counts alone for now
                    self.gate.failed(USER, exc)
                else:
                    return wait
            return self._check(self._memory_backend(), key, rpm_item, tpm_item, cost)

    def _check(
        self,
        backend: _Backend,
        key: str,
        rpm_item: RateLimitItem | None,
        tpm_item: RateLimitItem | None,
        cost: int,
    ) -> float:
        if rpm_item is not None and tpm_item is not None:
            # Test TPM before taking a request entry: an entry taken while TPM then refuses would be lost.
            # (A refused RPM hit takes nothing, so RPM needs no test.)
            wait = self._tpm_wait(backend, tpm_item, key, cost)
            if wait > 0:
                return max(wait, self._rpm_wait(backend, rpm_item, key))
        if rpm_item is not None and not backend.moving.hit(rpm_item, key):
            return max(self._rpm_wait(backend, rpm_item, key), _MIN_WAIT)
        if tpm_item is not None and not backend.sliding.hit(tpm_item, key, cost=cost):
            return max(self._tpm_wait(backend, tpm_item, key, cost), _MIN_WAIT)
        return 0.0

    @staticmethod
    def _rpm_wait(backend: _Backend, item: RateLimitItem, key: str) -> float:
        """Seconds until the oldest request in a full moving window leaves it (0 if not full)."""
        stats = backend.moving.get_window_stats(item, key)
        if stats.remaining >= 1:
            return 0.0
        return max(stats.reset_time - time.time(), _MIN_WAIT)

    @staticmethod
    def _tpm_wait(backend: _Backend, item: RateLimitItem, key: str, cost: int) -> float:
        """Seconds until ``cost`` fits the sliding window counter (0 if it fits now)."""
        expiry = item.get_expiry()
        limit = item.amount
        previous, previous_ttl, current, current_ttl = backend.storage.get_sliding_window(
            item.key_for(key), expiry
        )
        if math.floor(previous * previous_ttl / expiry) + current + cost <= limit:
            return 0.0
        room = limit - cost  # the weighted count must fall to this
        if current <= room:
            # The previous window's share decays linearly to 0 over previous_ttl.
            wait = previous_ttl - (room - current) * expiry / previous if previous else 0.0
        else:
            # Only after the current window becomes the previous one, and decays enough.
            until_shift = max(current_ttl - expiry, 0.0)
            wait = until_shift + expiry * (1 - room / current)
        return max(wait, _MIN_WAIT)

    @staticmethod
    def _force(backend: _Backend, item: RateLimitItem, key: str, amount: int) -> None:
        """Add ``amount`` to the TPM window whatever its count (the library's atomic acquire, unbounded)."""
        backend.storage.acquire_sliding_window_entry(item.key_for(key), _UNBOUNDED, item.get_expiry(), amount)

    @staticmethod
    def _sleep_for(wait: float, left: float) -> float:
        # A little jitter so that callers woken by one freed slot do not all check at once.
        return max(0.0, min(wait + random.uniform(0, _MIN_WAIT), left))  # noqa: S311 - not cryptographic

    def _error(self, key: str, policy: LimitPolicy, wait: float, max_wait: float) -> LLMRateLimitError:
        provider, _, model = key.partition("/")
        limits = [f"{policy.rpm} rpm"] if policy.rpm else []
        limits += [f"{policy.tpm} tpm"] if policy.tpm else []
        return LLMRateLimitError(
            f"client-side rate limit ({', '.join(limits)}) reached; the call would fit in {wait:.2f} s,"
            f" more than the {max(0.0, max_wait):.2f} s it may wait",
            provider=provider or None,
            model=model or None,
            retry_after=wait,
        )

    # --- storage ----------------------------------------------------------------

    def _key_lock(self, key: str) -> threading.Lock:
        lock = self._key_locks.get(key)
        if lock is None:
            with self._lock:
                lock = self._key_locks.setdefault(key, threading.Lock())
        return lock

    def _redis_backend(self) -> _Backend | None:
        """The Redis backend, or None when the gate says not to use Redis now."""
        client = self.gate.client()
        if client is None:
            return None
        backend = self._redis
        if backend is not None and backend.source is client:
            return backend
        with self._lock:
            if self._redis is None or self._redis.source is not client:  # first use, or a new app client
                if self._redis is not None:
                    _close_quietly(self._redis)
                self._redis = None
                try:
                    self._redis = _backend(self._redis_storage(client), client)
                except Exception as exc:  # could not even be built: a failure like any other
                    self.gate.failed(USER, exc)
                    return None
            return self._redis

    def _redis_storage(self, client: Redis) -> RedisStorage:
        """The library's storage on a fail-fast pool to the app client's server."""
        from limits.storage import RedisStorage

        # The URI only tells the library to use redis-py; the pool says where and how.
        return RedisStorage("redis://", connection_pool=fail_fast_pool(client, self.socket_timeout))

    def _memory_backend(self) -> _Backend:
        backend = self._memory
        if backend is not None:
            return backend
        with self._lock:
            if self._memory is None:
                from limits.storage import MemoryStorage

                self._memory = _backend(MemoryStorage())
            return self._memory

    def _forget_after_fork(self) -> None:
        # The parent's Redis connections and the memory storage's locks and timer stay the parent's.
        if self._redis is not None:
            keep_inherited(self._redis)
        if self._memory is not None:
            keep_inherited(self._memory)
        self._reset_state()


def _close_quietly(backend: _Backend) -> None:
    get_connection = getattr(backend.storage, "get_connection", None)
    try:
        if get_connection is not None:
            get_connection().connection_pool.disconnect()
    except Exception:  # closing is best effort
        logger.debug("closing a rate-limit Redis client failed", exc_info=True)


_live_limiters: weakref.WeakSet[RateLimiter] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for limiter in list(_live_limiters):
        limiter._forget_after_fork()


on_fork_in_child(_after_fork_in_child)
