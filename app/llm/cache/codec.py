"""Cache entries as JSON bytes: what a hit needs to rebuild the answer, and nothing else.

JSON rather than pickle: an entry is read back from a disk folder or a Redis
server that other processes write to, and unpickling what such a place holds
would run whatever it says. Each entry carries its format (:data:`FORMAT`)
and its kind; one of another format or kind, or one that does not decode,
is :class:`CorruptEntry`, which the cache treats as a miss and deletes.

Kept: content, model, provider, the usage (every token count and the
original's ``cost``), finish reason, tool calls, response id, and a
stream's text deltas (so a replay yields the same deltas). ``parsed`` is not
kept: it is rebuilt from the content by the request's ``response_format``,
so a hit gets a validated pydantic instance as a call does. Not kept:
``raw`` (the SDK's object), ``attempts`` and ``latency_ms`` (this call's own).
"""

from __future__ import annotations

import json
from decimal import Decimal, InvalidOperation
from typing import Any

from app.llm.errors import LLMError
from app.llm.hooks import EmbedResponse
from app.llm.providers.base import ChatRequest, EmbedRequest
from app.llm.structured import parse_structured
from app.llm.types import ChatResponse, ToolCall

#: Bumped when an entry's layout changes: entries of another format are never returned.
#: 2: a JSON array in a fixed order (1 was an object with one-letter keys): a hit parses an
#: array of eleven values in about two thirds of the time an object of eleven keys takes.
FORMAT = 2
#: Values in an entry: [FORMAT, kind, provider, model, content, usage (six counts), finish reason,
#: tool calls ([id, name, arguments] each), response id, cost (decimal text or null), deltas].
CHAT_LENGTH = 11
#: Values in an embeddings entry: [FORMAT, "embed", provider, model, vectors, input tokens].
EMBED_LENGTH = 6

_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode
#: ``raw_decode``: ``decode`` adds two whitespace matches and a frame, and an entry has no whitespace.
_scan = json.JSONDecoder().raw_decode


class CorruptEntry(ValueError):
    """An entry that cannot be used: not JSON, another format or kind, fields of the wrong shape."""


def encode(kind: str, response: ChatResponse | EmbedResponse) -> bytes:
    """The entry for ``response``, answered to a call of ``kind`` (``chat``, ``stream``, ``embed``)."""
    body: list[Any]
    if isinstance(response, EmbedResponse):
        body = [FORMAT, kind, response.provider, response.model, response.vectors, response.input_tokens]
    else:
        cost = response.cost
        body = [
            FORMAT,
            kind,
            response.provider,
            response.model,
            response.content,
            [
                response.input_tokens,
                response.output_tokens,
                response.total_tokens,
                response.reasoning_tokens,
                response.cached_input_tokens,
                response.cache_write_tokens,
            ],
            response.finish_reason,
            [[call.id, call.name, call.arguments] for call in response.tool_calls],
            response.response_id,
            None if cost is None else str(cost),
            response.deltas,
        ]
    return _dumps(body).encode("utf-8", "surrogatepass")


def decode(kind: str, data: bytes, request: ChatRequest | EmbedRequest) -> ChatResponse | EmbedResponse:
    """The answer an entry holds, marked ``cached``; :class:`CorruptEntry` when it cannot be used."""
    try:
        text = data.decode("utf-8", "surrogatepass")
        body, end = _scan(text)
        if end != len(text) or type(body) is not list or len(body) < 2:
            raise CorruptEntry("not an entry")
        if body[0] != FORMAT or body[1] != kind:
            raise CorruptEntry("not an entry of this format and kind")
        if kind == "embed":
            return _embed(body)
        assert isinstance(request, ChatRequest)
        return _chat(body, request)
    except CorruptEntry:
        raise
    except (ValueError, TypeError, KeyError, IndexError, AssertionError, InvalidOperation, LLMError) as exc:
        raise CorruptEntry(f"{type(exc).__name__} while decoding an entry") from None


def _embed(body: list[Any]) -> EmbedResponse:
    _, _, provider, model, vectors, tokens = body  # ValueError when not six values
    if not isinstance(vectors, list) or not all(isinstance(v, list) for v in vectors):
        raise CorruptEntry("vectors are not lists")
    if type(provider) is not str or type(model) is not str:
        raise CorruptEntry("a name of the wrong type")
    if tokens is not None and type(tokens) is not int:
        raise CorruptEntry("a count of the wrong type")
    return EmbedResponse(vectors, provider, model, tokens, cached=True)


def _chat(body: list[Any], request: ChatRequest) -> ChatResponse:
    """The checks are written out, not delegated per value: this runs on every hit."""
    _, _, provider, model, content, usage, finish, tools, response_id, cost, deltas = body
    if type(provider) is not str or type(model) is not str:
        raise CorruptEntry("a name of the wrong type")
    if content is not None and type(content) is not str:
        raise CorruptEntry("content is not text")
    if type(usage) is not list or len(usage) != 6:
        raise CorruptEntry("usage is not six counts")
    for count in usage:
        if count is not None and type(count) is not int:
            raise CorruptEntry("a count of the wrong type")
    if (finish is not None and type(finish) is not str) or (
        response_id is not None and type(response_id) is not str
    ):
        raise CorruptEntry("a text of the wrong type")
    if type(tools) is not list:
        raise CorruptEntry("tool calls are not a list")
    calls = [_tool_call(*call) for call in tools] if tools else []
    if deltas is not None and (type(deltas) is not list or not all(type(d) is str for d in deltas)):
        raise CorruptEntry("deltas are not texts")
    response = ChatResponse(
        content,
        model,
        provider,
        usage[0],
        usage[1],
        usage[2],
        finish,  # type: ignore[arg-type]  # text or None, checked above
        calls,
        reasoning_tokens=usage[3],
        cached_input_tokens=usage[4],
        cache_write_tokens=usage[5],
        response_id=response_id,
        cost=None if cost is None else Decimal(cost),
        deltas=deltas,
        cached=True,
    )
    if request.response_format is not None and not calls:
        response.parsed = parse_structured(request.response_format, content, **request.context())
    return response


def _tool_call(call_id: Any, name: Any, arguments: Any) -> ToolCall:
    if type(call_id) is not str or type(name) is not str:
        raise CorruptEntry("a name of the wrong type")
    if type(arguments) is not dict:
        raise CorruptEntry("arguments of the wrong type")
    return ToolCall(call_id, name, arguments)


__all__ = ["FORMAT", "CorruptEntry", "decode", "encode"]
