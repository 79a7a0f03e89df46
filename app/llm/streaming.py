"""Streams that yield text and end with a full :class:`ChatResponse`.

``for text in stream`` yields text deltas; once the stream is exhausted,
``stream.response`` holds the final answer (tool calls, usage, finish
reason). Closing a stream early (``close()``, leaving a ``with`` block, or a
WSGI server closing the response when the client goes away) closes the
provider's generator, which closes the upstream connection.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

from app.llm.errors import LLMError
from app.llm.providers.base import (
    ChatRequest,
    StreamEnd,
    StreamEvent,
    TextDelta,
    ToolCallDelta,
    tool_call_from_json,
)
from app.llm.structured import parse_structured
from app.llm.types import ChatResponse, ToolCall


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
        self.end = StreamEnd(
            finish_reason=event.finish_reason or self.end.finish_reason,
            input_tokens=event.input_tokens if event.input_tokens is not None else self.end.input_tokens,
            output_tokens=event.output_tokens if event.output_tokens is not None else self.end.output_tokens,
            total_tokens=event.total_tokens if event.total_tokens is not None else self.end.total_tokens,
            model=event.model or self.end.model,
        )
        return None

    def response(self) -> ChatResponse:
        request, end = self.request, self.end
        context = request.context()
        tool_calls: list[ToolCall] = [
            tool_call_from_json(
                call["id"] or f"call_{index}", call["name"] or "", "".join(call["arguments"]), **context
            )
            for index, call in sorted(self.calls.items())
        ]
        content = "".join(self.text) or None
        total = end.total_tokens
        if total is None and end.input_tokens is not None and end.output_tokens is not None:
            total = end.input_tokens + end.output_tokens
        finish = end.finish_reason or ("tool_calls" if tool_calls else None)
        response = ChatResponse(
            content=content,
            model=end.model or request.model,
            provider=request.provider,
            input_tokens=end.input_tokens,
            output_tokens=end.output_tokens,
            total_tokens=total,
            finish_reason=finish,
            tool_calls=tool_calls,
            latency_ms=(time.perf_counter() - self.started) * 1000,
        )
        if request.response_format is not None and not tool_calls:
            response.parsed = parse_structured(request.response_format, content, **context)
        return response


class _StreamState:
    def __init__(
        self,
        request: ChatRequest,
        map_error: Callable[[BaseException], LLMError],
        attempts: list[Any] | None = None,
    ) -> None:
        self.request = request
        self.map_error = map_error
        self.accumulator = StreamAccumulator(request, time.perf_counter())
        #: Every try behind this stream (retries, fallbacks); shared with the final response.
        self.attempts: list[Any] = attempts if attempts is not None else []
        self._response: ChatResponse | None = None
        self.closed = False

    def retarget(self, request: ChatRequest) -> None:
        """The stream is answered by a fallback model: the response names that one."""
        self.request = request
        self.accumulator.request = request

    @property
    def response(self) -> ChatResponse:
        if self._response is None:
            raise RuntimeError("stream.response is available once the stream has been read to the end")
        return self._response

    def finish(self) -> None:
        response = self.accumulator.response()
        response.attempts = self.attempts
        self._response = response


class ChatStream(_StreamState):
    """A synchronous stream of text deltas (see the module docstring)."""

    def __init__(
        self,
        request: ChatRequest,
        events: Iterator[StreamEvent],
        map_error: Callable[[BaseException], LLMError],
        attempts: list[Any] | None = None,
    ) -> None:
        super().__init__(request, map_error, attempts)
        self._events = events

    def __iter__(self) -> ChatStream:
        return self

    def __next__(self) -> str:
        while True:
            try:
                event = next(self._events)
            except StopIteration:
                self.closed = True
                self.finish()
                raise
            except LLMError:
                self.close()
                raise
            except Exception as exc:
                self.close()
                raise self.map_error(exc) from exc
            text = self.accumulator.add(event)
            if text is not None:
                return text

    def close(self) -> None:
        """Stop reading and close the upstream connection."""
        if not self.closed:
            self.closed = True
            close = getattr(self._events, "close", None)
            if close is not None:
                close()

    def __enter__(self) -> ChatStream:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


class AsyncChatStream(_StreamState):
    """``async for text in stream``; ``await stream.aclose()`` closes upstream."""

    def __init__(
        self,
        request: ChatRequest,
        events: AsyncIterator[StreamEvent],
        map_error: Callable[[BaseException], LLMError],
        attempts: list[Any] | None = None,
    ) -> None:
        super().__init__(request, map_error, attempts)
        self._events = events

    def __aiter__(self) -> AsyncChatStream:
        return self

    async def __anext__(self) -> str:
        while True:
            try:
                event = await self._events.__anext__()
            except StopAsyncIteration:
                self.closed = True
                self.finish()
                raise
            except LLMError:
                await self.aclose()
                raise
            except Exception as exc:
                await self.aclose()
                raise self.map_error(exc) from exc
            text = self.accumulator.add(event)
            if text is not None:
                return text

    async def aclose(self) -> None:
        if not self.closed:
            self.closed = True
            aclose = getattr(self._events, "aclose", None)
            if aclose is not None:
                await aclose()

    async def __aenter__(self) -> AsyncChatStream:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.aclose()
