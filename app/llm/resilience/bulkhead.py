"""Bulkheads: at most ``max_concurrency`` LLM calls in flight per provider per process.

A call beyond the limit waits (FIFO) up to ``max_wait`` for a slot, then
fails with :class:`LLMBulkheadFullError` without making a request, rather
than queueing on an exhausted connection pool. Sync and async callers share
one count per provider: a thread waits on an event, a task on a future of its
own loop (woken with ``call_soon_threadsafe``), so the event loop never blocks.

A freed slot is handed to the first waiter directly, so a newcomer cannot
take it first. The latest ``max_concurrency`` a caller passes is the limit
from then on (raising it admits waiters at once; lowering it lets calls in
flight finish). Counts are per process: a forked child starts with none.

Unset, ``max_concurrency`` follows the worker this process is
(:func:`app.serving.llm_capacity`): a gthread worker's threads or a gevent
worker's connections, less a few kept for probes. A refusal carries
``retry_after``, which ``/api`` sends as ``Retry-After`` with its 503.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections import deque
from contextlib import AbstractAsyncContextManager, AbstractContextManager
from types import TracebackType
from typing import TYPE_CHECKING

from app.connectors._base import on_fork_in_child
from app.llm.errors import LLMBulkheadFullError
from app.llm.resilience.steps import Step
from app.serving.worker import llm_capacity

if TYPE_CHECKING:
    import asyncio

    from app.llm.resilience.settings import BulkheadPolicy


class _Waiter:
    """A thread (``event``) or a task (``loop`` and ``future``) waiting for a slot."""

    __slots__ = ("event", "future", "granted", "loop")

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop | None = None,
        future: asyncio.Future[None] | None = None,
    ) -> None:
        self.granted = False
        self.loop = loop
        self.future = future
        self.event = threading.Event() if loop is None else None

    def wake(self) -> bool:
        """Hand this waiter a slot (under the compartment's lock); False if nobody can take it."""
        if self.event is not None:
            self.granted = True
            self.event.set()
            return True
        assert self.loop is not None and self.future is not None
        try:
            self.loop.call_soon_threadsafe(_resolve, self.future)
        except RuntimeError:  # the loop is closed: its task will never run again
            return False
        self.granted = True
        return True


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class _Compartment:
    """One provider's slots in this process."""

    __slots__ = ("in_flight", "limit", "lock", "waiters")

    def __init__(self, limit: int) -> None:
        self.lock = threading.Lock()
        self.limit = limit
        self.in_flight = 0
        self.waiters: deque[_Waiter] = deque()

    def take_or_wait_locked(self, limit: int, waiter: _Waiter | None) -> bool:
        """Take a slot now (True), or queue ``waiter`` when given (False)."""
        self.limit = limit
        self.grant_locked()
        if self.in_flight < self.limit and not self.waiters:
            self.in_flight += 1
            return True
        if waiter is not None:
            self.waiters.append(waiter)
        return False

    def grant_locked(self) -> None:
        while self.in_flight < self.limit and self.waiters:
            if self.waiters.popleft().wake():
                self.in_flight += 1

    def release_locked(self) -> None:
        self.in_flight -= 1
        if self.waiters:
            self.grant_locked()

    def give_up_locked(self, waiter: _Waiter) -> bool:
        """After a timeout: True if the slot was granted meanwhile (the waiter holds it)."""
        if waiter.granted:
            return True
        with contextlib.suppress(ValueError):  # already popped by a wake() that found its loop closed
            self.waiters.remove(waiter)
        return False


class Bulkheads:
    """The bulkheads of every provider, for this process."""

    def __init__(self) -> None:
        self._reset_state()
        _live_bulkheads.add(self)

    def _reset_state(self) -> None:
        self._lock = threading.Lock()
        self._compartments: dict[str, _Compartment] = {}

    def slot(self, provider: str, policy: BulkheadPolicy, max_wait: float) -> Slot:
        """``with bulkheads.slot(...):`` holds one of the provider's slots for a sync call.

        Waits up to ``max_wait`` seconds for one, then raises
        :class:`LLMBulkheadFullError`. The slot is released on exit, exception
        or not (``release()`` may also be called directly; twice is harmless).
        """
        limit = policy.max_concurrency or llm_capacity()
        return Slot(self._compartment(provider, limit), provider, limit, max_wait)

    #: ``async with bulkheads.aslot(...):``: the same slot; waiting never blocks the event loop.
    aslot = slot

    def in_flight(self, provider: str) -> int:
        """Calls holding a slot of ``provider`` in this process."""
        compartment = self._compartments.get(provider)
        return compartment.in_flight if compartment is not None else 0

    def waiting(self, provider: str) -> int:
        """Calls waiting for a slot of ``provider`` in this process."""
        compartment = self._compartments.get(provider)
        return len(compartment.waiters) if compartment is not None else 0

    def _compartment(self, provider: str, limit: int) -> _Compartment:
        compartment = self._compartments.get(provider)
        if compartment is None:
            with self._lock:
                compartment = self._compartments.setdefault(provider, _Compartment(limit))
        return compartment

    def _forget_after_fork(self) -> None:
        # The parent's calls in flight are not the child's; its locks may have been held at the fork.
        self._reset_state()


class Slot(AbstractContextManager[None], AbstractAsyncContextManager[None]):
    """One slot of a provider's compartment, for a sync or an async call.

    :meth:`try_take` takes a free slot without waiting; :meth:`wait` is the
    step that waits for one (an event in a thread, a future on a loop). ``with``
    and ``async with`` do both. :meth:`release` gives it back (twice is harmless).
    """

    __slots__ = ("_compartment", "_held", "_limit", "_max_wait", "_provider")

    def __init__(self, compartment: _Compartment, provider: str, limit: int, max_wait: float) -> None:
        self._compartment = compartment
        self._provider = provider
        self._limit = limit
        self._max_wait = max(0.0, max_wait)
        self._held = False

    def try_take(self) -> bool:
        """Take a free slot now, if no one is waiting for it."""
        compartment = self._compartment
        with compartment.lock:  # the common case first: a free slot, and no waiter to build
            if compartment.in_flight < self._limit and not compartment.waiters:
                compartment.limit = self._limit
                compartment.in_flight += 1
                self._held = True
                return True
            if compartment.take_or_wait_locked(self._limit, None):
                self._held = True
                return True
        return False

    def wait(self) -> Step:
        """Wait up to ``max_wait`` for a slot, then raise :class:`LLMBulkheadFullError`."""
        return Step(self._wait, self._await)

    def release(self) -> None:
        """Give the slot back (to the first waiter, if any); a no-op if not held."""
        compartment = self._compartment
        with compartment.lock:
            if not self._held:
                return
            self._held = False
            compartment.release_locked()

    def _queue(self, waiter: _Waiter | None) -> bool:
        """Take a slot now (True), or queue ``waiter`` (False); raise at once when it may not wait."""
        with self._compartment.lock:
            if self._compartment.take_or_wait_locked(self._limit, waiter):
                self._held = True
                return True
        if waiter is None:
            raise self._full()
        return False

    def _settle(self, waiter: _Waiter) -> None:
        """After the wait: hold the slot if it was granted meanwhile, else raise."""
        with self._compartment.lock:
            if self._compartment.give_up_locked(waiter):
                self._held = True
                return
        raise self._full()

    def _wait(self) -> None:
        waiter = _Waiter() if self._max_wait > 0 else None
        if self._queue(waiter):
            return
        assert waiter is not None and waiter.event is not None
        try:
            waiter.event.wait(self._max_wait)
        except BaseException:  # interrupted (a killed greenlet: its client left): leave the queue
            self._abandon(waiter)
            raise
        self._settle(waiter)

    async def _await(self) -> None:
        import asyncio  # only async callers pay for it

        waiter: _Waiter | None = None
        if self._max_wait > 0:
            loop = asyncio.get_running_loop()
            waiter = _Waiter(loop, loop.create_future())
        if self._queue(waiter):
            return
        assert waiter is not None and waiter.future is not None
        try:
            await asyncio.wait_for(waiter.future, self._max_wait)
        except TimeoutError:
            pass
        except asyncio.CancelledError:
            self._abandon(waiter)
            raise
        self._settle(waiter)

    def _abandon(self, waiter: _Waiter) -> None:
        """Stop waiting, without a verdict: leave the queue, or pass on a slot granted meanwhile."""
        with self._compartment.lock:
            if self._compartment.give_up_locked(waiter):
                self._compartment.release_locked()

    def _full(self) -> LLMBulkheadFullError:
        compartment = self._compartment
        return LLMBulkheadFullError(
            f"{compartment.in_flight} calls to {self._provider} are in flight in this process"
            f" (at most {compartment.limit}) and none ended within {self._max_wait:.2f} s;"
            " no request was made",
            provider=self._provider,
            # No slot is promised then; a client that comes back after a second or so finds
            # calls ended meanwhile (a wait of max_wait just failed to find one).
            retry_after=max(1.0, self._max_wait),
        )

    def __enter__(self) -> None:
        if not self.try_take():
            self._wait()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.release()

    async def __aenter__(self) -> None:
        if not self.try_take():
            await self._await()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.release()


#: ``async with bulkheads.aslot(...)`` and ``with bulkheads.slot(...)`` hand out the same kind of slot.
AsyncSlot = Slot


_live_bulkheads: weakref.WeakSet[Bulkheads] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for bulkheads in list(_live_bulkheads):
        bulkheads._forget_after_fork()


on_fork_in_child(_after_fork_in_child)
