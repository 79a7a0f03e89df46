"""Budgets: ``LLM_BUDGETS`` checked before every call, by a hook that reserves, then settles.

Which budgets apply to a call: ``user:<its user>`` or else ``user`` (when the
call has a user), ``tenant:<its tenant>`` or else ``tenant`` (when it has a
tenant), and ``global``; each with its ``daily_usd`` and ``monthly_usd``
windows (UTC days and calendar months). Before the call, its estimated cost
is reserved on every one of them (:mod:`.accounts`, atomically across
processes through Redis); after it, the reservation is settled to the call's
actual cost (:mod:`.booking`), or released when it failed without usage.

The estimate: the prompt's tokens (as the rate limiter estimates them) plus
``max_tokens`` (unset: the model's maximum output, else ``LLM_MAX_TOKENS_LIMIT``),
never more than the model's maximum output, priced by the catalogue, and at
most ``LLM_BUDGET_MAX_RESERVE_USD`` when that is set.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from app.llm.errors import LLMBadRequestError, LLMBudgetExceededError
from app.llm.hooks import LLMHook
from app.llm.usage.accounts import Accounts, CounterSpec, Held, Refusal
from app.llm.usage.booking import CHARS_PER_TOKEN, booking_for, prompt_tokens
from app.llm.usage.budget_store import counter_key
from app.llm.usage.settings import BudgetRule, nano, usd_text

if TYPE_CHECKING:
    from app.llm.catalogue import Catalogue
    from app.llm.errors import LLMError
    from app.llm.hooks import EmbedResponse, LLMCall
    from app.llm.types import ChatResponse
    from app.llm.usage.pricing import Pricer

__all__ = ["BudgetHook", "Budgets", "window_period"]

logger = logging.getLogger(__name__)

#: Where a call's reservation is kept between its before_call and its end.
METADATA_KEY = "usage.budget"
#: Seconds a refused caller is told to wait when only other calls in flight hold the room.
IN_FLIGHT_RETRY = 1.0
NANO = Decimal(1_000_000_000)


def window_period(window: str, now: datetime) -> tuple[str, datetime]:
    """The period of ``window`` that contains ``now`` (UTC): its label and when it ends."""
    day = now.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    if window == "daily":
        return day.strftime("%Y-%m-%d"), day + timedelta(days=1)
    month = day.replace(day=1)
    following = (month + timedelta(days=32)).replace(day=1)
    return month.strftime("%Y-%m"), following


class Budgets:
    """The rules of ``LLM_BUDGETS``, and the counters a call's user and tenant fall under."""

    def __init__(self, rules: Sequence[BudgetRule]) -> None:
        self.rules = tuple(rules)
        self._named: dict[tuple[str, str | None], BudgetRule] = {(r.scope, r.subject): r for r in rules}
        #: (user, tenant) -> the counters of ``_day`` (cleared when the day changes, or past 10 000).
        self._specs: dict[tuple[str | None, str | None], tuple[CounterSpec, ...]] = {}
        self._day = -1

    def __bool__(self) -> bool:
        return bool(self.rules)

    def rule_for(self, scope: str, subject: str | None) -> BudgetRule | None:
        """The rule of a user or tenant (its own, else the scope's default), or the global one."""
        if scope == "global":
            return self._named.get(("global", None))
        return self._named.get((scope, subject)) or self._named.get((scope, None))

    def specs(
        self, user: str | None, tenant: str | None, now: float | None = None
    ) -> tuple[CounterSpec, ...]:
        now = time.time() if now is None else now
        day = int(now // 86400)
        if day != self._day or len(self._specs) > 10_000:
            self._specs, self._day = {}, day
        key = (user, tenant)
        found = self._specs.get(key)
        if found is not None:
            return found
        specs: list[CounterSpec] = []
        moment = datetime.fromtimestamp(now, UTC)
        for scope, subject in (("user", user), ("tenant", tenant), ("global", None)):
            if scope != "global" and subject is None:
                continue
            rule = self.rule_for(scope, subject)
            if rule is None:
                continue
            for window, limit in rule.limits:
                period, ends = window_period(window, moment)
                name = rule.name if rule.subject is not None or scope == "global" else f"{scope}:{subject}"
                specs.append(
                    CounterSpec(
                        counter_key(scope, subject, window, period),
                        name,
                        window,
                        nano(limit),
                        ends.timestamp(),
                    )
                )
        found = self._specs[key] = tuple(specs)
        return found


class BudgetHook(LLMHook):
    """Reserves a call's estimated cost before it, settles it after (see the module docstring)."""

    def __init__(
        self,
        budgets: Budgets,
        accounts: Accounts,
        pricer: Pricer,
        catalogue: Catalogue,
        *,
        max_reserve_usd: Decimal | None,
        unknown_price: str,
        default_output_tokens: int,
    ) -> None:
        self.budgets = budgets
        self.accounts = accounts
        self.pricer = pricer
        self.catalogue = catalogue
        self.max_reserve = nano(max_reserve_usd) if max_reserve_usd is not None else None
        self.allow_unknown = unknown_price == "allow"
        self.default_output_tokens = default_output_tokens
        self._warned: set[tuple[str, str]] = set()

    # --- before -----------------------------------------------------------------------------

    def before_call(self, call: LLMCall) -> None:
        specs = self.budgets.specs(call.user, call.tenant)
        if not specs:
            return
        amount = self.estimate(call, specs)
        self._hold(call, self.accounts.reserve(specs, amount))

    async def abefore_call(self, call: LLMCall) -> None:
        """In memory when the room is held (no thread); a Redis round trip in a worker thread."""
        specs = self.budgets.specs(call.user, call.tenant)
        if not specs:
            return
        amount = self.estimate(call, specs)
        held: Held | Refusal | None = self.accounts.admit_in_memory(specs, amount)
        if held is None:
            held = await asyncio.to_thread(self.accounts.reserve, specs, amount)
        self._hold(call, held)

    def _hold(self, call: LLMCall, result: Held | Refusal) -> None:
        if isinstance(result, Refusal):
            raise self._refused(call, result)
        call.metadata[METADATA_KEY] = result

    def estimate(self, call: LLMCall, specs: Sequence[CounterSpec] = ()) -> int:
        """Nano-USD to reserve for ``call`` (raises for a model without a price, unless allowed)."""
        provider, model = call.provider, call.model
        if not self.pricer.priced(provider, model):
            if not self.allow_unknown:
                names = ", ".join(dict.fromkeys(spec.budget for spec in specs))
                raise LLMBadRequestError(
                    f"{provider}/{model} has no known price, so the budgets that apply ({names}) cannot"
                    " admit it; the operator can give it input_price and output_price in LLM_MODELS,"
                    " or set LLM_BUDGET_UNKNOWN_PRICE=allow",
                    field="model",
                    provider=provider,
                    model=model,
                )
            if (provider, model) not in self._warned:
                self._warned.add((provider, model))
                logger.warning(
                    "%s/%s has no known price: budgets book its calls at 0 (LLM_BUDGET_UNKNOWN_PRICE=allow)",
                    provider,
                    model,
                )
            return 0
        request: Any = call.request
        if call.kind == "embed":
            input_tokens = sum(len(text) for text in request.inputs) // CHARS_PER_TOKEN + 1
            output_tokens = 0
        else:
            input_tokens = prompt_tokens(request)
            info = self.catalogue.lookup(provider, model)
            most = info.max_output_tokens if info is not None else None
            output_tokens = request.max_tokens or most or self.default_output_tokens
            if most is not None:
                output_tokens = min(output_tokens, most)
        amount = self.pricer.nano_cost(provider, model, input_tokens, output_tokens) or 0
        return min(amount, self.max_reserve) if self.max_reserve is not None else amount

    # --- after ------------------------------------------------------------------------------

    def after_call(self, call: LLMCall, response: ChatResponse | EmbedResponse) -> None:
        self._settle(call, response)

    def on_error(self, call: LLMCall, error: LLMError) -> None:
        self._settle(call, None)

    def on_cancel(self, call: LLMCall, partial: ChatResponse) -> None:
        self._settle(call, partial)

    def _settle(self, call: LLMCall, outcome: ChatResponse | EmbedResponse | None) -> None:
        held = call.metadata.pop(METADATA_KEY, None)
        if not isinstance(held, Held):
            return  # no budget applied, or a hook answered before this one reserved
        booking = booking_for(call, outcome, self.pricer)
        # Answered by a model without a price (a fallback): the estimate stands, unless allowed.
        unpriced = 0 if self.allow_unknown else held.amount
        actual = booking.nano_cost if booking.nano_cost is not None else unpriced
        self.accounts.settle(held, actual)

    # --- refused ----------------------------------------------------------------------------

    def _refused(self, call: LLMCall, refusal: Refusal) -> LLMBudgetExceededError:
        spec = refusal.spec
        limit = Decimal(spec.limit) / NANO
        spent = Decimal(refusal.spent) / NANO
        held = Decimal(refusal.others + refusal.in_flight) / NANO
        needed = Decimal(refusal.amount) / NANO
        window_left = max(0.0, spec.ends_at - time.time())
        if refusal.amount > spec.limit:
            reason = (
                f"this call may cost up to {usd_text(needed)}, more than the whole budget"
                " (LLM_BUDGET_MAX_RESERVE_USD caps what one call reserves)"
            )
            retry_after = window_left
        elif refusal.spent + refusal.amount > spec.limit:
            reason = f"{usd_text(spent)} is spent and this call may cost up to {usd_text(needed)}"
            retry_after = window_left
        else:  # only calls in flight hold the room: it comes back as they end
            reason = (
                f"{usd_text(held)} is held by calls in flight and this call may cost up to {usd_text(needed)}"
            )
            retry_after = min(window_left, IN_FLIGHT_RETRY)
        ends = datetime.fromtimestamp(spec.ends_at, UTC)
        return LLMBudgetExceededError(
            f"the {spec.window} budget {spec.budget!r} ({usd_text(limit)}) has no room for this call:"
            f" {reason}; it resets at {ends.strftime('%Y-%m-%dT%H:%M:%SZ')}",
            budget=spec.budget,
            window=spec.window,
            limit_usd=limit,
            provider=call.provider,
            model=call.model,
            retry_after=retry_after,
        )
