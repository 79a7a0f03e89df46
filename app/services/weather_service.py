"""An example fifth service, built on :mod:`app.connectors.http_service`: a weather REST API.

Copy this file to add a service of your own (README: "Adding a service"):
settings under one prefix (``WEATHER_BASE_URL``, ``WEATHER_API_KEY``,
``WEATHER_TIMEOUT``, ``WEATHER_CONNECT_TIMEOUT``), ``init_app`` that validates
them and builds nothing, ``get_weather_client()`` that builds one client per
app and per process on first use, and ``reset_weather_client()``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flask import Flask

from app.connectors._base import current_connector, register, reset_registered
from app.connectors.http_service import (
    HTTPServiceClient,
    HTTPServiceConnector,
    HTTPServiceSettings,
    parse_http_service_settings,
)

EXTENSION_KEY = "weather_service"


class WeatherConnector(HTTPServiceConnector):
    extension_key = EXTENSION_KEY
    accessor = "get_weather_client()"

    @staticmethod
    def parse_settings(config: Mapping[str, Any]) -> HTTPServiceSettings:
        return parse_http_service_settings(config, "weather", "WEATHER")


def init_app(app: Flask) -> None:
    """Validate the WEATHER_* settings; opens no connection."""
    register(app, WeatherConnector(WeatherConnector.parse_settings(app.config)))


def get_weather_client() -> HTTPServiceClient:
    """The current app's weather client, built on first use in this process."""
    return current_connector(EXTENSION_KEY, WeatherConnector.accessor, WeatherConnector).client()


def reset_weather_client(app: Flask | None = None) -> None:
    """Close and forget the client (the next one reads the settings again)."""
    reset_registered(EXTENSION_KEY, app)


__all__ = ["get_weather_client", "init_app", "reset_weather_client"]
