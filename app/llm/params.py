"""The generation parameters of a call, validated once into the form every adapter reads.

Each check raises an :class:`LLMBadRequestError` whose ``field`` names the
parameter, before any hook, policy step or provider sees the call. Ranges are
the widest any supported provider takes (OpenAI's, which Gemini shares);
narrower limits of one provider (Anthropic's temperature up to 1, OpenAI's
four stop sequences, Gemini's 32-bit seed) are that adapter's ``check()``.
Numbers must be finite: ``NaN`` would be sent as the invalid JSON token ``NaN``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any, cast

from app.llm.errors import LLMBadRequestError
from app.llm.providers.base import REASONING_EFFORTS, ReasoningEffort

#: Body keys that the layer itself builds (and reads back): ``extra`` may not replace them.
RESERVED_BODY_KEYS = frozenset({"model", "messages", "stream", "stream_options", "contents"})
#: Stop sequences per call, at most (providers cap them lower: OpenAI 4, Gemini 5).
MAX_STOP_SEQUENCES = 16
INT64 = 2**63


def _number(name: str, value: Any, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise LLMBadRequestError(f"{name} must be a number, got {type(value).__name__}", field=name)
    if not math.isfinite(value) or not low <= value <= high:
        raise LLMBadRequestError(
            f"{name} must be a number from {low:g} to {high:g}, got {value!r}", field=name
        )
    return value


def _integer(name: str, value: Any, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise LLMBadRequestError(f"{name} must be an integer, got {type(value).__name__}", field=name)
    if value < low or (high is not None and value > high):
        bound = f"from {low} to {high}" if high is not None else f"of {low} or more"
        raise LLMBadRequestError(f"{name} must be an integer {bound}, got {value!r}", field=name)
    return value


def temperature(value: Any) -> float:
    return _number("temperature", value, 0.0, 2.0)


def max_tokens(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise LLMBadRequestError(f"max_tokens must be a positive integer, got {value!r}", field="max_tokens")
    return value


def top_p(value: Any) -> float:
    return _number("top_p", value, 0.0, 1.0)


def top_k(value: Any) -> int:
    return _integer("top_k", value, 1)


def penalty(name: str, value: Any) -> float:
    return _number(name, value, -2.0, 2.0)


def seed(value: Any) -> int:
    return _integer("seed", value, -INT64, INT64 - 1)


def stop(value: Any) -> tuple[str, ...]:
    """A string or a list of strings, each non-empty."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, Sequence) or isinstance(items, bytes | bytearray) or not items:
        raise LLMBadRequestError("stop must be a string or a non-empty list of strings", field="stop")
    if len(items) > MAX_STOP_SEQUENCES:
        raise LLMBadRequestError(f"stop takes at most {MAX_STOP_SEQUENCES} sequences", field="stop")
    for index, item in enumerate(items):
        if not isinstance(item, str) or not item:
            where = "stop" if isinstance(value, str) else f"stop[{index}]"
            raise LLMBadRequestError(f"{where} must be a non-empty string", field=where)
    return tuple(items)


def reasoning_effort(value: Any) -> ReasoningEffort:
    if not isinstance(value, str) or value not in REASONING_EFFORTS:
        raise LLMBadRequestError(
            f"reasoning_effort must be one of {', '.join(REASONING_EFFORTS)}, got {value!r}",
            field="reasoning_effort",
        )
    return cast(ReasoningEffort, value)


def thinking_budget(value: Any) -> int:
    """Tokens; 0 turns thinking off where a model allows it, -1 lets Gemini decide (dynamic)."""
    return _integer("thinking_budget", value, -1)


def safety(value: Any) -> tuple[tuple[str, str], ...]:
    """``{category: threshold}`` or ``[{"category", "threshold"}]`` -> upper-case pairs.

    The names themselves are Gemini's (``HARM_CATEGORY_HARASSMENT``,
    ``BLOCK_ONLY_HIGH``): the Gemini adapter checks them against its SDK.
    """
    if isinstance(value, Mapping):
        pairs = list(value.items())
        where = [f"safety.{key}" for key, _ in pairs]
    elif isinstance(value, Sequence) and not isinstance(value, str | bytes):
        pairs = []
        where = []
        for index, item in enumerate(value):
            if not isinstance(item, Mapping) or set(item) - {"category", "threshold"}:
                raise LLMBadRequestError(
                    f"safety[{index}] must be {{category, threshold}}", field=f"safety[{index}]"
                )
            pairs.append((item.get("category"), item.get("threshold")))
            where.append(f"safety[{index}]")
    else:
        raise LLMBadRequestError(
            "safety must be {category: threshold} or a list of {category, threshold}", field="safety"
        )
    if not pairs:
        raise LLMBadRequestError("safety must name at least one category", field="safety")
    normalised: list[tuple[str, str]] = []
    for (category, threshold), at in zip(pairs, where, strict=True):
        if not isinstance(category, str) or not category or not isinstance(threshold, str) or not threshold:
            raise LLMBadRequestError(f"{at}: category and threshold must be non-empty strings", field=at)
        normalised.append((category.upper(), threshold.upper()))
    return tuple(normalised)


def extra(value: Any) -> dict[str, Any]:
    """A JSON object merged into the provider's request body (a copy, checked to be JSON)."""
    if not isinstance(value, Mapping) or not all(isinstance(key, str) for key in value):
        raise LLMBadRequestError("extra must be a dict with string keys (a JSON object)", field="extra")
    for key in value:
        if key in RESERVED_BODY_KEYS:
            raise LLMBadRequestError(
                f"extra.{key} is built by the layer and cannot be replaced", field=f"extra.{key}"
            )
    try:
        text = json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise LLMBadRequestError(f"extra must hold only JSON values: {exc}", field="extra") from None
    copied: dict[str, Any] = json.loads(text)
    return copied


#: Parameter -> its validator (the keyword a caller gives, the field of ChatRequest it fills).
VALIDATORS: dict[str, Any] = {
    "temperature": temperature,
    "max_tokens": max_tokens,
    "top_p": top_p,
    "top_k": top_k,
    "stop": stop,
    "seed": seed,
    "presence_penalty": lambda value: penalty("presence_penalty", value),
    "frequency_penalty": lambda value: penalty("frequency_penalty", value),
    "reasoning_effort": reasoning_effort,
    "thinking_budget": thinking_budget,
    "safety": safety,
    "extra": extra,
}


def validate(options: Mapping[str, Any]) -> dict[str, Any]:
    """The generation parameters among ``options`` that are set, validated and normalised.

    Walks the call's own keywords (usually none or two), not every parameter: it runs on
    every call.
    """
    return {
        name: VALIDATORS[name](value)
        for name, value in options.items()
        if value is not None and name in VALIDATORS
    }


__all__ = ["MAX_STOP_SEQUENCES", "RESERVED_BODY_KEYS", "VALIDATORS", "validate"]
