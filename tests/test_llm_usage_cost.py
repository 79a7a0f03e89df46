"""Each ledger row's cost is genai-prices' own figure for its usage; the fast pricer never differs.

The rows are written to PostgreSQL (exact NUMERIC) from answers of the scripted
upstream in each provider's protocol, and compared with ``genai_prices.calc_price``
called here, directly, on the row's own token counts.
"""

from __future__ import annotations

import os
from decimal import Decimal

import pytest
from genai_prices import Usage, calc_price
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import select

from app.llm import get_llm
from app.llm.catalogue import Catalogue, parse_overrides
from app.llm.types import ChatResponse
from app.llm.usage import LlmUsage, usage_state
from app.llm.usage.pricing import Pricer
from app.llm.usage.settings import nano
from app.services.db_service import db
from tests.conftest import CANARY_GEMINI_KEY, CANARY_KEY
from tests.payloads import chat_completion, gemini_reply, gemini_text, gemini_usage

#: Flat prices, cache-read prices, and Gemini 2.5 Pro's tiers (prices double past 200k input tokens).
MODELS = [
    ("openai", "gpt-4o-mini"),
    ("openai", "gpt-4.1"),
    ("anthropic", "claude-sonnet-4-5"),
    ("gemini", "gemini-2.5-flash"),
    ("gemini", "gemini-2.5-pro"),
    ("private", "priced-here"),
]
OVERRIDES = parse_overrides(
    {"private/priced-here": {"input_price": "0.37", "output_price": 1.1, "cached_input_price": 0.05}}
)
_catalogue = Catalogue(OVERRIDES)
_pricer = Pricer(_catalogue)


def _catalogue_cost(provider: str, model: str, i: int, o: int, c: int, w: int) -> Decimal | None:
    usage = ChatResponse(None, model, provider, input_tokens=i, output_tokens=o)
    usage.cached_input_tokens, usage.cache_write_tokens = c or None, w or None
    return _catalogue.cost(provider, model, usage)


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from(MODELS),
    st.integers(0, 1_200_000),
    st.integers(0, 200_000),
    st.floats(0, 1),
    st.floats(0, 1),
)
def test_the_pricer_equals_genai_prices_through_the_catalogue_for_any_usage(model, i, o, cached, written):
    provider, name = model
    c = int(i * cached * 0.6)
    w = int((i - c) * written * 0.3) if provider == "anthropic" else 0
    assert _pricer.cost(provider, name, i, o, c, w) == _catalogue_cost(provider, name, i, o, c, w)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(MODELS), st.integers(0, 1_200_000), st.integers(0, 200_000), st.floats(0, 1))
def test_the_budgets_nano_usd_are_genai_prices_figure_rounded_up(model, i, o, cached):
    """The call's path prices in integers: its nano-USD are the catalogue's Decimal, rounded up."""
    provider, name = model
    c = int(i * cached * 0.6)
    expected = _catalogue_cost(provider, name, i, o, 0, 0)
    assert expected is not None
    assert _pricer.nano_cost(provider, name, i, o) == nano(expected)
    amount, exponent, nano_cost = _pricer.price(provider, name, i, o, c)
    with_cached = _catalogue_cost(provider, name, i, o, c, 0)
    assert with_cached is not None
    assert nano_cost == nano(with_cached)
    assert (Decimal(f"{amount}E-{exponent}") if isinstance(amount, int) else amount) == with_cached


def test_a_tiered_price_is_priced_by_genai_prices_on_every_call():
    from app.llm.usage import pricing

    assert _pricer._line("gemini", "gemini-2.5-pro") == pricing._EVERY_CALL
    assert isinstance(_pricer._line("openai", "gpt-4o-mini"), pricing._Line)
    assert _pricer._line("ollama", "llama3") == pricing._UNPRICED
    assert _pricer.cost("ollama", "llama3", 10, 10) is None
    short, long = (
        _pricer.cost("gemini", "gemini-2.5-pro", 1000, 10),
        _pricer.cost("gemini", "gemini-2.5-pro", 300_000, 10),
    )
    assert long / 300 > short  # past 200k input tokens, a higher price per token


@pytest.mark.postgres
def test_each_ledger_row_costs_what_genai_prices_says_for_its_usage(make_app, upstream, postgres_server):
    user = "cost-" + os.urandom(4).hex()
    app = make_app(
        OPENAI_API_KEY=CANARY_KEY,
        OPENAI_BASE_URL=upstream.url_for("/v1"),
        GEMINI_API_KEY=CANARY_GEMINI_KEY,
        GENAI_BASE_URL=upstream.url_for("/"),
        GENAI_API_VERSION="v1beta",
        DATABASE_URL=postgres_server.url,
    )
    with app.app_context():
        db.create_all()
    cached = chat_completion("cached", "gpt-4.1", usage=(4000, 50))
    cached["usage"]["prompt_tokens_details"] = {"cached_tokens": 2048}
    cached["usage"]["completion_tokens_details"] = {"reasoning_tokens": 20}
    upstream.script("/v1/chat/completions", chat_completion("flat", usage=(1234, 567)), cached)
    thinking = gemini_reply(gemini_text("thought"), usage=gemini_usage(250_000, 40, thoughtsTokenCount=300))
    upstream.script("/v1beta/models/gemini-2.5-pro:generateContent", thinking)
    messages = [{"role": "user", "content": "price me"}]
    with app.app_context():
        get_llm().chat(messages, "openai/gpt-4o-mini", user=user)
        get_llm().chat(messages, "openai/gpt-4.1", user=user)
        get_llm().chat(messages, "gemini/gemini-2.5-pro", user=user)
    assert usage_state(app).ledger.flush(), usage_state(app).ledger.last_error
    with app.app_context():
        rows = list(
            db.session.scalars(select(LlmUsage).filter_by(user_name=user).order_by(LlmUsage.started_at))
        )

    assert [
        (r.model, r.input_tokens, r.output_tokens, r.cached_input_tokens, r.reasoning_tokens) for r in rows
    ] == [
        ("gpt-4o-mini", 1234, 567, None, None),
        ("gpt-4.1", 4000, 50, 2048, 20),
        ("gemini-2.5-pro", 250_000, 340, None, 300),  # thoughts are billed as output
    ]
    providers = {"openai": "openai", "gemini": "google"}
    for row in rows:
        usage = Usage(
            input_tokens=row.input_tokens,
            output_tokens=row.output_tokens,
            cache_read_tokens=row.cached_input_tokens,
        )
        expected = calc_price(usage, row.model, provider_id=providers[row.provider]).total_price
        assert row.cost == expected, row.model
    assert rows[2].cost > Decimal("0.5")  # the >200k tier, not the base price


def test_an_image_call_is_booked_at_its_media_price():
    """Images and video have no tokens: the ledger books what app/llm/media/prices.py priced."""
    from decimal import Decimal

    from app.llm.hooks import LLMCall
    from app.llm.media.types import ImageResponse, MediaUsage
    from app.llm.providers.base import EmbedRequest
    from app.llm.usage.booking import _book

    call = LLMCall("image", "gemini", "imagen-4.0-generate-001", EmbedRequest("gemini", "imagen", ["x"]))
    call.attempts.append(object())  # a provider was asked
    outcome = ImageResponse(
        "gemini", "imagen-4.0-generate-001", [], [], MediaUsage("image", 2, Decimal("0.08"))
    )
    booking = _book(call, outcome, pricer=None)  # type: ignore[arg-type]
    assert (booking.cost, booking.input_tokens, booking.output_tokens, booking.billed) == (
        Decimal("0.08"), None, None, True,
    )  # fmt: skip
