"""Anthropic through its own SDK (the optional extra ``pip install .[anthropic]``).

Same contract as the other connectors: validated at start, the client built
on first use once per app and per process, 60 s read / 5 s connect by
default (the SDK's is 600 s). Async clients are built once per event loop
(an ``AsyncAnthropic`` pool belongs to the loop that opened its
connections), forgotten in a forked child and closed by a reset. Calls with a
key of their own (``api_key=`` of the LLM layer) copy :meth:`AnthropicConnector.keyed_client`:
the client above, or without ``ANTHROPIC_API_KEY`` one that only ever sends per-call keys.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from app.config import check_http_url, get_count, get_seconds, get_str
from app.connectors._base import (
    LazyClient,
    LoopBoundClients,
    SingleClientConnector,
    current_connector,
    reset_registered,
)
from app.connectors.outbound import sdk_http_client
from app.errors import ServiceNotConfiguredError
from app.redaction import Secret, redact_url, register_secret

if TYPE_CHECKING:
    from anthropic import Anthropic, AsyncAnthropic
    from flask import Flask

EXTENSION_KEY = "anthropic_service"
DEFAULT_ENDPOINT = "https://api.anthropic.com"
#: The key of a client that only ever sends per-call keys (no ANTHROPIC_API_KEY configured).
PER_CALL_KEYS_ONLY = "per-call-keys-only"

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class AnthropicSettings:
    api_key: Secret | None
    base_url: str | None = field(repr=False, default=None)
    timeout: float = 60.0
    connect_timeout: float = 5.0
    max_retries: int = 2

    @property
    def endpoint(self) -> str:
        return redact_url(self.base_url or DEFAULT_ENDPOINT)


def parse_anthropic_settings(config: Mapping[str, Any]) -> AnthropicSettings:
    key = get_str(config, "ANTHROPIC_API_KEY")
    settings = AnthropicSettings(
        api_key=Secret(key) if key else None,
        base_url=check_http_url(get_str(config, "ANTHROPIC_BASE_URL"), "ANTHROPIC_BASE_URL"),
        timeout=get_seconds(config, "ANTHROPIC_TIMEOUT"),
        connect_timeout=get_seconds(config, "ANTHROPIC_CONNECT_TIMEOUT"),
        max_retries=get_count(config, "ANTHROPIC_MAX_RETRIES"),
    )
    register_secret(settings.api_key)
    return settings


def _client_kwargs(settings: AnthropicSettings) -> dict[str, Any]:
    if settings.api_key is None:
        raise ServiceNotConfiguredError("Anthropic", "ANTHROPIC_API_KEY")
    try:
        import anthropic
    except ImportError:
        raise ServiceNotConfiguredError(
            "Anthropic", "the anthropic package", "install the extra: pip install '.[anthropic]'"
        ) from None
    return {
        "api_key": settings.api_key.reveal(),
        "base_url": settings.base_url,
        "timeout": anthropic.Timeout(settings.timeout, connect=settings.connect_timeout),
        "max_retries": settings.max_retries,
    }


def build_anthropic_client(settings: AnthropicSettings) -> Anthropic:
    import anthropic

    return anthropic.Anthropic(**_client_kwargs(settings), **sdk_http_client("anthropic"))


def build_async_anthropic_client(settings: AnthropicSettings) -> AsyncAnthropic:
    kwargs = _client_kwargs(settings)  # first: a missing key fails before the SDK loads further
    import anthropic

    return anthropic.AsyncAnthropic(**kwargs, **sdk_http_client("anthropic", asynchronous=True))


def close_anthropic_client(client: Anthropic) -> None:
    client.close()


class AnthropicConnector(SingleClientConnector[AnthropicSettings, "Anthropic"]):
    extension_key = EXTENSION_KEY
    accessor = "get_anthropic_client()"
    parse_settings = staticmethod(parse_anthropic_settings)
    build_client = staticmethod(build_anthropic_client)
    close_client = staticmethod(close_anthropic_client)

    def __init__(self, settings: AnthropicSettings) -> None:
        super().__init__(settings)
        self._async: LoopBoundClients[AsyncAnthropic] = LoopBoundClients(
            lambda: build_async_anthropic_client(self.settings)
        )
        # Without a key of the platform's: clients for per-call keys only, built on first use.
        self._keyed: LazyClient[Anthropic] = LazyClient(
            lambda: build_anthropic_client(self._per_call_settings()), close_anthropic_client
        )
        self._keyed_async: LoopBoundClients[AsyncAnthropic] = LoopBoundClients(
            lambda: build_async_anthropic_client(self._per_call_settings())
        )

    def _per_call_settings(self) -> AnthropicSettings:
        return replace(self.settings, api_key=Secret(PER_CALL_KEYS_ONLY))

    def async_client(self) -> AsyncAnthropic:
        """The async client of the running event loop, built on first use in that loop."""
        return self._async.get()

    def keyed_client(self) -> Anthropic:
        """What a call with its own key copies: the client above, whose pool it then shares,
        or, without ``ANTHROPIC_API_KEY``, a client that only ever sends per-call keys."""
        return self.client() if self.settings.api_key is not None else self._keyed.get()

    def keyed_async_client(self) -> AsyncAnthropic:
        return self.async_client() if self.settings.api_key is not None else self._keyed_async.get()

    @property
    def built(self) -> bool:
        return self._client.built or self._async.built

    def reset(self) -> None:
        super().reset()
        self._async.reset()
        self._keyed.reset()
        self._keyed_async.reset()

    def info(self) -> dict[str, Any]:
        settings = self.settings
        return {
            "anthropic": {
                "configured": settings.api_key is not None,
                "endpoint": settings.endpoint,
                "timeout": settings.timeout,
                "connect_timeout": settings.connect_timeout,
                "max_retries": settings.max_retries,
                "missing": None if settings.api_key else "ANTHROPIC_API_KEY",
                "client_built": self.built,
            }
        }


def current_anthropic_connector() -> AnthropicConnector:
    return current_connector(EXTENSION_KEY, AnthropicConnector.accessor, AnthropicConnector)


def get_anthropic_client() -> Anthropic:
    """The current app's Anthropic client, built on first use in this process."""
    return current_anthropic_connector().client()


def get_async_anthropic_client() -> AsyncAnthropic:
    """The current app's async Anthropic client for the running event loop."""
    return current_anthropic_connector().async_client()


def reset_anthropic_client(app: Flask | None = None) -> None:
    reset_registered(EXTENSION_KEY, app)
