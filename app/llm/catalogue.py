"""The model catalogue: what the layer knows of a model, and what an answer cost.

Three sources, each filling what the one before leaves out, per field:

1. **genai-prices** (the maintained price database, its data bundled in the
   package; nothing is fetched at run time): prices per million tokens and the
   context window. A provider is looked up there under its own name (``openai``,
   ``anthropic``, ``groq``, ``openrouter``, ``azure``, ... and ``gemini`` as
   ``google``); any other name (``ollama``, ``fake``, a private profile) is not.
2. ``app/llm/models.json``, shipped with the project: maximum output, what the
   model takes (images, tools, JSON schemas), whether it reasons, and a context
   window where genai-prices has none. Never prices.
3. ``LLM_MODELS``: JSON ``{"provider/model": {field: value}}``, validated at
   start, for Azure deployments, Ollama models and private endpoints.

A model none of them knows is unknown: :meth:`Catalogue.info` raises
:class:`UnknownModelError` rather than guess, and the layer skips its checks.

Cost is worked out by genai-prices itself (``ModelInfo.calc_price`` for its own
models, with their tiers and dated prices; ``ModelPrice.calc_price`` for prices
given in ``LLM_MODELS``), so the figure is genai-prices' own. The usage it is
given: input tokens (cache reads and writes included, priced at their own
rates where the model has them), and output tokens with the reasoning tokens
already in them (billed as output). genai-prices (about 0.17 s to import) loads
on the first call that needs it, never at start-up.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from app.errors import ConfigError

if TYPE_CHECKING:
    from app.llm.types import ChatResponse

logger = logging.getLogger(__name__)

#: Provider names of this layer that genai-prices spells otherwise.
GENAI_PRICES_PROVIDER = {"gemini": "google", "xai": "x-ai"}
#: Provider names never looked up in genai-prices (local or test providers).
NOT_PRICED = frozenset({"ollama", "fake"})

#: Field -> genai-prices price key (per million tokens).
PRICE_KEYS = {
    "input_price": "input_mtok",
    "output_price": "output_mtok",
    "cached_input_price": "cache_read_mtok",
    "cache_write_price": "cache_write_mtok",
}
_BOOLEANS = ("supports_images", "supports_tools", "supports_json_schema", "supports_reasoning")
_COUNTS = ("context_window", "max_output_tokens")
_KINDS = ("chat", "embedding")


class UnknownModelError(LookupError):
    """No source knows this model: the catalogue says so rather than guess."""

    def __init__(self, address: str) -> None:
        super().__init__(
            f"unknown model {address!r}: neither genai-prices nor the project's models.json knows it;"
            " describe it in LLM_MODELS (context_window, max_output_tokens, prices, ...)"
        )
        self.address = address


@dataclass(frozen=True)
class ModelInfo:
    """What is known of one model; None where no source says."""

    provider: str
    model: str
    kind: str = "chat"
    context_window: int | None = None
    max_output_tokens: int | None = None
    supports_images: bool | None = None
    supports_tools: bool | None = None
    supports_json_schema: bool | None = None
    supports_reasoning: bool | None = None
    #: USD per million tokens (the base tier where a price has tiers).
    input_price: Decimal | None = None
    output_price: Decimal | None = None
    cached_input_price: Decimal | None = None
    cache_write_price: Decimal | None = None
    #: Where the fields came from, in order: "genai-prices", "models.json", "LLM_MODELS".
    sources: tuple[str, ...] = ()

    @property
    def address(self) -> str:
        return f"{self.provider}/{self.model}"


@dataclass(frozen=True)
class _Entry:
    info: ModelInfo
    #: genai-prices' (provider, model) when prices are its own; None when LLM_MODELS gave them.
    priced_by: tuple[Any, Any] | None


# --- validation (the data file and LLM_MODELS share it) ------------------------------------------

_FIELDS = {f.name for f in fields(ModelInfo)} - {"provider", "model", "sources"}


def parse_entry(where: str, raw: Any, *, prices: bool) -> dict[str, Any]:
    """One model's fields, checked: names, types, ranges (``where`` names it in errors)."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where} must be a JSON object of model fields, got {type(raw).__name__}")
    allowed = _FIELDS if prices else _FIELDS - set(PRICE_KEYS)
    unknown = sorted(set(raw) - allowed)
    if unknown:
        known = ", ".join(sorted(allowed))
        raise ConfigError(f"{where}: unknown field(s) {', '.join(unknown)}; known: {known}")
    return {name: _field(f"{where}.{name}", name, value) for name, value in raw.items() if value is not None}


