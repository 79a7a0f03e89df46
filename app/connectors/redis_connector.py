"""Redis through redis-py, with defaults that fail fast.

redis-py 8 retries a failed command ten times with backoff and waits 5 s on a
dead socket; a cache or a breaker store in front of a web request must give up
sooner. Defaults here: 1 s socket and connect timeouts, at most one retry,
and a health check on connections idle for 30 s.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from app.config import get_count, get_seconds, get_str, parse_service_url
from app.connectors._base import SingleClientConnector, current_connector, reset_registered
from app.errors import ConfigError, ServiceNotConfiguredError
from app.redaction import Secret, redact_url, register_url_secrets

if TYPE_CHECKING:
    from flask import Flask
    from redis import Redis

EXTENSION_KEY = "redis_service"
SCHEMES = ("redis", "rediss", "unix")


@dataclass(frozen=True)
class RedisSettings:
    #: The whole URL is secret: it may carry a password.
    url: Secret | None
    socket_timeout: float
    connect_timeout: float
    max_retries: int
    health_check_interval: int

    @property
    def endpoint(self) -> str | None:
        return redact_url(self.url.reveal()) if self.url else None


def parse_redis_settings(config: Mapping[str, Any]) -> RedisSettings:
    url = get_str(config, "REDIS_URL")
    if url is not None:
        check_redis_url(url)
    return RedisSettings(
        url=Secret(url) if url else None,
        socket_timeout=get_seconds(config, "REDIS_SOCKET_TIMEOUT"),
        connect_timeout=get_seconds(config, "REDIS_CONNECT_TIMEOUT"),
        max_retries=get_count(config, "REDIS_MAX_RETRIES"),
        health_check_interval=get_count(config, "REDIS_HEALTH_CHECK_INTERVAL"),
    )


def check_redis_url(url: str, key: str = "REDIS_URL") -> None:
    """Scheme, host, port and database of a Redis URL, as redis-py (``urlparse``) will read it.

    A raw ``#`` or ``/`` in the password cannot work there (the URL ends, or
    the host starts, at it), so it fails here, with a message that shows no
    part of the password.
    """
    register_url_secrets(url)
    try:
        scheme = urlsplit(url).scheme
    except ValueError:
        scheme = ""
    if scheme not in SCHEMES:
        raise ConfigError(
            f"{key} must start with redis://, rediss:// or unix://, got {scheme or 'no'} scheme"
        )
    parse_service_url(url, key, SCHEMES, host_required=False)
    path = urlsplit(url).path
    if scheme != "unix" and not re.fullmatch(r"/?(\d+)?", path):
        raise ConfigError(
            f"{key} must end with a database number (/0), got {redact_url(url)!r}"
            " (a '/' or '@' in a password must be percent-encoded as %2F, %40)"
        )


def build_redis_client(settings: RedisSettings) -> Redis:
    if settings.url is None:
        raise ServiceNotConfiguredError("Redis", "REDIS_URL", "e.g. redis://127.0.0.1:6379/0")
    import redis
    from redis.backoff import ExponentialWithJitterBackoff
    from redis.retry import Retry

    return redis.Redis.from_url(
        settings.url.reveal(),
        socket_timeout=settings.socket_timeout,
        socket_connect_timeout=settings.connect_timeout,
        retry=Retry(ExponentialWithJitterBackoff(base=0.05, cap=0.5), settings.max_retries),
        health_check_interval=settings.health_check_interval,
    )


def close_redis_client(client: Redis) -> None:
    client.connection_pool.disconnect()
    client.close()


class RedisConnector(SingleClientConnector[RedisSettings, "Redis"]):
    extension_key = EXTENSION_KEY
    accessor = "get_redis_client()"
    parse_settings = staticmethod(parse_redis_settings)
    build_client = staticmethod(build_redis_client)
    close_client = staticmethod(close_redis_client)

    @property
    def configured(self) -> bool:
        return self.settings.url is not None

    def info(self) -> dict[str, Any]:
        settings = self.settings
        return {
            "redis": {
                "configured": self.configured,
                "endpoint": settings.endpoint,
                "socket_timeout": settings.socket_timeout,
                "connect_timeout": settings.connect_timeout,
                "max_retries": settings.max_retries,
                "missing": None if self.configured else "REDIS_URL",
                "client_built": self.built,
            }
        }


def current_redis_connector() -> RedisConnector:
    return current_connector(EXTENSION_KEY, RedisConnector.accessor, RedisConnector)


def reset_redis_client(app: Flask | None = None) -> None:
    """Close the Redis client of ``app`` (default: the current app) in this process."""
    reset_registered(EXTENSION_KEY, app)
