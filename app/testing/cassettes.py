"""Record real providers' answers once, replay them in tests: at the layer's level.

Why not vcrpy or pytest-recording at the HTTP level: the SDKs here speak
``httpx2``, which those libraries do not patch, and an HTTP cassette matches on
raw bodies whose key order and SDK-added fields change between SDK versions.
At the layer's level one format serves every provider, requests match on the
normalised request (:mod:`app.llm.canonical`: model, messages, tools,
parameters; order-insensitive), streams are kept as their deltas and replayed
as streams, and nothing secret is ever in view: the layer's requests hold no
headers and no key (a per-call key appears only as a hash).

A :class:`CassetteProvider` stands in front of each provider of the app. When
replaying it answers from the file and never calls the provider; a request that
is not in the cassette is an error naming what differed from the closest
recorded one. When recording it calls the real provider and keeps each answer
that finished cleanly (an errored or cancelled stream is not kept).
"""

from __future__ import annotations

import dataclasses
import json
import threading
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal

from app.llm.canonical import canonical, request_key
from app.llm.errors import LLMError
from app.llm.providers.base import (
    ChatRequest,
    EmbedRequest,
    Provider,
    StreamEnd,
    StreamEvent,
    TextDelta,
    ToolCallDelta,
)
from app.llm.types import ChatResponse, ToolCall

Kind = Literal["chat", "stream", "embed"]
FORMAT = 1
#: What a response keeps: what the adapter answered, not what the layer works out from it.
_DERIVED = frozenset({"raw", "attempts", "parsed", "latency_ms", "cost", "cached"})
_EVENTS: dict[str, type[Any]] = {cls.__name__: cls for cls in (TextDelta, ToolCallDelta, StreamEnd)}


class CassetteMiss(LLMError):
    """A request that the cassette holds no answer for (the test fails, naming what differed)."""


class Cassette:
    """One file of recorded answers (``tests/cassettes/<name>.json``)."""

    def __init__(self, path: Path, *, record: bool) -> None:
        self.path = path
        self.recording = record
        self._entries: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._used: dict[str, int] = defaultdict(int)
        if not record:
            if not path.exists():
                raise FileNotFoundError(
                    f"no cassette at {path}: record it once with `pytest --llm-record` against real providers"
                )
            data = json.loads(path.read_text())
            if data.get("format") != FORMAT:
                raise ValueError(f"{path} is a cassette of format {data.get('format')!r}, not {FORMAT}")
            self._entries = list(data["entries"])

    # --- replaying ----------------------------------------------------------------------

    def answer(self, kind: Kind, request: ChatRequest | EmbedRequest) -> dict[str, Any]:
        """The recorded entry for ``request`` (the same request again gets the next one recorded)."""
        key = request_key(request, kind=kind)
        with self._lock:
            matches = [entry for entry in self._entries if entry["key"] == key]
            if not matches:
                raise CassetteMiss(self._miss(kind, request), **request.context())
            index = min(self._used[key], len(matches) - 1)
            self._used[key] += 1
            return matches[index]

    def _miss(self, kind: Kind, request: ChatRequest | EmbedRequest) -> str:
        wanted = canonical(request)
        same_kind = [entry for entry in self._entries if entry["kind"] == kind]
        where = f"cassette {self.path.name} has no recorded {kind} answer for this request"
        if not same_kind:
            return f"{where} (it holds no {kind} call at all); re-record with `pytest --llm-record`"
        closest = min(same_kind, key=lambda entry: len(_differences(wanted, entry["request"])))
        differing = ", ".join(_differences(wanted, closest["request"])[:8])
        return f"{where}; the closest recorded one differs in: {differing}"

    # --- recording ----------------------------------------------------------------------

    def add(self, kind: Kind, request: ChatRequest | EmbedRequest, **answer: Any) -> None:
        entry = {
            "kind": kind,
            "key": request_key(request, kind=kind),
            "request": canonical(request),
            **answer,
        }
        with self._lock:
            self._entries.append(entry)

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps({"format": FORMAT, "entries": self._entries}, indent=1, sort_keys=True)
        self.path.write_text(text + "\n")


