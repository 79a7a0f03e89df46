"""Which failures are worth another attempt, and how long to wait before it.

One retry loop for every provider (the SDKs' own retries are off beneath it):
connection errors, timeouts, 408, 409, 429, 500-504 and 529 are retried;
every other 4xx is not. Waits are exponential with full jitter, capped, and a
server-requested delay (``retry_after``) is honoured when it is within
``retry_after_max``; a longer one ends the call at once, with the delay on the
error so the caller can come back later.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from app.llm.errors import (
    LLMBulkheadFullError,
    LLMCircuitOpenError,
    LLMConnectionError,
    LLMError,
    LLMRateLimitError,
    LLMServerError,
    LLMTimeoutError,
)
from app.llm.resilience.settings import RetryPolicy

RETRYABLE_STATUS = frozenset({408, 409, 429, 500, 501, 502, 503, 504, 529})
#: The largest exponent of the backoff that is computed; beyond it the delay is at its cap.
_MAX_EXPONENT = 1000


def is_retryable(error: LLMError) -> bool:
    """Whether another attempt may succeed (and so whether the failure counts for a breaker)."""
    if isinstance(error, LLMCircuitOpenError | LLMBulkheadFullError):
        return False  # raised by our own guards, before any request
    if isinstance(error, LLMTimeoutError | LLMConnectionError):
        return True
    if error.status_code is not None:
        return error.status_code in RETRYABLE_STATUS
    # Errors that arrive inside a stream carry no HTTP status (overloaded, rate limited).
    return isinstance(error, LLMServerError | LLMRateLimitError)


def backoff_delay(retry: int, policy: RetryPolicy, rng: Callable[[], float] = random.random) -> float:
    """Full jitter: a random wait in ``[0, min(backoff_max, backoff_base * 2**retry)]``."""
    # 2.0**1024 overflows (OverflowError); long before that the cap applies anyway.
    return min(policy.backoff_max, policy.backoff_base * (2.0 ** min(retry, _MAX_EXPONENT))) * rng()


def next_delay(
    error: LLMError, retry: int, policy: RetryPolicy, rng: Callable[[], float] = random.random
) -> float | None:
    """Seconds to wait before retry number ``retry`` (0-based), or None to give up now.

    Giving up: the error is not retryable, the retries are spent, or the
    server asked for a delay longer than ``retry_after_max``.
    """
    if not is_retryable(error) or retry >= policy.max_retries:
        return None
    if error.retry_after is not None:
        if error.retry_after > policy.retry_after_max:
            return None
        return error.retry_after
    return backoff_delay(retry, policy, rng)
