"""The policy around one model's call, in order: rate limit -> deadline -> retry -> breaker -> attempt.

:class:`Guards` holds one app's shared state (breakers and rate limits, in
Redis when configured; bulkheads per process) and writes the policy once, as
one flow (see :mod:`app.llm.resilience.steps`), :meth:`Guards.attempt_flow`,
for a call that answers at once (chat, embeddings) and for a stream, which is
retried only until its first event has arrived. The sync and async drivers run
the same flow, so they decide the same way.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from app.llm.errors import (
    LLMBulkheadFullError,
    LLMCircuitOpenError,
    LLMError,
    LLMRateLimitError,
    LLMTimeoutError,
)
from app.llm.providers.base import ChatRequest, EmbedRequest, StreamEnd, StreamEvent
from app.llm.resilience.breaker import CircuitBreakers
from app.llm.resilience.bulkhead import Bulkheads, Slot
from app.llm.resilience.ratelimit import RateLimiter, Reservation, estimate_tokens
from app.llm.resilience.retry import is_retryable, next_delay
from app.llm.resilience.settings import ProviderPolicy, ResilienceSettings
from app.llm.resilience.steps import Flow, Step, blocking, sleep

logger = logging.getLogger(__name__)

T = TypeVar("T")
RequestT = TypeVar("RequestT", ChatRequest, EmbedRequest)
Outcome = Literal["success", "failure", "ignored"]


@dataclass(frozen=True)
class Attempt:
    """One try at one model: ``outcome`` is ``"ok"`` or the error's class name."""

    model: str
    outcome: str
    latency_ms: float
    status_code: int | None = None


def falls_back(error: LLMError) -> bool:
    """Whether the next model of a fallback chain should be tried after ``error``."""
    from app.llm.errors import LLMContextLengthError

    return isinstance(error, LLMCircuitOpenError | LLMContextLengthError) or is_retryable(error)


class Admission:
    """What an open stream holds until it ends: its bulkhead slot, breaker verdict and reservation."""

    __slots__ = ("_done", "guards", "key", "own_key", "policy", "reservation", "slot")

    def __init__(
        self,
        guards: Guards,
        key: str,
        policy: ProviderPolicy,
        reservation: Reservation | None,
        slot: Slot,
        own_key: bool = False,
    ) -> None:
        self.guards = guards
        self.key = key
        self.policy = policy
        self.reservation = reservation
        self.slot = slot
        self.own_key = own_key
        self._done = False

    def end(self, error: LLMError | None, used_tokens: int | None) -> Step | None:
        """The stream ended, by itself (``error`` None) or with ``error``; a step left to run, if any."""
        if self._done:
            return None
        self._done = True
        self.slot.release()
        self.guards.record(self.key, self.policy, error, own_key=self.own_key)
        return self.guards.settle(self.reservation, used_tokens) if error is None else None

    def cancel(self) -> None:
        """Closed early by the caller: no verdict on the provider (and never blocks: ``__del__`` calls it)."""
        if not self._done:
            self._done = True
            self.slot.release()
            self.guards.breakers.record(self.key, self.policy.breaker, "ignored")


