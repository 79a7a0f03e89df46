"""One canonical JSON form of a normalised request: what cassettes match on and caches key on.

Two requests that mean the same thing (keywords in another order, dict keys
in another order) have the same form, and any field that changes the answer
changes it: the form walks every field of the request's dataclasses, so a
parameter added to :class:`~app.llm.providers.base.ChatRequest` later is
included without anyone remembering to. What never belongs in it: the
attempt's ``timeout`` (not part of the question) and secrets (a per-call key
appears only as its SHA-256, under the name it had). Image bytes are hashed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Mapping
from typing import Any

#: Fields that do not change the answer, left out of the form.
NOT_PART_OF_THE_QUESTION = frozenset({"timeout"})
#: Fields that are secrets: kept as a hash, so that two keys still differ.
SECRET_FIELDS = frozenset({"api_key"})
#: Bumped when the form changes, so that stored entries of an older form never match.
FORM_VERSION = 1


def canonical(value: Any) -> Any:
    """``value`` as plain JSON values, the same for requests that mean the same."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        form: dict[str, Any] = {"__type__": type(value).__name__}
        for item in dataclasses.fields(value):
            name = item.name
            if name in NOT_PART_OF_THE_QUESTION:
                continue
            field_value = getattr(value, name)
            if name in SECRET_FIELDS:
                form[name] = None if field_value is None else digest(_reveal(field_value))
            else:
                form[name] = canonical(field_value)
        return form
    if isinstance(value, bytes | bytearray | memoryview):
        return {"sha256": hashlib.sha256(bytes(value)).hexdigest()}
    if isinstance(value, type) and hasattr(value, "model_json_schema"):  # a pydantic model class
        return {"pydantic": value.__name__, "schema": canonical(value.model_json_schema())}
    if isinstance(value, Mapping):
        return {str(key): canonical(item) for key, item in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        items = [canonical(item) for item in value]
        return sorted(items, key=dumps) if isinstance(value, set | frozenset) else items
    if hasattr(value, "model_dump"):  # a pydantic instance
        return canonical(value.model_dump(mode="json"))
    raise TypeError(f"no canonical form for {type(value).__name__}")


def dumps(form: Any) -> str:
    """Canonical JSON text: sorted keys, fixed separators, no NaN."""
    return json.dumps(form, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def request_key(request: Any, **scope: Any) -> str:
    """SHA-256 of the canonical JSON of ``request`` and ``scope`` (tenant, ...), with the form's version."""
    return digest(dumps({"v": FORM_VERSION, "request": canonical(request), "scope": canonical(scope)}))


def _reveal(value: Any) -> str:
    reveal = getattr(value, "reveal", None)
    return str(reveal() if callable(reveal) else value)


__all__ = ["FORM_VERSION", "canonical", "digest", "dumps", "request_key"]
