"""Where settings come from, and the small parsers that validate them.

Sources, lowest to highest: :data:`DEFAULTS`, ``instance/config.py``,
``.env`` in the project folder, environment variables, and the mapping given
to :func:`app.create_app`. Each service validates its own keys in its
``init_app`` with the parsers below, so a bad value fails at start-up with an
error that names the key and what was expected.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flask import Flask

from app.errors import ConfigError

#: Every key the app knows, with its built-in default. ``None`` means "not set".
#: Environment variables are read for exactly these keys; ``.env`` and
#: ``instance/config.py`` may set others (for example the variable an
#: ``api_key_env`` profile setting names).
DEFAULTS: dict[str, Any] = {
    "SECRET_KEY": None,
    "DATABASE_URL": None,
    "SQLALCHEMY_DATABASE_URI": None,
    "DATABASE_CONNECT_TIMEOUT": 5.0,
    "DATABASE_POOL_PRE_PING": True,
    "REDIS_URL": None,
    "REDIS_SOCKET_TIMEOUT": 1.0,
    "REDIS_CONNECT_TIMEOUT": 1.0,
    "REDIS_MAX_RETRIES": 1,
    "REDIS_HEALTH_CHECK_INTERVAL": 30,
    "OPENAI_API_KEY": None,
    "OPENAI_BASE_URL": None,
    "OPENAI_ORGANIZATION": None,
    "OPENAI_PROJECT": None,
    "OPENAI_TIMEOUT": 60.0,
    "OPENAI_CONNECT_TIMEOUT": 5.0,
    "OPENAI_MAX_RETRIES": 2,
    "OPENAI_PROFILES": None,
    "GEMINI_API_KEY": None,
    "GOOGLE_API_KEY": None,
    "GENAI_BASE_URL": None,
    "GENAI_API_VERSION": None,
    "GENAI_TIMEOUT": 60.0,
    "GOOGLE_GENAI_USE_VERTEXAI": False,
    "GOOGLE_CLOUD_PROJECT": None,
    "GOOGLE_CLOUD_LOCATION": None,
    "LLM_DEFAULT_MODEL": None,
    "ANTHROPIC_API_KEY": None,
    "ANTHROPIC_BASE_URL": None,
    "ANTHROPIC_TIMEOUT": 60.0,
    "ANTHROPIC_CONNECT_TIMEOUT": 5.0,
    "ANTHROPIC_MAX_RETRIES": 2,
    "OLLAMA_HOST": None,
    "OLLAMA_TIMEOUT": 5.0,
    "OLLAMA_PULL_TIMEOUT": 300.0,
    # Resilience of LLM calls (app.llm.resilience.settings documents each).
    "LLM_MAX_RETRIES": 2,
    "LLM_BACKOFF_BASE": 0.5,
    "LLM_BACKOFF_MAX": 8.0,
    "LLM_RETRY_AFTER_MAX": 60.0,
    "LLM_DEADLINE": 120.0,
    "LLM_ATTEMPT_TIMEOUT": None,
    "LLM_BREAKER_WINDOW": 60.0,
    "LLM_BREAKER_MIN_CALLS": 10,
    "LLM_BREAKER_FAILURE_RATE": 0.5,
    "LLM_BREAKER_COOLDOWN": 30.0,
    "LLM_BREAKER_HALF_OPEN_CALLS": 1,
    "LLM_RATE_LIMIT_MAX_WAIT": 10.0,
    "LLM_RATE_LIMITS": None,
    "LLM_MAX_CONCURRENCY": None,  # the worker's concurrency (app.serving.llm_capacity)
    "LLM_BULKHEAD_MAX_WAIT": 1.0,
    "LLM_FALLBACKS": None,
    "LLM_POLICY": None,
    "LLM_HOOKS": None,
    "LLM_CALL_LOG": True,
    "LLM_SSE_HEARTBEAT": 15.0,
    "LLM_MODELS": None,
    "LLM_DROP_UNSUPPORTED": False,
    "HEALTH_CHECK_TIMEOUT": 2.0,
    "HEALTH_OPTIONAL_SERVICES": "",
    # /api: keys, quotas and request bounds (app.api_keys, app.api_quotas, app.api_body).
    "API_AUTH": True,
    "API_DEFAULT_RPM": 60,
    "API_DEFAULT_TPM": 50_000,
    "API_MAX_JSON_DEPTH": 32,
    "API_MAX_MESSAGES": 500,
    "API_MAX_INPUTS": 2048,
    "API_MAX_PROMPT_CHARS": 1_000_000,
    "LLM_MAX_TOKENS_LIMIT": 8192,
    "MAX_CONTENT_LENGTH": 4 * 1024 * 1024,
}

#: Secret keys shorter than this, or on this list, are refused outside debug and testing.
MIN_SECRET_KEY_LENGTH = 32
WEAK_SECRET_KEYS = frozenset({"dev", "development", "secret", "changeme", "change-me", "test"})


def load_config(app: Flask, overrides: Mapping[str, Any] | None, dotenv_path: Path) -> None:
    """Fill ``app.config`` from every source, in order of precedence."""
    app.config.from_mapping(DEFAULTS)
    app.config.from_pyfile("config.py", silent=True)
    if dotenv_path.is_file():
        # Imported only when there is a file to read: python-dotenv costs
        # about a sixth of a bare Flask start-up.
        from dotenv import dotenv_values

        # An empty value (``KEY=``, as in .env.example) means "not set": the default stands.
        app.config.from_mapping({k: v for k, v in dotenv_values(dotenv_path).items() if k.isupper() and v})
    app.config.from_mapping({k: os.environ[k] for k in DEFAULTS if os.environ.get(k)})
    if overrides:
        app.config.from_mapping(overrides)


def check_secret_key(app: Flask) -> None:
    """Refuse to run in production with a missing or guessable ``SECRET_KEY``."""
    key = app.config.get("SECRET_KEY")
    if app.debug or app.testing:
        if not key:
            # Sessions still need a key; an ephemeral one is right for dev and tests.
            import secrets

            app.config["SECRET_KEY"] = secrets.token_hex(32)
        return
    if not key:
        raise ConfigError(
            "SECRET_KEY must be set outside debug and testing"
            " (`make run` writes one to instance/config.py; or set the SECRET_KEY variable)"
        )
    if not isinstance(key, str | bytes) or len(key) < MIN_SECRET_KEY_LENGTH or key in WEAK_SECRET_KEYS:
        raise ConfigError(
            f"SECRET_KEY must be a random string of at least {MIN_SECRET_KEY_LENGTH} characters,"
            " got a weak one (generate one with: python -c 'import secrets; print(secrets.token_hex(32))')"
        )


# --- parsers: each takes the config and a key, and names the key on error ----


def _describe(value: object) -> str:
    return repr(value) if not isinstance(value, str) or len(value) <= 60 else repr(value[:57] + "...")


def get_str(config: Mapping[str, Any], key: str) -> str | None:
    """A string setting; empty strings mean "not set"."""
    value = config.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise ConfigError(f"{key} must be a string, got {_describe(value)}")
    return value.strip() or None


def get_seconds(config: Mapping[str, Any], key: str) -> float:
    """A positive, finite number of seconds (accepts ``"2.5"`` from the environment).

    A key absent from ``config`` (an app not built by ``create_app``) has its default.
    """
    return parse_seconds(config.get(key, DEFAULTS.get(key)), key)


def parse_seconds(value: object, key: str) -> float:
    try:
        seconds = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        seconds = math.nan
    if isinstance(value, bool) or not (seconds > 0 and math.isfinite(seconds)):
        raise ConfigError(f"{key} must be a positive number of seconds, got {_describe(value)}")
    return seconds


def get_count(config: Mapping[str, Any], key: str) -> int:
    """A whole number, zero or more (retries, intervals); a key absent from ``config`` has its default."""
    return parse_count(config.get(key, DEFAULTS.get(key)), key)


def parse_count(value: object, key: str) -> int:
    if isinstance(value, bool):
        raise ConfigError(f"{key} must be a whole number of 0 or more, got {_describe(value)}")
    try:
        count = int(value) if not isinstance(value, float) or value.is_integer() else -1  # type: ignore[call-overload]
    except (TypeError, ValueError):
        count = -1
    if count < 0:
        raise ConfigError(f"{key} must be a whole number of 0 or more, got {_describe(value)}")
    return count


_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off", ""})


def get_bool(config: Mapping[str, Any], key: str) -> bool:
    value = config.get(key, DEFAULTS.get(key))
    if isinstance(value, bool) or value is None:
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise ConfigError(f"{key} must be true or false, got {_describe(value)}")


def get_mapping(config: Mapping[str, Any], key: str) -> dict[str, Any]:
    """A mapping, or a JSON object in a string (as environment variables carry it)."""
    value = config.get(key)
    if value is None or value == "":
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ConfigError(
                f"{key} must be a JSON object, got invalid JSON ({exc.msg} at char {exc.pos})"
            ) from None
    if not isinstance(value, Mapping):
        raise ConfigError(f"{key} must be a mapping (a JSON object), got {type(value).__name__}")
    return dict(value)


def get_names(config: Mapping[str, Any], key: str) -> frozenset[str]:
    """A comma-separated list (or a list) of names."""
    value = config.get(key) or ()
    items = value.split(",") if isinstance(value, str) else value
    if not all(isinstance(item, str) for item in items):
        raise ConfigError(f"{key} must be a comma-separated list of names, got {_describe(value)}")
    return frozenset(item.strip() for item in items if item.strip())
