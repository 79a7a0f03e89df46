"""One logical call, written once: hooks around the fallback chain around the policy.

Each public method of :class:`~app.llm.client.LLM` builds an
:class:`~app.llm.hooks.LLMCall` and runs one of the flows below with
:func:`~app.llm.resilience.steps.run_sync` or
:func:`~app.llm.resilience.steps.run_async`. Nothing here waits or does
I/O itself; the sync and async drivers make the same decisions.

Order: ``before_call`` hooks (which may answer or refuse the call) -> each
model of the fallback chain, through :class:`~app.llm.resilience.executor.Guards`
-> ``after_call`` or ``on_error`` hooks. A stream's end, break or early close
is handled by :class:`~app.llm.streaming.StreamRelay`.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Iterator
from functools import partial
from typing import TYPE_CHECKING, Any

from app.llm.errors import LLMError
from app.llm.hooks import EmbedResponse, HookChain, LLMCall
from app.llm.providers.base import ChatRequest, EmbedRequest, Provider, StreamEvent
from app.llm.resilience.executor import Attempt, Guards
from app.llm.resilience.steps import Flow, Step
from app.llm.streaming import OpenStream, StreamRelay, response_events
from app.llm.structured import parse_structured
from app.llm.types import ChatResponse

if TYPE_CHECKING:
    from collections.abc import Sequence
    from decimal import Decimal

#: Builds the request for one model of the chain (validating it), or raises LLMError.
Build = Callable[[str], tuple[Provider, Any]]
#: The flow of one model's call under the policy, given its provider and request.
Attempt_ = Callable[[Provider, Any, Callable[[BaseException], LLMError]], Flow[Any]]
#: The step that asks a provider (sync and async twins) for one request.
Send = Callable[[Provider, Any], Step]
#: Maps an exception a provider raised to its typed error.
Mapper = Callable[[BaseException], LLMError]
TypedFor = Callable[[Provider, Any], Callable[[BaseException], LLMError]]
#: What an answer of ``provider``/``model`` cost, in USD, or None when unknown.
Price = Callable[[str, str, ChatResponse], "Decimal | None"]


class Pipeline:
    """The flows of one app's calls: its hooks, its guards, its error mapping."""

    def __init__(
        self, hooks: HookChain, guards: Callable[[], Guards], typed_for: TypedFor, price: Price | None = None
    ) -> None:
        self.hooks = hooks
        self._guards = guards
        self._typed_for = typed_for
        #: What an answer cost (the model catalogue's ``cost``); None: costs stay unknown.
        self._price = price

    # --- the three kinds of call ---------------------------------------------------

    def chat(self, call: LLMCall, chain: Sequence[str], build: Build) -> Flow[ChatResponse]:
        attempt = self._through_policy(call, _send_chat, usage=response_tokens)
        return self._answer(call, chain, build, attempt, partial(_finish_chat, price=self._price))

    def embed(self, call: LLMCall, build: Build) -> Flow[EmbedResponse]:
        inputs = call.request.inputs if isinstance(call.request, EmbedRequest) else []
        attempt = self._through_policy(
            call,
            _send_embed,
            usage=lambda _vectors: None,
            tokens=lambda: sum(len(text) for text in inputs) // 4 + 1,
        )
        return self._answer(call, [f"{call.provider}/{call.model}"], build, attempt, _finish_embed)

    def open_stream(self, call: LLMCall, chain: Sequence[str], build: Build) -> Flow[StreamRelay]:
        """Open a stream (retries and fallbacks happen here, before any text reaches the caller)."""
        try:
            preset = yield from self.hooks.before(call)
            if isinstance(preset, ChatResponse):
                opened = OpenStream(None, response_events(preset), None, preset)
                typed = self._typed_for(*build(chain[0]))
            else:
                provider, request, (events, first, admission) = yield from self._chain(
                    call, chain, build, self._through_policy(call, _send_open)
                )
                call.first_delta_at = time.perf_counter()
                opened = OpenStream(events, [first] if first is not None else [], admission)
                typed = self._typed_for(provider, request)
        except LLMError as error:
            yield from self.hooks.error(call, error)
            raise
        return StreamRelay(call, self.hooks, opened, typed, _close_step, price=self._price)

    def media(
        self,
        call: LLMCall,
        build: Build,
        send: Send,
        *,
        settle: bool = True,
        finish: Callable[[LLMCall, Any], Any] | None = None,
        typed: Callable[[Mapper], Mapper] | None = None,
    ) -> Flow[Any]:
        """An image call, or a video's submit (``settle=False``: its end is reported by :meth:`settle`,
        when the job ends). ``finish`` completes a provider's answer (latency, attempts); ``typed``
        wraps the error mapping (a submit whose outcome is unknown is not repeated)."""
        policy = self._through_policy(call, send, usage=lambda _answer: None, tokens=lambda: 0)
        attempt = policy if typed is None else lambda p, r, t: policy(p, r, typed(t))
        try:
            answer = yield from self.hooks.before(call)
            if answer is None:
                _provider, _request, answer = yield from self._chain(
                    call, [f"{call.provider}/{call.model}"], build, attempt
                )
                answer = finish(call, answer) if finish is not None else answer
        except LLMError as error:
            yield from self.hooks.error(call, error)
            raise
        if settle:
            yield from self.hooks.after(call, answer)
        return answer

    def settle(self, call: LLMCall, outcome: Any) -> Flow[None]:
        """How a call reported apart from its request ended (a video job): after_call, or on_error."""
        if isinstance(outcome, LLMError):
            yield from self.hooks.error(call, outcome)
        else:
            yield from self.hooks.after(call, outcome)

    # --- shared ----------------------------------------------------------------------

    def _through_policy(self, call: LLMCall, send: Send, **options: Any) -> Attempt_:
        """One model's call of ``call`` under the guards' policy (``options``: usage, tokens)."""

        def attempt(provider: Provider, request: Any, typed: Callable[..., LLMError]) -> Flow[Any]:
            return self._guards().attempt_flow(
                request, partial(send, provider), typed, call.attempts, **options
            )

        return attempt

    def _answer(
        self,
        call: LLMCall,
        chain: Sequence[str],
        build: Build,
        attempt: Attempt_,
        finish: Callable[[LLMCall, Any], Any],
    ) -> Flow[Any]:
        """Hooks around the chain, for a call that answers at once."""
        try:
            answer = yield from self.hooks.before(call)
            if answer is None:
                _provider, _request, answer = yield from self._chain(call, chain, build, attempt)
            answer = finish(call, answer)
        except LLMError as error:
            yield from self.hooks.error(call, error)
            raise
        yield from self.hooks.after(call, answer)
        return answer

    def _chain(
        self, call: LLMCall, chain: Sequence[str], build: Build, attempt: Attempt_
    ) -> Flow[tuple[Provider, Any, Any]]:
        """Each model of the fallback chain in turn, until one answers (each at most once).

        The primary's own invalid request is the caller's error and is raised; a
        fallback that cannot be used (unknown or unconfigured provider) is
        skipped and shown in ``attempts``, and when it was the last hope, the
        previous model's error is raised.
        """
        last_error: LLMError | None = None
        for index, address in enumerate(chain):
            try:
                provider, request = build(address)
            except LLMError as unusable:
                if index == 0 or last_error is None:
                    raise
                call.attempts.append(Attempt(address, type(unusable).__name__, 0.0))
                if index + 1 == len(chain):
                    raise last_error from None
                continue
            call.provider, call.model, call.request = request.provider, request.model, request
            try:
                result = yield from attempt(provider, request, self._typed_for(provider, request))
            except LLMError as error:
                error.attempts = call.attempts  # type: ignore[attr-defined]
                if index + 1 < len(chain) and Guards.falls_back(error):
                    last_error = error
                    continue
                raise
            return provider, request, result
        raise AssertionError("unreachable: the chain is never empty")