def _field(at: str, name: str, value: Any) -> Any:
    if name in _COUNTS:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{at} must be a positive whole number of tokens, got {value!r}")
        return value
    if name in _BOOLEANS:
        if not isinstance(value, bool):
            raise ConfigError(f"{at} must be true or false, got {value!r}")
        return value
    if name == "kind":
        if value not in _KINDS:
            raise ConfigError(f"{at} must be one of {', '.join(_KINDS)}, got {value!r}")
        return value
    # A price, USD per million tokens: kept as a Decimal of the number as written.
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ConfigError(f"{at} must be a number (USD per million tokens), got {value!r}")
    try:
        number = Decimal(str(value))
    except ArithmeticError:
        number = Decimal("NaN")
    if not number.is_finite() or number < 0:
        raise ConfigError(f"{at} must be a finite number of 0 or more, got {value!r}")
    return number


def parse_overrides(value: Any) -> dict[tuple[str, str], dict[str, Any]]:
    """``LLM_MODELS``: a JSON object (or a mapping) of ``"provider/model"`` -> fields."""
    if value is None or value == "":
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"LLM_MODELS must be a JSON object, got invalid JSON ({exc.msg})") from None
    if not isinstance(value, Mapping):
        raise ConfigError(f"LLM_MODELS must be a JSON object of 'provider/model' -> fields, got {value!r}")
    overrides: dict[tuple[str, str], dict[str, Any]] = {}
    for address, raw in value.items():
        provider, sep, model = str(address).partition("/")
        if not sep or not provider or not model:
            raise ConfigError(f"LLM_MODELS keys must be 'provider/model', got {address!r}")
        overrides[(provider, model)] = parse_entry(f"LLM_MODELS[{address!r}]", raw, prices=True)
    return overrides


def load_data_file() -> dict[str, dict[str, Any]]:
    """``app/llm/models.json``, checked as strictly as LLM_MODELS (and without prices)."""
    from importlib import resources

    text = resources.files("app.llm").joinpath("models.json").read_text(encoding="utf-8")
    models = json.loads(text)["models"]
    return {name: parse_entry(f"models.json[{name!r}]", raw, prices=False) for name, raw in models.items()}


# --- the catalogue ---------------------------------------------------------------------------------


