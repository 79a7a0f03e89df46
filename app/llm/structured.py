"""Structured output: a pydantic model in, a validated instance out (or a JSON
schema dict in, the decoded JSON object out).

Each provider sends the model's JSON schema in its native JSON-schema mode;
:func:`parse_structured` validates the text that comes back and raises an
:class:`LLMResponseError` (keeping the raw text) when it does not fit.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Mapping
from typing import Any

from app.llm.errors import LLMBadRequestError, LLMResponseError
from app.llm.types import check_texts

_NAME_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")
_USAGE = "response_format must be a pydantic model class or a JSON schema dict"


def check_response_format(response_format: Any) -> None:
    """Raise an LLMBadRequestError naming the ``field`` if ``response_format`` cannot be used.

    A dict is a JSON schema, bare or in OpenAI's wrapper; it must describe an
    object, as :func:`parse_structured` decodes the answer into one.
    """
    if not isinstance(response_format, Mapping):
        if not hasattr(response_format, "model_validate_json"):
            raise LLMBadRequestError(_USAGE, field="response_format")
        return
    schema: Any = response_format
    where = "response_format"
    if response_format.get("type") == "json_schema":
        inner = response_format.get("json_schema")
        if not isinstance(inner, Mapping):
            raise LLMBadRequestError(
                f"{_USAGE} ({{type: 'json_schema', json_schema: {{name, schema}}}})",
                field="response_format.json_schema",
            )
        schema = inner.get("schema")
        if not isinstance(schema, Mapping):
            raise LLMBadRequestError(
                "response_format.json_schema.schema must be a JSON schema object",
                field="response_format.json_schema.schema",
            )
        where = "response_format.json_schema.schema"
    if schema.get("type", "object") != "object":
        raise LLMBadRequestError(
            f"{_USAGE}; the schema must describe an object, got type {schema.get('type')!r}", field=where
        )
    check_texts(where, schema)  # no lone surrogates, which no provider can be sent


def json_schema(response_format: Any) -> dict[str, Any]:
    """The JSON schema of a pydantic model class, or of a schema given as a dict.

    A dict may be a bare JSON schema or OpenAI's wrapper
    ``{"type": "json_schema", "json_schema": {"name", "schema"}}``. Every
    provider reads the schema here, so one that cannot be used is refused
    here too (an LLMBadRequestError), before anything is sent.
    """
    check_response_format(response_format)
    if isinstance(response_format, Mapping):
        inner = response_format.get("json_schema")
        if response_format.get("type") == "json_schema" and isinstance(inner, Mapping):
            return dict(inner["schema"])
        return dict(response_format)
    return dict(response_format.model_json_schema())


def schema_name(response_format: Any) -> str:
    """A name for the schema (OpenAI requires one): the model's, or the wrapper's."""
    if isinstance(response_format, Mapping):
        inner = response_format.get("json_schema")
        name = inner.get("name") if isinstance(inner, Mapping) else response_format.get("title")
    else:
        name = response_format.__name__
    # OpenAI accepts a-z, A-Z, 0-9, _ and - (64 at most); "Page[Item]" is a valid class name.
    return _NAME_UNSAFE.sub("_", str(name or ""))[:64] or "response"


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


#: Keywords whose value is a map of name -> subschema, a list of subschemas, or one subschema.
_SCHEMA_MAPS = ("properties", "$defs", "definitions", "patternProperties")
_SCHEMA_LISTS = ("anyOf", "allOf", "oneOf", "prefixItems")
_SCHEMA_ONE = ("items", "additionalProperties", "not", "contains", "if", "then", "else")


def _close_objects(node: Any) -> None:
    """Close every object schema in ``node``, walking subschemas only.

    Walking by keyword (rather than every dict) keeps property *names* out of
    it: a field called ``default`` or ``properties`` is not a keyword.
    """
    if isinstance(node, list):  # "items" as a list (older drafts)
        for item in node:
            _close_objects(item)
        return
    if not isinstance(node, dict):
        return
    if node.get("type") == "object" or "properties" in node:
        node.setdefault("additionalProperties", False)
        properties = node.get("properties")
        node["required"] = list(properties) if isinstance(properties, dict) else []
    node.pop("default", None)
    for key in _SCHEMA_MAPS:
        children = node.get(key)
        if isinstance(children, dict):
            for child in children.values():
                _close_objects(child)
    for key in _SCHEMA_LISTS:
        children = node.get(key)
        if isinstance(children, list):
            for child in children:
                _close_objects(child)
    for key in _SCHEMA_ONE:
        _close_objects(node.get(key))


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
