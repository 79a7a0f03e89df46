"""What one call is booked at: its tokens and their cost, shared by the ledger and the budgets.

The rules (README, "Usage and budgets"):

* An answer with its usage is booked at that usage, priced by :class:`~.pricing.Pricer`
  (genai-prices' figure). Reasoning tokens are inside the output tokens, cached input
  and cache writes inside the input tokens, each priced at its own rate.
* A count the provider did not report (a stream closed early, a server that sends no
  usage, an embeddings call) is estimated: input as the rate limiter estimates a prompt
  (characters / 4, a few tokens per message, a flat count per image), output as the
  characters received (text and tool-call arguments) / 4. The booking says so.
* A stream that broke after its first delta is booked at its estimated input (the
  provider read the prompt); any other failure is booked at nothing.
* A cache hit (``response.cached``), or any answer a hook gave without asking a
  provider, costs 0.
* A model with no known price has cost None (the ledger keeps NULL: unknown, never 0).
"""

from __future__ import annotations

import json
import math
from decimal import Decimal
from typing import TYPE_CHECKING, Any, NamedTuple

from app.llm.hooks import EmbedResponse
from app.llm.media.types import MediaUsage
from app.llm.providers.base import ChatRequest
from app.llm.resilience.ratelimit import DEFAULT_ANSWER_TOKENS, estimate_tokens
from app.llm.types import ChatResponse
from app.llm.usage.settings import nano

if TYPE_CHECKING:
    from app.llm.hooks import LLMCall
    from app.llm.usage.pricing import Pricer

__all__ = ["Booking", "booking_for", "prompt_tokens"]

#: Characters per token in every estimate here (the rate limits and quotas use the same).
CHARS_PER_TOKEN = 4
#: Where a call's booking is kept, so that the ledger and the budgets work it out once.
METADATA_KEY = "usage.booking"
ZERO = Decimal(0)


class Booking(NamedTuple):
    """One call's tokens and cost as booked; None where nothing is known.

    A named tuple rather than a frozen dataclass: one is made per call, and a frozen
    dataclass's ``__init__`` (a ``object.__setattr__`` per field) took three times as long.
    """

    input_tokens: int | None
    output_tokens: int | None
    reasoning_tokens: int | None = None
    cached_input_tokens: int | None = None
    cache_write_tokens: int | None = None
    #: Some count was estimated (the provider did not report it).
    estimated: bool = False
    #: The cost, read as :attr:`cost`: a Decimal, or an exact whole number of 10**-``exponent`` USD
    #: (the pricer's figure, made into a Decimal only when read: by the ledger's writer, off the call).
    amount: Decimal | int | None = ZERO
    exponent: int = 0
    #: Whether the tokens were billed at all (False: a cache hit, a hook's answer, a failure).
    billed: bool = True
    #: The cost in nano-USD rounded up (what the budgets settle); None when the cost is.
    nano_cost: int | None = 0

    @property
    def cost(self) -> Decimal | None:
        """USD; None when the model has no known price. 0 for a cache hit or a failure without usage."""
        amount = self.amount
        if isinstance(amount, int):
            return Decimal(f"{amount}E-{self.exponent}")  # exact (the constructor does not round)
        return amount


NOTHING = Booking(None, None, billed=False)


def prompt_tokens(request: ChatRequest) -> int:
    """The prompt's tokens as the rate limiter estimates them (without the answer's budget)."""
    answer = request.max_tokens if request.max_tokens is not None else DEFAULT_ANSWER_TOKENS
    return estimate_tokens(request) - max(answer, 0)


def _text_tokens(response: ChatResponse) -> int:
    chars = len(response.content or "")
    for call in response.tool_calls:
        chars += len(call.name) + len(json.dumps(call.arguments, default=str))
    return math.ceil(chars / CHARS_PER_TOKEN)


def booking_for(call: LLMCall, outcome: ChatResponse | EmbedResponse | None, pricer: Pricer) -> Booking:
    """The booking of ``call`` (memoised in its metadata): ``outcome`` is the answer, the partial
    answer of a cancelled stream, or None for a failure."""
    metadata = call.metadata
    found = metadata.get(METADATA_KEY)
    if isinstance(found, Booking):
        return found
    booking = _book(call, outcome, pricer)
    metadata[METADATA_KEY] = booking
    return booking


def _book(call: LLMCall, outcome: Any, pricer: Pricer) -> Booking:
    request = call.request
    if outcome is None:  # a failure: only a stream that had begun was read by the provider
        if call.kind == "stream" and call.first_delta_at is not None and isinstance(request, ChatRequest):
            return _priced(call, pricer, prompt_tokens(request), 0, estimated=True)
        return NOTHING
    if getattr(outcome, "cached", False) or not call.attempts:
        # A cache hit, or a hook's own answer: no provider was asked. The tokens shown are the answer's.
        return Booking(
            getattr(outcome, "input_tokens", None),
            getattr(outcome, "output_tokens", None),
            getattr(outcome, "reasoning_tokens", None),
            getattr(outcome, "cached_input_tokens", None),
            getattr(outcome, "cache_write_tokens", None),
            billed=False,
        )
    if isinstance(outcome, ChatResponse):
        input_tokens, output_tokens = outcome.input_tokens, outcome.output_tokens
        estimated = False
        if input_tokens is None and isinstance(request, ChatRequest):
            input_tokens, estimated = prompt_tokens(request), True
        if output_tokens is None:
            output_tokens, estimated = _text_tokens(outcome), True
        return _priced(
            call,
            pricer,
            input_tokens or 0,
            output_tokens,
            estimated=estimated,
            reasoning=outcome.reasoning_tokens,
            cached=outcome.cached_input_tokens,
            write=outcome.cache_write_tokens,
        )
    if isinstance(outcome, EmbedResponse):
        inputs = getattr(request, "inputs", [])
        if outcome.input_tokens is not None:
            return _priced(call, pricer, outcome.input_tokens, 0)
        # What the pipeline estimates for an embeddings call's rate limit.
        return _priced(
            call, pricer, sum(len(text) for text in inputs) // CHARS_PER_TOKEN + 1, 0, estimated=True
        )
    media = getattr(outcome, "usage", None)
    assert isinstance(media, MediaUsage), type(outcome)  # images or video: priced per image or second
    cost = media.cost
    return Booking(None, None, amount=cost, nano_cost=nano(cost) if cost is not None else None)


def _priced(
    call: LLMCall,
    pricer: Pricer,
    input_tokens: int,
    output_tokens: int,
    *,
    estimated: bool = False,
    reasoning: int | None = None,
    cached: int | None = None,
    write: int | None = None,
) -> Booking:
    amount, exponent, nano_cost = pricer.price(
        call.provider, call.model, input_tokens, output_tokens, cached or 0, write or 0
    )
    return Booking(
        input_tokens, output_tokens, reasoning, cached, write, estimated, amount, exponent, True, nano_cost
    )
