"""The policy around one call, in order: rate limit -> deadline -> retry -> breaker -> attempt.

:class:`Guards` holds one app's shared state (breakers and rate limits, in
Redis when configured; bulkheads per process). :meth:`Guards.call` runs a
non-streaming call (chat, embeddings) through the policy;
:meth:`Guards.stream` does the same for a stream, retrying only until the
first event has reached the caller. Both append an :class:`Attempt` per
try to the list they are given, so fallbacks can show the path taken.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Generator, Iterator
from dataclasses import dataclass
from typing import Any, Literal, TypeVar, cast

from app.llm.errors import LLMBulkheadFullError, LLMCircuitOpenError, LLMError, LLMTimeoutError
from app.llm.providers.base import ChatRequest, EmbedRequest, StreamEnd, StreamEvent
from app.llm.resilience.breaker import CircuitBreakers
from app.llm.resilience.bulkhead import Bulkheads
from app.llm.resilience.ratelimit import RateLimiter, Reservation, estimate_tokens
from app.llm.resilience.retry import is_retryable, next_delay
from app.llm.resilience.settings import ProviderPolicy, ResilienceSettings

logger = logging.getLogger(__name__)

T = TypeVar("T")
RequestT = TypeVar("RequestT", ChatRequest, EmbedRequest)


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


class Guards:
    """One app's resilience state and the loop that applies it."""

    falls_back = staticmethod(falls_back)

    def __init__(
        self,
        settings: ResilienceSettings,
        breakers: CircuitBreakers,
        limiter: RateLimiter,
        bulkheads: Bulkheads,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.settings = settings
        self.breakers = breakers
        self.limiter = limiter
        self.bulkheads = bulkheads
        self._clock = clock
        self._sleep = sleep

    # --- shared steps ----------------------------------------------------------

    def _outcome(self, error: LLMError) -> Literal["failure", "ignored"]:
        return "failure" if is_retryable(error) else "ignored"

    def _deadline_error(self, request: ChatRequest | EmbedRequest, policy: ProviderPolicy) -> LLMTimeoutError:
        return LLMTimeoutError(
            f"no answer within the call's deadline of {policy.retry.deadline:g} s (LLM_DEADLINE)",
            **request.context(),
        )

    def _attempt_timeout(self, policy: ProviderPolicy, remaining: float) -> float:
        limit = policy.retry.attempt_timeout
        return min(limit, remaining) if limit is not None else remaining

    def _give_up(
        self, error: LLMError, retry: int, policy: ProviderPolicy, deadline_at: float
    ) -> float | None:
        """The wait before the next retry, or None to raise ``error`` now."""
        if isinstance(error, LLMCircuitOpenError | LLMBulkheadFullError):
            return None
        delay = next_delay(error, retry, policy.retry)
        if delay is None or self._clock() + delay >= deadline_at:
            return None
        logger.info(
            "retrying %s/%s after %s in %.2f s (retry %d of %d)",
            error.provider, error.model, type(error).__name__, delay, retry + 1, policy.retry.max_retries,
        )  # fmt: skip
        return delay

    def _record(self, key: str, policy: ProviderPolicy, error: LLMError | None) -> None:
        if isinstance(error, LLMCircuitOpenError):
            return  # the breaker itself refused: nothing to report back to it
        if isinstance(error, LLMBulkheadFullError):
            # The breaker admitted the call (perhaps as a half-open trial) but the
            # provider was not asked: give the permit back without a verdict.
            self.breakers.record(key, policy.breaker, "ignored")
            return
        outcome: Literal["success", "failure", "ignored"] = (
            "success" if error is None else self._outcome(error)
        )
        self.breakers.record(key, policy.breaker, outcome)

    def _reserve(
        self,
        key: str,
        policy: ProviderPolicy,
        request: ChatRequest | EmbedRequest,
        tokens: Callable[[], int] | None,
    ) -> Reservation | None:
        """Take the call's place in the rate limits of ``key`` (nothing to do without one)."""
        limits = policy.limits
        if not limits.rpm and not limits.tpm:
            return None
        return self.limiter.acquire(
            key, limits, _tokens(request, tokens, limits.tpm), min(limits.max_wait, policy.retry.deadline)
        )

    async def _areserve(
        self,
        key: str,
        policy: ProviderPolicy,
        request: ChatRequest | EmbedRequest,
        tokens: Callable[[], int] | None,
    ) -> Reservation | None:
        """:meth:`_reserve` for async calls (a wait for the limit does not block the loop)."""
        limits = policy.limits
        if not limits.rpm and not limits.tpm:
            return None
        return await self.limiter.aacquire(
            key, limits, _tokens(request, tokens, limits.tpm), min(limits.max_wait, policy.retry.deadline)
        )

    # --- non-streaming calls ---------------------------------------------------

    def call(
        self,
        request: RequestT,
        invoke: Callable[[RequestT], T],
        typed: Callable[[BaseException], LLMError],
        *,
        usage: Callable[[T], int | None],
        attempts: list[Attempt],
        tokens: Callable[[], int] | None = None,
    ) -> T:
        """Run ``invoke`` (the adapter's call) under the policy; ``typed`` maps what it raises.

        ``tokens`` estimates the request's tokens for a TPM limit (default:
        :func:`estimate_tokens` of a chat request); it runs only when one is set.
        """
        key = f"{request.provider}/{request.model}"
        policy = self.settings.policy(request.provider, request.model)
        deadline_at = self._clock() + policy.retry.deadline
        reservation = self._reserve(key, policy, request, tokens)
        retry = 0
        while True:
            attempt_started = self._clock()
            remaining = deadline_at - attempt_started
            if remaining <= 0:
                raise self._deadline_error(request, policy)
            error: LLMError | None = None
            try:
                self.breakers.before_call(key, policy.breaker)
                with self.bulkheads.slot(
                    request.provider, policy.bulkhead, min(policy.bulkhead.max_wait, remaining)
                ):
                    result = invoke(_with_timeout(request, self._attempt_timeout(policy, remaining)))
            except LLMError as exc:
                error = exc
            except Exception as exc:
                error = _typed(typed, exc)
            elapsed = (self._clock() - attempt_started) * 1000
            if error is None:  # the healthy path, kept short: every call takes it
                self.breakers.record(key, policy.breaker, "success")
                attempts.append(Attempt(key, "ok", elapsed))
                if reservation is not None:
                    self.limiter.settle(reservation, usage(result))
                return result
            self._record(key, policy, error)
            attempts.append(Attempt(key, type(error).__name__, elapsed, error.status_code))
            delay = self._give_up(error, retry, policy, deadline_at)
            if delay is None:
                raise error
            self._sleep(delay)
            retry += 1

    async def acall(
        self,
        request: RequestT,
        invoke: Callable[[RequestT], Awaitable[T]],
        typed: Callable[[BaseException], LLMError],
        *,
        usage: Callable[[T], int | None],
        attempts: list[Attempt],
        tokens: Callable[[], int] | None = None,
    ) -> T:
        """The async twin of :meth:`call`."""
        key = f"{request.provider}/{request.model}"
        policy = self.settings.policy(request.provider, request.model)
        deadline_at = self._clock() + policy.retry.deadline
        reservation = await self._areserve(key, policy, request, tokens)
        retry = 0
        while True:
            attempt_started = self._clock()
            remaining = deadline_at - attempt_started
            if remaining <= 0:
                raise self._deadline_error(request, policy)
            error: LLMError | None = None
            try:
                self.breakers.before_call(key, policy.breaker)
                async with self.bulkheads.aslot(
                    request.provider, policy.bulkhead, min(policy.bulkhead.max_wait, remaining)
                ):
                    result = await invoke(_with_timeout(request, self._attempt_timeout(policy, remaining)))
            except LLMError as exc:
                error = exc
            except Exception as exc:
                error = _typed(typed, exc)
            elapsed = (self._clock() - attempt_started) * 1000
            if error is None:
                self.breakers.record(key, policy.breaker, "success")
                attempts.append(Attempt(key, "ok", elapsed))
                if reservation is not None:
                    await self.limiter.asettle(reservation, usage(result))
                return result
            self._record(key, policy, error)
            attempts.append(Attempt(key, type(error).__name__, elapsed, error.status_code))
            delay = self._give_up(error, retry, policy, deadline_at)
            if delay is None:
                raise error
            await _async_sleep(delay)
            retry += 1

    # --- streams ---------------------------------------------------------------

    def stream(
        self,
        request: ChatRequest,
        open_events: Callable[[ChatRequest], Iterator[StreamEvent]],
        typed: Callable[[BaseException], LLMError],
        *,
        attempts: list[Attempt],
        tokens: Callable[[], int] | None = None,
    ) -> Iterator[StreamEvent]:
        """Open the stream with retries, then hand its events on; no retry after the first one."""
        key = f"{request.provider}/{request.model}"
        policy = self.settings.policy(request.provider, request.model)
        deadline_at = self._clock() + policy.retry.deadline
        reservation = self._reserve(key, policy, request, tokens)
        retry = 0
        while True:
            attempt_started = self._clock()
            remaining = deadline_at - attempt_started
            if remaining <= 0:
                raise self._deadline_error(request, policy)
            slot = self.bulkheads.slot(
                request.provider, policy.bulkhead, min(policy.bulkhead.max_wait, remaining)
            )
            events: Iterator[StreamEvent] | None = None
            try:
                self.breakers.before_call(key, policy.breaker)
                slot.__enter__()
            except LLMError as exc:
                error: LLMError = exc
            else:
                try:
                    events = open_events(_with_timeout(request, self._attempt_timeout(policy, remaining)))
                    first = next(events, None)
                except Exception as exc:
                    error = _typed(typed, exc)
                    _close(events)
                    slot.__exit__(None, None, None)
                except BaseException:  # interrupted (a gevent Timeout, KeyboardInterrupt): give all back
                    _close(events)
                    slot.__exit__(None, None, None)
                    self.breakers.record(key, policy.breaker, "ignored")
                    raise
                else:
                    attempts.append(Attempt(key, "ok", (self._clock() - attempt_started) * 1000))
                    relay = self._relay(key, policy, reservation, first, events, slot, typed)
                    # Run it to its first (empty) yield, inside its try: from now on, closing it
                    # before reading (or dropping it) still frees the slot and closes upstream.
                    next(relay)
                    return cast(Iterator[StreamEvent], relay)
            self._record(key, policy, error)
            attempts.append(
                Attempt(
                    key, type(error).__name__, (self._clock() - attempt_started) * 1000, error.status_code
                )
            )
            delay = self._give_up(error, retry, policy, deadline_at)
            if delay is None:
                raise error
            self._sleep(delay)
            retry += 1

    def _relay(
        self,
        key: str,
        policy: ProviderPolicy,
        reservation: Reservation | None,
        first: StreamEvent | None,
        events: Iterator[StreamEvent],
        slot: Any,
        typed: Callable[[BaseException], LLMError],
    ) -> Generator[StreamEvent | None, None, None]:
        """The events of an open stream; its first ``None`` is taken by :meth:`stream` itself."""
        used: int | None = None
        error: LLMError | None = None
        finished = False
        try:
            yield None
            if first is not None:
                used = _usage(first, used)
                yield first
                for event in events:
                    used = _usage(event, used)
                    yield event
            finished = True
        except LLMError as exc:
            error = exc
            raise
        except Exception as exc:
            error = _typed(typed, exc)
            raise error from exc
        finally:
            _close(events)
            slot.__exit__(None, None, None)
            if error is not None or finished:
                self._record(key, policy, error)
            else:  # closed early by the caller: no verdict on the provider
                self.breakers.record(key, policy.breaker, "ignored")
            if finished:
                self.limiter.settle(reservation, used)

    async def astream(
        self,
        request: ChatRequest,
        open_events: Callable[[ChatRequest], AsyncIterator[StreamEvent]],
        typed: Callable[[BaseException], LLMError],
        *,
        attempts: list[Attempt],
        tokens: Callable[[], int] | None = None,
    ) -> AsyncGenerator[StreamEvent, None]:
        """The async twin of :meth:`stream`: retries until the first event, then relays."""
        key = f"{request.provider}/{request.model}"
        policy = self.settings.policy(request.provider, request.model)
        deadline_at = self._clock() + policy.retry.deadline  # the rate-limit wait counts, as in stream()
        reservation = await self._areserve(key, policy, request, tokens)
        first, events, slot = await self._aopen(
            key, policy, request, open_events, typed, attempts, deadline_at
        )
        used: int | None = None
        failure: LLMError | None = None
        finished = False
        try:
            if first is not None:
                used = _usage(first, used)
                yield first
                async for event in events:
                    used = _usage(event, used)
                    yield event
            finished = True
        except LLMError as exc:
            failure = exc
            raise
        except Exception as exc:
            failure = _typed(typed, exc)
            raise failure from exc
        finally:
            await _aclose(events)
            await slot.__aexit__(None, None, None)
            if failure is not None or finished:
                self._record(key, policy, failure)
            else:  # closed early by the caller: no verdict on the provider
                self.breakers.record(key, policy.breaker, "ignored")
            if finished:
                await self.limiter.asettle(reservation, used)

    async def _aopen(
        self,
        key: str,
        policy: ProviderPolicy,
        request: ChatRequest,
        open_events: Callable[[ChatRequest], AsyncIterator[StreamEvent]],
        typed: Callable[[BaseException], LLMError],
        attempts: list[Attempt],
        deadline_at: float,
    ) -> tuple[StreamEvent | None, AsyncIterator[StreamEvent], Any]:
        """Open the stream and read its first event, retrying as the policy allows."""
        retry = 0
        while True:
            attempt_started = self._clock()
            remaining = deadline_at - attempt_started
            if remaining <= 0:
                raise self._deadline_error(request, policy)
            slot = self.bulkheads.aslot(
                request.provider, policy.bulkhead, min(policy.bulkhead.max_wait, remaining)
            )
            events: AsyncIterator[StreamEvent] | None = None
            try:
                self.breakers.before_call(key, policy.breaker)
                await slot.__aenter__()
            except LLMError as exc:
                error: LLMError = exc
            else:
                try:
                    events = open_events(_with_timeout(request, self._attempt_timeout(policy, remaining)))
                    first: StreamEvent | None = await anext(events, None)
                except Exception as exc:
                    error = _typed(typed, exc)
                    await _aclose(events)
                    await slot.__aexit__(None, None, None)
                except BaseException:  # cancelled while waiting for the first event: give all back
                    await slot.__aexit__(None, None, None)
                    self.breakers.record(key, policy.breaker, "ignored")
                    await _aclose(events)
                    raise
                else:
                    attempts.append(Attempt(key, "ok", (self._clock() - attempt_started) * 1000))
                    return first, events, slot
            self._record(key, policy, error)
            attempts.append(
                Attempt(
                    key, type(error).__name__, (self._clock() - attempt_started) * 1000, error.status_code
                )
            )
            delay = self._give_up(error, retry, policy, deadline_at)
            if delay is None:
                raise error
            await _async_sleep(delay)
            retry += 1


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


async def _async_sleep(seconds: float) -> None:
    import asyncio  # only async callers pay for it

    await asyncio.sleep(seconds)


def _typed(typed: Callable[[BaseException], LLMError], exc: BaseException) -> LLMError:
    """The typed error for ``exc``, with ``exc`` as its cause (as ``raise ... from exc`` would set)."""
    error = typed(exc)
    if error is not exc and error.__cause__ is None:
        error.__cause__ = exc
    return error


def _usage(event: StreamEvent, used: int | None) -> int | None:
    if isinstance(event, StreamEnd) and event.total_tokens is not None:
        return event.total_tokens
    if isinstance(event, StreamEnd) and event.input_tokens is not None and event.output_tokens is not None:
        return event.input_tokens + event.output_tokens
    return used


def _close(events: Any) -> None:
    close = getattr(events, "close", None)
    if close is not None:
        close()


async def _aclose(events: Any) -> None:
    aclose = getattr(events, "aclose", None)
    if aclose is not None:
        await aclose()


__all__ = ["Attempt", "Guards", "falls_back"]
