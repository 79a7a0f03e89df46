"""OpenAI and every OpenAI-compatible endpoint, as named profiles.

The ``default`` profile comes from ``OPENAI_API_KEY`` / ``OPENAI_BASE_URL`` /
``OPENAI_ORGANIZATION`` / ``OPENAI_PROJECT``; more come from
``OPENAI_PROFILES``, a mapping of name to settings. Profiles named
``openrouter``, ``groq`` or ``ollama`` start from that provider's well-known
base URL and key variable, so ``{"groq": {}}`` is a complete profile when
``GROQ_API_KEY`` is set; and when ``GROQ_API_KEY`` / ``OPENROUTER_API_KEY``
is set (or ``OLLAMA_HOST``), that profile exists without any entry. A profile
with ``azure_endpoint`` builds an ``AzureOpenAI`` client, authenticated by a key or,
with ``azure_ad_token_provider`` (``"module:callable"``, imported and checked at
start), by Azure AD tokens (a managed identity).

Calls with a key of their own (``api_key=`` of the LLM layer) go through
:meth:`OpenAIConnector.keyed_client`: the profile's client, whose pool they
share, or, for a profile without a key of its own, a client that only ever
sends per-call keys.

Every client gets a 60 s read / 5 s connect timeout unless configured (the
SDK's own default is 600 s), and is built only when first asked for.
"""

from __future__ import annotations

import importlib
import inspect
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from functools import partial
from typing import TYPE_CHECKING, Any

from app.config import (
    check_http_url,
    closest,
    get_count,
    get_mapping,
    get_seconds,
    get_str,
    parse_count,
    parse_seconds,
)
from app.connectors._base import (
    Connector,
    LazyClient,
    LoopBoundClients,
    current_connector,
    reset_registered,
)
from app.connectors.outbound import sdk_http_client
from app.errors import ConfigError, ServiceNotConfiguredError, UnknownProfileError
from app.redaction import Secret, redact_url, register_secret

if TYPE_CHECKING:
    from flask import Flask
    from openai import AsyncOpenAI, OpenAI

EXTENSION_KEY = "openai_service"
DEFAULT_PROFILE = "default"

#: Settings a profile may have; anything else is a typo worth failing on.
PROFILE_KEYS = frozenset(
    {
        "base_url", "api_key", "api_key_env", "organization", "project", "default_headers",
        "timeout", "connect_timeout", "max_retries", "azure_endpoint", "api_version",
        "azure_deployment", "azure_ad_token_provider",
    }
)  # fmt: skip

#: Well-known OpenAI-compatible endpoints: what a profile of that name starts from.
PRESETS: dict[str, dict[str, Any]] = {
    "openrouter": {"base_url": "https://openrouter.ai/api/v1", "api_key_env": "OPENROUTER_API_KEY"},
    "groq": {"base_url": "https://api.groq.com/openai/v1", "api_key_env": "GROQ_API_KEY"},
    "ollama": {"base_url": "http://127.0.0.1:11434/v1"},
}

#: Providers the LLM layer addresses by these names itself: a profile so named could never be reached.
BUILTIN_PROVIDERS = ("openai", "gemini", "anthropic")

#: Sent as the key to endpoints that need none (Ollama, vLLM): the SDK insists on one.
KEYLESS_PLACEHOLDER = "not-needed"
#: The key of a client that only ever sends per-call keys (a profile without a key of its own).
PER_CALL_KEYS_ONLY = "per-call-keys-only"


