"""What every back end of the response cache does, and the counters they share.

A store keeps entries (JSON bytes, :mod:`app.llm.cache.codec`) under names
``<provider>/<model>:<key>`` for a TTL, forgets them per model on request,
and says how many bytes it holds. A store shared by processes (disk, Redis)
also keeps the hit and miss counts and a short lock per key, so that one
worker calls the provider while the others wait for its answer
(:mod:`app.llm.cache.hook`). Every method fails open: a back end that fails
is a miss, a dropped write, no lock; none raises into a call.
"""

from __future__ import annotations

import threading
import time
from typing import Protocol

#: ``lock()``'s answer when this store has no cross-process lock, or cannot take one now: go ahead.
NO_LOCK = ""
#: How often a process adds its hit and miss counts to a shared store's (a call pays for none).
FLUSH_INTERVAL = 1.0


class Store(Protocol):
    #: ``memory``, ``disk`` or ``redis``.
    backend: str
    #: Whether other processes see its entries (then it has locks and shared counts).
    shared: bool

    def get(self, name: str) -> bytes | None: ...

    def set(self, name: str, data: bytes, ttl: float) -> None: ...

    def delete(self, name: str) -> None: ...

    def clear(self, model: str | None = None) -> int:
        """Forget every entry (of ``provider/model`` when given); how many were removed."""

    def size(self) -> tuple[int, int]:
        """(entries, bytes) held now."""

    def lock(self, name: str, ttl: float) -> str | None:
        """A token when this process now holds ``name``'s lock, :data:`NO_LOCK` when there is
        no lock to take (go ahead), None when another process holds it."""

    def unlock(self, name: str, token: str) -> None: ...

    def locked(self, name: str) -> bool:
        """Whether another process holds ``name``'s lock (False when unknown)."""

    def add_counts(self, hits: int, misses: int) -> bool:
        """Add to the counts every process shares (a store that is not shared keeps none); False
        when the store failed (the counts are given back for the next time)."""

    def shared_counts(self) -> tuple[int, int]: ...


class Counts:
    """This process's hits and misses, and what it has not yet added to the shared counts."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.hits = self.misses = 0
        self._pending_hits = self._pending_misses = 0
        self._flushed = time.monotonic()

    def hit(self) -> tuple[int, int] | None:
        """Count a hit; what :meth:`take_due` gives when a flush is due (one call on a hit's path)."""
        with self._lock:
            self.hits += 1
            self._pending_hits += 1
        if time.monotonic() - self._flushed < FLUSH_INTERVAL:
            return None  # the path of all but one hit a second
        return self.take_due()

    def miss(self) -> tuple[int, int] | None:
        """Count a miss; what :meth:`take_due` gives when a flush is due."""
        with self._lock:
            self.misses += 1
            self._pending_misses += 1
        return self.take_due()

    def take_due(self, force: bool = False) -> tuple[int, int] | None:
        """The counts to add to the shared ones, once per :data:`FLUSH_INTERVAL` (or now, ``force``)."""
        now = time.monotonic()
        if not force and now - self._flushed < FLUSH_INTERVAL:
            return None
        with self._lock:
            pending = self._pending_hits, self._pending_misses
            self._pending_hits = self._pending_misses = 0
            self._flushed = now
        return pending if any(pending) else None

    def pending(self) -> tuple[int, int]:
        return self._pending_hits, self._pending_misses

    def give_back(self, hits: int, misses: int) -> None:
        """A flush that failed: counted again at the next one."""
        with self._lock:
            self._pending_hits += hits
            self._pending_misses += misses


def model_of(name: str) -> str:
    """``provider/model`` of an entry's name."""
    return name.rpartition(":")[0]


__all__ = ["FLUSH_INTERVAL", "NO_LOCK", "Counts", "Store", "model_of"]
