"""Typed errors for every provider: what a view needs to decide, nothing it must parse.

Everything the LLM layer raises is an :class:`LLMError` carrying ``provider``,
``model``, ``status_code`` and ``retry_after`` (seconds, from
``retry-after-ms``, ``Retry-After`` in seconds or as a date, or Gemini's
``RetryInfo``), with the SDK's exception chained as ``__cause__``. Messages
pass through :func:`app.redaction.redact`, so they never carry a key; the
adapters scrub the SDK's exception too before it is chained (:func:`sdk_errors`),
so no traceback of the chain shows one either.
An error about a request names the URL it was sent to in ``url`` and in
``str(error)`` (credentials masked), but not in ``message``, which ``/api``
may show to its callers.

Each class also says what it means over HTTP, so a view answers by lookup
rather than by testing classes: ``http_status`` (the status ``/api`` answers
with), ``kind`` (the stable ``error.type`` of its JSON body) and, for a
request the provider refused, ``reason``. An :class:`LLMBadRequestError` the
layer raised itself names the offending parameter in ``field``.
"""

from __future__ import annotations

import functools
import math
import re
import time
import traceback
from collections.abc import Callable, Mapping
from decimal import Decimal
from typing import Any, ClassVar

from app.redaction import redact, redact_url, scrub_exception


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
        url: str | None = None,
    ) -> None:
        self.message = redact(message)
        self.provider = provider
        self.model = model
        self.status_code = status_code
        self.retry_after = retry_after
        #: The URL the failed request went to, credentials masked (None: no request, or unknown).
        self.url = redact(redact_url(url)) if url else None
        where = f"{provider}/{model}" if provider and model else provider or model
        text = f"{where}: {self.message}" if where else self.message
        super().__init__(f"{text} ({self.url})" if self.url else text)

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


class LLMBudgetExceededError(LLMError):
    """A budget (``LLM_BUDGETS``) has no room for this call: refused before any request.

    ``budget`` names it (``user:alice``, ``tenant:acme``, ``global``), ``window`` says
    which of its limits (``daily`` or ``monthly``), and ``retry_after`` is the time
    until that window resets (or a second, when only calls in flight hold the room).
    """

    http_status = 429
    kind = "budget_exceeded"

    def __init__(
        self,
        message: str,
        *,
        budget: str,
        window: str | None = None,
        limit_usd: Decimal | None = None,
        **context: Any,
    ) -> None:
        super().__init__(message, **context)
        self.budget = budget
        self.window = window
        self.limit_usd = limit_usd


class LLMMaxRoundsError(LLMError):
    """``run()``: the model still asked for tools after ``max_rounds`` rounds, and gave no answer.

    ``messages`` keeps the whole transcript (the caller's messages, then each round's
    assistant message and tool results; the last round's tool calls were not run),
    ``rounds`` how many rounds ran, and ``response`` the last round's answer with the
    usage (and cost) summed over every round. A bad gateway: the model, not the caller,
    failed to finish.
    """

    kind = "max_rounds_exceeded"

    def __init__(
        self,
        message: str,
        *,
        messages: list[dict[str, Any]] | None = None,
        rounds: int = 0,
        response: Any = None,
        **context: Any,
    ) -> None:
        super().__init__(message, **context)
        self.messages = messages if messages is not None else []
        self.rounds = rounds
        self.response = response


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


def upstream_url(exc: BaseException) -> str | None:
    """The URL of the request ``exc`` is about (an SDK error's ``request``, or its response's), masked."""
    for holder in (exc, getattr(exc, "response", None)):
        try:
            request = getattr(holder, "request", None)
        except RuntimeError:  # httpx's Response.request when the response has none
            request = None
        url = getattr(request, "url", None)
        if url is not None:
            return redact_url(str(url))
    return None


class RedactedCause(Exception):
    """Stands in, as ``__cause__``, for an SDK exception whose text still shows a secret once scrubbed.

    Some exceptions format themselves from data out of reach (a pydantic
    ``ValidationError`` quotes the input it refused): the chain then holds
    this redacted copy, with the original's type name, message and
    traceback, instead of the exception itself.
    """

    def __init__(self, exc: BaseException) -> None:
        #: The dotted name of the exception this stands for.
        self.original_type = f"{type(exc).__module__}.{type(exc).__qualname__}"
        super().__init__(f"{self.original_type}: {redact(str(exc))}")


def safe_cause(exc: BaseException, _seen: set[int] | None = None) -> BaseException:
    """``exc`` scrubbed in place, or a :class:`RedactedCause` when its message would still show a secret.

    The exceptions chained to it are made safe the same way (and relinked), so
    that no link of what a traceback prints shows a secret; its frames show
    code, never values.
    """
    seen = _seen if _seen is not None else set()
    seen.add(id(exc))
    scrub_exception(exc)
    for link in ("__cause__", "__context__"):
        linked = getattr(exc, link)
        if linked is not None and id(linked) not in seen:
            setattr(exc, link, safe_cause(linked, seen))
    shown = "".join(traceback.format_exception_only(exc))
    if redact(shown) == shown:
        return exc
    stand_in = RedactedCause(exc).with_traceback(exc.__traceback__)
    stand_in.__cause__ = exc.__cause__
    if exc.__cause__ is None and not exc.__suppress_context__:
        stand_in.__context__ = exc.__context__
    return stand_in


MapError = Callable[[Any, BaseException, dict[str, Any]], "LLMError"]


def sdk_errors(map_error: MapError) -> MapError:
    """Decorates an adapter's ``map_error``: the URL the request went to, and a chain without secrets.

    The typed error gets ``url`` (credentials masked) and, as ``__cause__``,
    the SDK's exception scrubbed of every known secret (or a redacted copy of
    it, see :func:`safe_cause`): the provider may echo a key in an error
    message, and the layer keeps that exception for debugging.
    """

    @functools.wraps(map_error)
    def mapped(self: Any, exc: BaseException, context: dict[str, Any]) -> LLMError:
        cause = safe_cause(exc)
        error = map_error(self, exc, {**context, "url": upstream_url(exc)})
        if error is not exc and error.__cause__ is None:
            error.__cause__ = cause
        return error

    return mapped


class MalformedChunkError(Exception):
    """An adapter's signal that an upstream stream sent a chunk it cannot read (not a JSON object).

    Raised from a stream reader, like :class:`IncompleteStreamError`, so that ``map_error`` adds
    provider, model and URL and maps it to an :class:`LLMResponseError`.
    """


class IncompleteStreamError(Exception):
    """An adapter's signal that an upstream stream ended without its end marker.

    The adapters raise it from their stream readers (so that it goes through
    ``map_error``, which adds provider, model and URL) and map it to an
    :class:`LLMResponseError`: a stream that stops early, or whose body is not
    an event stream at all, is a broken answer, never a finished one.
    """

    def __init__(self, marker: str, response: Any = None) -> None:
        message = f"the stream ended without its end marker ({marker})"
        if response is not None:  # the HTTP response, when the SDK shows it: what came, and from where
            kind = str(response.headers.get("content-type") or "").split(";")[0].strip().lower()
            if kind != "text/event-stream":
                message += f"; the body was {kind or 'of no content type'}, not text/event-stream"
            #: The request, so that the typed error names its URL (see :func:`upstream_url`).
            self.request = getattr(response, "request", None)
        super().__init__(message)
