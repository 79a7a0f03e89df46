"""The timeouts of a request, checked at start to nest inside each other.

From the innermost out, every wait ends by its own timeout before the next
one out can cut it::

    LLM_SSE_HEARTBEAT < a stream's idle timeout <= the attempt timeout <= LLM_DEADLINE < GUNICORN_TIMEOUT

- A heartbeat (an SSE comment) goes out while a stream is idle, well before
  the idle timeout (or a proxy's, which is set above it) ends the stream.
- A stream's idle timeout between two deltas is the read timeout of the
  attempt that opened it: the client's own (``OPENAI_TIMEOUT``,
  ``GENAI_TIMEOUT``, ``ANTHROPIC_TIMEOUT``, a profile's ``timeout``), or
  ``LLM_ATTEMPT_TIMEOUT`` when it is set, or what is left of the deadline
  when that is less. So it is never longer than the attempt timeout.
- ``LLM_DEADLINE`` bounds a call's attempts and waits together: a hung
  upstream ends there in the JSON 504 (``upstream_timeout``).
- gunicorn's worker timeout is the outermost. Under gthread and gevent it is
  not a request timeout (a worker that keeps serving is never killed, however
  long a stream lasts): the arbiter kills a worker whose heartbeat stalls that
  long. It must be longer than one attempt (error otherwise: a single wait that
  held the worker's heartbeat would get the worker killed, and its requests
  cut with HTML or a reset, before the 504), and should be longer than the
  deadline (warning).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from flask import Flask

from app.config import get_seconds
from app.errors import ConfigError

logger = logging.getLogger(__name__)

#: The heartbeat's setting and its default, in seconds.
HEARTBEAT_KEY = "LLM_SSE_HEARTBEAT"


@dataclass(frozen=True)
class Disagreement:
    """Two settings in the wrong order; ``level`` says whether the app may start."""

    level: Literal["error", "warning"]
    message: str


@dataclass(frozen=True)
class AttemptTimeout:
    """One provider's attempt timeout and the setting it comes from."""

    provider: str
    seconds: float
    setting: str
    deadline: float
    deadline_setting: str


def heartbeat_seconds(config: Mapping[str, Any]) -> float:
    """``LLM_SSE_HEARTBEAT``: a positive number of seconds (ConfigError naming it otherwise)."""
    return get_seconds(config, HEARTBEAT_KEY)


def attempt_timeouts(app: Flask) -> list[AttemptTimeout]:
    """Each configured provider's attempt timeout, with the setting that sets it."""
    resilience = app.extensions["llm"].resilience
    found: list[AttemptTimeout] = []
    for provider, client_timeout, client_setting in _client_timeouts(app):
        override = resilience.overrides.get(provider)
        policy = override or resilience.base
        retry = policy.retry
        seconds, setting = client_timeout, client_setting
        if retry.attempt_timeout is not None and retry.attempt_timeout < client_timeout:
            seconds = retry.attempt_timeout
            own = override is not None and retry.attempt_timeout != resilience.base.retry.attempt_timeout
            setting = f"LLM_POLICY[{provider!r}].attempt_timeout" if own else "LLM_ATTEMPT_TIMEOUT"
        deadline_setting = (
            f"LLM_POLICY[{provider!r}].deadline"
            if override is not None and retry.deadline != resilience.base.retry.deadline
            else "LLM_DEADLINE"
        )
        found.append(AttemptTimeout(provider, seconds, setting, retry.deadline, deadline_setting))
    return found


def _client_timeouts(app: Flask) -> Iterator[tuple[str, float, str]]:
    """(provider, the client's read timeout, its setting) for each configured LLM client."""
    openai = app.extensions.get("openai_service")
    if openai is not None:
        for name, entry in openai.info().items():
            if entry.get("configured"):
                provider = "openai" if name == "default" else name
                setting = "OPENAI_TIMEOUT" if name == "default" else f"OPENAI_PROFILES[{name!r}].timeout"
                yield provider, float(entry["timeout"]), setting
    for key, provider, setting in (
        ("genai_service", "gemini", "GENAI_TIMEOUT"),
        ("anthropic_service", "anthropic", "ANTHROPIC_TIMEOUT"),
    ):
        connector = app.extensions.get(key)
        if connector is None:
            continue
        for entry in connector.info().values():
            if entry.get("configured"):
                yield provider, float(entry["timeout"]), setting


def check_timeouts(app: Flask, worker_timeout: float | None) -> list[Disagreement]:
    """What is out of order among the heartbeat, attempt timeouts, deadlines and the worker timeout."""
    found: list[Disagreement] = []
    heartbeat = heartbeat_seconds(app.config)
    for attempt in attempt_timeouts(app):
        where = f"for {attempt.provider}"
        if heartbeat >= attempt.seconds:
            found.append(Disagreement("warning", (
                f"{HEARTBEAT_KEY} ({heartbeat:g} s) is not shorter than {attempt.setting}"
                f" ({attempt.seconds:g} s) {where}: an idle stream ends before its first heartbeat,"
                " and a proxy may close it first"
            )))  # fmt: skip
        if attempt.seconds > attempt.deadline:
            found.append(Disagreement("warning", (
                f"{attempt.setting} ({attempt.seconds:g} s) is longer than {attempt.deadline_setting}"
                f" ({attempt.deadline:g} s) {where}: every attempt is cut at the deadline instead"
            )))  # fmt: skip
        if worker_timeout is None:
            continue
        if worker_timeout <= attempt.seconds:
            found.append(Disagreement("error", (
                f"GUNICORN_TIMEOUT ({worker_timeout:g} s) must be longer than {attempt.setting}"
                f" ({attempt.seconds:g} s) {where}: a worker whose heartbeat one upstream wait held"
                " would be killed before the call could answer its JSON 504"
            )))  # fmt: skip
        elif worker_timeout <= attempt.deadline:
            found.append(Disagreement("warning", (
                f"GUNICORN_TIMEOUT ({worker_timeout:g} s) is not longer than {attempt.deadline_setting}"
                f" ({attempt.deadline:g} s) {where}: keep the worker timeout the outermost"
            )))  # fmt: skip
    return found


def enforce_timeouts(app: Flask, worker_timeout: float | None, log: logging.Logger | Any = None) -> None:
    """Log each warning once; raise :class:`ConfigError` naming the settings when one is an error."""
    log = log or logger
    found = check_timeouts(app, worker_timeout)
    seen: set[str] = set()
    for item in found:
        if item.level == "warning" and item.message not in seen:
            seen.add(item.message)
            log.warning("timeouts out of order: %s", item.message)
    errors = list(dict.fromkeys(item.message for item in found if item.level == "error"))
    if errors:
        raise ConfigError("; ".join(errors))


__all__ = [
    "HEARTBEAT_KEY",
    "AttemptTimeout",
    "Disagreement",
    "attempt_timeouts",
    "check_timeouts",
    "enforce_timeouts",
    "heartbeat_seconds",
]
