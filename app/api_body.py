"""The body of an ``/api`` request, read once within its bounds, and the size of its prompt.

Checked here, before any field is looked at, each as a 4xx that names what
is wrong: the size (``MAX_CONTENT_LENGTH``, 413: werkzeug refuses to read
past it), the nesting depth (``API_MAX_JSON_DEPTH``, 400, measured on the raw
text before the recursive parser runs: :mod:`app.jsonbounds`), JSON itself
(``NaN``/``Infinity``, which Python's parser accepts and JSON does not, and
numbers too large for a float), and lone UTF-16 surrogates (``"\\ud800"``)
anywhere, in keys too, which no provider can be sent. The outcome, a value or
the error, is kept on the request, so the quota's cost and the view read the
body once.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from flask import current_app, g, request

from app.config import get_count
from app.jsonbounds import too_deep

#: A UTF-16 surrogate code point: in a Python string, always a lone one.
_SURROGATE = re.compile("[\ud800-\udfff]")


class BodyError(Exception):
    """The body is not one the views can take: the status (400 or 413), ``field`` and a message."""

    def __init__(self, field: str, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.field = field
        self.message = message
        self.status = status


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text[:20]} is too large")
    return value


def _parse() -> Any:
    if not request.is_json:
        raise BodyError("body", "the body must be a JSON object, sent with Content-Type: application/json")
    limit = current_app.config.get("MAX_CONTENT_LENGTH")
    if limit is not None and request.content_length is not None and request.content_length > limit:
        raise BodyError("body", f"the body is larger than {limit} bytes (MAX_CONTENT_LENGTH)", 413)
    from werkzeug.exceptions import RequestEntityTooLarge

    try:
        raw = request.get_data(cache=True)
    except RequestEntityTooLarge:  # a chunked body that grew past the limit while read
        raise BodyError("body", f"the body is larger than {limit} bytes (MAX_CONTENT_LENGTH)", 413) from None
    try:
        text = raw.decode(json.detect_encoding(raw))
    except (UnicodeDecodeError, LookupError):
        raise BodyError("body", "the body is not valid UTF-8 text") from None
    depth = get_count(current_app.config, "API_MAX_JSON_DEPTH")
    if too_deep(text, depth):
        raise BodyError("body", f"the body nests arrays and objects more than {depth} levels deep")
    try:
        return json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)
    except ValueError as exc:  # JSONDecodeError, and the two hooks' refusals
        reason = exc.msg if isinstance(exc, json.JSONDecodeError) else str(exc)
        raise BodyError("body", f"the body is not valid JSON: {reason}") from None


@dataclass
class _Outcome:
    value: Any = None
    error: BodyError | None = None


def json_body() -> dict[str, Any]:
    """The request's JSON object, read and checked once per request (:class:`BodyError` otherwise)."""
    outcome: _Outcome | None = g.get("_api_body")
    if outcome is None:
        outcome = _Outcome()
        try:
            value = _parse()
            if not isinstance(value, dict):
                raise BodyError("body", "the body must be a JSON object")
            where = lone_surrogate(value)
            if where is not None:
                raise BodyError(
                    where or "body", f"{where or 'the body'} holds a lone UTF-16 surrogate, not text"
                )
            outcome.value = value
        except BodyError as exc:
            outcome.error = exc
        g._api_body = outcome
    if outcome.error is not None:
        raise outcome.error
    return outcome.value  # type: ignore[no-any-return]


def _path(path: tuple[str | int, ...]) -> str:
    text = ""
    for step in path:
        text += f"[{step}]" if isinstance(step, int) else (f".{step}" if text else step)
    return text


def _strings(value: Any, path: tuple[str | int, ...]) -> Iterator[tuple[str, tuple[str | int, ...]]]:
    """Every string in a parsed JSON value, keys included, with where it is (depth is bounded)."""
    if isinstance(value, str):
        yield value, path
    elif isinstance(value, dict):
        for key, item in value.items():
            yield key, path
            yield from _strings(item, (*path, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _strings(item, (*path, index))


def lone_surrogate(value: Any) -> str | None:
    """Where the first lone surrogate in ``value`` is (``messages[0].content``), or None."""
    for text, path in _strings(value, ()):
        if not text.isascii() and _SURROGATE.search(text):
            return _path(path)
    return None


def text_size(value: Any) -> int:
    """Characters in every string of ``value`` (keys included): the prompt size a limit bounds."""
    return sum(len(text) for text, _ in _strings(value, ()))
