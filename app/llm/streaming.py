"""Streams that yield text and end with a full :class:`ChatResponse`.

``for text in stream`` yields text deltas; once the stream is exhausted,
``stream.response`` holds the final answer (tool calls, usage, finish
reason). Closing a stream early (``close()``, leaving a ``with`` block, a WSGI
server closing the response when the client goes away, or dropping it)
closes the provider's generator, which closes the upstream connection.

What happens at each event and at the end is decided once, in
:class:`StreamRelay` (flows, as in :mod:`app.llm.resilience.steps`);
:class:`ChatStream` and :class:`AsyncChatStream` only iterate.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import fields
from functools import partial
from typing import TYPE_CHECKING, Any

from app.llm.errors import LLMError
from app.llm.providers.base import (
    ChatRequest,
    StreamEnd,
    StreamEvent,
    TextDelta,
    ToolCallDelta,
    tool_call_from_json,
)
from app.llm.resilience.steps import Flow, Step, run_async, run_sync
from app.llm.structured import parse_structured
from app.llm.types import ChatResponse, ToolCall

if TYPE_CHECKING:
    from decimal import Decimal

    from app.llm.hooks import HookChain, LLMCall
    from app.llm.resilience.executor import Admission


class StreamAccumulator:
    """Adds up stream events into the final response."""

    def __init__(self, request: ChatRequest, started: float) -> None:
        self.request = request
        self.started = started
        self.text: list[str] = []
        self.calls: dict[int, dict[str, Any]] = {}
        self.end = StreamEnd()

    def add(self, event: StreamEvent) -> str | None:
        """Record ``event``; returns its text when it is a text delta."""
        if isinstance(event, TextDelta):
            if event.text:
                self.text.append(event.text)
                return event.text
            return None
        if isinstance(event, ToolCallDelta):
            call = self.calls.setdefault(event.index, {"id": None, "name": None, "arguments": []})
            call["id"] = call["id"] or event.id
            call["name"] = call["name"] or event.name
            call["arguments"].append(event.arguments)
            return None
        self.end = _merged(self.end, event)
        return None

    def used_tokens(self) -> int | None:
        end = self.end
        if end.total_tokens is not None:
            return end.total_tokens
        if end.input_tokens is not None and end.output_tokens is not None:
            return end.input_tokens + end.output_tokens
        return None

    def response(self, *, partial: bool = False) -> ChatResponse:
        """The answer so far; ``partial`` (a cancelled stream) skips what needs the whole answer."""
        request, end = self.request, self.end
        context = request.context()
        tool_calls: list[ToolCall] = (
            []
            if partial
            else [
                tool_call_from_json(
                    call["id"] or f"call_{index}", call["name"] or "", "".join(call["arguments"]), **context
                )
                for index, call in sorted(self.calls.items())
            ]
        )
        content = "".join(self.text) or None
        finish = end.finish_reason or ("tool_calls" if tool_calls else None)
        response = ChatResponse(
            content=content,
            model=end.model or request.model,
            provider=request.provider,
            input_tokens=end.input_tokens,
            output_tokens=end.output_tokens,
            total_tokens=self.used_tokens(),
            finish_reason=finish,
            tool_calls=tool_calls,
            latency_ms=(time.perf_counter() - self.started) * 1000,
            reasoning_tokens=end.reasoning_tokens,
            cached_input_tokens=end.cached_input_tokens,
            cache_write_tokens=end.cache_write_tokens,
            response_id=end.response_id,
            deltas=list(self.text),
        )
        if request.response_format is not None and not tool_calls and not partial:
            response.parsed = parse_structured(request.response_format, content, **context)
        return response


#: The fields of a StreamEnd: a later event's value replaces an earlier one's, None keeps it.
_END_FIELDS = tuple(f.name for f in fields(StreamEnd))


def _merged(end: StreamEnd, event: StreamEnd) -> StreamEnd:
    """``end`` updated by ``event``: what an event leaves out (None, or an empty name) stands."""
    return StreamEnd(
        **{
            name: new if (new := getattr(event, name)) or new == 0 else getattr(end, name)
            for name in _END_FIELDS
        }
    )


def response_events(response: ChatResponse) -> list[StreamEvent]:
    """A finished answer as the events of a stream (a hook's answer, replayed: its deltas as they came)."""
    deltas = response.deltas if response.deltas is not None else [response.content or ""]
    events: list[StreamEvent] = [TextDelta(text) for text in deltas if text]
    events += [
        ToolCallDelta(index, id=call.id, name=call.name, arguments=json.dumps(call.arguments))
        for index, call in enumerate(response.tool_calls)
    ]
    events.append(
        StreamEnd(
            finish_reason=response.finish_reason,
            input_tokens=response.input_tokens,
            output_tokens=response.output_tokens,
            total_tokens=response.total_tokens,
            model=response.model,
            reasoning_tokens=response.reasoning_tokens,
            cached_input_tokens=response.cached_input_tokens,
            cache_write_tokens=response.cache_write_tokens,
            response_id=response.response_id,
        )
    )
    return events


class OpenStream:
    """What opening a stream gives: events already read (``buffered``), the rest, and what it holds."""

    __slots__ = ("admission", "buffered", "events", "preset")

    def __init__(
        self,
        events: Any,
        buffered: list[StreamEvent],
        admission: Admission | None,
        preset: ChatResponse | None = None,
    ) -> None:
        #: The provider's iterator (sync or async), or None when ``buffered`` is the whole stream.
        self.events = events
        self.buffered = buffered
        self.admission = admission
        #: A hook's answer being replayed: the final response is that one, as the hook gave it.
        self.preset = preset


class StreamRelay:
    """The policy of one open stream: accumulate events, and end it exactly once.

    Ending settles the stream's admission (slot, breaker verdict, rate-limit
    correction) and tells the hooks: ``after_call`` at its end, ``on_error``
    when it breaks, ``on_cancel`` when the caller closes it first.
    """

    def __init__(
        self,
        call: LLMCall,
        hooks: HookChain,
        opened: OpenStream,
        map_error: Callable[[BaseException], LLMError],
        close_step: Callable[[Any], Step],
        *,
        price: Callable[[str, str, ChatResponse], Decimal | None] | None = None,
    ) -> None:
        request = call.request
        assert isinstance(request, ChatRequest)
        #: What the answer cost (the model catalogue's ``cost``), set on the final response.
        self.price = price
        self.call = call
        self.hooks = hooks
        self.opened = opened
        self.map_error = map_error
        self.close_step = close_step
        self.accumulator = StreamAccumulator(request, call.started)
        self.response: ChatResponse | None = None
        self.ended = False

    def buffered(self) -> StreamEvent | None:
        """The next event read before the caller asked (the first one, or a replayed answer)."""
        buffered = self.opened.buffered
        return buffered.pop(0) if buffered else None

    @property
    def exhausted(self) -> bool:
        """Nothing left to read: a replayed answer has no upstream behind its buffer."""
        return self.opened.events is None and not self.opened.buffered

    def finish(self) -> Flow[ChatResponse]:
        """The stream ran to its end."""
        self.ended = True
        try:
            response = self.opened.preset or self.accumulator.response()
        except LLMError as error:  # malformed tool arguments, unparsable structured output
            yield from self._fail(error)
            raise
        response.latency_ms = self.call.latency_ms
        response.attempts = self.call.attempts
        if self.price is not None and self.opened.preset is None:  # a hook's answer is not priced
            request = self.accumulator.request
            response.pricing = partial(self.price, request.provider, request.model)
        admission = self.opened.admission
        step = admission.end(None, self.accumulator.used_tokens()) if admission is not None else None
        if step is not None:
            yield step
        yield from self.hooks.after(self.call, response)
        self.response = response
        return response

    def fail(self, exc: Exception) -> Flow[LLMError]:
        """The stream broke: close upstream, settle, and return the typed error to raise."""
        self.ended = True
        error = exc if isinstance(exc, LLMError) else self.map_error(exc)
        if error is not exc and error.__cause__ is None:
            error.__cause__ = exc
        yield self.close_step(self.opened.events)
        yield from self._fail(error)
        return error

    def _fail(self, error: LLMError) -> Flow[None]:
        """Settle, and tell the hooks."""
        error.attempts = self.call.attempts  # type: ignore[attr-defined]
        if self.opened.admission is not None:
            self.opened.admission.end(error, None)  # no step: nothing to settle after an error
        yield from self.hooks.error(self.call, error)

    def cancel(self) -> Flow[None]:
        """Closed by the caller before its end: close upstream, give back, tell the hooks."""
        if self.ended:
            return
        self.ended = True
        yield self.close_step(self.opened.events)
        if self.opened.admission is not None:
            self.opened.admission.cancel()
        yield from self.hooks.cancel(self.call, self.accumulator.response(partial=True))

    def abandon(self) -> None:
        """Dropped unclosed (garbage collected): give back what it holds, without blocking."""
        if not self.ended:
            self.ended = True
            if self.opened.admission is not None:
                self.opened.admission.cancel()


class _StreamBase:
    def __init__(self, request: ChatRequest, attempts: list[Any]) -> None:
        self.request = request
        #: Every try behind this stream (retries, fallbacks); shared with the final response.
        self.attempts = attempts
        self._relay: StreamRelay | None = None
        self.closed = False

    @property
    def response(self) -> ChatResponse:
        relay = self._relay
        if relay is None or relay.response is None:
            raise RuntimeError("stream.response is available once the stream has been read to the end")
        return relay.response

    def _opened(self, relay: StreamRelay) -> None:
        self._relay = relay
        self.request = relay.accumulator.request  # a fallback may have answered

    def __del__(self) -> None:
        relay = self._relay
        if relay is not None:
            relay.abandon()


class ChatStream(_StreamBase):
    """A synchronous stream of text deltas, opened (with retries and fallbacks) when it is made."""

    def __init__(self, request: ChatRequest, attempts: list[Any], relay: StreamRelay) -> None:
        super().__init__(request, attempts)
        self._opened(relay)
        self._events: Iterator[StreamEvent] = relay.opened.events

    def __iter__(self) -> ChatStream:
        return self

    def __next__(self) -> str:
        relay = self._relay
        assert relay is not None
        while not self.closed:
            event = relay.buffered()
            if event is None:
                try:
                    if relay.exhausted:
                        raise StopIteration
                    event = next(self._events)
                except StopIteration:
                    self.closed = True
                    run_sync(relay.finish())
                    raise
                except Exception as exc:
                    self.closed = True
                    raise run_sync(relay.fail(exc))  # noqa: B904 (the cause is set by fail)
                except BaseException:  # interrupted: no verdict, but close upstream and give back
                    self.close()
                    raise
            text = relay.accumulator.add(event)
            if text is not None:
                return text
        raise StopIteration

    def close(self) -> None:
        """Stop reading and close the upstream connection."""
        if not self.closed:
            self.closed = True
            if self._relay is not None:
                run_sync(self._relay.cancel())

    def __enter__(self) -> ChatStream:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


class AsyncChatStream(_StreamBase):
    """``async for text in stream``; opened on the first read; ``await stream.aclose()`` closes upstream."""

    def __init__(
        self, request: ChatRequest, attempts: list[Any], open_flow: Callable[[], Flow[StreamRelay]]
    ) -> None:
        super().__init__(request, attempts)
        self._open_flow = open_flow
        self._events: AsyncIterator[StreamEvent] | None = None

    def __aiter__(self) -> AsyncChatStream:
        return self

    async def __anext__(self) -> str:
        relay = self._relay
        if relay is None and not self.closed:
            relay = await run_async(self._open_flow())
            self._opened(relay)
            self._events = relay.opened.events
        while not self.closed:
            assert relay is not None
            event = relay.buffered()
            if event is None:
                try:
                    if relay.exhausted:
                        raise StopAsyncIteration
                    assert self._events is not None
                    event = await self._events.__anext__()
                except StopAsyncIteration:
                    self.closed = True
                    await run_async(relay.finish())
                    raise
                except Exception as exc:
                    self.closed = True
                    raise await run_async(relay.fail(exc))  # noqa: B904 (the cause is set by fail)
                except BaseException:  # cancelled: no verdict, but close upstream and give back
                    await self.aclose()
                    raise
            text = relay.accumulator.add(event)
            if text is not None:
                return text
        raise StopAsyncIteration

    async def aclose(self) -> None:
        if not self.closed:
            self.closed = True
            if self._relay is not None:
                await run_async(self._relay.cancel())

    async def __aenter__(self) -> AsyncChatStream:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.aclose()


__all__ = [
    "AsyncChatStream",
    "ChatStream",
    "OpenStream",
    "StreamAccumulator",
    "StreamRelay",
    "response_events",
]
