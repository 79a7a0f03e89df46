"""The resilience settings, validated at start-up, with per-provider overrides.

Every ``LLM_*`` key below is a default for all providers; ``LLM_POLICY``
(a JSON object) overrides any of them per provider or per provider/model, e.g.
``{"gemini": {"max_retries": 1}, "openai": {"breaker_cooldown": 10}}``. The layers
apply in order: defaults, then the provider's, then the provider/model's
(``LLM_RATE_LIMITS`` adds ``rpm``/``tpm`` to the same targets).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from app.config import closest, get_mapping, parse_count, parse_seconds
from app.errors import ConfigError


@dataclass(frozen=True)
class RetryPolicy:
    #: Retries after the first attempt (so attempts = max_retries + 1).
    max_retries: int = 2
    #: Full-jitter exponential backoff: a random delay in [0, min(backoff_max, base * 2**n)].
    backoff_base: float = 0.5
    backoff_max: float = 8.0
    #: A server-requested delay (Retry-After, retry-after-ms, RetryInfo) longer than this fails at once.
    retry_after_max: float = 60.0
    #: Seconds for the whole call: every attempt and every wait together.
    deadline: float = 120.0
    #: Seconds for one attempt; None: the client's own timeout (OPENAI_TIMEOUT, ...).
    attempt_timeout: float | None = None


@dataclass(frozen=True)
class BreakerPolicy:
    #: Seconds of history the failure rate is computed over.
    window: float = 60.0
    #: Calls in the window before the breaker may open.
    min_calls: int = 10
    #: Failure rate (0-1] of retryable failures that opens the breaker.
    failure_rate: float = 0.5
    #: Seconds the breaker stays open before it admits trial calls.
    cooldown: float = 30.0
    #: Trial calls admitted while half-open; all must succeed to close it.
    half_open_calls: int = 1


@dataclass(frozen=True)
class LimitPolicy:
    #: Requests per minute (None: unlimited).
    rpm: int | None = None
    #: Tokens per minute, estimated from the request and corrected by the usage (None: unlimited).
    tpm: int | None = None
    #: Seconds a call may wait for the limit before LLMRateLimitError.
    max_wait: float = 10.0


@dataclass(frozen=True)
class BulkheadPolicy:
    #: Calls in flight per provider per process; None: the worker's own concurrency less a reserve
    #: for probes (:func:`app.serving.llm_capacity`: 56 of 64 gthread threads, 992 of 1000 gevent
    #: connections; 32 outside gunicorn).
    max_concurrency: int | None = None
    #: Seconds a call waits for a free slot before LLMBulkheadFullError.
    max_wait: float = 1.0


@dataclass(frozen=True)
class CachePolicy:
    #: The response cache (app.llm.cache) for these calls: None (on when LLM_CACHE is set), False
    #: (off), True (on), or seconds to keep an answer. A call's own ``cache=`` comes first.
    enabled: bool | float | None = None


@dataclass(frozen=True)
class ProviderPolicy:
    retry: RetryPolicy = RetryPolicy()
    breaker: BreakerPolicy = BreakerPolicy()
    limits: LimitPolicy = LimitPolicy()
    bulkhead: BulkheadPolicy = BulkheadPolicy()
    cache: CachePolicy = CachePolicy()


#: Config key -> (section, field).
KEYS: dict[str, tuple[str, str]] = {
    "LLM_MAX_RETRIES": ("retry", "max_retries"),
    "LLM_BACKOFF_BASE": ("retry", "backoff_base"),
    "LLM_BACKOFF_MAX": ("retry", "backoff_max"),
    "LLM_RETRY_AFTER_MAX": ("retry", "retry_after_max"),
    "LLM_DEADLINE": ("retry", "deadline"),
    "LLM_ATTEMPT_TIMEOUT": ("retry", "attempt_timeout"),
    "LLM_BREAKER_WINDOW": ("breaker", "window"),
    "LLM_BREAKER_MIN_CALLS": ("breaker", "min_calls"),
    "LLM_BREAKER_FAILURE_RATE": ("breaker", "failure_rate"),
    "LLM_BREAKER_COOLDOWN": ("breaker", "cooldown"),
    "LLM_BREAKER_HALF_OPEN_CALLS": ("breaker", "half_open_calls"),
    "LLM_RATE_LIMIT_MAX_WAIT": ("limits", "max_wait"),
    "LLM_MAX_CONCURRENCY": ("bulkhead", "max_concurrency"),
    "LLM_BULKHEAD_MAX_WAIT": ("bulkhead", "max_wait"),
}
#: The defaults as config (for app.config.DEFAULTS and .env.example).
DEFAULTS: dict[str, Any] = {
    key: getattr(getattr(ProviderPolicy(), section), name) for key, (section, name) in KEYS.items()
}


def _parse(key: str, field_name: str, value: Any) -> Any:
    if value is None or value == "":
        return None
    if field_name == "enabled":  # LLM_POLICY's "cache": true, false or seconds
        from app.llm.cache.settings import policy_option

        return policy_option(value, key)
    if field_name in ("max_retries", "min_calls", "half_open_calls", "max_concurrency", "rpm", "tpm"):
        count = parse_count(value, key)
        if field_name in ("half_open_calls", "max_concurrency", "rpm", "tpm", "min_calls") and count < 1:
            raise ConfigError(f"{key} must be a whole number of 1 or more, got {value!r}")
        return count
    if field_name == "failure_rate":
        rate = parse_seconds(value, key) if not isinstance(value, bool) else -1
        if not 0 < rate <= 1:
            raise ConfigError(f"{key} must be a number in (0, 1], got {value!r}")
        return rate
    if field_name in ("backoff_base", "max_wait"):  # 0: no backoff; no wait for a slot or a limit
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = -1.0
        if not (0 <= number < math.inf) or isinstance(value, bool):
            raise ConfigError(f"{key} must be a number of seconds of 0 or more, got {value!r}")
        return number
    return parse_seconds(value, key)


def _apply(policy: ProviderPolicy, key: str, section: str, field_name: str, value: Any) -> ProviderPolicy:
    parsed = _parse(key, field_name, value)
    if parsed is None and field_name not in ("attempt_timeout", "rpm", "tpm"):
        return policy
    part = getattr(policy, section)
    return replace(policy, **{section: replace(part, **{field_name: parsed})})


_OVERRIDE_FIELDS = {
    **{name: (section, name) for section, name in KEYS.values() if name not in ("max_wait",)},
    "breaker_window": ("breaker", "window"),
    "breaker_min_calls": ("breaker", "min_calls"),
    "breaker_failure_rate": ("breaker", "failure_rate"),
    "breaker_cooldown": ("breaker", "cooldown"),
    "breaker_half_open_calls": ("breaker", "half_open_calls"),
    "rpm": ("limits", "rpm"),
    "tpm": ("limits", "tpm"),
    "rate_limit_max_wait": ("limits", "max_wait"),
    "bulkhead_max_wait": ("bulkhead", "max_wait"),
    "cache": ("cache", "enabled"),
}


@dataclass(frozen=True)
class ResilienceSettings:
    base: ProviderPolicy
    #: Per provider (``openai``, ``gemini``, a profile name) or per ``provider/model``.
    overrides: Mapping[str, ProviderPolicy]
    #: ``provider/model`` -> the models to try next, in order.
    fallbacks: Mapping[str, tuple[str, ...]]

    def policy(self, provider: str, model: str) -> ProviderPolicy:
        """The most specific policy: ``provider/model``, else ``provider``, else the defaults.

        A ``provider/model`` override is built on its provider's, so it inherits its settings.
        """
        return self.overrides.get(f"{provider}/{model}") or self.overrides.get(provider) or self.base


#: Providers every app can address, besides its OpenAI profiles: the built-in ones, and the
#: fake provider that app.llm.testing registers after start-up (tests configure policies for it).
BUILTIN_PROVIDERS = frozenset({"openai", "gemini", "anthropic", "fake"})


def parse_resilience_settings(config: Mapping[str, Any]) -> ResilienceSettings:
    base = ProviderPolicy()
    for key, (section, name) in KEYS.items():
        if key in config:
            base = _apply(base, key, section, name, config[key])
    settings = ResilienceSettings(base=base, overrides=_overrides(config, base), fallbacks=_fallbacks(config))
    check_provider_names(config, settings)
    return settings


def known_providers(config: Mapping[str, Any]) -> frozenset[str]:
    """Every provider name a call may use: the built-in ones and the OpenAI profiles of ``config``."""
    from app.connectors.openai_connector import parse_openai_settings  # validated there already

    return BUILTIN_PROVIDERS | {name for name in parse_openai_settings(config) if name != "default"}


def check_provider_names(config: Mapping[str, Any], settings: ResilienceSettings) -> None:
    """Each provider named by LLM_POLICY, LLM_RATE_LIMITS, LLM_FALLBACKS and LLM_DEFAULT_MODEL exists.

    A misspelt one would otherwise be a policy that never applies, or a
    fallback (or a default model) that fails at the first call.
    """
    named: list[tuple[str, str]] = []  # (where, provider)
    for key in ("LLM_POLICY", "LLM_RATE_LIMITS"):
        named += [(f"{key}[{target!r}]", target.partition("/")[0]) for target in get_mapping(config, key)]
    for model, chain in settings.fallbacks.items():
        named.append((f"LLM_FALLBACKS[{model!r}]", model.partition("/")[0]))
        named += [(f"LLM_FALLBACKS[{model!r}] ({entry!r})", entry.partition("/")[0]) for entry in chain]
    default_model = config.get("LLM_DEFAULT_MODEL")
    if isinstance(default_model, str) and "/" in default_model:
        named.append(("LLM_DEFAULT_MODEL", default_model.strip().partition("/")[0]))
    if not named:
        return
    known = known_providers(config)
    for where, provider in named:
        if provider not in known:
            listed = ", ".join(sorted(known - {"fake"}))
            raise ConfigError(
                f"{where} names the provider {provider!r}, which does not exist{closest(provider, known)};"
                f" known providers: {listed} (OpenAI-compatible ones are the profiles of OPENAI_PROFILES)"
            )


def _overrides(config: Mapping[str, Any], base: ProviderPolicy) -> dict[str, ProviderPolicy]:
    """LLM_POLICY and LLM_RATE_LIMITS, layered: defaults <- provider <- provider/model."""
    # Each target's settings, from LLM_POLICY then LLM_RATE_LIMITS: (key, section, field, value).
    settings: dict[str, list[tuple[str, str, str, Any]]] = {}
    for target, raw in get_mapping(config, "LLM_POLICY").items():
        where = f"LLM_POLICY[{target!r}]"
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{where} must be a mapping of settings")
        unknown = sorted(set(raw) - set(_OVERRIDE_FIELDS))
        if unknown:
            raise ConfigError(
                f"{where} has unknown settings {unknown}{closest(str(unknown[0]), _OVERRIDE_FIELDS)};"
                f" expected some of {sorted(_OVERRIDE_FIELDS)}"
            )
        entries = settings.setdefault(target, [])
        for name, value in raw.items():
            entries.append((f"{where}.{name}", *_OVERRIDE_FIELDS[name], value))
    for target, raw in get_mapping(config, "LLM_RATE_LIMITS").items():
        where = f"LLM_RATE_LIMITS[{target!r}]"
        if not isinstance(raw, Mapping) or set(raw) - {"rpm", "tpm"}:
            raise ConfigError(f"{where} must be a mapping with rpm and/or tpm")
        entries = settings.setdefault(target, [])
        for name, value in raw.items():
            entries.append((f"{where}.{name}", "limits", name, value))
    overrides: dict[str, ProviderPolicy] = {}
    for target in sorted(settings, key=lambda name: "/" in name):  # providers before their models
        provider, is_model, _ = target.partition("/")
        policy = overrides.get(provider, base) if is_model else base
        for key, section, field_name, value in settings[target]:
            policy = _apply(policy, key, section, field_name, value)
        overrides[target] = policy
    return overrides


def _fallbacks(config: Mapping[str, Any]) -> dict[str, tuple[str, ...]]:
    fallbacks: dict[str, tuple[str, ...]] = {}
    for model, chain in get_mapping(config, "LLM_FALLBACKS").items():
        if "/" not in model:
            raise ConfigError(f"LLM_FALLBACKS keys must be 'provider/model' names, got {model!r}")
        if not isinstance(chain, list) or not all(isinstance(m, str) and "/" in m for m in chain):
            raise ConfigError(f"LLM_FALLBACKS[{model!r}] must be a list of 'provider/model' names")
        fallbacks[model] = tuple(chain)
    return fallbacks
