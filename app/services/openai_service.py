"""OpenAI and OpenAI-compatible clients for views and commands.

``get_openai_client("groq")`` returns the client of a named profile (see
:mod:`app.connectors.openai_connector` for how profiles are configured).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from flask import Flask

from app.connectors._base import register
from app.connectors.openai_connector import (
    DEFAULT_PROFILE,
    OpenAIConnector,
    current_openai_connector,
    parse_openai_settings,
    reset_openai_client,
)

if TYPE_CHECKING:
    from openai import AsyncOpenAI, OpenAI

__all__ = ["get_async_openai_client", "get_openai_client", "init_app", "reset_openai_client"]


def init_app(app: Flask) -> None:
    """Validate every OpenAI setting and profile; builds no client."""
    register(app, OpenAIConnector(parse_openai_settings(app.config)))


def get_openai_client(name: str = DEFAULT_PROFILE) -> OpenAI:
    """The current app's client for profile ``name``, built on first use in this process."""
    return current_openai_connector().client(name)


def get_async_openai_client(name: str = DEFAULT_PROFILE) -> AsyncOpenAI:
    """The current app's async client for ``name``, one per event loop."""
    return current_openai_connector().async_client(name)
