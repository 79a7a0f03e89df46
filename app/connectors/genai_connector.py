"""Gemini through google-genai: the Developer API with a key, or Vertex AI.

google-genai has no request timeout by default; every client built here has
``GENAI_TIMEOUT`` (60 s unless configured). The key comes from
``GEMINI_API_KEY``, with ``GOOGLE_API_KEY`` accepted; Vertex AI is chosen by
``GOOGLE_GENAI_USE_VERTEXAI`` and needs ``GOOGLE_CLOUD_PROJECT`` and
``GOOGLE_CLOUD_LOCATION`` (credentials from Application Default Credentials).

A call with a key of its own (``api_key=`` of the LLM layer) is sent by
:meth:`GenAIConnector.keyed_client` with its key in that request's headers: the
client above, whose pool every key shares, or, without a key of the platform's,
a client that only ever sends per-call keys.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from app.config import check_http_url, get_bool, get_seconds, get_str
from app.connectors._base import LazyClient, SingleClientConnector, current_connector, reset_registered
from app.connectors.outbound import genai_client_args
from app.errors import ServiceNotConfiguredError
from app.redaction import Secret, redact_url, register_secret

if TYPE_CHECKING:
    from flask import Flask
    from google.genai import Client

EXTENSION_KEY = "genai_service"
DEFAULT_ENDPOINT = "https://generativelanguage.googleapis.com"
#: The key of a client that only ever sends per-call keys (no GEMINI_API_KEY configured).
PER_CALL_KEYS_ONLY = "per-call-keys-only"


@dataclass(frozen=True)
class GenAISettings:
    api_key: Secret | None
    #: Which key the value came from, for `flask services info`.
    api_key_setting: str
    base_url: str | None
    api_version: str | None
    timeout: float
    vertexai: bool
    project: str | None
    location: str | None

    @property
    def missing(self) -> str | None:
        """The first setting a client still needs, or ``None`` when complete."""
        if self.vertexai:
            if not self.project:
                return "GOOGLE_CLOUD_PROJECT"
            if not self.location:
                return "GOOGLE_CLOUD_LOCATION"
            return None
        return None if self.api_key else "GEMINI_API_KEY"

    @property
    def endpoint(self) -> str:
        if self.base_url:
            return redact_url(self.base_url)
        if self.vertexai:
            return f"https://{self.location or '<GOOGLE_CLOUD_LOCATION>'}-aiplatform.googleapis.com"
        return DEFAULT_ENDPOINT


def parse_genai_settings(config: Mapping[str, Any]) -> GenAISettings:
    gemini_key, google_key = get_str(config, "GEMINI_API_KEY"), get_str(config, "GOOGLE_API_KEY")
    key = gemini_key or google_key
    settings = GenAISettings(
        api_key=Secret(key) if key else None,
        api_key_setting="GEMINI_API_KEY" if gemini_key or not google_key else "GOOGLE_API_KEY",
        base_url=check_http_url(get_str(config, "GENAI_BASE_URL"), "GENAI_BASE_URL"),
        api_version=get_str(config, "GENAI_API_VERSION"),
        timeout=get_seconds(config, "GENAI_TIMEOUT"),
        vertexai=get_bool(config, "GOOGLE_GENAI_USE_VERTEXAI"),
        project=get_str(config, "GOOGLE_CLOUD_PROJECT"),
        location=get_str(config, "GOOGLE_CLOUD_LOCATION"),
    )
    register_secret(settings.api_key)
    return settings


def build_genai_client(settings: GenAISettings) -> Client:
    missing = settings.missing
    if missing is not None:
        hint = "or GOOGLE_API_KEY" if missing == "GEMINI_API_KEY" else "needed for Vertex AI"
        raise ServiceNotConfiguredError("Gemini (google-genai)", missing, hint)
    from google import genai
    from google.genai import types

    http_options = types.HttpOptions(
        base_url=settings.base_url,
        api_version=settings.api_version,
        timeout=round(settings.timeout * 1000),  # google-genai counts milliseconds
        **genai_client_args(),  # the test kit's guard, when installed; else nothing
    )
    if settings.vertexai:
        return genai.Client(
            vertexai=True,
            project=settings.project,
            location=settings.location,
            http_options=http_options,
        )
    assert settings.api_key is not None  # settings.missing said so
    return genai.Client(api_key=settings.api_key.reveal(), http_options=http_options)


def close_genai_client(client: Client) -> None:
    client.close()


class GenAIConnector(SingleClientConnector[GenAISettings, "Client"]):
    extension_key = EXTENSION_KEY
    accessor = "get_genai_client()"
    parse_settings = staticmethod(parse_genai_settings)
    build_client = staticmethod(build_genai_client)
    close_client = staticmethod(close_genai_client)

    def __init__(self, settings: GenAISettings) -> None:
        super().__init__(settings)
        self._keyed: LazyClient[Client] = LazyClient(
            lambda: build_genai_client(replace(self.settings, api_key=Secret(PER_CALL_KEYS_ONLY))),
            close_genai_client,
        )

    def keyed_client(self) -> Client:
        """The client that sends calls with a key of their own (the key goes in each request's
        headers): the client above, or, without a key of the platform's, one that only ever
        sends per-call keys. Vertex AI takes no API key: the layer refuses one before this."""
        if self.settings.missing is None or self.settings.vertexai:
            return self.client()
        return self._keyed.get()

    def reset(self) -> None:
        super().reset()
        self._keyed.reset()

    def info(self) -> dict[str, Any]:
        settings = self.settings
        return {
            "gemini": {
                "configured": settings.missing is None,
                "kind": "vertex-ai" if settings.vertexai else "gemini-developer-api",
                "endpoint": settings.endpoint,
                "timeout": settings.timeout,
                "missing": settings.missing,
                "client_built": self.built,
            }
        }


def current_genai_connector() -> GenAIConnector:
    return current_connector(EXTENSION_KEY, GenAIConnector.accessor, GenAIConnector)


def reset_genai_client(app: Flask | None = None) -> None:
    """Close the Gemini client of ``app`` (default: the current app) in this process."""
    reset_registered(EXTENSION_KEY, app)
