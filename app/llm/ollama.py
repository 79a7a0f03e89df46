"""Ollama's native API: is the server up, which models it has, and pulling more.

>>> ollama = get_llm().ollama                 # OLLAMA_HOST, default http://127.0.0.1:11434
>>> ollama.is_available()                    # never raises
>>> ollama.ensure_model("llama3.2", progress=print)  # pulls only when missing

Chat goes through the OpenAI-compatible ``ollama`` profile (``ollama/llama3.2``);
this module covers what that API lacks. It talks HTTP with the standard
library (no SDK, no proxy: Ollama is usually local), with a connect timeout
and a read timeout on every socket read: 5 s for queries (``OLLAMA_TIMEOUT``
when set), 300 s between two progress lines of a pull
(``OLLAMA_PULL_TIMEOUT``). Failures raise the layer's typed errors with
``provider="ollama"``; credentials in ``OLLAMA_HOST``
(``https://user:pass@host``) are sent as basic auth and never shown.
"""

from __future__ import annotations

import base64
import http.client
import json
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any
from urllib.parse import unquote, urlsplit

from flask import Flask

from app.config import get_str, parse_seconds
from app.connectors.outbound import check_request
from app.llm.errors import (
    LLMBadRequestError,
    LLMConnectionError,
    LLMError,
    LLMNotFoundError,
    LLMResponseError,
    LLMServerError,
    LLMTimeoutError,
    error_for_status,
    retry_after_from_headers,
)
from app.redaction import redact_url, register_secret

PROVIDER = "ollama"
DEFAULT_HOST = "http://127.0.0.1:11434"
#: Connect and read timeout of queries (version, tags), in seconds.
DEFAULT_TIMEOUT = 5.0
#: Longest wait for the next progress line of a pull, in seconds.
DEFAULT_PULL_TIMEOUT = 300.0
#: Error bodies are read up to this size, for the message.
_MAX_ERROR_BODY = 64 * 1024

Progress = Callable[[dict[str, Any]], None]


def model_key(name: str) -> str:
    """``"llama3.2"`` -> ``"llama3.2:latest"``: the name as Ollama lists it, for comparing."""
    name = name.strip().lower()
    _, _, last = name.rpartition("/")
    return name if ":" in last else f"{name}:latest"


