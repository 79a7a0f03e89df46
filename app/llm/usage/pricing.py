"""What a usage costs, as genai-prices says, in microseconds rather than a tenth of a millisecond.

Why it exists: genai-prices' ``calc_price`` takes about 0.1 ms (it decomposes
every token kind generically), as much as everything else the layer does on a
call, and the ledger and the budgets price every call, a budget twice. For a
model whose price is linear in its token counts (no tiers), the price is
``base + a*input + b*output + c*cached + d*cache_write``, so :class:`Pricer`
asks the catalogue (:meth:`app.llm.catalogue.Catalogue.cost`, genai-prices
itself) for a handful of points and keeps the coefficients for the current
minute (prices have dates and times of day). Before trusting them it checks
them against the catalogue at large counts (two million tokens), where any
tier would show; a model whose check fails is priced by the catalogue on
every call. Every figure is exact (``Decimal``) and equal to the catalogue's
(a property test checks it with random usages over tiered and flat models).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from app.llm.catalogue import Catalogue

__all__ = ["Pricer", "UnitPrices"]

#: Token counts at which the linear form is checked: large enough to cross every tier.
_CHECKS = (
    (2_000_000, 0, 0, 0),
    (0, 2_000_000, 0, 0),
    (1_500_000, 700_000, 0, 0),
    (123_457, 7_891, 0, 0),
)
_CACHED_CHECK = (1_500_000, 3, 1_000_000, 0)
_WRITE_CHECK = (1_500_000, 3, 0, 1_000_000)


@dataclass(frozen=True)
class UnitPrices:
    """USD per million tokens, as the catalogue lists them (the base tier of a tiered price)."""

    input: Decimal | None
    output: Decimal | None
    cached_input: Decimal | None
    cache_write: Decimal | None


@dataclass(frozen=True)
class _Line:
    base: Decimal
    input: Decimal
    output: Decimal
    #: None: the line does not cover this kind; a usage with it is priced by the catalogue.
    cached: Decimal | None
    write: Decimal | None


#: A model with no price at all, and one priced by the catalogue on every call.
_UNPRICED = "unpriced"
_EVERY_CALL = "every call"


class Pricer:
    """One app's prices: ``cost(provider, model, input, output, cached, cache_write)``."""

    def __init__(self, catalogue: Catalogue, clock: Callable[[], float] = time.time) -> None:
        self.catalogue = catalogue
        self._clock = clock
        self._lock = threading.Lock()
        #: (provider, model) -> (minute, line or marker).
        self._lines: dict[tuple[str, str], tuple[int, _Line | str]] = {}

    def cost(
        self,
        provider: str,
        model: str,
        input_tokens: int,
        output_tokens: int,
        cached: int = 0,
        write: int = 0,
    ) -> Decimal | None:
        """USD for this usage (genai-prices' figure); None when the model has no known price."""
        line = self._line(provider, model)
        if line == _UNPRICED:
            return None
        if (
            isinstance(line, _Line)
            and (not cached or line.cached is not None)
            and (not write or line.write is not None)
        ):
            total = line.base + line.input * input_tokens + line.output * output_tokens
            if cached:
                assert line.cached is not None
                total += line.cached * cached
            if write:
                assert line.write is not None
                total += line.write * write
            return total
        return self._oracle(provider, model, input_tokens, output_tokens, cached, write)

    def priced(self, provider: str, model: str) -> bool:
        """Whether calls of this model have a price."""
        return self._line(provider, model) != _UNPRICED

    def unit_prices(self, provider: str, model: str) -> UnitPrices:
        info = self.catalogue.lookup(provider, model)
        if info is None:
            return UnitPrices(None, None, None, None)
        return UnitPrices(
            info.input_price, info.output_price, info.cached_input_price, info.cache_write_price
        )

    # --- the line ------------------------------------------------------------------------

    def _line(self, provider: str, model: str) -> _Line | str:
        minute = int(self._clock() // 60)
        key = (provider, model)
        found = self._lines.get(key)
        if found is not None and found[0] == minute:
            return found[1]
        line = self._derive(provider, model)
        with self._lock:
            self._lines[key] = (minute, line)
        return line

    def _derive(self, provider: str, model: str) -> _Line | str:
        def at(i: int, o: int, c: int = 0, w: int = 0) -> Decimal | None:
            return self._oracle(provider, model, i, o, c, w)

        base = at(0, 0)
        one_in, one_out = at(1, 0), at(0, 1)
        if base is None or one_in is None or one_out is None:
            return _UNPRICED
        line = _Line(base, one_in - base, one_out - base, None, None)
        cached, write = at(1, 0, 1), at(1, 0, 0, 1)
        line = _Line(
            base,
            line.input,
            line.output,
            cached - one_in if cached is not None else None,
            write - one_in if write is not None else None,
        )
        checks = [*_CHECKS]
        if line.cached is not None:
            checks.append(_CACHED_CHECK)
        if line.write is not None:
            checks.append(_WRITE_CHECK)
        for i, o, c, w in checks:
            expected = at(i, o, c, w)
            linear = line.base + line.input * i + line.output * o
            linear += (line.cached or 0) * c + (line.write or 0) * w
            if expected != linear:
                return _EVERY_CALL  # tiers (or anything not linear): genai-prices on every call
        return line

    def _oracle(self, provider: str, model: str, i: int, o: int, c: int, w: int) -> Decimal | None:
        from app.llm.types import ChatResponse

        usage = ChatResponse(
            content=None,
            model=model,
            provider=provider,
            input_tokens=i,
            output_tokens=o,
            cached_input_tokens=c or None,
            cache_write_tokens=w or None,
        )
        return self.catalogue.cost(provider, model, usage)
