"""The Gemini client (google-genai) for views and commands."""

from __future__ import annotations

from typing import TYPE_CHECKING

from flask import Flask

from app.connectors._base import register
from app.connectors.genai_connector import (
    GenAIConnector,
    current_genai_connector,
    parse_genai_settings,
    reset_genai_client,
)

if TYPE_CHECKING:
    from google.genai import Client

__all__ = ["get_genai_client", "init_app", "reset_genai_client"]


def init_app(app: Flask) -> None:
    """Validate the Gemini settings; builds no client."""
    register(app, GenAIConnector(parse_genai_settings(app.config)))


def get_genai_client() -> Client:
    """The current app's ``google.genai.Client``, built on first use in this process."""
    return current_genai_connector().client()
