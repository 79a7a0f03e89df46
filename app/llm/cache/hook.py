"""The response cache: a hook that answers a call from the cache, or stores the answer it got.

``before_call`` computes the call's key (:mod:`app.llm.cache.keys`), and on a
hit answers the call itself: no provider request is made, and a stream
replays the stored deltas with no delay. On a miss the call goes on, and
``after_call`` stores its answer; a stream's ``after_call`` runs only after
a clean end, so a stream closed early (``on_cancel``) or broken
(``on_error``) is never stored.

**Single flight.** Identical calls at once make one provider request. In a
process, the first leads and the others wait for its answer
(:mod:`app.llm.cache.flight`); across processes, a shared store's short lock
makes other workers' leaders poll the store for the answer instead of
calling. Each waiter gets the answer, or calls for itself when the leader
failed or ``LLM_CACHE_WAIT`` ran out.

**Hits.** ``r.cached`` is True; the usage (tokens and ``cost``) is the
original's, for a ledger to bill at zero; tool calls and ``parsed`` are
restored. An answer a fallback model gave is not stored under the primary
model's key (the waiters of that moment still get it).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from app.llm.cache.codec import CorruptEntry, decode, encode
from app.llm.cache.flight import Flight, Flights
from app.llm.cache.keys import call_key
from app.llm.cache.settings import CacheOption, CacheSettings, ttl_for
from app.llm.cache.store import NO_LOCK, Counts, Store
from app.llm.errors import LLMError
from app.llm.hooks import EmbedResponse, LLMCall, LLMHook
from app.llm.types import ChatResponse

logger = logging.getLogger("app.llm.cache")

#: Where a call that missed keeps what ``after_call`` needs, in ``call.metadata``.
PENDING = "llm.cache"
_UNSET: Any = object()
MAX_REMEMBERED_MODELS = 1024
#: The kinds of call answered from the cache (media calls are not).
CACHED_KINDS = frozenset({"chat", "stream", "embed"})
#: Seconds between two looks at a shared store while another worker calls: from, and up to.
POLL_FIRST, POLL_MAX = 0.005, 0.05


class _Pending:
    """A call that missed: where its answer goes, for how long, and what it holds."""

    __slots__ = ("flight", "model", "name", "token", "ttl")

    def __init__(self, name: str, ttl: float, model: str, flight: Flight | None, token: str) -> None:
        self.name = name
        self.ttl = ttl
        #: ``provider/model`` the call was made for: an answer of another (a fallback) is not stored.
        self.model = model
        #: The in-process flight this call leads (None: it waited, then called for itself).
        self.flight = flight
        #: The shared store's lock it holds (NO_LOCK: none).
        self.token = token


class _Waiting:
    """A call that found an identical one in flight in this process: what it waits on."""

    __slots__ = ("flight", "model", "name", "ttl")

    def __init__(self, name: str, ttl: float, model: str, flight: Flight) -> None:
        self.name, self.ttl, self.model, self.flight = name, ttl, model, flight


class ResponseCache(LLMHook):
    """The cache of one app: its store, settings, in-process flights and counts."""

    def __init__(
        self,
        settings: CacheSettings,
        store: Callable[[], Store],
        policy: Callable[[str, str], CacheOption],
        endpoints: Callable[[], dict[str, str | None]],
    ) -> None:
        self.settings = settings
        self._make_store = store
        self._store: Store | None = None
        self._policy = policy
        #: (provider, model) -> its LLM_POLICY ``cache`` entry: settings fixed at start, read per call.
        self._policies: dict[tuple[str, str], CacheOption] = {}
        self._endpoints = endpoints
        self._endpoint_of: dict[str, str | None] | None = None
        self._lock = threading.Lock()
        self.flights = Flights()
        self.counts = Counts()

    @property
    def store(self) -> Store:
        """The back end, made on the first call (so start-up opens no file and no connection)."""
        store = self._store
        if store is None:
            with self._lock:
                if self._store is None:
                    self._store = self._make_store()
                store = self._store
        return store

    # --- the hook ------------------------------------------------------------------

    def before_call(self, call: LLMCall) -> ChatResponse | EmbedResponse | None:
        looked = self._look_up(call)
        if not isinstance(looked, _Waiting):
            return looked
        looked.flight.wait(self.settings.wait)
        return self._after_waiting(call, looked)

    def after_call(self, call: LLMCall, response: ChatResponse | EmbedResponse) -> None:
        pending = self._take(call)
        if pending is None:
            return
        entry = None
        try:
            if call.attempts:  # a provider answered (not another hook)
                entry = encode(call.kind, response)
                if f"{call.provider}/{call.model}" == pending.model:
                    self.store.set(pending.name, entry, pending.ttl)
        finally:  # the waiters are told whatever happens
            self._land(pending, entry)

    def on_error(self, call: LLMCall, error: LLMError) -> None:
        pending = self._take(call)
        if pending is not None:
            self._land(pending, None)

    def on_cancel(self, call: LLMCall, partial: ChatResponse) -> None:
        pending = self._take(call)  # a stream closed before its end: never stored
        if pending is not None:
            self._land(pending, None)

    # Async calls: the store's I/O and a flight's wait happen in a worker thread, not on the loop.

    async def abefore_call(self, call: LLMCall) -> ChatResponse | EmbedResponse | None:
        looked = await asyncio.to_thread(self._look_up, call)
        if not isinstance(looked, _Waiting):
            return looked
        await looked.flight.await_(self.settings.wait)  # on the loop: no thread held while waiting
        return await asyncio.to_thread(self._after_waiting, call, looked)

    async def aafter_call(self, call: LLMCall, response: ChatResponse | EmbedResponse) -> None:
        await asyncio.to_thread(self.after_call, call, response)

    async def aon_error(self, call: LLMCall, error: LLMError) -> None:
        await asyncio.to_thread(self.on_error, call, error)

    async def aon_cancel(self, call: LLMCall, partial: ChatResponse) -> None:
        await asyncio.to_thread(self.on_cancel, call, partial)

    # --- keys and entries -----------------------------------------------------------

    def name_of(self, call: LLMCall) -> str:
        """``provider/model:key``: the store's name of this call's answer."""
        endpoints = self._endpoint_of
        if endpoints is None:
            endpoints = self._endpoint_of = self._endpoints()
        key = call_key(call.request, endpoints.get(call.provider), call.kind, call.tenant)
        return f"{call.provider}/{call.model}:{key}"

    def _decoded(self, call: LLMCall, name: str, data: bytes) -> ChatResponse | EmbedResponse | None:
        try:
            return decode(call.kind, data, call.request)
        except CorruptEntry as exc:
            logger.warning(
                "LLM response cache: an entry of %s could not be used (%s); deleted", call.model, exc
            )
            self.store.delete(name)
            return None

    # --- single flight --------------------------------------------------------------------

    def _look_up(self, call: LLMCall) -> ChatResponse | EmbedResponse | _Waiting | None:
        """A hit; None (call the provider: a miss, or this call does not use the cache); or a
        :class:`_Waiting`: an identical call of this process is in flight, wait for it."""
        if call.kind not in CACHED_KINDS:
            return None
        target = (call.provider, call.model)
        policy = self._policies.get(target, _UNSET)
        if policy is _UNSET:
            if len(self._policies) >= MAX_REMEMBERED_MODELS:  # model names come from callers: bounded
                self._policies.clear()
            policy = self._policies[target] = self._policy(*target)
        ttl = ttl_for(call.cache, policy, self.settings.ttl)
        if ttl is None:
            return None
        name = self.name_of(call)
        store = self.store
        data = store.get(name)
        if data is not None:
            hit = self._decoded(call, name, data)
            if hit is not None:
                self._count(hit=True)
                return hit
        model = f"{call.provider}/{call.model}"
        flight, leads = self.flights.join(name, self.settings.wait)
        if not leads:
            return _Waiting(name, ttl, model, flight)
        token = store.lock(name, self.settings.wait) if store.shared else NO_LOCK
        if token is None:  # another process is calling: wait for its answer in the store
            data = self._poll(store, name)
            if data is not None:
                hit = self._decoded(call, name, data)
                if hit is not None:
                    self.flights.land(name, flight, data)
                    self._count(hit=True)
                    return hit
            token = store.lock(name, self.settings.wait) or NO_LOCK  # it failed, or ran out of time
        self._count(hit=False)
        call.metadata[PENDING] = _Pending(name, ttl, model, flight, token)
        return None

    def _after_waiting(self, call: LLMCall, waiting: _Waiting) -> ChatResponse | EmbedResponse | None:
        """The leader's answer; or None, to call for itself (the leader failed, or is too slow)."""
        entry = waiting.flight.entry
        if entry is not None:
            hit = self._decoded(call, waiting.name, entry)
            if hit is not None:
                self._count(hit=True)
                return hit
        self._count(hit=False)  # its answer is stored too
        call.metadata[PENDING] = _Pending(waiting.name, waiting.ttl, waiting.model, None, NO_LOCK)
        return None

    def _poll(self, store: Store, name: str) -> bytes | None:
        """The entry another process stores, until its lock goes or ``LLM_CACHE_WAIT`` runs out."""
        deadline = time.monotonic() + self.settings.wait
        pause = POLL_FIRST
        while True:
            data = store.get(name)
            if data is not None:
                return data
            if not store.locked(name):
                return store.get(name)  # stored just before it unlocked, or it failed
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            time.sleep(min(pause, left))
            pause = min(pause * 2, POLL_MAX)

    def _take(self, call: LLMCall) -> _Pending | None:
        pending = call.metadata.pop(PENDING, None)
        return pending if isinstance(pending, _Pending) else None

    def _land(self, pending: _Pending, entry: bytes | None) -> None:
        if pending.flight is not None:
            self.flights.land(pending.name, pending.flight, entry)
        if pending.token:
            self.store.unlock(pending.name, pending.token)

    # --- counts ------------------------------------------------------------------------

    def _count(self, *, hit: bool) -> None:
        due = self.counts.hit() if hit else self.counts.miss()
        if due is not None and not self.store.add_counts(*due):
            self.counts.give_back(*due)

    def stats(self) -> dict[str, Any]:
        """Hits, misses (every process's, for a shared store), entries, bytes, back end, hit ratio."""
        store = self.store
        due = self.counts.take_due(force=True)
        if due is not None and not store.add_counts(*due):
            self.counts.give_back(*due)
        if store.shared:
            hits, misses = store.shared_counts()
            pending_hits, pending_misses = self.counts.pending()
            hits, misses = hits + pending_hits, misses + pending_misses
        else:
            hits, misses = self.counts.hits, self.counts.misses
        entries, size = store.size()
        calls = hits + misses
        return {
            "backend": store.backend,
            "hits": hits,
            "misses": misses,
            "hit_ratio": hits / calls if calls else None,
            "entries": entries,
            "bytes": size,
        }


__all__ = ["PENDING", "ResponseCache"]
