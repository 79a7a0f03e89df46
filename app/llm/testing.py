"""A fake LLM provider for your own tests: scripted answers, recorded calls, no network.

::

    from app.llm import LLMRateLimitError, ToolCall
    from app.llm.testing import install_fake_llm

    def test_summary(app, client):
        fake = install_fake_llm(app)               # answers model="fake/<anything>"
        fake.add_response("A short summary.")
        r = client.post("/api/chat", json={"model": "fake/m", "messages": [...]})
        assert r.json["content"] == "A short summary."
        assert fake.calls[0].messages[-1].text == "Summarise ..."

Script what the provider answers, in order; each call consumes the next item:

* ``fake.add_response(content, tool_calls=..., usage=..., finish_reason=..., model=...)``:
  one answer (``usage`` may also give ``reasoning_tokens``, ``cached_input_tokens`` and
  ``cache_write_tokens``; ``cost`` is the model catalogue's, None for ``fake/...``).
  ``content`` is text, a :class:`ChatResponse` (returned as is), a pydantic model
  instance or a dict/list (sent as JSON text, so ``response_format=`` validates it
  into ``r.parsed``), or None.
* ``fake.add_stream(["Hel", "lo"], tool_calls=..., usage=..., delay=0.01, error=...)``:
  an answer in chunks; ``delay`` sleeps before each chunk, ``error`` is raised
  after the chunks (a connection that breaks mid-stream).
* ``fake.add_error(LLMRateLimitError("slow down", retry_after=3))``: the next
  call (chat, stream or embed) raises it; a stream raises it when it is
  opened, as the SDKs do for an HTTP error. Exceptions that are not an
  :class:`LLMError` go through ``map_error`` and arrive as a plain ``LLMError``.
* ``fake.add_embedding([[0.1, 0.2], [0.3, 0.4]])``: one ``embed()`` answer,
  one vector per input.

Answers and streams are interchangeable: ``chat()`` on a scripted stream gets
the joined chunks, ``chat_stream()`` on a scripted response gets its content
as one chunk. Usage defaults to word counts (prompt words in, answer words
out); the finish reason to ``tool_calls`` when there are tool calls, else
``stop``. Sync and async calls behave the same.

When the script is empty, a call raises :class:`FakeScriptError` (an
``LLMError``) naming what was called, so an unexpected call fails the test
loudly; ``install_fake_llm(app, echo=True)`` answers with the last user
message instead (and deterministic 8-number vectors for embeddings).

Every call is recorded: ``fake.calls`` holds the :class:`ChatRequest` or
:class:`EmbedRequest` the layer built (``.model``, ``.messages`` as
validated :class:`Message` values with ``.role`` and ``.text``, ``.tools``,
``.tool_choice``, ``.response_format``, ``.temperature`` and every other
generation parameter (``.top_p``, ``.stop``, ``.seed``, ``.reasoning_effort``,
``.thinking_budget``, ``.safety``, ``.extra``, ...), ``.inputs``), and
``fake.methods`` the matching method names (``"chat"``, ``"stream"``,
``"embed"``, ``"achat"``, ``"astream"``, ``"aembed"``). ``fake.pending`` is the
number of scripted items left, ``fake.open_streams`` the number of streams
not yet finished or closed, and ``fake.reset()`` forgets script and calls.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from flask import Flask, current_app

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
from app.llm.types import ChatResponse, FinishReason, ToolCall

__all__ = ["FakeProvider", "FakeScriptError", "install_fake_llm"]

Method = Literal["chat", "stream", "embed", "achat", "astream", "aembed"]


class FakeScriptError(LLMError):
    """The fake provider was called with nothing (or the wrong kind of thing) scripted."""


@dataclass
class _Item:
    kind: Literal["reply", "embedding", "error"]
    #: For a reply: the scripted answer; ``chunks`` is set when it was scripted as a stream.
    response: ChatResponse | None = None
    content: str | None = None
    chunks: list[str] | None = None
    tool_calls: list[ToolCall] = field(default_factory=list)
    usage: Mapping[str, int | None] | None = None
    finish_reason: FinishReason | None = None
    model: str | None = None
    delay: float = 0.0
    #: For an error item: the exception; for a reply: raised after the chunks of a stream.
    error: BaseException | None = None
    vectors: list[list[float]] | None = None


class FakeProvider(Provider):
    """A provider that answers from a script and records every call (see the module docstring)."""

    takes_api_key = True  # a call's own key is recorded with it (a Secret), as any parameter

    def __init__(
        self, name: str = "fake", *, echo: bool = False, models: Sequence[str] = ("fake-model",)
    ) -> None:
        super().__init__(name)
        self.echo = echo
        #: What ``list_models()`` (and ``flask llm models``) reports.
        self.models = list(models)
        self.calls: list[ChatRequest | EmbedRequest] = []
        self.methods: list[Method] = []
        self.open_streams = 0
        self._script: deque[_Item] = deque()
        self._lock = threading.Lock()

    # --- scripting ---------------------------------------------------------

    def add_response(
        self,
        content: Any = "",
        *,
        tool_calls: Iterable[ToolCall | Mapping[str, Any]] | None = None,
        usage: Mapping[str, int | None] | None = None,
        finish_reason: FinishReason | None = None,
        model: str | None = None,
    ) -> FakeProvider:
        """Script one answer (returns the provider, so calls chain)."""
        if isinstance(content, ChatResponse):
            item = _Item("reply", response=content)
        else:
            item = _Item(
                "reply",
                content=_as_text(content),
                tool_calls=_tool_calls(tool_calls),
                usage=usage,
                finish_reason=finish_reason,
                model=model,
            )
        return self._push(item)

    def add_stream(
        self,
        chunks: Iterable[str],
        *,
        tool_calls: Iterable[ToolCall | Mapping[str, Any]] | None = None,
        usage: Mapping[str, int | None] | None = None,
        finish_reason: FinishReason | None = None,
        model: str | None = None,
        delay: float = 0.0,
        error: BaseException | None = None,
    ) -> FakeProvider:
        """Script one streamed answer: text ``chunks``, then tool calls and usage (or ``error``)."""
        pieces = [chunks] if isinstance(chunks, str) else list(chunks)
        if not all(isinstance(piece, str) for piece in pieces):
            raise TypeError("add_stream() takes a list of text chunks")
        return self._push(
            _Item(
                "reply",
                chunks=pieces,
                tool_calls=_tool_calls(tool_calls),
                usage=usage,
                finish_reason=finish_reason,
                model=model,
                delay=delay,
                error=error,
            )
        )

    def add_error(self, error: BaseException | type[BaseException]) -> FakeProvider:
        """Script an error: the next call raises it."""
        if isinstance(error, type):
            error = error("scripted error")
        return self._push(_Item("error", error=error))

    def add_embedding(self, vectors: Sequence[Sequence[float]]) -> FakeProvider:
        """Script one ``embed()`` answer: one vector per input."""
        if not vectors or any(isinstance(v, int | float | str) or not v for v in vectors):
            raise TypeError("add_embedding() takes a non-empty list of vectors (lists of numbers)")
        rows = [list(map(float, vector)) for vector in vectors]
        return self._push(_Item("embedding", vectors=rows))

    @property
    def pending(self) -> int:
        """How many scripted items are left."""
        return len(self._script)

    @property
    def last_request(self) -> ChatRequest | EmbedRequest:
        if not self.calls:
            raise AssertionError("the fake provider was not called")
        return self.calls[-1]

    def reset(self) -> None:
        """Forget the script and the recorded calls."""
        with self._lock:
            self._script.clear()
            self.calls.clear()
            self.methods.clear()

    def _push(self, item: _Item) -> FakeProvider:
        with self._lock:
            self._script.append(item)
        return self

    def _next(self, method: Method, request: ChatRequest | EmbedRequest) -> _Item | None:
        """Record the call and take the next scripted item (None: echo)."""
        wanted = "embedding" if isinstance(request, EmbedRequest) else "reply"
        with self._lock:
            self.calls.append(request)
            self.methods.append(method)
            if not self._script:
                if self.echo:
                    return None
                raise FakeScriptError(
                    f"nothing scripted for {method}() (call {self._hint(wanted)} first,"
                    " or install the fake with echo=True)",
                    **request.context(),
                )
            item = self._script[0]
            if item.kind not in (wanted, "error"):
                raise FakeScriptError(
                    f"{method}() was called, but the next scripted item is "
                    f"{'an embedding' if item.kind == 'embedding' else 'a chat answer'}",
                    **request.context(),
                )
            self._script.popleft()
        if item.kind == "error":
            assert item.error is not None
            raise _with_context(item.error, request)
        return item

    @staticmethod
    def _hint(kind: str) -> str:
        return (
            "fake.add_embedding(...)"
            if kind == "embedding"
            else "fake.add_response(...) or fake.add_stream(...)"
        )

    # --- answers -----------------------------------------------------------

    def _response(self, item: _Item | None, request: ChatRequest) -> ChatResponse:
        if item is None:
            return _build(request, _echo_text(request), [], None, None, None)
        if item.response is not None:
            response = dataclasses.replace(item.response)
            response.tool_calls = list(response.tool_calls)
            return response
        if item.error is not None:  # a stream that breaks: chat() gets the break
            raise _with_context(item.error, request)
        content = "".join(item.chunks) if item.chunks is not None else item.content
        return _build(request, content, item.tool_calls, item.usage, item.finish_reason, item.model)

    def _events(self, item: _Item | None, request: ChatRequest) -> Iterator[tuple[float, StreamEvent]]:
        """(delay, event) pairs for a stream."""
        usage: Mapping[str, int | None] | None
        model: str | None
        response_id = None
        if item is not None and item.response is not None:
            response = item.response
            chunks = [response.content] if response.content else []
            calls, usage = response.tool_calls, response.usage()
            finish, model, response_id = response.finish_reason, response.model, response.response_id
        elif item is not None:
            chunks = item.chunks if item.chunks is not None else ([item.content] if item.content else [])
            calls, usage, finish, model = item.tool_calls, item.usage, item.finish_reason, item.model
        else:
            chunks, calls, usage, finish, model = [_echo_text(request)], [], None, None, None
        delay = item.delay if item is not None else 0.0
        for chunk in chunks:
            yield delay, TextDelta(chunk)
        for index, call in enumerate(calls):
            yield 0.0, ToolCallDelta(index, id=call.id, name=call.name, arguments=json.dumps(call.arguments))
        if item is not None and item.error is not None:
            raise _with_context(item.error, request)
        final = _build(request, "".join(chunks) or None, calls, usage, finish, model)
        yield (
            0.0,
            StreamEnd(
                finish_reason=final.finish_reason,
                input_tokens=final.input_tokens,
                output_tokens=final.output_tokens,
                total_tokens=final.total_tokens,
                model=final.model,
                reasoning_tokens=final.reasoning_tokens,
                cached_input_tokens=final.cached_input_tokens,
                cache_write_tokens=final.cache_write_tokens,
                response_id=response_id,
            ),
        )

    def _embedding(self, item: _Item | None, request: EmbedRequest) -> list[list[float]]:
        if item is None:
            return [_fake_vector(text) for text in request.inputs]
        assert item.vectors is not None
        if len(item.vectors) != len(request.inputs):
            raise FakeScriptError(
                f"embed() got {len(request.inputs)} inputs but the scripted embedding has"
                f" {len(item.vectors)} vectors",
                **request.context(),
            )
        return [list(vector) for vector in item.vectors]

    # --- the Provider contract ---------------------------------------------

    def chat(self, request: ChatRequest) -> ChatResponse:
        return self._response(self._next("chat", request), request)

    async def achat(self, request: ChatRequest) -> ChatResponse:
        item = self._next("achat", request)
        await asyncio.sleep(0)
        return self._response(item, request)

    def stream(self, request: ChatRequest) -> Iterator[StreamEvent]:
        item = self._next("stream", request)  # records and raises scripted errors when opened
        return self._sync_stream(item, request)

    def _sync_stream(self, item: _Item | None, request: ChatRequest) -> Iterator[StreamEvent]:
        with self._lock:
            self.open_streams += 1
        try:
            for delay, event in self._events(item, request):
                if delay:
                    time.sleep(delay)
                yield event
        finally:
            with self._lock:
                self.open_streams -= 1

    def astream(self, request: ChatRequest) -> AsyncIterator[StreamEvent]:
        item = self._next("astream", request)
        return self._async_stream(item, request)

    async def _async_stream(self, item: _Item | None, request: ChatRequest) -> AsyncIterator[StreamEvent]:
        with self._lock:
            self.open_streams += 1
        try:
            for delay, event in self._events(item, request):
                await asyncio.sleep(delay)
                yield event
        finally:
            with self._lock:
                self.open_streams -= 1

    def embed(self, request: EmbedRequest) -> list[list[float]]:
        return self._embedding(self._next("embed", request), request)

    async def aembed(self, request: EmbedRequest) -> list[list[float]]:
        item = self._next("aembed", request)
        await asyncio.sleep(0)
        return self._embedding(item, request)

    def map_error(self, exc: BaseException, context: dict[str, Any]) -> LLMError:
        return LLMError(f"{type(exc).__name__}: {exc}", **context)

    def list_models(self) -> list[str]:
        return list(self.models)


def install_fake_llm(
    app: Flask | None = None,
    name: str = "fake",
    *,
    echo: bool = False,
    models: Sequence[str] = ("fake-model",),
) -> FakeProvider:
    """Register a :class:`FakeProvider` on ``app``'s LLM layer (default: the current app) as ``name``."""
    target = app if app is not None else current_app._get_current_object()  # type: ignore[attr-defined]
    fake = FakeProvider(name, echo=echo, models=models)
    target.extensions["llm"].register_provider(name, fake)
    return fake


