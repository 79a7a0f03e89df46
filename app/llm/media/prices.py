"""Media prices: per image, or per second of video (genai-prices prices tokens, not these).

List prices (USD) of the providers' pricing pages for the models this project
names, at their default quality; ``LLM_MEDIA_PRICES`` (JSON
``{"provider/model": {"per_image": 0.04}}`` or ``{"per_second": 0.4}``)
replaces or adds entries, validated at start. A model in neither has no
price: its ``cost`` is None, never a guess.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from decimal import Decimal, InvalidOperation
from typing import Any

from app.errors import ConfigError
from app.llm.media.types import MediaUnit, MediaUsage

#: (unit, USD per unit) for each model, by "provider/model".
BUILT_IN: dict[str, tuple[MediaUnit, str]] = {
    "gemini/imagen-4.0-generate-001": ("image", "0.04"),
    "gemini/imagen-4.0-fast-generate-001": ("image", "0.02"),
    "gemini/imagen-4.0-ultra-generate-001": ("image", "0.06"),
    "gemini/gemini-2.5-flash-image": ("image", "0.039"),
    "openai/gpt-image-1": ("image", "0.042"),  # medium quality, 1024x1024
    "gemini/veo-2.0-generate-001": ("second", "0.35"),
    "gemini/veo-3.0-generate-001": ("second", "0.40"),
    "gemini/veo-3.0-fast-generate-001": ("second", "0.15"),
    "gemini/veo-3.1-generate-preview": ("second", "0.40"),
    "gemini/veo-3.1-fast-generate-preview": ("second", "0.15"),
}

_KEYS: dict[str, MediaUnit] = {"per_image": "image", "per_second": "second"}


def parse_media_prices(value: Any) -> dict[str, tuple[MediaUnit, Decimal]]:
    """The built-in prices with ``LLM_MEDIA_PRICES`` over them; a bad entry names itself."""
    prices = {address: (unit, Decimal(price)) for address, (unit, price) in BUILT_IN.items()}
    if value is None or value == "":
        return prices
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise ConfigError("LLM_MEDIA_PRICES must be a JSON object") from None
    if not isinstance(value, Mapping):
        raise ConfigError("LLM_MEDIA_PRICES must be a JSON object of 'provider/model' -> price")
    for address, entry in value.items():
        if "/" not in str(address) or not isinstance(entry, Mapping) or len(entry) != 1:
            raise ConfigError(
                f"LLM_MEDIA_PRICES[{address!r}] must be 'provider/model' -> "
                '{"per_image": USD} or {"per_second": USD}'
            )
        ((key, price),) = entry.items()
        if key not in _KEYS:
            raise ConfigError(f"LLM_MEDIA_PRICES[{address!r}]: {key!r} is not per_image or per_second")
        try:
            amount = Decimal(str(price))
        except InvalidOperation:
            amount = Decimal(-1)
        if isinstance(price, bool) or not amount.is_finite() or amount < 0:
            raise ConfigError(f"LLM_MEDIA_PRICES[{address!r}].{key} must be a price in USD (0 or more)")
        prices[str(address)] = (_KEYS[key], amount)
    return prices


def usage(
    prices: Mapping[str, tuple[MediaUnit, Decimal]],
    provider: str,
    model: str,
    unit: MediaUnit,
    quantity: float,
) -> MediaUsage:
    """``quantity`` units of ``provider/model`` and what they cost (0 units cost 0, priced or not)."""
    entry = prices.get(f"{provider}/{model.removeprefix('models/')}")
    if quantity == 0:
        return MediaUsage(unit, 0, Decimal(0))
    if entry is None or entry[0] != unit:
        return MediaUsage(unit, quantity, None)
    return MediaUsage(unit, quantity, entry[1] * Decimal(str(quantity)))


__all__ = ["BUILT_IN", "parse_media_prices", "usage"]
