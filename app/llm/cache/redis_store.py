"""The Redis back end: entries shared by every worker and host, failing open through the app's gate.

Entries are plain strings with a TTL (``SET ... PX``), named
``llm-cache:<provider>/<model>:<key>`` so that one model's can be found
(``SCAN MATCH``) and removed. The lock that makes other workers wait for the
one calling the provider is ``SET NX PX`` of a random token, released by a
compare-and-delete script, and expires by itself if its holder dies.

Redis is reached through :class:`~app.services.redis_json.GatedRedis`: short
socket timeouts, no retries, and while Redis is down (until the gate's probe,
once a second, finds it back) no command at all: a read is a miss, a write
is dropped, a lock is not taken (each worker calls for itself), and the gate
logs it once per interval.
"""

from __future__ import annotations

import secrets
from typing import TYPE_CHECKING, Any

from app.connectors.redis_gate import RedisGate, redis_failures
from app.llm.cache.store import NO_LOCK
from app.services.redis_json import GatedRedis

if TYPE_CHECKING:
    from redis import Redis

PREFIX = "llm-cache:"
LOCK_PREFIX = "llm-cache-lock:"
COUNTS = "llm-cache-counts"
#: How the cache is named in the gate's log lines.
USER = "the LLM response cache"
#: Deletes the lock only if it is still ours (it may have expired and been taken by another worker).
_UNLOCK = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"
#: Keys per SCAN round trip (stats and clear only).
SCAN_COUNT = 500


class RedisStore:
    backend = "redis"
    shared = True

    def __init__(self, gate: RedisGate) -> None:
        self.redis = GatedRedis(gate, USER)

    def _run(self, command: Any, default: Any = None) -> Any:
        client = self.redis.client()
        if client is None:
            return default
        try:
            return command(client)
        except redis_failures() as exc:
            self.redis.failed(exc)
            return default

    def get(self, name: str) -> bytes | None:
        client = self.redis.client()
        if client is None:
            return None
        try:
            value = client.get(PREFIX + name)
        except redis_failures() as exc:
            self.redis.failed(exc)
            return None
        return value if isinstance(value, bytes) else None

    def set(self, name: str, data: bytes, ttl: float) -> None:
        self._run(lambda client: client.set(PREFIX + name, data, px=max(1, round(ttl * 1000))))

    def delete(self, name: str) -> None:
        self._run(lambda client: client.delete(PREFIX + name))

    def clear(self, model: str | None = None) -> int:
        client = self._client()
        pattern = PREFIX + (_escaped(model) + ":*" if model is not None else "*")
        removed = 0
        batch: list[bytes] = []
        for name in client.scan_iter(match=pattern, count=SCAN_COUNT):
            batch.append(name)
            if len(batch) >= SCAN_COUNT:
                removed += int(client.unlink(*batch))
                batch = []
        if batch:
            removed += int(client.unlink(*batch))
        return removed

    def size(self) -> tuple[int, int]:
        client = self._client()
        entries = total = 0
        names: list[bytes] = []
        for name in client.scan_iter(match=PREFIX + "*", count=SCAN_COUNT):
            names.append(name)
            if len(names) >= SCAN_COUNT:
                total += _lengths(client, names)
                entries += len(names)
                names = []
        if names:
            total += _lengths(client, names)
            entries += len(names)
        return entries, total

    def _client(self) -> Redis:
        """For the operator's commands: the gate's client, or the error that says why there is none."""
        client = self.redis.client()
        if client is None:
            raise ConnectionError("Redis is not configured (REDIS_URL) or not answering")
        return client

    def lock(self, name: str, ttl: float) -> str | None:
        client = self.redis.client()
        if client is None:
            return NO_LOCK
        token = secrets.token_hex(8)
        try:
            taken = client.set(LOCK_PREFIX + name, token, nx=True, px=max(1, round(ttl * 1000)))
        except redis_failures() as exc:
            self.redis.failed(exc)
            return NO_LOCK
        return token if taken else None

    def unlock(self, name: str, token: str) -> None:
        self._run(lambda client: client.eval(_UNLOCK, 1, LOCK_PREFIX + name, token))

    def locked(self, name: str) -> bool:
        return bool(self._run(lambda client: client.exists(LOCK_PREFIX + name), 0))

    def add_counts(self, hits: int, misses: int) -> bool:
        def add(client: Redis) -> bool:
            pipe = client.pipeline(transaction=False)
            pipe.hincrby(COUNTS, "hits", hits)
            pipe.hincrby(COUNTS, "misses", misses)
            pipe.execute()
            return True

        return bool(self._run(add, False))

    def shared_counts(self) -> tuple[int, int]:
        values = self._client().hmget(COUNTS, ["hits", "misses"])
        return int(values[0] or 0), int(values[1] or 0)


def _lengths(client: Redis, names: list[bytes]) -> int:
    pipe = client.pipeline(transaction=False)
    for name in names:
        pipe.strlen(name)
    return sum(int(length) for length in pipe.execute())


def _escaped(text: str) -> str:
    """``text`` as a literal in a SCAN MATCH glob."""
    return "".join("\\" + char if char in "*?[]\\" else char for char in text)
