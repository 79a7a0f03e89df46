"""``/api/chat`` with ``"stream": true``: Server-Sent Events that stop when the client leaves.

An ``event: delta`` per text delta, then ``event: done`` (usage, finish
reason, tool calls), or ``event: error`` if the provider fails mid-stream.
Errors before the first delta are ordinary JSON responses with their status
codes (a hung upstream included: the call's deadline answers 504 JSON).

The stream is opened and read apart from the request (:mod:`app.serving.background`:
a greenlet under gevent, a task on the worker's loop under gthread), and the
request relays what it reads. So the request can watch its client
(:mod:`app.serving.disconnect`) and stop the upstream the moment the client
leaves: while the call waits for a bulkhead slot, for the first byte, or
between two deltas. A request that waited in a queue and whose client has
already gone never asks the provider.

While no delta arrives, an SSE comment (``: heartbeat``) goes out every
``LLM_SSE_HEARTBEAT`` seconds (15): proxies do not close a stream that sends
bytes, and a write to a client that has gone fails, which ends the stream too.
"""

from __future__ import annotations

import json
import queue
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

from flask import Response, current_app, request, stream_with_context

from app.llm import ChatResponse, ChatStream, LLMError
from app.serving.background import Cancelled, run_apart
from app.serving.disconnect import client_gone, client_socket, watch_client
from app.serving.timeouts import heartbeat_seconds

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
#: An SSE comment: clients ignore it, proxies see bytes.
HEARTBEAT = ": heartbeat\n\n"
#: nginx's status for "the client closed the request": logged, never seen by the client.
CLIENT_CLOSED = 499

#: What the reader hands the response, in order: ("delta", text), ("done", ChatResponse),
#: ("error", LLMError), ("failed", Exception); ("gone", None) comes from the watcher.
Item = tuple[str, Any]
Put = Callable[[Item], None]


def check_settings(state: Any) -> None:
    """At registration (``bp.record_once``): ``LLM_SSE_HEARTBEAT`` is a positive number of seconds."""
    heartbeat_seconds(state.app.config)


def _sse(event: str, data: Any) -> str:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


def stream_chat(llm: Any, messages: Any, model: str, options: dict[str, Any], structured: bool) -> Response:
    """Open ``llm.chat_stream(messages, model, **options)`` apart from this request and relay it."""
    opener = partial(llm.chat_stream, messages, model, **options)
    aopener = partial(llm.achat_stream, messages, model, **options)
    return _relay(opener, aopener, structured)


def _sse_response(stream: ChatStream, structured: bool) -> Response:
    """Relay a stream that is already open (heartbeats and disconnects as for :func:`stream_chat`)."""
    return _relay(lambda: stream, None, structured)


def _relay(opener: Callable[[], ChatStream], aopener: Callable[[], Any] | None, structured: bool) -> Response:
    from app.api import llm_error_response

    sock = client_socket(request.environ)
    if sock is not None and client_gone(sock):  # it waited in a queue, and its client gave up meanwhile
        return Response(status=CLIENT_CLOSED)
    heartbeat = heartbeat_seconds(current_app.config)
    items: queue.SimpleQueue[Item] = queue.SimpleQueue()
    running = run_apart(
        partial(_read, opener, items.put),
        partial(_aread, aopener, items.put) if aopener is not None else _never,
        # The loop's task is the one thing a watcher can stop at once under gthread: used
        # when there is a client to watch (gunicorn), and the stream is not open already.
        on_loop=sock is not None and aopener is not None,
        crashed=lambda exc: items.put(("failed", exc)),
    )

    def gone() -> None:  # in the watcher: must not block
        running.cancel()
        items.put(("gone", None))

    watch = watch_client(sock, gone)

    def end() -> None:
        watch.stop()
        running.cancel()

    kind, value = items.get()
    if kind not in {"delta", "done"}:
        end()
        if kind == "error":
            return llm_error_response(value)
        if kind == "failed":
            raise value
        return Response(status=CLIENT_CLOSED)

    def events() -> Iterator[str]:
        item: Item | None = (kind, value)
        try:
            while True:
                if item is None:
                    yield HEARTBEAT
                else:
                    event = _event(*item, structured)
                    if event is None:  # gone
                        return
                    yield event
                    if item[0] != "delta":
                        return
                try:
                    item = items.get(timeout=heartbeat)
                except queue.Empty:
                    item = None
        finally:
            # Also when the server closes this generator because a write to the client failed.
            end()

    response = Response(stream_with_context(events()), mimetype="text/event-stream", headers=SSE_HEADERS)
    # A generator closed before its first step runs no ``finally``: stop the reading here too.
    response.call_on_close(end)
    return response


def _event(kind: str, value: Any, structured: bool) -> str | None:
    from app.api import _error_body, _tool_calls, _usage, llm_error_parts

    if kind == "delta":
        return _sse("delta", {"text": value})
    if kind == "done":
        answer: ChatResponse = value
        done = {
            "model": answer.model,
            "provider": answer.provider,
            "usage": _usage(answer),
            "finish_reason": answer.finish_reason,
            "tool_calls": _tool_calls(answer),
        }
        if structured:
            done["parsed"] = answer.parsed
        return _sse("done", done)
    if kind == "error":
        status, body, _headers = llm_error_parts(value)
        return _sse("error", {"error": {**body, "status": status}})
    if kind == "failed":
        current_app.logger.error("unhandled error in a chat stream", exc_info=value)
        body = _error_body("internal_error", "the server hit an unexpected error")
        return _sse("error", {"error": {**body, "status": 500}})
    return None


# --- the reader: opens the stream and reads it, apart from the request ------------------


def _failure(exc: Exception) -> tuple[str, Exception]:
    """The event for an error: the layer's own (``error``: its status and body) or a bug (``failed``)."""
    return ("error", exc) if isinstance(exc, LLMError) else ("failed", exc)


def _read(opener: Callable[[], ChatStream], put: Put, cancelled: Cancelled) -> None:
    """Sync: in a greenlet (killed when the client leaves) or a thread (told to stop)."""
    try:
        stream = opener()
    except Exception as exc:
        put(_failure(exc))
        return
    try:
        for text in stream:
            if cancelled:
                return
            put(("delta", text))
        put(("done", stream.response))
    except Exception as exc:
        put(_failure(exc))
    finally:
        stream.close()  # closes the upstream connection if it is still open


async def _aread(aopener: Callable[[], Any], put: Put) -> None:
    """Async: a task on the worker's loop, cancelled when the client leaves."""
    try:
        stream = aopener()
    except Exception as exc:
        put(_failure(exc))
        return
    try:
        async for text in stream:
            put(("delta", text))
        put(("done", stream.response))
    except Exception as exc:
        put(_failure(exc))
    finally:
        await stream.aclose()


async def _never() -> None:  # pragma: no cover (on_loop is false whenever it would be used)
    raise AssertionError("an open sync stream is never read on the loop")


__all__ = ["HEARTBEAT", "SSE_HEADERS", "_sse", "_sse_response", "check_settings", "stream_chat"]
