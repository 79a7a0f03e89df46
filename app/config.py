"""Where settings come from, and the small parsers that validate them.

Sources, lowest to highest: :data:`DEFAULTS`, ``instance/config.py``,
``.env`` in the project folder, environment variables, and the mapping given
to :func:`app.create_app`. Each service validates its own keys in its
``init_app`` with the parsers below, so a bad value fails at start-up with an
error that names the key and what was expected.

Strict by default: a key with one of the app's prefixes (:data:`APP_PREFIXES`)
that the app does not know stops start-up, naming the closest known key
(``CONFIG_STRICT=false``: a warning instead). Only those prefixes are checked,
so Flask's keys, ``SQLALCHEMY_*`` and the user's own keys are never refused.
The environment is shared with other software (Kubernetes service links such
as ``REDIS_PORT``, the SDKs' own variables, the Ollama server's), so an unknown
environment variable is refused only when it looks like a misspelling of a key
the app knows; the app's own files and the mapping are checked in full.
"""

from __future__ import annotations

import difflib
import ipaddress
import json
import logging
import math
import os
import re
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from flask import Config, Flask

from app.errors import ConfigError
from app.redaction import MASK, redact, redact_url, register_url_secrets

logger = logging.getLogger(__name__)

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
    # Usage ledger and budgets (app.llm.usage.settings documents each).
    "LLM_USAGE_LEDGER": True,
    "LLM_USAGE_BUFFER": 10_000,
    "LLM_USAGE_BATCH": 500,
    "LLM_USAGE_FLUSH_INTERVAL": 1.0,
    "LLM_BUDGETS": None,
    "LLM_BUDGET_MAX_RESERVE_USD": None,
    "LLM_BUDGET_UNKNOWN_PRICE": "refuse",
    "LLM_BUDGET_RESERVATION_TTL": 300.0,
    # The response cache (app.llm.cache.settings documents each).
    "LLM_CACHE": None,
    "LLM_CACHE_TTL": 3600.0,
    "LLM_CACHE_MAX_BYTES": 64 * 1024 * 1024,
    "LLM_CACHE_DIR": None,
    "LLM_CACHE_WAIT": 30.0,
    "HEALTH_CHECK_TIMEOUT": 2.0,
    "HEALTH_OPTIONAL_SERVICES": "",
    "HEALTH_REQUIRED_SERVICES": "",
    "CONFIG_STRICT": True,
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
    # Background jobs and media (app.jobs, app.media, app.llm.media document each).
    "JOBS_QUEUE": "media",
    "JOBS_THREADS": 2,
    "JOBS_POLL_INTERVAL": 10.0,
    "JOBS_POLL_TIMEOUT": 1800.0,
    "JOBS_LEASE": 30.0,
    "JOBS_RECOVERY_INTERVAL": 10.0,
    "MEDIA_STORAGE_URL": None,
    "LLM_MEDIA_PRICES": None,
}

#: Keys with these prefixes are the app's: an unknown one is a mistake (see the module docstring).
APP_PREFIXES = ("LLM_", "OPENAI_", "GENAI_", "GEMINI_", "ANTHROPIC_", "OLLAMA_", "REDIS_", "DATABASE_",
                "HEALTH_", "API_")  # fmt: skip

#: Variables with the app's prefixes that belong to other software and may be in the environment:
#: read by the SDKs themselves (openai, anthropic) and by the Ollama server (its documented ones);
#: Kubernetes and Docker service links are matched by :data:`_SERVICE_LINK`.
FOREIGN_VARIABLES = frozenset(
    {
        "OPENAI_ORG_ID", "OPENAI_PROJECT_ID", "OPENAI_LOG", "OPENAI_ADMIN_KEY", "OPENAI_WEBHOOK_SECRET",
        "OPENAI_API_VERSION", "OPENAI_API_TYPE", "OPENAI_API_BASE", "ANTHROPIC_AUTH_TOKEN", "ANTHROPIC_LOG",
        "OLLAMA_DEBUG", "OLLAMA_FLASH_ATTENTION", "OLLAMA_KV_CACHE_TYPE", "OLLAMA_GPU_OVERHEAD",
        "OLLAMA_KEEP_ALIVE", "OLLAMA_LLM_LIBRARY", "OLLAMA_LOAD_TIMEOUT", "OLLAMA_MAX_LOADED_MODELS",
        "OLLAMA_MAX_QUEUE", "OLLAMA_MODELS", "OLLAMA_NOHISTORY", "OLLAMA_NOPRUNE", "OLLAMA_NUM_PARALLEL",
        "OLLAMA_ORIGINS", "OLLAMA_SCHED_SPREAD", "OLLAMA_MULTIUSER_CACHE", "OLLAMA_CONTEXT_LENGTH",
        "OLLAMA_NEW_ENGINE", "OLLAMA_NEW_ESTIMATES", "OLLAMA_INTEL_GPU", "OLLAMA_TMPDIR",
        "OLLAMA_RUNNERS_DIR",
    }
)  # fmt: skip
_SERVICE_LINK = re.compile(
    r"^[A-Z0-9_]+_(?:SERVICE_HOST|SERVICE_PORT(?:_[A-Z0-9_]+)?|PORT(?:_\d+_(?:TCP|UDP|SCTP)(?:_[A-Z]+)?)?"
    r"|NAME|ENV_[A-Z0-9_]+)$"
)
#: How alike (difflib's ratio of what follows the prefix) an unknown environment variable and a
#: known key must be to call it a misspelling: MAX_RETRY/MAX_RETRIES 0.80, URLS/URL 0.86, USER/URL 0.57.
MISSPELLING_CUTOFF = 0.8

