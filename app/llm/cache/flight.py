"""Single flight in one process: identical calls at once make one request, the others wait for it.

The first call of a key leads: it calls the provider. Others of the same key
join its flight and wait (at most the cache's ``LLM_CACHE_WAIT``) for the
entry it lands; when it lands none (it failed, or was cancelled), or takes
too long, each calls for itself. ``threading`` primitives, so the same code
serves threads and, under gevent's monkey-patching (the gevent worker
patches before the app loads), greenlets; an async call awaits a future the
leader resolves, holding no thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import weakref
from collections.abc import Callable

from app.connectors._base import on_fork_in_child


class Flight:
    """One key's call in flight: ``done`` is set when it lands, ``entry`` is what it answered, or None."""

    __slots__ = ("__weakref__", "_lock", "_wake", "done", "entry", "started")

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.done = threading.Event()
        self.entry: bytes | None = None
        self._lock = threading.Lock()
        #: Async waiters' wake-ups, called (from the leader's thread) when it lands.
        self._wake: list[Callable[[], object]] = []

    def wait(self, timeout: float) -> None:
        """Block this thread (or greenlet) until it lands, at most ``timeout`` seconds."""
        self.done.wait(timeout)

    async def await_(self, timeout: float) -> None:
        """Wait on the event loop, holding no thread, until it lands, at most ``timeout`` seconds.

        Why not ``to_thread(wait)``: twenty async waiters would hold every thread of the
        loop's default executor, where the leader's own ``after_call`` must run to land.
        """
        loop = asyncio.get_running_loop()
        landed = loop.create_future()

        def wake() -> None:
            loop.call_soon_threadsafe(_resolve, landed)

        with self._lock:
            if self.done.is_set():
                return
            self._wake.append(wake)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(landed, timeout)

    def _landed(self, entry: bytes | None) -> None:
        with self._lock:
            self.entry = entry
            self.done.set()
            wake, self._wake = self._wake, []
        for callback in wake:
            with contextlib.suppress(RuntimeError):  # a waiter whose loop has closed
                callback()


class Flights:
    def __init__(self) -> None:
        self._reset()
        _live.add(self)

    def _reset(self) -> None:
        self._lock = threading.Lock()
        self._flights: dict[str, Flight] = {}

    def join(self, key: str, max_age: float) -> tuple[Flight, bool]:
        """The flight of ``key``, and whether this call leads it (the first one does).

        A flight older than ``max_age`` (the waiters' bound) is replaced: its leader never
        landed (an async call cancelled, a stream dropped unclosed), and its key must not
        make every later call wait.
        """
        with self._lock:
            flight = self._flights.get(key)
            if flight is not None and time.monotonic() - flight.started < max_age:
                return flight, False
            flight = self._flights[key] = Flight()
            return flight, True

    def land(self, key: str, flight: Flight, entry: bytes | None) -> None:
        """The leader is done: wake the waiters (``entry`` None: each calls for itself)."""
        with self._lock:
            if self._flights.get(key) is flight:
                del self._flights[key]
        flight._landed(entry)

    def __len__(self) -> int:
        return len(self._flights)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


_live: weakref.WeakSet[Flights] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    # The parent's flights (and a lock another thread may have held at fork) are not this process's.
    for flights in list(_live):
        flights._reset()


on_fork_in_child(_after_fork_in_child)

__all__ = ["Flight", "Flights"]
