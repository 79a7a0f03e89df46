"""Fallback chains whose later models cannot be called: the caller sees the real failure."""

from __future__ import annotations

import asyncio

import pytest

from app.llm import LLMNotConfiguredError, LLMServerError, get_llm
from app.llm.testing import install_fake_llm

USER = [{"role": "user", "content": "Hi"}]


def test_an_unusable_fallback_does_not_hide_the_primarys_error(make_app):
    app = make_app()
    fake = install_fake_llm(app)
    fake.add_error(LLMServerError("upstream broke", status_code=500))
    with app.app_context(), pytest.raises(LLMServerError) as excinfo:
        get_llm().chat(USER, model="fake/primary", fallbacks=["nowhere/model"])
    outcomes = [(a.model, a.outcome) for a in excinfo.value.attempts]
    assert outcomes == [("fake/primary", "LLMServerError"), ("nowhere/model", "LLMNotConfiguredError")]


def test_an_unusable_fallback_is_skipped_for_the_next_one(make_app):
    app = make_app()
    fake = install_fake_llm(app)
    fake.add_error(LLMServerError("upstream broke", status_code=500))
    fake.add_response("from the second fallback")
    with app.app_context():
        response = get_llm().chat(USER, model="fake/primary", fallbacks=["nowhere/model", "fake/backup"])
    assert response.content == "from the second fallback"
    assert response.model == "backup"
    assert [a.outcome for a in response.attempts] == ["LLMServerError", "LLMNotConfiguredError", "ok"]


def test_an_unknown_primary_is_the_callers_error(make_app):
    app = make_app()
    with app.app_context(), pytest.raises(LLMNotConfiguredError):
        get_llm().chat(USER, model="nowhere/model", fallbacks=["fake/backup"])


def test_an_async_stream_prepares_a_fallback_only_when_needed(make_app):
    app = make_app()
    fake = install_fake_llm(app)
    fake.add_stream(["Hel", "lo"])

    async def main() -> str:
        stream = get_llm().achat_stream(USER, model="fake/primary", fallbacks=["nowhere/model"])
        return "".join([text async for text in stream])

    with app.app_context():
        assert asyncio.run(main()) == "Hello"