#: Names of keys whose values are secrets, by their words (``SECRET_KEY``, ``GROQ_API_KEY``...).
_SECRET_WORDS = frozenset({"KEY", "SECRET", "PASSWORD", "PASSWD", "TOKEN", "CREDENTIALS", "DSN"})

_extra_known: set[str] = set()


def register_config_keys(*names: str) -> None:
    """Keys the app reads besides :data:`DEFAULTS` (an extension's own), so strict checks accept them."""
    _extra_known.update(names)


#: Secret keys shorter than this, or on this list, are refused outside debug and testing.
MIN_SECRET_KEY_LENGTH = 32
WEAK_SECRET_KEYS = frozenset({"dev", "development", "secret", "changeme", "change-me", "test"})


class MaskedConfig(Config):
    """``app.config`` whose repr masks secrets: keys named like one, URL passwords, known values."""

    def __repr__(self) -> str:
        shown = {key: _masked(key, value) for key, value in self.items()}
        return f"<{type(self).__name__} {redact(repr(shown))}>"


def _masked(name: object, value: Any, depth: int = 0) -> Any:
    if isinstance(name, str) and _SECRET_WORDS & set(name.upper().split("_")) and value:
        return MASK
    if isinstance(value, Mapping) and depth < 5:
        return {key: _masked(key, item, depth + 1) for key, item in value.items()}
    return value


def load_config(app: Flask, overrides: Mapping[str, Any] | None, dotenv_path: Path) -> None:
    """Fill ``app.config`` from every source, in order of precedence, then check its keys."""
    app.config = MaskedConfig(app.config.root_path, app.config)  # Flask's own defaults stay
    app.config.from_mapping(DEFAULTS)
    #: Where each key of the app's own sources came from, for the messages of the strict check.
    sources: dict[str, str] = {}
    before = set(app.config)
    app.config.from_pyfile("config.py", silent=True)
    sources.update(dict.fromkeys(set(app.config) - before, "instance/config.py"))
    if dotenv_path.is_file():
        # Imported only when there is a file to read: python-dotenv costs
        # about a sixth of a bare Flask start-up.
        from dotenv import dotenv_values

        # An empty value (``KEY=``, as in .env.example) means "not set": the default stands.
        values = {k: v for k, v in dotenv_values(dotenv_path).items() if k.isupper()}
        app.config.from_mapping({k: v for k, v in values.items() if v})
        sources.update(dict.fromkeys(values, dotenv_path.name))
    app.config.from_mapping({k: os.environ[k] for k in DEFAULTS if os.environ.get(k)})
    if overrides:
        app.config.from_mapping(overrides)
        sources.update(dict.fromkeys(overrides, "create_app()"))
    check_keys(app.config, sources, os.environ)
    check_unowned_settings(app.config)


def known_keys(config: Mapping[str, Any]) -> frozenset[str]:
    """:data:`DEFAULTS`, registered keys, and the variables ``OPENAI_PROFILES`` names in ``api_key_env``."""
    named: set[str] = set()
    try:
        profiles = get_mapping(config, "OPENAI_PROFILES")
    except ConfigError:  # the OpenAI connector reports it, with the details
        profiles = {}
    for settings in profiles.values():
        if isinstance(settings, Mapping) and isinstance(settings.get("api_key_env"), str):
            named.add(settings["api_key_env"])
    return frozenset({*DEFAULTS, *_extra_known, *named})


def check_keys(config: Mapping[str, Any], sources: Mapping[str, str], environ: Mapping[str, str]) -> None:
    """Refuse (or, with ``CONFIG_STRICT=false``, warn about) keys with the app's prefixes it does not know.

    ``sources``: key -> where it was set (the app's own files and the mapping);
    ``environ``: the environment, where only likely misspellings count.
    """
    known = known_keys(config)
    mistakes: list[str] = []
    for key in sorted(sources, key=str):
        if isinstance(key, str) and key.startswith(APP_PREFIXES) and key not in known:
            mistakes.append(f"{key} (in {sources[key]}) is not a setting of this app{closest(key, known)}")
    for key in sorted(environ):
        if key in known or key in sources or not key.startswith(APP_PREFIXES):
            continue
        if key in FOREIGN_VARIABLES or _SERVICE_LINK.match(key):
            continue
        # What follows the prefix, against the keys of the same prefix: OLLAMA_MODELS is not a
        # misspelt LLM_MODELS, nor DATABASE_USER a misspelt DATABASE_URL; LLM_MAX_RETRY is one.
        prefix = next(p for p in APP_PREFIXES if key.startswith(p))
        rests = {name[len(prefix) :]: name for name in known if name.startswith(prefix)}
        close = difflib.get_close_matches(key[len(prefix) :], rests, n=1, cutoff=MISSPELLING_CUTOFF)
        if close:
            mistakes.append(
                f"{key} (in the environment) is not a setting of this app; did you mean {rests[close[0]]!r}?"
            )
    if not mistakes:
        return
    text = "; ".join(mistakes)
    if get_bool(config, "CONFIG_STRICT"):
        raise ConfigError(f"{text} (CONFIG_STRICT=false turns this into a warning)")
    logger.warning("configuration: %s (ignored: CONFIG_STRICT is false)", text)