class OllamaManager:
    """Model management over Ollama's native API at one host."""

    def __init__(
        self,
        host: str | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        connect_timeout: float | None = None,
        pull_timeout: float = DEFAULT_PULL_TIMEOUT,
    ) -> None:
        url = (host or DEFAULT_HOST).strip()
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"the Ollama host must be an http:// or https:// URL, got {redact_url(url)!r}")
        self.endpoint = redact_url(url.rstrip("/"))
        self._https = parts.scheme == "https"
        self._hostname = parts.hostname
        self._port = parts.port
        self._base_path = parts.path.rstrip("/")
        self._headers = {"Accept": "application/json", "User-Agent": "app-llm-ollama"}
        if parts.username is not None or parts.password is not None:
            user, password = unquote(parts.username or ""), unquote(parts.password or "")
            register_secret(password)
            token = base64.b64encode(f"{user}:{password}".encode()).decode()
            register_secret(token)
            self._headers["Authorization"] = f"Basic {token}"
        self.timeout = timeout
        self.connect_timeout = connect_timeout if connect_timeout is not None else timeout
        self.pull_timeout = pull_timeout

    @classmethod
    def for_app(cls, app: Flask) -> OllamaManager:
        """The manager for ``app.config``: ``OLLAMA_HOST`` and the optional timeouts."""
        config = app.config

        def seconds(key: str, default: float) -> float:
            value = config.get(key)
            return default if value is None or value == "" else parse_seconds(value, key)

        return cls(
            get_str(config, "OLLAMA_HOST"),
            timeout=seconds("OLLAMA_TIMEOUT", DEFAULT_TIMEOUT),
            pull_timeout=seconds("OLLAMA_PULL_TIMEOUT", DEFAULT_PULL_TIMEOUT),
        )

    def __repr__(self) -> str:
        return f"OllamaManager(endpoint={self.endpoint!r})"

    # --- the API -----------------------------------------------------------

    def is_available(self, timeout: float | None = None) -> bool:
        """Whether Ollama answers ``GET /api/version``; never raises."""
        wait = self.timeout if timeout is None else timeout
        try:
            with self._open("GET", "/api/version", read_timeout=wait, connect_timeout=wait) as response:
                response.read()
                return True
        except Exception:
            return False

    def version(self) -> str | None:
        """Ollama's version string."""
        body = self._get_json("/api/version")
        version = body.get("version")
        return version if isinstance(version, str) else None

    def list_models(self) -> list[str]:
        """The names of the local models (``GET /api/tags``), as Ollama lists them (``name:tag``)."""
        body = self._get_json("/api/tags")
        models = body.get("models")
        if not isinstance(models, list):
            raise LLMResponseError(
                "Ollama's /api/tags answer has no models list",
                raw_text=json.dumps(body)[:500],
                provider=PROVIDER,
            )
        names: list[str] = []
        for entry in models:
            name = entry.get("name") or entry.get("model") if isinstance(entry, Mapping) else None
            if isinstance(name, str) and name:
                names.append(name)
        return names

    def has_model(self, name: str) -> bool:
        """Whether the model is local; ``"llama3.2"`` matches ``"llama3.2:latest"``."""
        wanted = model_key(name)
        return any(model_key(local) == wanted for local in self.list_models())

    def pull_model(self, name: str, progress: Progress | None = None) -> None:
        """Pull ``name`` (``POST /api/pull``), calling ``progress`` with every status line.

        Lines look like ``{"status": "pulling 6a0746a1ec1a", "digest": "sha256:...",
        "total": 2019377376, "completed": 241970}``; the last is ``{"status": "success"}``.
        An ``{"error": ...}`` line raises an :class:`LLMError` (``LLMNotFoundError`` for an
        unknown model).
        """
        if not name or not name.strip():
            raise LLMBadRequestError("a model name is required", provider=PROVIDER)
        body = {"model": name.strip(), "stream": True}
        status: str | None = None
        with self._open(
            "POST", "/api/pull", body=body, read_timeout=self.pull_timeout, model=name
        ) as response:
            for line in self._lines(response, name):
                error = line.get("error")
                if error is not None:
                    raise _pull_error(str(error), name)
                if isinstance(line.get("status"), str):
                    status = line["status"]
                if progress is not None:
                    progress(line)
        if status != "success":
            raise LLMConnectionError(
                f"the pull from Ollama at {self.endpoint} ended before it reported success"
                f" (last status: {status!r})",
                provider=PROVIDER,
                model=name,
            )

    def ensure_model(self, name: str, progress: Progress | None = None) -> bool:
        """Pull ``name`` unless it is already local; returns whether it pulled."""
        if self.has_model(name):
            return False
        self.pull_model(name, progress)
        return True

    # --- HTTP --------------------------------------------------------------

    def _get_json(self, path: str) -> dict[str, Any]:
        with self._open("GET", path, read_timeout=self.timeout) as response:
            raw = self._read(response, None)
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        if not isinstance(body, dict):
            raise LLMResponseError(
                f"Ollama at {self.endpoint} answered {path} with something other than a JSON object",
                raw_text=raw[:500].decode("utf-8", "replace"),
                provider=PROVIDER,
            )
        return body

    @contextmanager
    def _open(
        self,
        method: str,
        path: str,
        *,
        read_timeout: float,
        body: Mapping[str, Any] | None = None,
        model: str | None = None,
        connect_timeout: float | None = None,
    ) -> Iterator[http.client.HTTPResponse]:
        """A response with status < 400; the connection closes when the block ends."""
        check_request(method, self._hostname, self._base_path + path)  # the test kit's guard, if any
        connection_class = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
        connection = connection_class(
            self._hostname,
            self._port,
            timeout=self.connect_timeout if connect_timeout is None else connect_timeout,
        )
        headers = dict(self._headers)
        payload = None
        if body is not None:
            payload = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        try:
            with self._mapped_errors(model, f"{method} {path}"):
                connection.connect()
                if connection.sock is not None:
                    connection.sock.settimeout(read_timeout)
                connection.request(method, self._base_path + path, body=payload, headers=headers)
                response = connection.getresponse()
            if response.status >= 400:
                raise self._status_error(response, model)
            yield response
        finally:
            connection.close()

    def _read(self, response: http.client.HTTPResponse, model: str | None) -> bytes:
        with self._mapped_errors(model, "reading the answer"):
            return response.read()

    def _lines(self, response: http.client.HTTPResponse, model: str) -> Iterator[dict[str, Any]]:
        """The NDJSON lines of a streamed answer, as dicts."""
        while True:
            with self._mapped_errors(model, "reading the pull's progress"):
                raw = response.readline()
            if not raw:
                return
            raw = raw.strip()
            if not raw:
                continue
            try:
                line = json.loads(raw)
            except ValueError:
                line = None
            if not isinstance(line, dict):
                raise LLMResponseError(
                    f"Ollama sent a line that is not a JSON object: {raw[:200].decode('utf-8', 'replace')}",
                    raw_text=raw.decode("utf-8", "replace"),
                    provider=PROVIDER,
                    model=model,
                )
            yield line

    @contextmanager
    def _mapped_errors(self, model: str | None, doing: str) -> Iterator[None]:
        where = f"Ollama at {self.endpoint}"
        try:
            yield
        except LLMError:
            raise
        except TimeoutError as exc:
            raise LLMTimeoutError(f"{where} did not answer in time ({doing})", provider=PROVIDER,
                                  model=model) from exc  # fmt: skip
        except (OSError, http.client.HTTPException) as exc:
            reason = str(exc) or type(exc).__name__
            raise LLMConnectionError(f"{where} is not reachable ({doing}): {reason}", provider=PROVIDER,
                                     model=model) from exc  # fmt: skip

    def _status_error(self, response: http.client.HTTPResponse, model: str | None) -> LLMError:
        status = response.status
        try:
            raw = response.read(_MAX_ERROR_BODY)
        except (OSError, http.client.HTTPException):
            raw = b""
        message = raw.decode("utf-8", "replace").strip()
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        if isinstance(body, Mapping) and body.get("error"):
            message = str(body["error"])
        headers = {key.lower(): value for key, value in response.getheaders()}
        cls = error_for_status(status)
        return cls(
            f"Ollama at {self.endpoint} answered {status}: {message or response.reason}",
            provider=PROVIDER,
            model=model,
            status_code=status,
            retry_after=retry_after_from_headers(headers),
        )


def _pull_error(message: str, model: str) -> LLMError:
    lowered = message.lower()
    cls: type[LLMError] = (
        LLMNotFoundError
        if "not found" in lowered or "does not exist" in lowered or "manifest unknown" in lowered
        else LLMServerError
    )
    return cls(f"Ollama could not pull {model!r}: {message}", provider=PROVIDER, model=model)