# --- helpers -----------------------------------------------------------------


def _as_text(content: Any) -> str | None:
    if content is None or isinstance(content, str):
        return content
    if hasattr(content, "model_dump_json"):
        return str(content.model_dump_json())
    if isinstance(content, Mapping | list):
        return json.dumps(content)
    raise TypeError(
        "add_response() takes text, a ChatResponse, a pydantic model instance or a dict/list,"
        f" got {type(content).__name__}"
    )


def _tool_calls(calls: Iterable[ToolCall | Mapping[str, Any]] | None) -> list[ToolCall]:
    result: list[ToolCall] = []
    for index, call in enumerate(calls or ()):
        if isinstance(call, ToolCall):
            result.append(call)
            continue
        if not isinstance(call, Mapping) or not isinstance(call.get("name"), str):
            raise TypeError("tool_calls takes ToolCall values or {name, arguments, id} dicts")
        arguments = call.get("arguments") or {}
        if isinstance(arguments, str):
            arguments = json.loads(arguments)
        result.append(
            ToolCall(id=str(call.get("id") or f"call_{index}"), name=call["name"], arguments=arguments)
        )
    return result


def _words(text: str | None) -> int:
    return len(text.split()) if text else 0


def _build(
    request: ChatRequest,
    content: str | None,
    tool_calls: list[ToolCall],
    usage: Mapping[str, int | None] | None,
    finish_reason: FinishReason | None,
    model: str | None,
) -> ChatResponse:
    if usage is None:
        usage = {
            "input_tokens": sum(_words(message.text) for message in request.messages),
            "output_tokens": _words(content),
        }
    input_tokens, output_tokens = usage.get("input_tokens"), usage.get("output_tokens")
    total = usage.get("total_tokens")
    if total is None and input_tokens is not None and output_tokens is not None:
        total = input_tokens + output_tokens
    return ChatResponse(
        content=content,
        model=model or request.model,
        provider=request.provider,
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        total_tokens=total,
        finish_reason=finish_reason or ("tool_calls" if tool_calls else "stop"),
        tool_calls=list(tool_calls),
        reasoning_tokens=usage.get("reasoning_tokens"),
        cached_input_tokens=usage.get("cached_input_tokens"),
        cache_write_tokens=usage.get("cache_write_tokens"),
    )


def _echo_text(request: ChatRequest) -> str:
    for message in reversed(request.messages):
        if message.role == "user":
            return message.text
    return ""


def _fake_vector(text: str, dimensions: int = 8) -> list[float]:
    digest = hashlib.sha256(text.encode()).digest()
    return [byte / 255 for byte in digest[:dimensions]]


def _with_context(error: BaseException, request: ChatRequest | EmbedRequest) -> BaseException:
    """A scripted LLMError gets the call's provider and model when it has none."""
    if isinstance(error, LLMError) and error.provider is None and error.model is None:
        error.provider, error.model = request.provider, request.model
        error.args = (f"{request.provider}/{request.model}: {error.message}",)
    return error
