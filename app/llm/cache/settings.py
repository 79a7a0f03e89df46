"""The response cache's settings, validated at start, and the per-call ``cache=`` option.

``LLM_CACHE`` picks the back end (``memory``, ``disk``, ``redis``; unset: no
cache). Whether one call uses it, and for how long its answer is kept, is
decided in this order: the call's own ``cache=`` (``False``, ``True`` or a
TTL in seconds), else its provider/model's ``cache`` entry of
``LLM_POLICY``, else its provider's, else on with ``LLM_CACHE_TTL``.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from app.config import get_count, get_seconds, get_str
from app.errors import ConfigError
from app.llm.errors import LLMBadRequestError

Backend = Literal["memory", "disk", "redis"]
BACKENDS: tuple[Backend, ...] = ("memory", "disk", "redis")

#: What a call may say: ``False`` (off), ``True`` (on, the default TTL) or seconds to keep the answer.
CacheOption = bool | float | int | None


@dataclass(frozen=True)
class CacheSettings:
    backend: Backend
    #: Seconds an answer is kept (``LLM_CACHE_TTL``).
    ttl: float
    #: Bytes the memory back end holds at most, its least recently used entries dropped first.
    max_bytes: int
    #: The disk back end's folder (``LLM_CACHE_DIR``, default ``<instance>/llm-cache``).
    directory: Path
    #: Seconds an identical call waits for the one in flight before it calls itself; also the
    #: life of the Redis lock that makes workers wait for each other, if its holder dies.
    wait: float


def parse_cache_settings(config: Mapping[str, Any], instance_path: str) -> CacheSettings | None:
    """``None`` when ``LLM_CACHE`` is unset; every key checked, naming it, otherwise."""
    backend = get_str(config, "LLM_CACHE")
    ttl = get_seconds(config, "LLM_CACHE_TTL")
    max_bytes = get_count(config, "LLM_CACHE_MAX_BYTES")
    wait = get_seconds(config, "LLM_CACHE_WAIT")
    directory = get_str(config, "LLM_CACHE_DIR")
    if backend is None:
        return None
    backend = backend.lower()
    if backend not in BACKENDS:
        raise ConfigError(
            f"LLM_CACHE must be one of {', '.join(BACKENDS)} (or unset: no cache), got {backend!r}"
        )
    if max_bytes < 1024:
        raise ConfigError(f"LLM_CACHE_MAX_BYTES must be at least 1024, got {max_bytes}")
    if backend == "disk" and importlib.util.find_spec("diskcache") is None:
        raise ConfigError("LLM_CACHE=disk needs the diskcache package: pip install 'flask-services[cache]'")
    path = Path(directory) if directory else Path(instance_path) / "llm-cache"
    if not path.is_absolute():
        path = Path(instance_path) / path
    return CacheSettings(backend, ttl, max_bytes, path, wait)


def check_cache_option(value: Any, where: str = "cache") -> CacheOption:
    """A call's ``cache=``: ``True``, ``False``, ``None`` or a positive number of seconds."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int | float) and math.isfinite(value) and value > 0:
        return value
    raise LLMBadRequestError(
        f"{where} must be true, false or a number of seconds above 0 (how long to keep the answer),"
        f" got {value!r}",
        field=where,
    )


def policy_option(value: Any, key: str) -> CacheOption:
    """``LLM_POLICY``'s ``cache`` entry: the same values as the per-call option, refused by key."""
    try:
        return check_cache_option(value, key)
    except LLMBadRequestError as exc:
        raise ConfigError(exc.message) from None


def ttl_for(option: CacheOption, policy: CacheOption, default_ttl: float) -> float | None:
    """Seconds to keep this call's answer, or None: this call does not use the cache."""
    chosen = option if option is not None else policy
    if chosen is None or chosen is True:
        return default_ttl
    if chosen is False:
        return None
    return float(chosen)


__all__ = [
    "BACKENDS",
    "CacheOption",
    "CacheSettings",
    "check_cache_option",
    "parse_cache_settings",
    "policy_option",
    "ttl_for",
]
