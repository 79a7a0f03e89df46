"""Structured output: a pydantic model in, a validated instance out (or a JSON
schema dict in, the decoded JSON object out).

Each provider sends the model's JSON schema in its native JSON-schema mode;
:func:`parse_structured` validates the text that comes back and raises an
:class:`LLMResponseError` (keeping the raw text) when it does not fit.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from typing import Any

from app.llm.errors import LLMResponseError


def json_schema(response_format: Any) -> dict[str, Any]:
    """The JSON schema of a pydantic model class, or of a schema given as a dict.

    A dict may be a bare JSON schema or OpenAI's wrapper
    ``{"type": "json_schema", "json_schema": {"name", "schema"}}``.
    """
    if isinstance(response_format, Mapping):
        inner = response_format.get("json_schema")
        if response_format.get("type") == "json_schema" and isinstance(inner, Mapping):
            return dict(inner.get("schema") or {})
        return dict(response_format)
    return dict(response_format.model_json_schema())


def schema_name(response_format: Any) -> str:
    """A name for the schema (OpenAI requires one): the model's, or the wrapper's."""
    if isinstance(response_format, Mapping):
        inner = response_format.get("json_schema")
        name = inner.get("name") if isinstance(inner, Mapping) else response_format.get("title")
        return str(name or "response")
    return str(response_format.__name__)


def is_response_format(value: Any) -> bool:
    return isinstance(value, Mapping) or hasattr(value, "model_validate_json")


def strict_json_schema(response_format: Any) -> dict[str, Any]:
    """The schema in the form OpenAI's ``strict`` mode requires.

    Every object closes (``additionalProperties: false``) and lists all of its
    properties as required; written here because the SDK's own converter is
    private API.
    """
    schema = copy.deepcopy(json_schema(response_format))
    _close_objects(schema)
    return schema


def _close_objects(node: Any) -> None:
    if isinstance(node, dict):
        if node.get("type") == "object" or "properties" in node:
            node.setdefault("additionalProperties", False)
            node["required"] = list(node.get("properties", {}))
        node.pop("default", None)
        for value in node.values():
            _close_objects(value)
    elif isinstance(node, list):
        for item in node:
            _close_objects(item)


def parse_structured(response_format: Any, text: str | None, **context: Any) -> Any:
    """Validate ``text``: an instance of the pydantic model, or the JSON object for a dict schema.

    Output that does not fit raises an LLMResponseError that keeps the raw text.
    """
    if not text:
        raise LLMResponseError("the model returned no structured output", raw_text=text, **context)
    if isinstance(response_format, Mapping):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise LLMResponseError(
                f"structured output is not valid JSON: {exc.msg}", raw_text=text, **context
            ) from None
        if not isinstance(value, dict):
            raise LLMResponseError("structured output is not a JSON object", raw_text=text, **context)
        return value
    from pydantic import ValidationError

    try:
        return response_format.model_validate_json(text)
    except ValidationError as exc:
        errors = exc.errors()
        where = ".".join(str(p) for p in errors[0]["loc"]) if errors else ""
        reason = errors[0]["msg"] if errors else "invalid"
        raise LLMResponseError(
            f"structured output does not match {response_format.__name__}: {where or 'the output'}: {reason}",
            raw_text=text,
            **context,
        ) from exc