@dataclass(frozen=True)
class OpenAIProfile:
    """One validated endpoint. ``api_key`` is a :class:`Secret`; reprs show ``'***'``."""

    name: str
    base_url: str | None
    api_key: Secret | None
    #: The setting the key comes from, named in "not configured" errors.
    api_key_setting: str | None
    organization: str | None = None
    project: str | None = None
    default_headers: Mapping[str, str] = field(default_factory=dict)
    timeout: float = 60.0
    connect_timeout: float = 5.0
    max_retries: int = 2
    azure_endpoint: str | None = None
    api_version: str | None = None
    azure_deployment: str | None = None
    #: ``"module:callable"`` of an Azure AD token provider (Azure profiles, instead of a key).
    azure_ad_token_provider: str | None = None
    #: That callable, imported at start: called by the SDK for every request.
    token_provider: Callable[[], str] | None = field(default=None, repr=False, compare=False)

    @property
    def is_azure(self) -> bool:
        return self.azure_endpoint is not None

    @property
    def configured(self) -> bool:
        return self.api_key is not None or self.api_key_setting is None

    @property
    def endpoint(self) -> str:
        return redact_url(self.azure_endpoint or self.base_url or "https://api.openai.com/v1")

    def require_key(self) -> str:
        if self.api_key is not None:
            return self.api_key.reveal()
        if self.api_key_setting is None:  # a keyless endpoint
            return KEYLESS_PLACEHOLDER
        raise ServiceNotConfiguredError(f"OpenAI profile {self.name!r}", self.api_key_setting, "the API key")


def parse_openai_settings(config: Mapping[str, Any]) -> dict[str, OpenAIProfile]:
    """Validate every OpenAI setting; returns the profiles by name."""
    timeout = get_seconds(config, "OPENAI_TIMEOUT")
    connect_timeout = get_seconds(config, "OPENAI_CONNECT_TIMEOUT")
    max_retries = get_count(config, "OPENAI_MAX_RETRIES")
    key = get_str(config, "OPENAI_API_KEY")
    profiles = {
        DEFAULT_PROFILE: OpenAIProfile(
            name=DEFAULT_PROFILE,
            base_url=check_http_url(get_str(config, "OPENAI_BASE_URL"), "OPENAI_BASE_URL"),
            api_key=Secret(key) if key else None,
            api_key_setting="OPENAI_API_KEY",
            organization=get_str(config, "OPENAI_ORGANIZATION"),
            project=get_str(config, "OPENAI_PROJECT"),
            timeout=timeout,
            connect_timeout=connect_timeout,
            max_retries=max_retries,
        )
    }
    for name, raw in get_mapping(config, "OPENAI_PROFILES").items():
        where = f"OPENAI_PROFILES[{name!r}]"
        _check_profile_name(name, where)
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{where} must be a mapping of settings, got {type(raw).__name__}")
        unknown = sorted(set(raw) - PROFILE_KEYS)
        if unknown:
            raise ConfigError(
                f"{where} has unknown settings {unknown}{closest(str(unknown[0]), PROFILE_KEYS)};"
                f" expected some of {sorted(PROFILE_KEYS)}"
            )
        preset = dict(_presets(config).get(name, {}))
        if raw.get("api_key"):  # a key given inline replaces the preset's key variable
            preset.pop("api_key_env", None)
        if raw.get("azure_endpoint"):
            preset.pop("base_url", None)
        settings = {**preset, **raw}
        if name == DEFAULT_PROFILE:
            # Overrides on top of the OPENAI_* keys.
            base = profiles[DEFAULT_PROFILE]
            settings = {
                "base_url": base.base_url, "organization": base.organization,
                "project": base.project,
                **({"api_key": base.api_key.reveal()} if base.api_key else {}),
                **settings,
            }  # fmt: skip
        profiles[name] = _parse_profile(name, where, settings, config, timeout, connect_timeout, max_retries)
    for name, preset in PRESETS.items():
        # A well-known provider whose key variable is set needs no OPENAI_PROFILES entry.
        key_env = preset.get("api_key_env")
        if name not in profiles and key_env and (config.get(key_env) or os.environ.get(key_env)):
            profiles[name] = _parse_profile(
                name, key_env, preset, config, timeout, connect_timeout, max_retries
            )
    if "ollama" not in profiles and get_str(config, "OLLAMA_HOST"):
        profiles["ollama"] = _parse_profile(
            "ollama", "OLLAMA_HOST", _presets(config)["ollama"], config, timeout, connect_timeout, max_retries
        )
    for profile in profiles.values():
        register_secret(profile.api_key)
    return profiles


