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

On the call's path the line is worked in integers: its coefficients are exact
decimals, so each is a whole number of 10**-``exponent`` USD, and a usage's
price is a sum of integer products, turned into one ``Decimal`` (the ledger's
cost) or rounded up to nano-USD (the budgets' unit) with no ``Decimal``
arithmetic at all. Decimal's operations cost about a microsecond each in a warm
loop and several times that on a call, between two waits on the network.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import TYPE_CHECKING

from app.llm.usage.settings import nano

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


class _Units:
    """A line in whole units of 10**-exponent USD (exact: each coefficient is a finite decimal)."""

    __slots__ = (
        "base",
        "cached",
        "exponent",
        "input",
        "line",
        "nano_divisor",
        "nano_factor",
        "output",
        "write",
    )

    def __init__(self, line: _Line, exponent: int) -> None:
        self.line = line
        self.exponent = exponent
        self.base: int = _whole(line.base, exponent)
        self.input: int = _whole(line.input, exponent)
        self.output: int = _whole(line.output, exponent)
        self.cached: int | None = _whole(line.cached, exponent) if line.cached is not None else None
        self.write: int | None = _whole(line.write, exponent) if line.write is not None else None
        #: From units to nano-USD: multiply (exponent <= 9), or divide rounding up.
        self.nano_factor: int = 10 ** max(0, 9 - exponent)
        self.nano_divisor: int = 10 ** max(0, exponent - 9)

    @classmethod
    def of(cls, line: _Line) -> _Units | None:
        """The line in units; None if a coefficient is not a finite decimal of a sane size."""
        known = [d for d in (line.base, line.input, line.output, line.cached, line.write) if d is not None]
        if not all(d.is_finite() for d in known):
            return None
        places = [int(d.as_tuple().exponent) for d in known]
        if any(abs(place) > 30 for place in places):
            return None
        return cls(line, max(0, *(-place for place in places)))

    def total(self, input_tokens: int, output_tokens: int, cached: int, write: int) -> int | None:
        """The usage's price in units; None when it has a kind the line does not cover."""
        total = self.base + self.input * input_tokens + self.output * output_tokens
        if cached:
            if self.cached is None:
                return None
            total += self.cached * cached
        if write:
            if self.write is None:
                return None
            total += self.write * write
        return total

    def nano(self, total: int) -> int:
        """Rounded up, as :func:`app.llm.usage.settings.nano` rounds a Decimal."""
        return total * self.nano_factor if self.nano_divisor == 1 else -(-total // self.nano_divisor)


def _whole(amount: Decimal, exponent: int) -> int:
    """``amount`` in units of 10**-exponent (a whole number: ``exponent`` covers its decimals)."""
    sign, digits, places = amount.as_tuple()
    assert isinstance(places, int)
    whole = int("".join(map(str, digits)) or "0") * int(10 ** (places + exponent))
    return -whole if sign else whole


#: A model with no price at all, and one priced by the catalogue on every call.
_UNPRICED = "unpriced"
_EVERY_CALL = "every call"


class Pricer:
    """One app's prices: ``cost(provider, model, input, output, cached, cache_write)``."""

    def __init__(self, catalogue: Catalogue, clock: Callable[[], float] = time.time) -> None:
        self.catalogue = catalogue
        self._clock = clock
        self._lock = threading.Lock()
        #: (provider, model) -> (minute, the line in units, or a marker).
        self._units: dict[tuple[str, str], tuple[int, _Units | str]] = {}

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
        amount, exponent, _ = self.price(provider, model, input_tokens, output_tokens, cached, write)
        return Decimal(f"{amount}E-{exponent}") if isinstance(amount, int) else amount

    def price(
        self,
        provider: str,
        model: str,
        input_tokens: int,
        output_tokens: int,
        cached: int = 0,
        write: int = 0,
    ) -> tuple[Decimal | int | None, int, int | None]:
        """This usage's price as (amount, exponent, nano-USD rounded up), without a Decimal when it
        can: ``amount`` is a whole number of 10**-exponent USD, or a Decimal (exponent 0), or None
        when the model has no known price."""
        units = self._line_units(provider, model)
        if type(units) is _Units:
            total = units.total(input_tokens, output_tokens, cached, write)
            if total is not None:
                return total, units.exponent, units.nano(total)
        elif units == _UNPRICED:
            return None, 0, None
        cost = self._oracle(provider, model, input_tokens, output_tokens, cached, write)
        return cost, 0, nano(cost) if cost is not None else None

    def nano_cost(self, provider: str, model: str, input_tokens: int, output_tokens: int) -> int | None:
        """Nano-USD for this usage, rounded up (what the budgets reserve); None without a known price."""
        units = self._line_units(provider, model)
        if type(units) is _Units:
            total = units.total(input_tokens, output_tokens, 0, 0)
            assert total is not None  # no cached input, no cache writes
            return units.nano(total)
        if units == _UNPRICED:
            return None
        cost = self._oracle(provider, model, input_tokens, output_tokens, 0, 0)
        return nano(cost) if cost is not None else None

    def priced(self, provider: str, model: str) -> bool:
        """Whether calls of this model have a price."""
        return self._line_units(provider, model) != _UNPRICED

    def unit_prices(self, provider: str, model: str) -> UnitPrices:
        info = self.catalogue.lookup(provider, model)
        if info is None:
            return UnitPrices(None, None, None, None)
        return UnitPrices(
            info.input_price, info.output_price, info.cached_input_price, info.cache_write_price
        )

    # --- the line ------------------------------------------------------------------------

    def _line(self, provider: str, model: str) -> _Line | str:
        units = self._line_units(provider, model)
        return units.line if isinstance(units, _Units) else units

    def _line_units(self, provider: str, model: str) -> _Units | str:
        minute = int(self._clock() // 60)
        key = (provider, model)
        found = self._units.get(key)
        if found is not None and found[0] == minute:
            return found[1]
        line = self._derive(provider, model)
        # A line not worked in integers (it never happens with genai-prices' figures): every call.
        units: _Units | str = (_Units.of(line) or _EVERY_CALL) if isinstance(line, _Line) else line
        with self._lock:
            self._units[key] = (minute, units)
        return units

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