def check_unowned_settings(config: Mapping[str, Any]) -> None:
    """Validate at start the keys no service parses at start (read later, they failed at request time)."""
    from app.health import parse_health_settings  # app.health imports this module

    parse_health_settings(config)
    get_seconds(config, "OLLAMA_TIMEOUT")
    get_seconds(config, "OLLAMA_PULL_TIMEOUT")


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


def closest(name: str, choices: Iterable[str]) -> str:
    """``"; did you mean 'x'?"`` for the closest of ``choices``, or ``""``: for error messages."""
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


# --- URLs: parsed at start, scheme, host and port ---------------------------------------

#: A host name (letters of any script, digits, ``.``, ``-``, ``_``); IP literals are checked apart.
_HOST = re.compile(r"[\w.\-]+")
#: Why a URL with a password may not parse, said with every URL error.
_ENCODE_HINT = "a '#', '/' or '@' in a password must be percent-encoded as %23, %2F, %40"


@dataclass(frozen=True)
class ServiceURL:
    """What start-up checks of a URL: scheme, host (None: the library's default) and port."""

    scheme: str
    host: str | None
    port: int | None


def parse_service_url(
    url: str, key: str, schemes: Collection[str], *, host_required: bool = True
) -> ServiceURL:
    """Check a service URL as ``urlsplit`` (and so httpx and redis-py) reads it; errors name ``key``.

    Messages show the URL with its passwords masked, never a password.
    """
    register_url_secrets(url)
    shown = redact_url(url)
    wanted = " or ".join(f"{scheme}://" for scheme in schemes)
    try:
        parts = urlsplit(url)
    except ValueError:
        raise ConfigError(f"{key} must be a {wanted} URL, got {shown!r} ({_ENCODE_HINT})") from None
    scheme = parts.scheme.lower()
    if scheme not in schemes:
        raise ConfigError(f"{key} must be a {wanted} URL, got {shown!r}")
    if parts.fragment or url.endswith("#"):
        raise ConfigError(
            f"{key} has a '#' fragment, which a service URL never has: {shown!r} ({_ENCODE_HINT})"
        )
    try:
        port = parts.port
    except ValueError:
        port = -1
    if port is not None and not 1 <= port <= 65535:
        raise ConfigError(
            f"{key} must have a port from 1 to 65535 after the host, got {shown!r} ({_ENCODE_HINT})"
        )
    host = parts.hostname
    if host_required and not host:
        raise ConfigError(f"{key} must name a host, got {shown!r}")
    if host and not _valid_host(host):
        raise ConfigError(f"{key} has an invalid host in {shown!r} ({_ENCODE_HINT})")
    return ServiceURL(scheme, host, port)


def check_http_url(url: str | None, key: str) -> str | None:
    """An ``http://`` or ``https://`` URL with a host (or None); the value, unchanged."""
    if url is not None:
        parse_service_url(url, key, ("http", "https"))
    return url


def check_database_url(url: str, key: str) -> None:
    """Host and port of a database URL as SQLAlchemy reads it (a raw ``#`` or ``/`` in a password is fine)."""
    register_url_secrets(url)
    from sqlalchemy.engine import make_url  # loaded at start anyway, by Flask-SQLAlchemy

    shown = redact_url(url)
    try:
        parsed = make_url(url)
    except ValueError:  # a port that is not a number, or not a URL at all
        raise ConfigError(
            f"{key} must be a database URL with a numeric port, got {shown!r} ({_ENCODE_HINT})"
        ) from None
    if parsed.get_backend_name() == "sqlite":
        return
    if url.count("@") > 1 or "@" in (parsed.username or ""):
        # SQLAlchemy takes the userinfo up to the first '@': a second one (a raw '@' in the
        # password, or in a query-string password after a username) moves the host elsewhere.
        raise ConfigError(
            f"{key} has more than one '@', so its host cannot be told: {shown!r} ({_ENCODE_HINT})"
        )
    if parsed.port is not None and not 1 <= parsed.port <= 65535:
        raise ConfigError(f"{key} must have a port from 1 to 65535, got {shown!r}")
    if parsed.host and not _valid_host(parsed.host):
        raise ConfigError(f"{key} has an invalid host in {shown!r} ({_ENCODE_HINT})")


def _valid_host(host: str) -> bool:
    if _HOST.fullmatch(host):
        return True
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True