def _check_profile_name(name: object, where: str) -> None:
    """A name the layer can address as ``name/model``, and no built-in provider's."""
    if not isinstance(name, str) or not name.strip() or "/" in name or name != name.strip():
        raise ConfigError(f"{where}: a profile name must be a non-empty name without '/' or spaces")
    if name in BUILTIN_PROVIDERS:
        raise ConfigError(
            f"{where} is named like the built-in provider {name!r}, so '{name}/model' could never reach"
            " it; give the profile another name"
            + (" (the OPENAI_* keys configure the 'default' profile, addressed as 'openai/...')"
               if name == "openai" else "")
        )  # fmt: skip


def _presets(config: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The well-known presets, with Ollama's URL following ``OLLAMA_HOST`` when it is set."""
    host = check_http_url(get_str(config, "OLLAMA_HOST"), "OLLAMA_HOST")
    if host is None:
        return PRESETS
    return {**PRESETS, "ollama": {"base_url": host.rstrip("/") + "/v1"}}


def _parse_profile(
    name: str,
    where: str,
    settings: Mapping[str, Any],
    config: Mapping[str, Any],
    timeout: float,
    connect_timeout: float,
    max_retries: int,
) -> OpenAIProfile:
    def text(key: str) -> str | None:
        value = settings.get(key)
        if value is not None and not isinstance(value, str):
            raise ConfigError(f"{where}.{key} must be a string, got {type(value).__name__}")
        return value or None

    api_key, key_env = text("api_key"), text("api_key_env")
    if api_key and key_env:
        raise ConfigError(f"{where} sets both api_key and api_key_env; keep one")
    key_setting: str | None = None
    if key_env:
        # The variable may live in .env / instance config as well as the environment.
        api_key = config.get(key_env) or os.environ.get(key_env) or None
        key_setting = key_env
    elif not api_key and name == DEFAULT_PROFILE:
        key_setting = "OPENAI_API_KEY"
    headers = settings.get("default_headers") or {}
    if not isinstance(headers, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in headers.items()
    ):
        raise ConfigError(f"{where}.default_headers must be a mapping of header names to strings")
    azure_endpoint = check_http_url(text("azure_endpoint"), f"{where}.azure_endpoint")
    check_http_url(text("base_url"), f"{where}.base_url")
    if azure_endpoint and not text("api_version"):
        raise ConfigError(f"{where}.api_version is required for an Azure profile (e.g. '2024-10-21')")
    if azure_endpoint and text("base_url"):
        raise ConfigError(
            f"{where} sets both azure_endpoint and base_url; an Azure profile uses azure_endpoint"
        )
    if not azure_endpoint and not text("base_url") and name != DEFAULT_PROFILE:
        raise ConfigError(
            f"{where}.base_url is required (the OpenAI-compatible endpoint, e.g. 'http://127.0.0.1:8000/v1')"
        )
    token_path = text("azure_ad_token_provider")
    token_provider = None
    if token_path:
        if not azure_endpoint:
            raise ConfigError(
                f"{where}.azure_ad_token_provider is for an Azure profile (one with azure_endpoint)"
            )
        if text("api_key") or key_env:
            raise ConfigError(f"{where} sets both a key and azure_ad_token_provider; keep one")
        token_provider = load_token_provider(token_path, f"{where}.azure_ad_token_provider")
    elif azure_endpoint and not api_key and not key_env:
        key_setting = f"{where}.api_key"
    return OpenAIProfile(
        name=name,
        base_url=text("base_url"),
        api_key=Secret(api_key) if api_key else None,
        api_key_setting=key_setting,
        organization=text("organization"),
        project=text("project"),
        default_headers=dict(headers),
        timeout=parse_seconds(settings["timeout"], f"{where}.timeout") if "timeout" in settings else timeout,
        connect_timeout=(
            parse_seconds(settings["connect_timeout"], f"{where}.connect_timeout")
            if "connect_timeout" in settings
            else connect_timeout
        ),
        max_retries=(
            parse_count(settings["max_retries"], f"{where}.max_retries")
            if "max_retries" in settings
            else max_retries
        ),
        azure_endpoint=azure_endpoint,
        api_version=text("api_version"),
        azure_deployment=text("azure_deployment"),
        azure_ad_token_provider=token_path,
        token_provider=token_provider,
    )


def load_token_provider(path: str, setting: str) -> Callable[[], str]:
    """The Azure AD token provider named by ``"module:callable"``, checked without calling it.

    A callable that takes no argument and returns a bearer token, such as
    ``azure.identity.get_bearer_token_provider(DefaultAzureCredential(), scope)``.
    It must be a plain function: the sync client calls it (the async one too, on
    its event loop), and calling it at start would ask Azure for a token.
    """
    module_name, sep, attribute = path.partition(":")
    if not sep or not module_name.strip() or not attribute.strip():
        raise ConfigError(f"{setting} must be 'module:callable', got {path!r}")
    try:
        target: Any = importlib.import_module(module_name)
        for part in attribute.split("."):
            target = getattr(target, part)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"{setting}: cannot load {path!r} ({type(exc).__name__}: {exc})") from None
    if not callable(target) or isinstance(target, type):
        raise ConfigError(f"{setting}: {path!r} is not a function that returns a token")
    if inspect.iscoroutinefunction(target) or (
        not inspect.isroutine(target) and inspect.iscoroutinefunction(type(target).__call__)
    ):
        raise ConfigError(
            f"{setting}: {path!r} is an async function; give a plain one (the sync client calls it too)"
        )
    try:
        inspect.signature(target).bind()
    except TypeError:
        raise ConfigError(f"{setting}: {path!r} must be callable without arguments") from None
    except ValueError:  # no signature to read (a builtin): let the SDK call it
        pass
    return target  # type: ignore[no-any-return]


