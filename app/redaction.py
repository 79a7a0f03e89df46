"""Keeping secrets out of every output: reprs, logs, error bodies, CLI and health.

Two tools, both small enough to write by hand:

* :class:`Secret` wraps a credential so that ``repr``, ``str`` and f-strings
  show ``'***'``; the value is only reachable through :meth:`Secret.reveal`,
  which the connectors call when they hand the key to an SDK.
* A process-wide registry of secret values, fed by the connectors, and a
  :mod:`logging` record factory that scrubs those values (and the userinfo of
  URLs) from every log record, including formatted tracebacks. A factory,
  rather than a filter, because filters attached to a logger do not see the
  records of its child loggers (``openai._base_client``, ``httpx`` ...).
"""

from __future__ import annotations

import logging
import re
import threading
from typing import Any
from urllib.parse import urlsplit, urlunsplit

MASK = "***"

_URL_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.\-]*://)(?P<userinfo>[^/@\s:]*(?::[^/@\s]*)?)@")


class Secret:
    """A credential that will not print itself."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        """The real value: only for handing to the client that needs it."""
        return self._value

    def __repr__(self) -> str:
        return f"Secret({MASK!r})"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __bool__(self) -> bool:
        return bool(self._value)


def redact_url(url: str) -> str:
    """``scheme://user:password@host/path`` -> ``scheme://user:***@host/path``.

    A URL with a username and no password (``redis://token@host``) may carry
    the secret in the username, so the whole userinfo is masked then.
    """
    try:
        parts = urlsplit(url)
    except ValueError:
        return _URL_USERINFO.sub(lambda m: f"{m['scheme']}{MASK}@", url)
    if "@" not in parts.netloc:
        return url
    userinfo, _, hostport = parts.netloc.rpartition("@")
    user, sep, _password = userinfo.partition(":")
    masked = f"{user}:{MASK}" if sep and user else MASK
    return urlunsplit(parts._replace(netloc=f"{masked}@{hostport}"))


class _SecretRegistry:
    """The secret values this process knows of, longest first."""

    # Values this short would mask ordinary words; real keys are far longer.
    MIN_LENGTH = 6

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: tuple[str, ...] = ()

    def add(self, value: str | Secret | None) -> None:
        raw = value.reveal() if isinstance(value, Secret) else value
        if not raw or len(raw) < self.MIN_LENGTH or raw in self._values:
            return
        with self._lock:
            values = {*self._values, raw}
            self._values = tuple(sorted(values, key=len, reverse=True))

    def redact(self, text: str) -> str:
        for value in self._values:
            if value in text:
                text = text.replace(value, MASK)
        if "@" in text:
            text = _URL_USERINFO.sub(_mask_userinfo, text)
        return text


def _mask_userinfo(match: re.Match[str]) -> str:
    user, sep, _ = match["userinfo"].partition(":")
    masked = f"{user}:{MASK}" if sep and user else MASK
    return f"{match['scheme']}{masked}@"


secrets = _SecretRegistry()


def register_secret(value: str | Secret | None) -> None:
    """Remember a credential so that logs and error bodies never show it."""
    secrets.add(value)


def redact(text: str) -> str:
    """``text`` with every known secret and URL password masked."""
    return secrets.redact(text)


_factory_lock = threading.Lock()
_installed = False


def install_log_redaction() -> None:
    """Wrap the log record factory once per process so every record is scrubbed."""
    global _installed  # noqa: PLW0603 - one factory per process, by design
    with _factory_lock:
        if _installed:
            return
        previous = logging.getLogRecordFactory()

        def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
            record = previous(*args, **kwargs)
            _scrub(record)
            return record

        logging.setLogRecordFactory(factory)
        _installed = True


def _scrub(record: logging.LogRecord) -> None:
    try:
        message = record.getMessage()
    except Exception:  # a broken format string is the logging call's problem, not ours
        return
    cleaned = redact(message)
    if cleaned != message or record.args:
        record.msg, record.args = cleaned, None
    if record.exc_info and not record.exc_text:
        text = logging.Formatter().formatException(record.exc_info)
        record.exc_text = redact(text)
