"""The disk back end: ``diskcache`` in ``LLM_CACHE_DIR``, shared by the workers of one host.

Why diskcache: it is SQLite (WAL journal) plus files, made to be used by
several processes at once. Every process, and every thread, opens its own
SQLite connection (it checks the pid on each use, so a worker forked from a
``--preload`` master never touches the master's), SQLite's locking makes each
write atomic across processes, and WAL lets readers go on while one writes.
Entries expire at their TTL and the folder is culled past its size limit
(diskcache's 1 GiB default). Values are our JSON bytes, stored raw: nothing
is unpickled. A locked database is waited on for at most
:data:`DISK_TIMEOUT`, then the read is a miss and the write is dropped.
"""

from __future__ import annotations

import os
import secrets
import sqlite3
import threading
from pathlib import Path
from typing import Any

from app.llm.cache.failures import FailureLog
from app.llm.cache.store import NO_LOCK, model_of

#: Seconds a read or write waits for SQLite's lock before the cache gives up on it.
DISK_TIMEOUT = 0.5
LOCK_PREFIX = "lock:"
STATS = ("hits", "misses")


class DiskStore:
    backend = "disk"
    shared = True

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.failures = FailureLog(self.backend)
        self._caches: tuple[Any, Any] | None = None
        self._lock = threading.Lock()

    def _open(self) -> tuple[Any, Any]:
        """(entries, counts): opened on first use, so that start-up touches no disk."""
        caches = self._caches
        if caches is None:
            with self._lock:
                if self._caches is None:
                    import diskcache

                    os.makedirs(self.directory, exist_ok=True)
                    entries = diskcache.Cache(str(self.directory), timeout=DISK_TIMEOUT, tag_index=True)
                    counts = diskcache.Cache(
                        str(self.directory / "counts"), timeout=DISK_TIMEOUT, eviction_policy="none"
                    )
                    self._caches = (entries, counts)
                caches = self._caches
        return caches

    def _failures(self) -> tuple[type[BaseException], ...]:
        import diskcache

        return (diskcache.Timeout, sqlite3.Error, OSError)

    def get(self, name: str) -> bytes | None:
        try:
            value = self._open()[0].get(name)
        except self._failures() as exc:
            self.failures.failed("a read", exc)
            return None
        return value if isinstance(value, bytes) else None

    def set(self, name: str, data: bytes, ttl: float) -> None:
        try:
            self._open()[0].set(name, data, expire=ttl, tag=model_of(name))
        except self._failures() as exc:
            self.failures.failed("a write", exc)

    def delete(self, name: str) -> None:
        try:
            self._open()[0].delete(name)
        except self._failures() as exc:
            self.failures.failed("a delete", exc)

    def clear(self, model: str | None = None) -> int:
        entries = self._open()[0]
        if model is not None:
            return int(entries.evict(model))
        return int(entries.clear())

    def size(self) -> tuple[int, int]:
        entries = self._open()[0]
        return len(entries), int(entries.volume())

    def lock(self, name: str, ttl: float) -> str | None:
        token = secrets.token_hex(8)
        try:
            added = self._open()[0].add(LOCK_PREFIX + name, token, expire=ttl)
        except self._failures() as exc:
            self.failures.failed("a lock", exc)
            return NO_LOCK
        return token if added else None

    def unlock(self, name: str, token: str) -> None:
        entries = self._open()[0]
        try:
            with entries.transact():
                if entries.get(LOCK_PREFIX + name) == token:
                    entries.delete(LOCK_PREFIX + name)
        except self._failures() as exc:
            self.failures.failed("an unlock", exc)

    def locked(self, name: str) -> bool:
        try:
            return LOCK_PREFIX + name in self._open()[0]
        except self._failures():
            return False

    def add_counts(self, hits: int, misses: int) -> bool:
        try:
            counts = self._open()[1]
            for key, value in zip(STATS, (hits, misses), strict=True):
                if value:
                    counts.incr(key, value)
        except self._failures() as exc:
            self.failures.failed("counting", exc)
            return False
        return True

    def shared_counts(self) -> tuple[int, int]:
        counts = self._open()[1]
        return int(counts.get("hits", 0)), int(counts.get("misses", 0))