class Catalogue:
    """One app's catalogue: the three sources, looked up once per model and kept."""

    def __init__(self, overrides: Mapping[tuple[str, str], Mapping[str, Any]] | None = None) -> None:
        self.overrides = dict(overrides or {})
        self._data: dict[str, dict[str, Any]] | None = None
        self._entries: dict[tuple[str, str], _Entry | None] = {}
        self._lock = threading.Lock()
        self._cost_failures: set[tuple[str, str]] = set()

    def info(self, address: str) -> ModelInfo:
        """What is known of ``"provider/model"``; :class:`UnknownModelError` when nothing is."""
        provider, sep, model = address.partition("/")
        if not sep or not provider or not model:
            raise ValueError(f"a model is addressed as 'provider/model', got {address!r}")
        found = self.lookup(provider, model)
        if found is None:
            raise UnknownModelError(address)
        return found

    def lookup(self, provider: str, model: str) -> ModelInfo | None:
        entry = self._entry(provider, model)
        return entry.info if entry is not None else None

    def _entry(self, provider: str, model: str) -> _Entry | None:
        key = (provider, model)
        try:
            return self._entries[key]
        except KeyError:
            pass
        entry = self._build(provider, model)
        with self._lock:
            self._entries[key] = entry
        return entry

    def _data_file(self) -> dict[str, dict[str, Any]]:
        data = self._data
        if data is None:
            data = self._data = load_data_file()
        return data

    def _build(self, provider: str, model: str) -> _Entry | None:
        values: dict[str, Any] = {}
        sources: list[str] = []
        priced_by = _genai_prices_model(provider, model)
        genai_id: str | None = None
        if priced_by is not None:
            genai_model = priced_by[1]
            genai_id = genai_model.id
            values.update(_genai_values(genai_model))
            sources.append("genai-prices")
        data = self._data_file()
        # A bare model name in the file describes the model genai-prices found (any host of
        # it); for a model it does not know, only an entry under this provider's name counts.
        names = [f"{provider}/{model}"]
        if genai_id is not None:
            names += [model, genai_id, model.rsplit("/", 1)[-1]]
        for name in names:
            if name in data:
                # genai-prices' own fields stand: the file only fills what it lacks.
                values.update({k: v for k, v in data[name].items() if k not in values})
                sources.append("models.json")
                break
        override = self.overrides.get((provider, model))
        if override:
            values.update(override)
            sources.append("LLM_MODELS")
            if any(name in override for name in PRICE_KEYS):
                priced_by = None  # prices of the deployment's own: priced with them
        if not sources:
            return None
        info = replace(ModelInfo(provider, model), **values, sources=tuple(sources))
        return _Entry(info, priced_by)

    # --- cost ---------------------------------------------------------------------------------------

    def cost(self, provider: str, model: str, response: ChatResponse) -> Decimal | None:
        """USD for ``response``'s usage on this model, by genai-prices; None when unknown."""
        if response.input_tokens is None or response.output_tokens is None:
            return None
        entry = self._entry(provider, model)
        if entry is None:
            return None
        info = entry.info
        if entry.priced_by is None and (info.input_price is None or info.output_price is None):
            return None
        try:
            from genai_prices import Usage

            usage = Usage(
                input_tokens=response.input_tokens,
                output_tokens=response.output_tokens,  # reasoning tokens included: billed as output
                cache_read_tokens=response.cached_input_tokens or None,
                cache_write_tokens=response.cache_write_tokens or None,
            )
            if entry.priced_by is not None:
                genai_provider, genai_model = entry.priced_by
                total: Decimal = genai_model.calc_price(usage, genai_provider).total_price
                return total
            from genai_prices.types import ModelPrice

            prices = ModelPrice(
                **{
                    key: getattr(info, name)
                    for name, key in PRICE_KEYS.items()
                    if getattr(info, name) is not None
                }
            )
            configured: Decimal = prices.calc_price(usage)["total_price"]
            return configured
        except (ValueError, LookupError, ArithmeticError) as exc:  # inconsistent usage: no figure, no failure
            if (provider, model) not in self._cost_failures:
                self._cost_failures.add((provider, model))
                logger.warning("no cost for %s/%s: %s", provider, model, exc)
            return None


def _genai_prices_model(provider: str, model: str) -> tuple[Any, Any] | None:
    """genai-prices' (provider, model) objects for this address, or None."""
    if provider in NOT_PRICED:
        return None
    from genai_prices.data_snapshot import get_snapshot

    name = model.removeprefix("models/") if provider == "gemini" else model
    try:
        found: tuple[Any, Any] = get_snapshot().find_provider_model(
            name, None, GENAI_PRICES_PROVIDER.get(provider, provider), None
        )
    except LookupError:
        return None
    return found


def _genai_values(genai_model: Any) -> dict[str, Any]:
    """The fields genai-prices has: context window and today's prices (the base of a tiered price)."""
    from datetime import UTC, datetime

    values: dict[str, Any] = {}
    if genai_model.context_window:
        values["context_window"] = int(genai_model.context_window)
    prices = genai_model.get_prices(datetime.now(tz=UTC))
    for name, key in PRICE_KEYS.items():
        price = getattr(prices, key, None)
        price = getattr(price, "base", price)  # TieredPrices: the first tier
        if price is not None:
            values[name] = Decimal(price)
    return values


__all__ = ["Catalogue", "ModelInfo", "UnknownModelError", "parse_overrides"]
