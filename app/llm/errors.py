"""Typed errors for every provider: what a view needs to decide, nothing it must parse.

Everything the LLM layer raises is an :class:`LLMError` carrying ``provider``,
``model``, ``status_code`` and ``retry_after`` (seconds, from
``retry-after-ms``, ``Retry-After`` in seconds or as a date, or Gemini's
``RetryInfo``), with the SDK's exception chained as ``__cause__``. Messages
pass through :func:`app.redaction.redact`, so they never carry a key.

Each class also says what it means over HTTP, so a view answers by lookup
rather than by testing classes: ``http_status`` (the status ``/api`` answers
with), ``kind`` (the stable ``error.type`` of its JSON body) and, for a
request the provider refused, ``reason``. An :class:`LLMBadRequestError` the
layer raised itself names the offending parameter in ``field``.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Mapping
from typing import Any, ClassVar

from app.redaction import redact


class LLMError(Exception):
    """Base of every error the LLM layer raises.

    A plain ``LLMError`` is one the layer could not classify (the provider's
    answer broke the adapter): a bad gateway.
    """

    #: The HTTP status ``/api`` answers with.
    http_status: ClassVar[int] = 502
    #: For a request the provider refused (``kind == "upstream_rejected"``): why.
    reason: ClassVar[str | None] = None
    #: The request parameter at fault, when the layer knows it (see LLMBadRequestError).
    field: str | None = None

    def __init__(
        self,
        message: str,
        *,
        provider: str | None = None,
        model: str | None = None,
        status_code: int | None = None,
        retry_after: float | None = None,
    ) -> None:
        self.message = redact(message)
        self.provider = provider
        self.model = model
        self.status_code = status_code
        self.retry_after = retry_after
        where = f"{provider}/{model}" if provider and model else provider or model
        super().__init__(f"{where}: {self.message}" if where else self.message)

    @property
    def kind(self) -> str:
        """The stable, snake_case name ``/api`` gives this error (``error.type``).

        A property here so that :class:`LLMBadRequestError` can tell its two
        origins apart; every other class sets it as a plain class attribute.
        """
        return "upstream_error"


class LLMAuthError(LLMError):
    """401: the key is missing, wrong or revoked."""

    kind = "upstream_auth"  # our configuration is at fault, not the caller: a bad gateway


class LLMPermissionError(LLMError):
    """403: the key may not use this model or resource."""

    kind = "upstream_auth"


class LLMBadRequestError(LLMError):
    """400/422: the request is invalid (the layer's own validation raises it too).

    ``field`` names the parameter at fault when the layer's own checks raise
    it: ``messages[2].content[0].url``, ``tools[1].parameters``,
    ``tool_choice``, ``response_format``, ``max_tokens``... Its ``kind`` is
    ``invalid_request`` then (nothing was sent), and ``upstream_rejected``
    when the provider refused the request (it has an HTTP status, or chains
    the SDK's error).
    """

    http_status = 400
    reason = "bad_request"

    def __init__(self, message: str, *, field: str | None = None, **context: Any) -> None:
        super().__init__(message, **context)
        self.field = field

    @property
    def kind(self) -> str:
        if self.status_code is None and self.__cause__ is None:
            return "invalid_request"
        return "upstream_rejected"


class LLMNotFoundError(LLMError):
    """404: no such model (or deployment)."""

    http_status = 400  # the caller named it
    kind = "upstream_rejected"
    reason = "not_found"


class LLMContextLengthError(LLMBadRequestError):
    """The prompt (plus max_tokens) exceeds the model's context window."""

    kind = "upstream_rejected"
    reason = "context_length"


class LLMContentFilterError(LLMBadRequestError):
    """The provider refused the request on content-policy grounds."""

    kind = "upstream_rejected"
    reason = "content_filter"


class LLMRateLimitError(LLMError):
    """429 (or a quota error): slow down; ``retry_after`` says for how long when known."""

    http_status = 429
    kind = "rate_limited"


class LLMTimeoutError(LLMError):
    """No answer within the timeout."""

    http_status = 504
    kind = "upstream_timeout"


class LLMConnectionError(LLMError):
    """The provider could not be reached, or the connection broke."""

    kind = "upstream_unreachable"


class LLMServerError(LLMError):
    """5xx (and Anthropic's 529 overloaded): the provider failed."""

    kind = "upstream_error"


class LLMResponseError(LLMError):
    """The provider answered, but the answer is malformed: bad JSON arguments, invalid structured output.

    ``raw_text`` keeps what the model sent.
    """

    kind = "upstream_error"

    def __init__(self, message: str, *, raw_text: str | None = None, **context: Any) -> None:
        super().__init__(message, **context)
        self.raw_text = raw_text


class LLMNotConfiguredError(LLMError):
    """The provider is unknown, or a setting it needs is missing (named in ``setting``)."""

    http_status = 503
    kind = "not_configured"

    def __init__(self, message: str, *, setting: str | None = None, **context: Any) -> None:
        super().__init__(message, **context)
        self.setting = setting


class LLMCircuitOpenError(LLMError):
    """The provider/model's circuit breaker is open: no request was made.

    ``retry_after`` is the time left until it admits trial calls.
    """

    http_status = 503
    kind = "circuit_open"


class LLMBulkheadFullError(LLMError):
    """Too many calls to this provider are in flight in this process; none was made."""

    http_status = 503
    kind = "bulkhead_full"


def error_for_status(status: int | None) -> type[LLMError]:
    """The error class for an HTTP status."""
    if status is None:
        return LLMError
    return {
        400: LLMBadRequestError,
        401: LLMAuthError,
        403: LLMPermissionError,
        404: LLMNotFoundError,
        408: LLMTimeoutError,
        413: LLMContextLengthError,
        422: LLMBadRequestError,
        429: LLMRateLimitError,
    }.get(status, LLMServerError if status >= 500 else LLMBadRequestError if status >= 400 else LLMError)


_CONTEXT_PATTERNS = re.compile(
    r"context[_ ]length|context window|maximum context|too many tokens|prompt is too long"
    r"|exceeds the maximum number of tokens|input token count.*exceeds|reduce the length",
    re.IGNORECASE,
)
_FILTER_PATTERNS = re.compile(r"content[_ ]?(filter|policy|management)|safety|responsible ai", re.IGNORECASE)


def refine_bad_request(cls: type[LLMError], code: str | None, message: str) -> type[LLMError]:
    """A 400 that is really a context-length or content-filter error, by its code or message."""
    if cls is not LLMBadRequestError:
        return cls
    text = f"{code or ''} {message}"
    if _CONTEXT_PATTERNS.search(text):
        return LLMContextLengthError
    if _FILTER_PATTERNS.search(text):
        return LLMContentFilterError
    return cls


def retry_after_from_headers(headers: Mapping[str, str] | None, now: float | None = None) -> float | None:
    """Seconds to wait, from ``retry-after-ms``, or ``retry-after`` in seconds or as an HTTP date."""
    if not headers:
        return None
    if isinstance(headers, dict):  # a plain dict is case-sensitive; HTTP header names are not
        headers = {str(name).lower(): value for name, value in headers.items()}
    millis = headers.get("retry-after-ms")
    if millis is not None:
        try:
            value = float(millis) / 1000
            if math.isfinite(value) and value >= 0:
                return value
        except ValueError:
            pass
    raw = headers.get("retry-after")
    if raw is None:
        return None
    raw = raw.strip()
    try:
        seconds = float(raw)
        return seconds if math.isfinite(seconds) and seconds >= 0 else None
    except ValueError:
        pass
    from email.utils import parsedate_to_datetime  # rarely needed: only for HTTP-date values

    try:
        when = parsedate_to_datetime(raw)
    except (TypeError, ValueError, IndexError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)s\s*$")


def retry_after_from_google_details(body: Any) -> float | None:
    """Seconds from a ``google.rpc.RetryInfo`` entry (``"retryDelay": "30s"``) in an error body."""
    error = body.get("error", body) if isinstance(body, Mapping) else None
    details = error.get("details") if isinstance(error, Mapping) else None
    if not isinstance(details, list):
        return None
    for detail in details:
        if isinstance(detail, Mapping) and str(detail.get("@type", "")).endswith("google.rpc.RetryInfo"):
            match = _DURATION.match(str(detail.get("retryDelay", "")))
            if match:
                return float(match.group(1))
    return None