def _client_kwargs(profile: OpenAIProfile) -> dict[str, Any]:
    import openai

    kwargs: dict[str, Any] = {
        "api_key": profile.require_key(),
        "organization": profile.organization,
        "project": profile.project,
        "timeout": openai.Timeout(profile.timeout, connect=profile.connect_timeout),
        "max_retries": profile.max_retries,
        "default_headers": dict(profile.default_headers) or None,
    }
    if profile.is_azure:
        kwargs.update(
            azure_endpoint=profile.azure_endpoint,
            api_version=profile.api_version,
            azure_deployment=profile.azure_deployment,
        )
        kwargs.pop("project")
        if profile.token_provider is not None and profile.api_key is None:
            kwargs.update(api_key=None, azure_ad_token_provider=profile.token_provider)
    else:
        kwargs["base_url"] = profile.base_url
    return kwargs


def build_openai_client(profile: OpenAIProfile) -> OpenAI:
    """A sync client for ``profile``; ``AzureOpenAI`` for an Azure profile."""
    kwargs = _client_kwargs(profile)  # first: a missing key fails before the SDK loads further
    import openai

    kwargs.update(sdk_http_client("openai"))  # the test kit's guard, when installed; else nothing
    return openai.AzureOpenAI(**kwargs) if profile.is_azure else openai.OpenAI(**kwargs)


def build_async_openai_client(profile: OpenAIProfile) -> AsyncOpenAI:
    kwargs = _client_kwargs(profile)
    import openai

    kwargs.update(sdk_http_client("openai", asynchronous=True))
    return openai.AsyncAzureOpenAI(**kwargs) if profile.is_azure else openai.AsyncOpenAI(**kwargs)


def _close_sync(client: OpenAI) -> None:
    client.close()


