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
FORMAT = 1

_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode
_loads = json.JSONDecoder().decode


class CorruptEntry(ValueError):
    """An entry that cannot be used: not JSON, another format or kind, fields of the wrong shape."""


def encode(kind: str, response: ChatResponse | EmbedResponse) -> bytes:
    """The entry for ``response``, answered to a call of ``kind`` (``chat``, ``stream``, ``embed``)."""
    if isinstance(response, EmbedResponse):
        body: dict[str, Any] = {
            "f": FORMAT,
            "k": kind,
            "p": response.provider,
            "m": response.model,
            "e": response.vectors,
            "u": response.input_tokens,
        }
    else:
        cost = response.cost
        body = {
            "f": FORMAT,
            "k": kind,
            "p": response.provider,
            "m": response.model,
            "c": response.content,
            "u": [
                response.input_tokens,
                response.output_tokens,
                response.total_tokens,
                response.reasoning_tokens,
                response.cached_input_tokens,
                response.cache_write_tokens,
            ],
            "r": response.finish_reason,
            "t": [[call.id, call.name, call.arguments] for call in response.tool_calls],
            "i": response.response_id,
            "$": None if cost is None else str(cost),
            "d": response.deltas,
        }
    return _dumps(body).encode("utf-8", "surrogatepass")


def decode(kind: str, data: bytes, request: ChatRequest | EmbedRequest) -> ChatResponse | EmbedResponse:
    """The answer an entry holds, marked ``cached``; :class:`CorruptEntry` when it cannot be used."""
    try:
        body = _loads(data.decode("utf-8", "surrogatepass"))
        if type(body) is not dict or body.get("f") != FORMAT or body.get("k") != kind:
            raise CorruptEntry("not an entry of this format and kind")
        if kind == "embed":
            return _embed(body)
        assert isinstance(request, ChatRequest)
        return _chat(body, request)
    except CorruptEntry:
        raise
    except (ValueError, TypeError, KeyError, IndexError, AssertionError, InvalidOperation, LLMError) as exc:
        raise CorruptEntry(f"{type(exc).__name__} while decoding an entry") from None


def _embed(body: dict[str, Any]) -> EmbedResponse:
    vectors = body["e"]
    if not isinstance(vectors, list) or not all(isinstance(v, list) for v in vectors):
        raise CorruptEntry("vectors are not lists")
    return EmbedResponse(vectors, _text(body["p"]), _text(body["m"]), _count(body["u"]), cached=True)


def _chat(body: dict[str, Any], request: ChatRequest) -> ChatResponse:
    usage = body["u"]
    if type(usage) is not list or len(usage) != 6:
        raise CorruptEntry("usage is not six counts")
    content = body["c"]
    if content is not None and type(content) is not str:
        raise CorruptEntry("content is not text")
    calls = [
        ToolCall(_text(i), _text(n), a if type(a) is dict else _bad("arguments")) for i, n, a in body["t"]
    ]
    deltas = body["d"]
    if deltas is not None and (type(deltas) is not list or not all(type(d) is str for d in deltas)):
        raise CorruptEntry("deltas are not texts")
    response = ChatResponse(
        content,
        _text(body["m"]),
        _text(body["p"]),
        _count(usage[0]),
        _count(usage[1]),
        _count(usage[2]),
        _optional_text(body["r"]),  # type: ignore[arg-type]
        calls,
        reasoning_tokens=_count(usage[3]),
        cached_input_tokens=_count(usage[4]),
        cache_write_tokens=_count(usage[5]),
        response_id=_optional_text(body["i"]),
        deltas=deltas,
        cached=True,
    )
    cost = body["$"]
    if cost is not None:
        response.cost = Decimal(cost)
    if request.response_format is not None and not calls:
        response.parsed = parse_structured(request.response_format, content, **request.context())
    return response


def _text(value: Any) -> str:
    return value if type(value) is str else _bad("a name")


def _optional_text(value: Any) -> str | None:
    return value if value is None or type(value) is str else _bad("a text")


def _count(value: Any) -> int | None:
    return value if value is None or type(value) is int else _bad("a count")


def _bad(what: str) -> Any:
    raise CorruptEntry(f"{what} of the wrong type")


__all__ = ["FORMAT", "CorruptEntry", "decode", "encode"]
