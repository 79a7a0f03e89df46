"""The Redis client for views and commands, and JSON values with a TTL that fail open (``redis_json``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from flask import Flask

from app.connectors._base import register
from app.connectors.redis_connector import (
    RedisConnector,
    current_redis_connector,
    parse_redis_settings,
    reset_redis_client,
)

if TYPE_CHECKING:
    from redis import Redis

from app.services.redis_json import cached, get_json, set_json  # JSON values, fail-open, through the gate

__all__ = ["cached", "get_json", "get_redis_client", "init_app", "reset_redis_client", "set_json"]


def init_app(app: Flask) -> None:
    """Validate the Redis settings; opens no connection."""
    register(app, RedisConnector(parse_redis_settings(app.config)))


def get_redis_client() -> Redis:
    """The current app's ``redis.Redis``, built on first use in this process."""
    return current_redis_connector().client()