class CassetteProvider(Provider):
    """Answers from a cassette (replay), or asks the real adapter and records (record).

    The real adapter is built on first need (``adapter()``): replaying never imports an SDK.
    """

    def __init__(self, name: str, adapter: Callable[[], Provider], cassette: Cassette) -> None:
        super().__init__(name)
        self._adapter = adapter
        self._inner: Provider | None = None
        self.cassette = cassette

    @property
    def inner(self) -> Provider:
        if self._inner is None:
            self._inner = self._adapter()
        return self._inner

    takes_api_key = True  # replayed: matched by the key's hash; recorded: the real adapter decides

    def check(self, request: ChatRequest) -> None:
        if self.cassette.recording:  # a replayed request passed this check when it was recorded
            self.inner.check(request)

    def check_api_key(self, request: ChatRequest | EmbedRequest) -> None:
        if self.cassette.recording:
            self.inner.check_api_key(request)

    def map_error(self, exc: BaseException, context: dict[str, Any]) -> LLMError:
        return self.inner.map_error(exc, context)

    def chat(self, request: ChatRequest) -> ChatResponse:
        if not self.cassette.recording:
            return decode_response(self.cassette.answer("chat", request)["response"])
        response = self.inner.chat(request)
        self.cassette.add("chat", request, response=encode_response(response))
        return response

    async def achat(self, request: ChatRequest) -> ChatResponse:
        if not self.cassette.recording:
            return decode_response(self.cassette.answer("chat", request)["response"])
        response = await self.inner.achat(request)
        self.cassette.add("chat", request, response=encode_response(response))
        return response

    def stream(self, request: ChatRequest) -> Iterator[StreamEvent]:
        if not self.cassette.recording:
            return iter(decode_events(self.cassette.answer("stream", request)["events"]))
        return self._record_stream(request)

    def _record_stream(self, request: ChatRequest) -> Iterator[StreamEvent]:
        events: list[StreamEvent] = []
        upstream = self.inner.stream(request)
        try:
            for event in upstream:
                events.append(event)
                yield event
        finally:
            close = getattr(upstream, "close", None)
            if close is not None:
                close()
        self.cassette.add("stream", request, events=encode_events(events))  # only a clean finish

    def astream(self, request: ChatRequest) -> AsyncIterator[StreamEvent]:
        if not self.cassette.recording:
            return _replayed(decode_events(self.cassette.answer("stream", request)["events"]))
        return self._arecord_stream(request)

    async def _arecord_stream(self, request: ChatRequest) -> AsyncIterator[StreamEvent]:
        events: list[StreamEvent] = []
        upstream = self.inner.astream(request)
        try:
            async for event in upstream:
                events.append(event)
                yield event
        finally:
            aclose = getattr(upstream, "aclose", None)
            if aclose is not None:
                await aclose()
        self.cassette.add("stream", request, events=encode_events(events))

    def embed(self, request: EmbedRequest) -> list[list[float]]:
        if not self.cassette.recording:
            return list(self.cassette.answer("embed", request)["vectors"])
        vectors = self.inner.embed(request)
        self.cassette.add("embed", request, vectors=vectors)
        return vectors

    async def aembed(self, request: EmbedRequest) -> list[list[float]]:
        if not self.cassette.recording:
            return list(self.cassette.answer("embed", request)["vectors"])
        vectors = await self.inner.aembed(request)
        self.cassette.add("embed", request, vectors=vectors)
        return vectors

    def list_models(self) -> list[str]:
        return self.inner.list_models()


async def _replayed(events: list[StreamEvent]) -> AsyncIterator[StreamEvent]:
    for event in events:
        yield event


# --- the file's form ---------------------------------------------------------------------


def _plain(value: Any) -> Any:
    if isinstance(value, Decimal):
        return {"decimal": str(value)}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {item.name: _plain(getattr(value, item.name)) for item in dataclasses.fields(value)}
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    return value


def encode_response(response: ChatResponse) -> dict[str, Any]:
    return {
        item.name: _plain(getattr(response, item.name))
        for item in dataclasses.fields(response)
        if item.name not in _DERIVED
    }


def decode_response(data: dict[str, Any]) -> ChatResponse:
    known = {item.name for item in dataclasses.fields(ChatResponse)}
    values = {key: _unplain(value) for key, value in data.items() if key in known}
    values["tool_calls"] = [ToolCall(**call) for call in values.get("tool_calls", [])]
    return ChatResponse(**values)


def encode_events(events: list[StreamEvent]) -> list[dict[str, Any]]:
    return [{"type": type(event).__name__, **_plain(event)} for event in events]


def decode_events(data: list[dict[str, Any]]) -> list[StreamEvent]:
    events: list[StreamEvent] = []
    for item in data:
        fields = {key: _unplain(value) for key, value in item.items() if key != "type"}
        events.append(_EVENTS[item["type"]](**fields))
    return events


def _unplain(value: Any) -> Any:
    if isinstance(value, dict) and set(value) == {"decimal"}:
        return Decimal(value["decimal"])
    return value


def _differences(wanted: Any, recorded: Any, path: str = "") -> list[str]:
    """Paths where two canonical forms differ (``messages[1].parts[0].text``)."""
    if isinstance(wanted, dict) and isinstance(recorded, dict):
        found: list[str] = []
        for key in sorted(set(wanted) | set(recorded)):
            if key == "__type__":
                continue
            where = f"{path}.{key}" if path else key
            found += _differences(wanted.get(key), recorded.get(key), where)
        return found
    if isinstance(wanted, list) and isinstance(recorded, list) and len(wanted) == len(recorded):
        found = []
        for index, (a, b) in enumerate(zip(wanted, recorded, strict=True)):
            found += _differences(a, b, f"{path}[{index}]")
        return found
    return [] if wanted == recorded else [path or "(the request)"]


__all__ = ["Cassette", "CassetteMiss", "CassetteProvider"]
