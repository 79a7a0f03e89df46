"""The cache key: SHA-256 of the canonical JSON of the normalised request and its scope.

The key *is* :func:`app.llm.canonical.request_key` (the form cassettes match
on, with its ``FORM_VERSION``; secrets hashed, image bytes hashed); a test
checks that the two agree on requests of every shape. It is computed here
with the same rules in about a ninth of the time, because a hit pays for it
on every call and the generic walk (``dataclasses.fields`` and an
``isinstance`` ladder per value, then a ``sort_keys`` encoding) costs more
than the whole rest of a memory hit. What differs is only how: each
dataclass type is written by a function compiled once, each value's writer
is one look-up by its exact type, dicts are built in sorted order (so no
``sort_keys``), and a scope's text is written once.

The scope is what is not in the request but must separate answers: the
tenant, the provider's endpoint (its base URL, credentials masked), and the
kind of call (a stream's entry keeps its deltas; a chat's does not).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import weakref
from collections.abc import Callable, Mapping
from typing import Any

from app.llm.canonical import FORM_VERSION, NOT_PART_OF_THE_QUESTION, SECRET_FIELDS, canonical, digest

#: The generic encoding, for the rare values :func:`encode` hands to canonical(): keys sorted, no
#: spaces, no NaN (the rules of ``app.llm.canonical.dumps``), one encoder object reused.
_encode_sorted = json.JSONEncoder(
    sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False, check_circular=False
).encode
#: A JSON string literal, as the encoder writes one (``ensure_ascii=False``).
_string: Callable[[str], str] = json.encoder.encode_basestring

#: Per dataclass type, the function that writes one as canonical JSON (:func:`_writer`).
_writers: dict[type, Callable[[Any], str]] = {}
#: A pydantic model class's canonical text: its JSON schema is costly to build and never changes.
_model_texts: weakref.WeakKeyDictionary[type, str] = weakref.WeakKeyDictionary()

_TYPE = "__type__"
#: (endpoint, kind, tenant) -> the scope's canonical text: a few per app, written once each.
_scopes: dict[tuple[str | None, str, str | None], str] = {}
MAX_SCOPES = 4096


def cache_key(request: Any, **scope: Any) -> str:
    """``request_key(request, **scope)``: the hex SHA-256 of the canonical JSON of both."""
    text = f'{{"request":{encode(request)},"scope":{encode(scope)},"v":{FORM_VERSION}}}'
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def call_key(request: Any, endpoint: str | None, kind: str, tenant: str | None) -> str:
    """``cache_key(request, endpoint=..., kind=..., tenant=...)``, the scope written once per scope."""
    scope = _scopes.get((endpoint, kind, tenant))
    if scope is None:
        scope = (
            f'{{"endpoint":{"null" if endpoint is None else _string(endpoint)},"kind":{_string(kind)},'
            f'"tenant":{"null" if tenant is None else encode(tenant)}}}'
        )
        if len(_scopes) >= MAX_SCOPES:  # tenants come from callers: bounded
            _scopes.clear()
        _scopes[(endpoint, kind, tenant)] = scope
    text = f'{{"request":{encode(request)},"scope":{scope},"v":{FORM_VERSION}}}'
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def encode(value: Any) -> str:
    """``dumps(canonical(value))``, written directly for the types a request is made of."""
    kind = type(value)
    if kind is str:
        return _string(value)
    if value is None:
        return "null"
    writer = _writers.get(kind)
    if writer is not None:
        return writer(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _writer(kind)(value)
    if isinstance(value, type) and hasattr(value, "model_json_schema"):  # a pydantic model class
        text = _model_texts.get(value)
        if text is None:
            text = _model_texts[value] = _encode_sorted(canonical(value))
        return text
    return _encode_sorted(canonical(value))  # bytes, sets, pydantic instances...: the generic rules


def _sequence(value: list[Any] | tuple[Any, ...]) -> str:
    if not value:
        return "[]"
    if len(value) == 1:  # most parts and many message lists: no join
        item = value[0]
        return f"[{(_writers.get(item.__class__) or encode)(item)}]"
    return f"[{','.join([(_writers.get(item.__class__) or encode)(item) for item in value])}]"


def _mapping(value: dict[Any, Any]) -> str:
    items = {str(key): item for key, item in value.items()}  # canonical()'s keys: str(key)
    return "{" + ",".join([f"{_string(key)}:{encode(items[key])}" for key in sorted(items)]) + "}"


def _float(value: float) -> str:
    return float.__repr__(value) if math.isfinite(value) else _string(repr(value))


# The plain types by exact class, beside the dataclass writers: one dict look-up picks the writer.
_writers.update(
    {
        list: _sequence,
        tuple: _sequence,
        dict: _mapping,
        bool: lambda value: "true" if value else "false",
        int: int.__repr__,
        float: _float,
    }
)


def _writer(kind: type) -> Callable[[Any], str]:
    """The function that writes a ``kind`` dataclass as canonical JSON, compiled once per type.

    Why generated code: a hit computes the key on every call, and a loop over the
    fields (``getattr`` by name, a branch per field) costs about twice as much as
    straight-line code that reads each field once, writes ``null`` for None and a
    string literal inline, and joins the pieces in one f-string. The text is fixed by
    the type (its name, its fields in sorted order, which are secrets); only values vary.
    """
    names = [f.name for f in dataclasses.fields(kind) if f.name not in NOT_PART_OF_THE_QUESTION]
    if not kind.__name__.isidentifier():
        raise TypeError(f"{kind.__name__} is not a class name")
    lines: list[str] = []
    # The f-string's text: JSON punctuation, field names and the class name (identifiers: no quote,
    # no backslash), its braces doubled; and a placeholder per field.
    text: list[str] = []
    for index, name in enumerate(sorted([*names, _TYPE])):
        head = ("{" if index == 0 else ",") + _string(name) + ":"
        if name == _TYPE:
            text.append(_literal(head + _string(kind.__name__)))
            continue
        if not name.isidentifier():
            raise TypeError(f"{kind.__name__}.{name} is not a field name")
        local = f"v{index}"
        text.append(_literal(head) + "{" + local + "}")
        if name in SECRET_FIELDS:  # kept as its hash, as canonical() keeps it
            written = f'"null" if {local} is None else _string(_digest(_reveal({local})))'
        else:
            written = (
                f'"null" if {local} is None else _string({local}) if {local}.__class__ is str'
                f" else (_writers.get({local}.__class__) or _encode)({local})"
            )
        lines.append(f"    {local} = value.{name}\n    {local} = {written}\n")
    text.append(_literal("}"))
    literal = "".join(text)
    source = "def write(value):\n" + "".join(lines) + f"    return f'{literal}'\n"
    scope: dict[str, Any] = {
        "_string": _string,
        "_digest": digest,
        "_reveal": _reveal,
        "_encode": encode,
        "_writers": _writers,
    }
    exec(compile(source, f"<cache key writer of {kind.__name__}>", "exec"), scope)  # noqa: S102 (our own text)
    write: Callable[[Any], str] = scope["write"]
    _writers[kind] = write
    return write


def _literal(text: str) -> str:
    """``text`` as it stands in an f-string."""
    return text.replace("{", "{{").replace("}", "}}")


def _reveal(value: Any) -> str:
    reveal = getattr(value, "reveal", None)
    return str(reveal() if callable(reveal) else value)


def endpoints(extensions: Mapping[str, Any]) -> dict[str, str | None]:
    """Provider name -> the base URL its calls go to (credentials masked), from the connectors.

    ``openai`` is the OpenAI connector's ``default`` profile; every other profile, ``gemini``
    and ``anthropic`` are under their own names. A provider not listed (a registered custom
    one, the test kit's fake) has no endpoint in its key.
    """
    from app.connectors._base import Connector

    found: dict[str, str | None] = {}
    for extension in extensions.values():
        if not isinstance(extension, Connector):
            continue
        for name, info in extension.info().items():
            if extension.extension_key == "openai_service" and name == "default":
                name = "openai"  # noqa: PLW2901
            endpoint = info.get("endpoint")
            found[name] = str(endpoint) if endpoint is not None else None
    return found


__all__ = ["cache_key", "call_key", "encode", "endpoints"]