def _send_chat(provider: Provider, request: ChatRequest) -> Step:
    return Step(lambda: provider.chat(request), lambda: provider.achat(request))


def _send_embed(provider: Provider, request: EmbedRequest) -> Step:
    return Step(lambda: provider.embed(request), lambda: provider.aembed(request))


def _send_open(provider: Provider, request: ChatRequest) -> Step:
    """Open a stream and read its first event: answers ``(events, first)``."""
    return Step(lambda: _open(provider, request), lambda: _aopen(provider, request))


def _finish_embed(call: LLMCall, vectors: Any) -> EmbedResponse:
    if isinstance(vectors, EmbedResponse):  # a hook's answer
        return vectors
    return EmbedResponse(vectors, call.provider, call.model)


def _finish_chat(call: LLMCall, response: ChatResponse, *, price: Price | None = None) -> ChatResponse:
    response.latency_ms = call.latency_ms
    response.attempts = call.attempts
    request = call.request
    assert isinstance(request, ChatRequest)
    if request.response_format is not None and not response.tool_calls and response.parsed is None:
        response.parsed = parse_structured(request.response_format, response.content, **request.context())
    if price is not None and call.attempts and response.pricing is None:
        # A provider's answer (a hook's answer made no attempt, and is not priced): its cost is
        # worked out when first read (ChatResponse.cost).
        response.pricing = partial(price, request.provider, request.model)
    return response


def response_tokens(response: ChatResponse) -> int | None:
    """The tokens a finished answer used, for the rate limits' correction."""
    if response.total_tokens is not None:
        return response.total_tokens
    if response.input_tokens is not None and response.output_tokens is not None:
        return response.input_tokens + response.output_tokens
    return None


def _open(provider: Provider, request: ChatRequest) -> tuple[Iterator[StreamEvent], StreamEvent | None]:
    """Open a sync stream and read its first event (closing it if that fails)."""
    events = provider.stream(request)
    try:
        return events, next(events, None)
    except BaseException:
        _close(events)
        raise


async def _aopen(
    provider: Provider, request: ChatRequest
) -> tuple[AsyncIterator[StreamEvent], StreamEvent | None]:
    events = provider.astream(request)
    try:
        return events, await anext(events, None)
    except BaseException:
        await _aclose(events)
        raise


def _close(events: Any) -> None:
    close = getattr(events, "close", None)
    if close is not None:
        close()


async def _aclose(events: Any) -> None:
    aclose = getattr(events, "aclose", None)
    if aclose is not None:
        await aclose()


def _close_step(events: Any) -> Step:
    return Step(lambda: _close(events), lambda: _aclose(events))


__all__ = ["Pipeline", "response_tokens"]