class OpenAIConnector(Connector):
    extension_key = EXTENSION_KEY
    accessor = "get_openai_client()"

    def __init__(self, profiles: dict[str, OpenAIProfile]) -> None:
        self._install(profiles)

    def _install(self, profiles: dict[str, OpenAIProfile]) -> None:
        self.profiles = profiles
        self._sync = {
            name: LazyClient(partial(build_openai_client, profile), _close_sync)
            for name, profile in profiles.items()
        }
        self._async = {
            name: LoopBoundClients(partial(build_async_openai_client, profile))
            for name, profile in profiles.items()
        }
        # Profiles without a key of their own: a client for per-call keys only, built on first use.
        keyless = {
            name: replace(profile, api_key=Secret(PER_CALL_KEYS_ONLY))
            for name, profile in profiles.items()
            if not profile.configured
        }
        self._keyed_sync = {
            name: LazyClient(partial(build_openai_client, profile), _close_sync)
            for name, profile in keyless.items()
        }
        self._keyed_async = {
            name: LoopBoundClients(partial(build_async_openai_client, profile))
            for name, profile in keyless.items()
        }

    def reconfigure(self, config: Mapping[str, Any]) -> None:
        profiles = parse_openai_settings(config)
        if profiles == self.profiles:
            return
        old = self._slots()
        self._install(profiles)
        for slot in old:
            slot.reset()

    def _unknown(self, name: str) -> UnknownProfileError:
        return UnknownProfileError(name, sorted(self.profiles))

    def client(self, name: str = DEFAULT_PROFILE) -> OpenAI:
        try:
            slot = self._sync[name]
        except KeyError:
            raise self._unknown(name) from None
        return slot.get()

    def async_client(self, name: str = DEFAULT_PROFILE) -> AsyncOpenAI:
        try:
            clients = self._async[name]
        except KeyError:
            raise self._unknown(name) from None
        return clients.get()

    def keyed_client(self, name: str = DEFAULT_PROFILE) -> OpenAI:
        """The client that calls with a key of their own copy (``with_options(api_key=...)``).

        The profile's client when it has a key (or needs none), so per-call keys share its
        pool; else one that only ever sends per-call keys, never a key of the platform's.
        """
        slot = self._keyed_sync.get(name)
        return slot.get() if slot is not None else self.client(name)

    def keyed_async_client(self, name: str = DEFAULT_PROFILE) -> AsyncOpenAI:
        clients = self._keyed_async.get(name)
        return clients.get() if clients is not None else self.async_client(name)

    def profile(self, name: str = DEFAULT_PROFILE) -> OpenAIProfile:
        try:
            return self.profiles[name]
        except KeyError:
            raise self._unknown(name) from None

    def _slots(self) -> list[LazyClient[Any] | LoopBoundClients[Any]]:
        return [*self._sync.values(), *self._async.values(), *self._keyed_sync.values(),
                *self._keyed_async.values()]  # fmt: skip

    def reset(self) -> None:
        for slot in self._slots():
            slot.reset()

    def info(self) -> dict[str, Any]:
        return {
            name: {
                "configured": profile.configured,
                "kind": "azure" if profile.is_azure else "openai-compatible",
                **({"auth": "azure_ad_token_provider"} if profile.token_provider is not None else {}),
                "endpoint": profile.endpoint,
                "timeout": profile.timeout,
                "connect_timeout": profile.connect_timeout,
                "max_retries": profile.max_retries,
                "missing": None if profile.configured else profile.api_key_setting,
                "client_built": self._sync[name].built or self._async[name].built,
            }
            for name, profile in self.profiles.items()
        }


def current_openai_connector() -> OpenAIConnector:
    return current_connector(EXTENSION_KEY, OpenAIConnector.accessor, OpenAIConnector)


def reset_openai_client(app: Flask | None = None) -> None:
    """Close every OpenAI client of ``app`` (default: the current app) in this process."""
    reset_registered(EXTENSION_KEY, app)
