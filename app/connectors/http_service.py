"""A base for any HTTP (REST) service: the recipe the built-in services follow, made reusable.

A service built on it has settings read from config under its own prefix
(``<PREFIX>_BASE_URL``, ``<PREFIX>_API_KEY``, ``<PREFIX>_TIMEOUT``,
``<PREFIX>_CONNECT_TIMEOUT``), validated at start with errors that name the
key; one ``httpx2`` client per app and per process, built on first use and
forgotten (never closed) in a forked child (:class:`~app.connectors._base.LazyClient`);
timeouts that fail a web request in seconds, not minutes; typed errors whose
messages never carry the key or a password in the URL; and the real-call guard
of the test kit in front of its transport. See the README's "Adding a service"
and ``app/services/weather_service.py``, the example.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from app.config import get_str
from app.connectors._base import SingleClientConnector
from app.connectors.outbound import plain_http_transport
from app.errors import ConfigError, ServiceNotConfiguredError
from app.redaction import Secret, redact, redact_url, register_secret

if TYPE_CHECKING:
    import httpx2

#: Seconds a request may take, and to connect, unless the service's settings say otherwise.
DEFAULT_TIMEOUT = 10.0
DEFAULT_CONNECT_TIMEOUT = 5.0


class HTTPServiceError(RuntimeError):
    """A call to an HTTP service failed; ``service`` names it, and no message carries a secret."""

    def __init__(self, service: str, message: str, *, status_code: int | None = None) -> None:
        self.service = service
        self.status_code = status_code
        super().__init__(redact(f"{service}: {message}"))


class HTTPServiceStatusError(HTTPServiceError):
    """The service answered with an HTTP error status (4xx or 5xx)."""


class HTTPServiceUnavailableError(HTTPServiceError):
    """The service could not be reached, or did not answer in time."""


@dataclass(frozen=True)
class HTTPServiceSettings:
    name: str
    prefix: str
    base_url: str | None
    api_key: Secret | None
    timeout: float
    connect_timeout: float

    @property
    def endpoint(self) -> str | None:
        return redact_url(self.base_url) if self.base_url else None


def parse_http_service_settings(config: Mapping[str, Any], name: str, prefix: str) -> HTTPServiceSettings:
    """Read ``<prefix>_*`` from ``config``; a malformed value stops start-up naming its key."""
    base_url = get_str(config, f"{prefix}_BASE_URL")
    if base_url is not None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"{prefix}_BASE_URL must be an http:// or https:// URL with a host")
        register_secret(parts.password)
    api_key = get_str(config, f"{prefix}_API_KEY")
    register_secret(api_key)
    return HTTPServiceSettings(
        name=name,
        prefix=prefix,
        base_url=base_url,
        api_key=Secret(api_key) if api_key else None,
        timeout=_seconds(config, f"{prefix}_TIMEOUT", DEFAULT_TIMEOUT),
        connect_timeout=_seconds(config, f"{prefix}_CONNECT_TIMEOUT", DEFAULT_CONNECT_TIMEOUT),
    )


def _seconds(config: Mapping[str, Any], key: str, default: float) -> float:
    value = config.get(key)
    if value is None or value == "":
        return default
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        seconds = math.nan
    if not math.isfinite(seconds) or seconds <= 0:
        raise ConfigError(f"{key} must be a positive number of seconds")
    return seconds


class HTTPServiceClient:
    """The service's client: ``get_json``/``post_json``/``request`` with typed, redacted errors."""

    def __init__(self, settings: HTTPServiceSettings) -> None:
        import httpx2

        if settings.base_url is None:
            raise ServiceNotConfiguredError(settings.name, f"{settings.prefix}_BASE_URL")
        headers = {"Authorization": f"Bearer {settings.api_key.reveal()}"} if settings.api_key else {}
        self.settings = settings
        self.http = httpx2.Client(
            base_url=settings.base_url,
            headers=headers,
            timeout=httpx2.Timeout(settings.timeout, connect=settings.connect_timeout),
            **plain_http_transport(),
        )

    def request(self, method: str, path: str, **kwargs: Any) -> httpx2.Response:
        import httpx2

        service = self.settings.name
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx2.TimeoutException:
            raise HTTPServiceUnavailableError(
                service, f"no answer to {method} {path} within {self.settings.timeout:g} s"
            ) from None
        except (httpx2.HTTPError, ConnectionError) as exc:
            raise HTTPServiceUnavailableError(
                service, f"{method} {path} failed: {type(exc).__name__}"
            ) from None
        if response.status_code >= 400:
            raise HTTPServiceStatusError(
                service,
                f"{method} {path} answered {response.status_code} at {self.settings.endpoint}",
                status_code=response.status_code,
            )
        return response

    def get_json(self, path: str, **kwargs: Any) -> Any:
        return self.request("GET", path, **kwargs).json()

    def post_json(self, path: str, payload: Any, **kwargs: Any) -> Any:
        return self.request("POST", path, json=payload, **kwargs).json()

    def close(self) -> None:
        self.http.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.settings.name!r}, endpoint={self.settings.endpoint!r})"


class HTTPServiceConnector(SingleClientConnector[HTTPServiceSettings, HTTPServiceClient]):
    """One HTTP service's settings and client for one app. Subclass it per service (see the example)."""

    @staticmethod
    def build_client(settings: HTTPServiceSettings) -> HTTPServiceClient:
        return HTTPServiceClient(settings)

    @staticmethod
    def close_client(client: HTTPServiceClient) -> None:
        client.close()

    def info(self) -> dict[str, Any]:
        settings = self.settings
        return {
            settings.name: {
                "configured": settings.base_url is not None,
                "missing": None if settings.base_url else f"{settings.prefix}_BASE_URL",
                "endpoint": settings.endpoint,
                "timeout": settings.timeout,
                "connect_timeout": settings.connect_timeout,
                "client_built": self.built,
            }
        }


__all__ = [
    "HTTPServiceClient",
    "HTTPServiceConnector",
    "HTTPServiceError",
    "HTTPServiceSettings",
    "HTTPServiceStatusError",
    "HTTPServiceUnavailableError",
    "parse_http_service_settings",
]