class Guards:
    """One app's resilience state and the flows that apply it."""

    falls_back = staticmethod(falls_back)

    def __init__(
        self,
        settings: ResilienceSettings,
        breakers: CircuitBreakers,
        limiter: RateLimiter,
        bulkheads: Bulkheads,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.breakers = breakers
        self.limiter = limiter
        self.bulkheads = bulkheads
        self._clock = clock

    # --- the two flows ---------------------------------------------------------

    def attempt_flow(
        self,
        request: RequestT,
        send: Callable[[RequestT], Step],
        typed: Callable[[BaseException], LLMError],
        attempts: list[Attempt],
        *,
        usage: Callable[[Any], int | None] | None = None,
        tokens: Callable[[], int] | None = None,
    ) -> Flow[Any]:
        """One model's call under the policy: retried until an attempt succeeds or the policy gives up.

        ``send(request)`` is the step that asks the provider. A call that answers at
        once (``usage`` given: the tokens of its result) gives its slot back and
        answers the result. A stream (``send`` answers ``(events, first event)``)
        keeps its slot, and answers ``(events, first, admission)``: it holds the
        :class:`Admission` until it ends. ``tokens`` estimates the request for a TPM limit.
        """
        key = f"{request.provider}/{request.model}"
        policy = self.settings.policy(request.provider, request.model)
        deadline_at = self._clock() + policy.retry.deadline  # the wait for the rate limit counts
        limits = policy.limits
        reservation: Reservation | None = None
        if limits.rpm or limits.tpm:
            reservation = yield from self.limiter.acquire_flow(
                key, limits, _tokens(request, tokens, limits.tpm), min(limits.max_wait, policy.retry.deadline)
            )
        retry = 0
        while True:
            started = self._clock()
            remaining = self._remaining(request, policy, deadline_at, started)
            slot: Slot | None = None
            try:
                self.breakers.before_call(key, policy.breaker)
                slot = self.bulkheads.slot(
                    request.provider, policy.bulkhead, min(policy.bulkhead.max_wait, remaining)
                )
                if not slot.try_take():
                    yield from self._wait_for(slot, key, policy)
                result = yield send(_with_timeout(request, self._attempt_timeout(policy, remaining)))
            except Exception as exc:
                error = _typed(typed, exc)
            except BaseException:  # interrupted (cancelled, a gevent Timeout): give all back
                self._interrupted(key, policy, slot)
                raise
            else:
                attempts.append(Attempt(key, "ok", (self._clock() - started) * 1000))
                if usage is None:
                    events, first = result
                    own_key = request.api_key is not None
                    return events, first, Admission(self, key, policy, reservation, slot, own_key)
                slot.release()  # the healthy path, kept short: every call takes it
                self.breakers.record(key, policy.breaker, "success")
                if reservation is not None:
                    step = self.settle(reservation, usage(result))
                    if step is not None:
                        yield step
                return result
            if slot is not None:
                slot.release()
            delay = self._failed(request, key, policy, error, started, attempts, retry, deadline_at)
            yield sleep(delay)
            retry += 1

    # --- shared steps ----------------------------------------------------------

    def _wait_for(self, slot: Slot, key: str, policy: ProviderPolicy) -> Flow[None]:
        """Wait for a bulkhead slot; when none comes, give the breaker's permit back."""
        try:
            yield slot.wait()
        except LLMBulkheadFullError:
            # The breaker admitted the call (perhaps as a half-open trial) but the
            # provider was not asked: give the permit back without a verdict.
            self.breakers.record(key, policy.breaker, "ignored")
            raise

    @staticmethod
    def _remaining(
        request: ChatRequest | EmbedRequest, policy: ProviderPolicy, deadline_at: float, now: float
    ) -> float:
        """Seconds left of the call's deadline; past it, the call ends (no verdict on the provider)."""
        remaining = deadline_at - now
        if remaining <= 0:
            raise LLMTimeoutError(
                f"no answer within the call's deadline of {policy.retry.deadline:g} s (LLM_DEADLINE)",
                **request.context(),
            )
        return remaining

    def _failed(
        self,
        request: ChatRequest | EmbedRequest,
        key: str,
        policy: ProviderPolicy,
        error: LLMError,
        started: float,
        attempts: list[Attempt],
        retry: int,
        deadline_at: float,
    ) -> float:
        """Record a failed attempt; the wait before the next one, or raise ``error`` now."""
        if not isinstance(error, LLMBulkheadFullError):  # already given back in _wait_for
            self.record(key, policy, error, own_key=request.api_key is not None)
        attempts.append(
            Attempt(key, type(error).__name__, (self._clock() - started) * 1000, error.status_code)
        )
        if isinstance(error, LLMCircuitOpenError | LLMBulkheadFullError):
            raise error
        delay = next_delay(error, retry, policy.retry)
        if delay is None or self._clock() + delay >= deadline_at:
            raise error
        logger.info(
            "retrying %s/%s after %s in %.2f s (retry %d of %d)",
            error.provider, error.model, type(error).__name__, delay, retry + 1, policy.retry.max_retries,
        )  # fmt: skip
        return delay

    def _interrupted(self, key: str, policy: ProviderPolicy, slot: Slot | None) -> None:
        if slot is not None:
            slot.release()
            self.breakers.record(key, policy.breaker, "ignored")

    def record(
        self, key: str, policy: ProviderPolicy, error: LLMError | None, *, own_key: bool = False
    ) -> None:
        """Tell the breaker how the provider did (our own refusals are no verdict on it).

        With a caller's own key (``own_key``), a 429 is that key's quota running out,
        not the provider failing: it counts nothing, so one tenant's exhausted quota
        cannot open the breaker every other tenant's calls go through.
        """
        if isinstance(error, LLMCircuitOpenError):
            return  # the breaker itself refused: nothing to report back to it
        outcome: Outcome
        if error is None:
            outcome = "success"
        elif own_key and isinstance(error, LLMRateLimitError):
            outcome = "ignored"
        else:
            outcome = "failure" if is_retryable(error) else "ignored"
        self.breakers.record(key, policy.breaker, outcome)

    def settle(self, reservation: Reservation | None, used_tokens: int | None) -> Step | None:
        """The step that corrects the TPM window by the tokens really used, when one must."""
        if (
            reservation is not None
            and reservation.tpm
            and used_tokens is not None
            and used_tokens > reservation.tokens
        ):
            return blocking(lambda: self.limiter.settle(reservation, used_tokens))
        return None

    @staticmethod
    def _attempt_timeout(policy: ProviderPolicy, remaining: float) -> float:
        limit = policy.retry.attempt_timeout
        return min(limit, remaining) if limit is not None else remaining


def _with_timeout(request: RequestT, timeout: float) -> RequestT:
    """``request`` with this attempt's timeout: the shallow copy dataclasses.replace would
    make, without re-running ``__init__`` (nor copy.copy's pickle protocol) on every attempt."""
    attempt = object.__new__(type(request))
    fields = attempt.__dict__
    fields.update(request.__dict__)
    fields["timeout"] = timeout
    return attempt


def _tokens(request: ChatRequest | EmbedRequest, tokens: Callable[[], int] | None, tpm: int | None) -> int:
    """The tokens a TPM limit is charged up front (0 without one): ``tokens()``, else the estimate."""
    if not tpm:
        return 0
    if tokens is not None:
        return tokens()
    assert isinstance(request, ChatRequest), "an embedding call passes its own token count"
    return estimate_tokens(request)


def _typed(typed: Callable[[BaseException], LLMError], exc: BaseException) -> LLMError:
    """The typed error for ``exc``, with ``exc`` as its cause (as ``raise ... from exc`` would set)."""
    if isinstance(exc, LLMError):
        return exc
    error = typed(exc)
    if error is not exc and error.__cause__ is None:
        error.__cause__ = exc
    return error


def event_tokens(event: StreamEvent, used: int | None) -> int | None:
    """The tokens a stream has used so far, updated by ``event`` (its end carries the usage)."""
    if isinstance(event, StreamEnd):
        if event.total_tokens is not None:
            return event.total_tokens
        if event.input_tokens is not None and event.output_tokens is not None:
            return event.input_tokens + event.output_tokens
    return used


__all__ = ["Admission", "Attempt", "Guards", "event_tokens", "falls_back"]
