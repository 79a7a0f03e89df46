"""The resilience policy as a caller meets it: settings, retry rules, and the executor through get_llm().

Settings are validated by ``create_app``; the retry rules are pure
functions; everything else runs through ``get_llm()`` on an app with the
fake provider of :mod:`app.llm.testing` (a real Provider adapter that
answers from a script and records each call), so every upstream attempt is
counted. The OpenAI SDK's own retries are checked against a local HTTP
server, and breakers run both in-process and on a real redis-server.
"""

from __future__ import annotations

import asyncio
import gc
import json
import re
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from flask import Flask

from app import create_app
from app.config import DEFAULTS
from app.errors import ConfigError
from app.llm import get_llm
from app.llm.errors import (
    LLMAuthError,
    LLMBadRequestError,
    LLMBulkheadFullError,
    LLMCircuitOpenError,
    LLMConnectionError,
    LLMContentFilterError,
    LLMContextLengthError,
    LLMError,
    LLMNotFoundError,
    LLMPermissionError,
    LLMRateLimitError,
    LLMServerError,
    LLMTimeoutError,
    error_for_status,
)
from app.llm.resilience.retry import backoff_delay, is_retryable, next_delay
from app.llm.resilience.settings import (
    KEYS,
    BreakerPolicy,
    BulkheadPolicy,
    LimitPolicy,
    ProviderPolicy,
    RetryPolicy,
)
from app.llm.testing import FakeProvider, install_fake_llm
from app.services import reset_services
from tests.conftest import ROOT

MESSAGES = [{"role": "user", "content": "hi"}]


def unavailable(status: int = 503, retry_after: float | None = None) -> LLMServerError:
    return LLMServerError(f"upstream answered {status}", status_code=status, retry_after=retry_after)


def layer(make_app: Callable[..., Flask], **settings: Any) -> tuple[Flask, FakeProvider]:
    """An app with the fake provider; no backoff unless a test sets one, so retries are quick."""
    settings.setdefault("LLM_BACKOFF_BASE", 0)
    app = make_app(**settings)
    return app, install_fake_llm(app)


def models_called(fake: FakeProvider) -> list[str]:
    return [f"{call.provider}/{call.model}" for call in fake.calls]


def path(attempts: list[Any]) -> list[tuple[str, str]]:
    return [(attempt.model, attempt.outcome) for attempt in attempts]


def chat_error(model: str = "fake/m", **kwargs: Any) -> LLMError:
    with pytest.raises(LLMError) as caught:
        get_llm().chat(MESSAGES, model=model, **kwargs)
    return caught.value


# --- settings -------------------------------------------------------------------------


ALL_KEYS_AS_STRINGS = {
    "LLM_MAX_RETRIES": "4",
    "LLM_BACKOFF_BASE": "0",
    "LLM_BACKOFF_MAX": "3.5",
    "LLM_RETRY_AFTER_MAX": "12",
    "LLM_DEADLINE": "30",
    "LLM_ATTEMPT_TIMEOUT": "7.5",
    "LLM_BREAKER_WINDOW": "20",
    "LLM_BREAKER_MIN_CALLS": "3",
    "LLM_BREAKER_FAILURE_RATE": "0.25",
    "LLM_BREAKER_COOLDOWN": "9",
    "LLM_BREAKER_HALF_OPEN_CALLS": "2",
    "LLM_RATE_LIMIT_MAX_WAIT": "4",
    "LLM_MAX_CONCURRENCY": "5",
    "LLM_BULKHEAD_MAX_WAIT": "0.5",
    "LLM_RATE_LIMITS": '{"fake": {"rpm": "60", "tpm": "1000"}}',
    "LLM_FALLBACKS": '{"fake/a": ["fake/b", "openai/gpt-4o-mini"]}',
    "LLM_POLICY": '{"fake/a": {"max_retries": "1", "breaker_cooldown": "2"}}',
}


def test_every_llm_key_is_parsed_from_environment_strings(tmp_path, monkeypatch):
    assert set(KEYS) | {"LLM_RATE_LIMITS", "LLM_FALLBACKS", "LLM_POLICY"} == set(ALL_KEYS_AS_STRINGS)
    for key, value in ALL_KEYS_AS_STRINGS.items():
        monkeypatch.setenv(key, value)
    # create_app itself (not make_app, which pins LLM_MAX_RETRIES), so every key comes from the environment.
    app = create_app({"TESTING": True, "INSTANCE_PATH": str(tmp_path), "DOTENV_PATH": str(tmp_path / "x")})
    try:
        settings = app.extensions["llm"].guards.settings
    finally:
        reset_services(app)
    assert settings.base == ProviderPolicy(
        retry=RetryPolicy(
            max_retries=4,
            backoff_base=0.0,
            backoff_max=3.5,
            retry_after_max=12.0,
            deadline=30.0,
            attempt_timeout=7.5,
        ),
        breaker=BreakerPolicy(window=20.0, min_calls=3, failure_rate=0.25, cooldown=9.0, half_open_calls=2),
        limits=LimitPolicy(rpm=None, tpm=None, max_wait=4.0),
        bulkhead=BulkheadPolicy(max_concurrency=5, max_wait=0.5),
    )
    fake_policy = settings.policy("fake", "b")
    assert (fake_policy.limits.rpm, fake_policy.limits.tpm) == (60, 1000)
    assert fake_policy.retry == settings.base.retry
    model_policy = settings.policy("fake", "a")  # LLM_POLICY for fake/a, on top of LLM_RATE_LIMITS for fake
    assert model_policy.retry.max_retries == 1
    assert model_policy.breaker.cooldown == 2.0
    assert (model_policy.limits.rpm, model_policy.limits.tpm) == (60, 1000)
    assert settings.fallbacks == {"fake/a": ("fake/b", "openai/gpt-4o-mini")}


def test_the_defaults_are_the_documented_ones(make_app):
    base = make_app(LLM_MAX_RETRIES=2).extensions["llm"].guards.settings.base
    assert base == ProviderPolicy()
    assert (base.retry.max_retries, base.retry.backoff_base, base.retry.backoff_max) == (2, 0.5, 8.0)
    assert (base.retry.retry_after_max, base.retry.deadline, base.retry.attempt_timeout) == (
        60.0,
        120.0,
        None,
    )
    assert (base.breaker.window, base.breaker.min_calls, base.breaker.failure_rate) == (60.0, 10, 0.5)
    assert (base.breaker.cooldown, base.breaker.half_open_calls) == (30.0, 1)
    # The bulkhead's size follows the worker's concurrency unless set (app.serving.llm_capacity).
    assert (base.limits.max_wait, base.bulkhead.max_concurrency, base.bulkhead.max_wait) == (10.0, None, 1.0)


def test_every_llm_setting_is_in_the_defaults_and_in_env_example():
    text = (ROOT / ".env.example").read_text()
    listed = {line.split("=", 1)[0] for line in text.splitlines() if line and not line.startswith("#")}
    for key in [*KEYS, "LLM_RATE_LIMITS", "LLM_FALLBACKS", "LLM_POLICY"]:
        assert key in DEFAULTS, key
        assert key in listed, key


@pytest.mark.parametrize(
    ("key", "value", "named"),
    [
        ("LLM_BREAKER_FAILURE_RATE", "1.5", "LLM_BREAKER_FAILURE_RATE"),
        ("LLM_BREAKER_FAILURE_RATE", "0", "LLM_BREAKER_FAILURE_RATE"),
        ("LLM_BREAKER_FAILURE_RATE", "half", "LLM_BREAKER_FAILURE_RATE"),
        ("LLM_MAX_CONCURRENCY", "0", "LLM_MAX_CONCURRENCY"),
        ("LLM_MAX_CONCURRENCY", "2.5", "LLM_MAX_CONCURRENCY"),
        ("LLM_DEADLINE", "abc", "LLM_DEADLINE"),
        ("LLM_DEADLINE", "0", "LLM_DEADLINE"),
        ("LLM_DEADLINE", "inf", "LLM_DEADLINE"),
        ("LLM_MAX_RETRIES", "-1", "LLM_MAX_RETRIES"),
        ("LLM_MAX_RETRIES", "two", "LLM_MAX_RETRIES"),
        ("LLM_MAX_RETRIES", True, "LLM_MAX_RETRIES"),
        ("LLM_BACKOFF_BASE", "-0.5", "LLM_BACKOFF_BASE"),
        ("LLM_BACKOFF_BASE", "nan", "LLM_BACKOFF_BASE"),
        ("LLM_BACKOFF_MAX", "0", "LLM_BACKOFF_MAX"),
        ("LLM_RETRY_AFTER_MAX", "nan", "LLM_RETRY_AFTER_MAX"),
        ("LLM_ATTEMPT_TIMEOUT", "-3", "LLM_ATTEMPT_TIMEOUT"),
        ("LLM_BREAKER_WINDOW", "0", "LLM_BREAKER_WINDOW"),
        ("LLM_BREAKER_MIN_CALLS", "0", "LLM_BREAKER_MIN_CALLS"),
        ("LLM_BREAKER_COOLDOWN", "-5", "LLM_BREAKER_COOLDOWN"),
        ("LLM_BREAKER_HALF_OPEN_CALLS", "0", "LLM_BREAKER_HALF_OPEN_CALLS"),
        ("LLM_RATE_LIMIT_MAX_WAIT", "soon", "LLM_RATE_LIMIT_MAX_WAIT"),
        ("LLM_BULKHEAD_MAX_WAIT", "-1", "LLM_BULKHEAD_MAX_WAIT"),
        ("LLM_FALLBACKS", '["fake/b"]', "LLM_FALLBACKS"),
        ("LLM_FALLBACKS", '{"fake/a": "fake/b"}', "LLM_FALLBACKS['fake/a']"),
        ("LLM_FALLBACKS", '{"fake/a": ["b"]}', "LLM_FALLBACKS['fake/a']"),
        ("LLM_FALLBACKS", '{"fake/a": [3]}', "LLM_FALLBACKS['fake/a']"),
        ("LLM_FALLBACKS", '{"gpt-4o": ["fake/b"]}', "LLM_FALLBACKS"),
        ("LLM_FALLBACKS", "{not json", "LLM_FALLBACKS"),
        ("LLM_POLICY", '{"fake": {"retries": 1}}', "LLM_POLICY['fake']"),
        ("LLM_POLICY", '{"fake": 3}', "LLM_POLICY['fake']"),
        ("LLM_POLICY", '{"fake": {"max_retries": -1}}', "LLM_POLICY['fake'].max_retries"),
        (
            "LLM_POLICY",
            '{"fake/m": {"breaker_failure_rate": 2}}',
            "LLM_POLICY['fake/m'].breaker_failure_rate",
        ),
        ("LLM_RATE_LIMITS", '{"fake": {"rpm": 0}}', "LLM_RATE_LIMITS['fake'].rpm"),
        ("LLM_RATE_LIMITS", '{"fake": {"tpm": "lots"}}', "LLM_RATE_LIMITS['fake'].tpm"),
        ("LLM_RATE_LIMITS", '{"fake": {"rps": 5}}', "LLM_RATE_LIMITS['fake']"),
        ("LLM_RATE_LIMITS", '{"fake": 5}', "LLM_RATE_LIMITS['fake']"),
        ("LLM_RATE_LIMITS", "[]", "LLM_RATE_LIMITS"),
    ],
)
def test_a_bad_value_fails_create_app_naming_the_key(make_app, key, value, named):
    with pytest.raises(ConfigError) as caught:
        make_app(**{key: value})
    assert named in str(caught.value)


def test_zero_waits_are_valid_and_mean_fail_at_once(make_app):
    base = (
        make_app(LLM_BULKHEAD_MAX_WAIT="0", LLM_RATE_LIMIT_MAX_WAIT="0")
        .extensions["llm"]
        .guards.settings.base
    )
    assert (base.bulkhead.max_wait, base.limits.max_wait) == (0.0, 0.0)


def test_overrides_resolve_from_the_most_specific_down_to_the_defaults(make_app):
    app = make_app(
        LLM_MAX_RETRIES="1",
        LLM_DEADLINE="50",
        LLM_POLICY=json.dumps(
            {
                "fake": {"max_retries": 4, "breaker_cooldown": 7},
                "fake/big": {"deadline": 9, "bulkhead_max_wait": 0.25},
                "fake/org/model": {"backoff_max": 2},
            }
        ),
        LLM_RATE_LIMITS={"fake/big": {"rpm": 30}, "fake": {"tpm": 1000}},
    )
    settings = app.extensions["llm"].guards.settings
    big = settings.policy("fake", "big")
    assert big.retry.max_retries == 4  # inherited from "fake"
    assert big.breaker.cooldown == 7.0  # inherited from "fake"
    assert big.retry.deadline == 9.0  # its own
    assert big.bulkhead.max_wait == 0.25  # its own
    assert (big.limits.rpm, big.limits.tpm) == (30, 1000)  # its own rpm, the provider's tpm
    small = settings.policy("fake", "small")
    assert (small.retry.max_retries, small.retry.deadline, small.breaker.cooldown) == (4, 50.0, 7.0)
    assert (small.limits.rpm, small.limits.tpm, small.bulkhead.max_wait) == (None, 1000, 1.0)
    nested = settings.policy("fake", "org/model")  # a model name with a slash of its own
    assert (nested.retry.backoff_max, nested.retry.max_retries) == (2.0, 4)
    other = settings.policy("openai", "gpt-4o")
    assert (other.retry.max_retries, other.retry.deadline, other.breaker.cooldown) == (1, 50.0, 30.0)
    assert other == settings.base


def test_the_most_specific_override_decides_the_attempts_made(make_app):
    app, fake = layer(
        make_app, LLM_MAX_RETRIES=0, LLM_POLICY={"fake": {"max_retries": 2}, "fake/one": {"deadline": 5}}
    )
    other = install_fake_llm(app, "other")
    for _ in range(5):
        fake.add_error(unavailable())
        other.add_error(unavailable())
    with app.app_context():
        assert len(chat_error("fake/one").attempts) == 3  # max_retries from "fake", not LLM_MAX_RETRIES
        assert len(chat_error("other/x").attempts) == 1  # no override: LLM_MAX_RETRIES


# --- retry rules ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "retryable"),
    [
        *((status, True) for status in (408, 409, 429, 500, 501, 502, 503, 504, 529)),
        *((status, False) for status in (400, 401, 403, 404, 405, 413, 422, 505, 511)),
    ],
)
def test_retryable_by_status(status, retryable):
    error = error_for_status(status)("failed", status_code=status)
    assert is_retryable(error) is retryable


@pytest.mark.parametrize(
    ("error", "retryable"),
    [
        (LLMTimeoutError("no answer"), True),
        (LLMConnectionError("reset"), True),
        (LLMServerError("overloaded (in a stream, no status)"), True),
        (LLMRateLimitError("quota (in a stream, no status)"), True),
        (LLMCircuitOpenError("open", retry_after=3), False),
        (LLMBulkheadFullError("full"), False),
        (LLMError("something else"), False),
        (LLMBadRequestError("bad", status_code=400), False),
        (LLMContextLengthError("too long", status_code=400), False),
        (LLMAuthError("who are you", status_code=401), False),
    ],
    ids=lambda value: type(value).__name__ if isinstance(value, LLMError) else str(value),
)
def test_retryable_by_class(error, retryable):
    assert is_retryable(error) is retryable


def test_backoff_is_full_jitter_exponential_and_capped():
    policy = RetryPolicy(backoff_base=0.5, backoff_max=8.0)
    assert [backoff_delay(retry, policy, rng=lambda: 0.0) for retry in range(8)] == [0.0] * 8
    top = [backoff_delay(retry, policy, rng=lambda: 0.999) for retry in range(8)]
    assert top == pytest.approx([0.4995, 0.999, 1.998, 3.996, 7.992, 7.992, 7.992, 7.992])
    assert backoff_delay(5000, policy, rng=lambda: 0.999) == pytest.approx(7.992)  # no overflow
    assert backoff_delay(5000, RetryPolicy(backoff_base=0.0), rng=lambda: 0.999) == 0.0
    samples = [backoff_delay(3, policy) for _ in range(2000)]  # the real rng
    assert all(0.0 <= delay <= 4.0 for delay in samples)
    assert min(samples) < 0.4 and max(samples) > 3.6  # spread over the whole range


def test_next_delay_honours_retry_after_within_its_cap():
    policy = RetryPolicy(max_retries=2, backoff_base=1.0, backoff_max=2.0, retry_after_max=10.0)
    never = lambda: pytest.fail("a server-requested delay is used as is, without jitter")  # noqa: E731
    assert next_delay(LLMRateLimitError("slow", status_code=429, retry_after=3.0), 0, policy, never) == 3.0
    assert next_delay(unavailable(retry_after=10.0), 1, policy, never) == 10.0  # the cap itself is honoured
    assert next_delay(LLMRateLimitError("slow", status_code=429, retry_after=10.5), 0, policy) is None
    assert next_delay(unavailable(retry_after=0.0), 0, policy, never) == 0.0
    assert next_delay(unavailable(), 1, policy, lambda: 0.5) == pytest.approx(1.0)  # backoff: 1 * 2**1 * 0.5


def test_next_delay_gives_up_when_retries_are_spent_or_the_error_is_final():
    policy = RetryPolicy(max_retries=2)
    assert next_delay(unavailable(retry_after=1.0), 2, policy) is None
    assert next_delay(unavailable(), 3, policy) is None
    assert next_delay(unavailable(), 0, RetryPolicy(max_retries=0)) is None
    assert next_delay(LLMBadRequestError("bad", status_code=400), 0, policy) is None
    assert next_delay(LLMCircuitOpenError("open", retry_after=1.0), 0, policy) is None


# --- the executor through get_llm() -----------------------------------------------------------


def test_retries_exactly_max_retries_then_raises_the_last_error(make_app):
    app, fake = layer(make_app, LLM_MAX_RETRIES=3)
    errors = [
        unavailable(503),
        unavailable(502),
        LLMRateLimitError("slow down", status_code=429),
        unavailable(500),
    ]
    for error in errors:
        fake.add_error(error)
    fake.add_response("never reached")
    with app.app_context():
        error = chat_error()
    assert error is errors[-1]
    assert len(fake.calls) == 4 and fake.pending == 1
    assert path(error.attempts) == [
        ("fake/m", "LLMServerError"),
        ("fake/m", "LLMServerError"),
        ("fake/m", "LLMRateLimitError"),
        ("fake/m", "LLMServerError"),
    ]
    assert [attempt.status_code for attempt in error.attempts] == [503, 502, 429, 500]
    assert all(attempt.latency_ms >= 0 for attempt in error.attempts)


def test_a_success_after_retries_records_the_path(make_app):
    app, fake = layer(make_app, LLM_MAX_RETRIES=2)
    fake.add_error(LLMConnectionError("reset")).add_error(LLMTimeoutError("slow")).add_response("at last")
    with app.app_context():
        response = get_llm().chat(MESSAGES, model="fake/m")
    assert response.content == "at last"
    assert (response.provider, response.model) == ("fake", "m")
    assert path(response.attempts) == [
        ("fake/m", "LLMConnectionError"),
        ("fake/m", "LLMTimeoutError"),
        ("fake/m", "ok"),
    ]


@pytest.mark.parametrize(
    "error",
    [
        LLMBadRequestError("bad", status_code=400),
        LLMAuthError("bad key", status_code=401),
        LLMPermissionError("not yours", status_code=403),
        LLMNotFoundError("no such model", status_code=404),
        LLMBadRequestError("unprocessable", status_code=422),
        LLMContextLengthError("too long", status_code=400),
    ],
    ids=lambda error: f"{type(error).__name__}-{error.status_code}",
)
def test_a_final_error_makes_one_attempt(make_app, error):
    app, fake = layer(make_app, LLM_MAX_RETRIES=3)
    fake.add_error(error).add_response("never reached")
    with app.app_context():
        assert chat_error() is error
    assert len(fake.calls) == 1
    assert path(error.attempts) == [("fake/m", type(error).__name__)]


def test_a_retry_after_within_the_cap_is_waited_for(make_app):
    app, fake = layer(make_app, LLM_MAX_RETRIES=1, LLM_BACKOFF_BASE=0)  # the backoff alone would not wait
    fake.add_error(LLMRateLimitError("slow down", status_code=429, retry_after=0.25)).add_response("ok")
    with app.app_context():
        started = time.monotonic()
        assert get_llm().chat(MESSAGES, model="fake/m").content == "ok"
        elapsed = time.monotonic() - started
    assert 0.25 <= elapsed < 0.75
    assert len(fake.calls) == 2


def test_a_retry_after_above_the_cap_fails_at_once_keeping_it(make_app):
    app, fake = layer(make_app, LLM_MAX_RETRIES=3, LLM_RETRY_AFTER_MAX=5)
    fake.add_error(LLMRateLimitError("come back in 30 s", status_code=429, retry_after=30)).add_response("x")
    with app.app_context():
        started = time.monotonic()
        error = chat_error()
        elapsed = time.monotonic() - started
    assert isinstance(error, LLMRateLimitError)
    assert error.retry_after == 30
    assert elapsed < 0.1
    assert len(fake.calls) == 1 and len(error.attempts) == 1


def test_the_deadline_bounds_every_attempt_and_wait_together(make_app):
    # Each failure asks for 0.2 s; 20 retries would take 4 s, the deadline allows 0.5 s.
    app, fake = layer(make_app, LLM_MAX_RETRIES=20, LLM_DEADLINE=0.5, LLM_RETRY_AFTER_MAX=1)
    errors = [unavailable(503, retry_after=0.2) for _ in range(21)]
    for error in errors:
        fake.add_error(error)
    with app.app_context():
        started = time.monotonic()
        error = chat_error()
        elapsed = time.monotonic() - started
    made = len(fake.calls)
    # Attempts at about 0, 0.2 and 0.4 s; the next wait would end past the deadline, so the call
    # ends there with the last error (not an LLMTimeoutError: no attempt was cut short). Only a
    # wait that overslept by 0.1 s could make it 2 attempts.
    assert made in (2, 3)
    assert error is errors[made - 1]
    assert len(error.attempts) == made and fake.pending == 21 - made
    assert 0.2 * (made - 1) <= elapsed < 0.5
    # Each attempt is given what is left of the deadline as its timeout.
    timeouts = [call.timeout for call in fake.calls]
    assert all(timeout is not None and 0 < timeout <= 0.5 for timeout in timeouts)
    assert timeouts == sorted(timeouts, reverse=True)
    assert timeouts[0] - timeouts[-1] >= 0.2 * (made - 1) - 0.01


def test_the_attempt_timeout_is_passed_down_when_shorter_than_the_deadline(make_app):
    app, fake = layer(make_app, LLM_MAX_RETRIES=0, LLM_ATTEMPT_TIMEOUT=0.2, LLM_DEADLINE=60)
    fake.add_response("ok")
    with app.app_context():
        get_llm().chat(MESSAGES, model="fake/m")
    assert fake.calls[0].timeout == 0.2


# --- fallbacks ---------------------------------------------------------------------------------


def test_a_fallback_answers_after_the_primary_spends_its_retries(make_app):
    app, fake = layer(make_app, LLM_MAX_RETRIES=1)
    fake.add_error(unavailable()).add_error(unavailable()).add_response("from b")
    with app.app_context():
        response = get_llm().chat(MESSAGES, model="fake/m", fallbacks=["fake/b"])
    assert response.content == "from b"
    assert (response.provider, response.model) == ("fake", "b")
    assert path(response.attempts) == [
        ("fake/m", "LLMServerError"),
        ("fake/m", "LLMServerError"),
        ("fake/b", "ok"),
    ]


def test_the_chain_is_tried_in_order_each_model_at_most_once(make_app):
    app, fake = layer(make_app, LLM_MAX_RETRIES=0)
    errors = [unavailable() for _ in range(5)]
    for error in errors:
        fake.add_error(error)
    with app.app_context():
        error = chat_error(fallbacks=["fake/b", "fake/m", "fake/b", "fake/c", "fake/c"])
    assert models_called(fake) == ["fake/m", "fake/b", "fake/c"]
    assert error is errors[2]
    assert [attempt.model for attempt in error.attempts] == ["fake/m", "fake/b", "fake/c"]
    assert fake.pending == 2


def test_configured_fallbacks_apply_unless_the_call_names_its_own(make_app):
    app, fake = layer(make_app, LLM_MAX_RETRIES=0, LLM_FALLBACKS='{"fake/m": ["fake/n", "fake/o"]}')
    with app.app_context():
        fake.add_error(unavailable()).add_response("from n")
        assert get_llm().chat(MESSAGES, model="fake/m").model == "n"
        fake.reset()
        fake.add_error(unavailable()).add_response("unused")
        chat_error("fake/m", fallbacks=[])  # an explicit empty list: no fallback
        assert models_called(fake) == ["fake/m"]
        fake.reset()
        fake.add_error(unavailable()).add_response("from p")
        assert get_llm().chat(MESSAGES, model="fake/m", fallbacks=["fake/p"]).model == "p"
        fake.reset()
        fake.add_error(unavailable()).add_response("unused")
        chat_error("fake/n")  # the chain is looked up by the model called, not followed from fallbacks
        assert models_called(fake) == ["fake/n"]


@pytest.mark.parametrize(
    ("error", "falls_back"),
    [
        (unavailable(500), True),
        (LLMRateLimitError("slow down", status_code=429), True),
        (LLMTimeoutError("no answer"), True),
        (LLMConnectionError("refused"), True),
        (LLMContextLengthError("too long for this model", status_code=400), True),
        (LLMBadRequestError("bad", status_code=400), False),
        (LLMContentFilterError("refused on policy grounds", status_code=400), False),
        (LLMAuthError("bad key", status_code=401), False),
        (LLMNotFoundError("no such model", status_code=404), False),
    ],
    ids=lambda value: type(value).__name__ if isinstance(value, LLMError) else str(value),
)
def test_which_errors_fall_back(make_app, error, falls_back):
    app, fake = layer(make_app, LLM_MAX_RETRIES=0)
    fake.add_error(error).add_response("from b")
    with app.app_context():
        if falls_back:
            assert get_llm().chat(MESSAGES, model="fake/m", fallbacks=["fake/b"]).model == "b"
        else:
            assert chat_error(fallbacks=["fake/b"]) is error
    assert models_called(fake) == (["fake/m", "fake/b"] if falls_back else ["fake/m"])


def test_an_open_breaker_falls_back_without_calling_the_primary(make_app):
    app, fake = layer(make_app, LLM_MAX_RETRIES=0, LLM_BREAKER_MIN_CALLS=1, LLM_BREAKER_FAILURE_RATE=1)
    fake.add_error(unavailable()).add_response("from b")
    with app.app_context():
        chat_error()  # one failure: open
        response = get_llm().chat(MESSAGES, model="fake/m", fallbacks=["fake/b"])
    assert response.model == "b"
    assert models_called(fake) == ["fake/m", "fake/b"]
    assert path(response.attempts) == [("fake/m", "LLMCircuitOpenError"), ("fake/b", "ok")]


# --- streams -----------------------------------------------------------------------------------


def test_a_stream_that_fails_to_open_is_retried(make_app):
    app, fake = layer(make_app, LLM_MAX_RETRIES=2)
    fake.add_error(unavailable(503))  # an HTTP error on opening
    fake.add_stream([], error=LLMConnectionError("reset before the first byte"))
    fake.add_stream(["Hel", "lo"])
    with app.app_context(), get_llm().chat_stream(MESSAGES, model="fake/m") as stream:
        assert "".join(stream) == "Hello"
    assert fake.methods == ["stream"] * 3
    assert path(stream.response.attempts) == [
        ("fake/m", "LLMServerError"),
        ("fake/m", "LLMConnectionError"),
        ("fake/m", "ok"),
    ]


def test_a_stream_is_not_retried_after_its_first_delta(make_app):
    app, fake = layer(make_app, LLM_MAX_RETRIES=3)
    fake.add_stream(["Hel", "lo"], error=LLMConnectionError("reset mid-stream")).add_response("never")
    received = []
    with app.app_context(), get_llm().chat_stream(MESSAGES, model="fake/m") as stream:
        with pytest.raises(LLMConnectionError):
            for text in stream:
                received.append(text)
    assert received == ["Hel", "lo"]
    assert len(fake.calls) == 1 and fake.pending == 1
    with pytest.raises(RuntimeError):
        stream.response  # the partial text is not reported as a complete answer


def test_a_stream_falls_back_when_the_primary_cannot_open(make_app):
    app, fake = layer(make_app, LLM_MAX_RETRIES=0)
    fake.add_error(unavailable()).add_stream(["from ", "b"])
    with app.app_context(), get_llm().chat_stream(MESSAGES, model="fake/m", fallbacks=["fake/b"]) as stream:
        assert "".join(stream) == "from b"
    assert (stream.response.provider, stream.response.model) == ("fake", "b")
    assert path(stream.response.attempts) == [("fake/m", "LLMServerError"), ("fake/b", "ok")]


def test_a_stream_closed_or_dropped_unread_gives_its_slot_back(make_app):
    app, fake = layer(make_app, LLM_MAX_RETRIES=0, LLM_MAX_CONCURRENCY=1, LLM_BULKHEAD_MAX_WAIT=0.05)
    bulkheads = app.extensions["llm"].guards.bulkheads
    with app.app_context():
        fake.add_stream(["a", "b"])
        get_llm().chat_stream(MESSAGES, model="fake/m").close()  # e.g. the client went away at once
        assert bulkheads.in_flight("fake") == 0 and fake.open_streams == 0
        fake.add_stream(["a", "b"])
        stream = get_llm().chat_stream(MESSAGES, model="fake/m")
        assert bulkheads.in_flight("fake") == 1
        del stream
        gc.collect()
        assert bulkheads.in_flight("fake") == 0 and fake.open_streams == 0
        fake.add_response("the slot is free")
        assert get_llm().chat(MESSAGES, model="fake/m").content == "the slot is free"


class Interrupted(BaseException):
    """Not an Exception, like gevent's Timeout or KeyboardInterrupt."""


def test_a_stream_interrupted_or_cancelled_while_opening_gives_its_slot_back(make_app):
    app, fake = layer(make_app, LLM_MAX_RETRIES=2, LLM_MAX_CONCURRENCY=1, LLM_BULKHEAD_MAX_WAIT=0.05)
    bulkheads = app.extensions["llm"].guards.bulkheads
    fake.add_stream([], error=Interrupted())
    with app.app_context():
        with pytest.raises(Interrupted):
            get_llm().chat_stream(MESSAGES, model="fake/m")
        assert len(fake.calls) == 1  # not retried: it was not a failure of the provider
        assert bulkheads.in_flight("fake") == 0

        async def cancelled() -> None:
            stream = get_llm().achat_stream(MESSAGES, model="fake/m")

            async def read() -> list[str]:
                async with stream:
                    return [piece async for piece in stream]

            with pytest.raises(TimeoutError):  # the caller gives up before the first token
                await asyncio.wait_for(read(), 0.1)

        fake.add_stream(["late"], delay=5.0)
        started = time.monotonic()
        asyncio.run(cancelled())
        assert time.monotonic() - started < 1.0
        assert bulkheads.in_flight("fake") == 0 and fake.open_streams == 0
        fake.add_response("the slot is free")
        assert get_llm().chat(MESSAGES, model="fake/m").content == "the slot is free"


# --- async -------------------------------------------------------------------------------------


def test_achat_retries_and_falls_back(make_app):
    app, fake = layer(make_app, LLM_MAX_RETRIES=1)
    fake.add_error(unavailable()).add_response("second try")
    fake.add_error(unavailable()).add_error(LLMTimeoutError("slow")).add_response("from b")

    async def main() -> tuple[Any, Any]:
        llm = get_llm()
        return (
            await llm.achat(MESSAGES, model="fake/m"),
            await llm.achat(MESSAGES, model="fake/m", fallbacks=["fake/b"]),
        )

    with app.app_context():
        retried, fallen_back = asyncio.run(main())
    assert retried.content == "second try"
    assert path(retried.attempts) == [("fake/m", "LLMServerError"), ("fake/m", "ok")]
    assert (fallen_back.content, fallen_back.model) == ("from b", "b")
    assert path(fallen_back.attempts) == [
        ("fake/m", "LLMServerError"),
        ("fake/m", "LLMTimeoutError"),
        ("fake/b", "ok"),
    ]
    assert fake.methods == ["achat"] * 5


def test_achat_raises_the_last_error_after_its_retries(make_app):
    app, fake = layer(make_app, LLM_MAX_RETRIES=2)
    errors = [unavailable() for _ in range(3)]
    for error in errors:
        fake.add_error(error)
    fake.add_error(LLMAuthError("bad key", status_code=401))

    async def main() -> list[LLMError]:
        caught = []
        for _ in range(2):
            try:
                await get_llm().achat(MESSAGES, model="fake/m", fallbacks=["fake/b"] if caught else None)
            except LLMError as exc:
                caught.append(exc)
        return caught

    with app.app_context():
        exhausted, final = asyncio.run(main())
    assert exhausted is errors[-1] and len(exhausted.attempts) == 3
    assert isinstance(final, LLMAuthError) and len(final.attempts) == 1  # no retry, no fallback
    assert models_called(fake) == ["fake/m"] * 4


def test_achat_stream_retries_then_falls_back(make_app):
    app, fake = layer(make_app, LLM_MAX_RETRIES=1)
    fake.add_error(unavailable()).add_stream([], error=LLMConnectionError("reset"))
    fake.add_error(unavailable()).add_stream(["from ", "b"])

    async def main() -> tuple[str, Any]:
        stream = get_llm().achat_stream(MESSAGES, model="fake/m", fallbacks=["fake/b"])
        async with stream:
            text = "".join([piece async for piece in stream])
        return text, stream.response

    with app.app_context():
        text, response = asyncio.run(main())
    assert text == "from b"
    assert (response.provider, response.model) == ("fake", "b")
    assert path(response.attempts) == [
        ("fake/m", "LLMServerError"),
        ("fake/m", "LLMConnectionError"),
        ("fake/b", "LLMServerError"),
        ("fake/b", "ok"),
    ]
    assert fake.methods == ["astream"] * 4


def test_achat_stream_is_not_retried_after_its_first_delta(make_app):
    app, fake = layer(make_app, LLM_MAX_RETRIES=3)
    fake.add_stream(["Hel"], error=LLMConnectionError("reset mid-stream")).add_response("never")

    async def main() -> list[str]:
        received: list[str] = []
        stream = get_llm().achat_stream(MESSAGES, model="fake/m", fallbacks=["fake/b"])
        with pytest.raises(LLMConnectionError):
            async for piece in stream:
                received.append(piece)
        return received

    with app.app_context():
        assert asyncio.run(main()) == ["Hel"]
    assert models_called(fake) == ["fake/m"]  # neither retried nor fallen back once text was sent


def test_embeddings_are_retried_too(make_app):
    app, fake = layer(make_app, LLM_MAX_RETRIES=1)
    fake.add_error(unavailable()).add_embedding([[0.5, 0.25]])
    fake.add_error(unavailable()).add_embedding([[0.75, 0.125]])
    with app.app_context():
        assert get_llm().embed(["x"], model="fake/e") == [[0.5, 0.25]]
        assert asyncio.run(get_llm().aembed(["y"], model="fake/e")) == [[0.75, 0.125]]
    assert fake.methods == ["embed", "embed", "aembed", "aembed"]


# --- bulkhead ----------------------------------------------------------------------------------


def test_a_full_bulkhead_fails_after_its_max_wait_without_a_request(make_app):
    app, fake = layer(
        make_app,
        LLM_MAX_RETRIES=2,
        LLM_MAX_CONCURRENCY=1,
        LLM_BULKHEAD_MAX_WAIT=0.3,
        LLM_BREAKER_MIN_CALLS=1,
    )
    other = install_fake_llm(app, "other")
    fake.add_stream(["slow ", "answer"], delay=0.05)
    with app.app_context():
        held = get_llm().chat_stream(MESSAGES, model="fake/m")  # open: its slot is taken
        fake.add_response("must wait")
        started = time.monotonic()
        error = chat_error()
        elapsed = time.monotonic() - started
        assert isinstance(error, LLMBulkheadFullError)
        assert 0.29 <= elapsed < 0.8
        assert len(fake.calls) == 1  # only the held stream reached the provider
        assert path(error.attempts) == [("fake/m", "LLMBulkheadFullError")]  # not retried
        other.add_response("another provider has slots of its own")
        assert get_llm().chat(MESSAGES, model="other/x").content.startswith("another")
        assert "".join(held) == "slow answer"
        assert get_llm().chat(MESSAGES, model="fake/m").content == "must wait"
        # A full bulkhead says nothing about the provider: the breaker (min 1 call) stayed closed.
        assert get_llm().guards.breakers.state("fake/m", BreakerPolicy(min_calls=1)).state == "closed"


# --- the breaker through the layer --------------------------------------------------------------


#: Long enough for the checks made while a breaker is open, even on a loaded machine.
COOLDOWN = 1.5


@pytest.fixture(params=["local", "redis"])
def breaker_settings(request: pytest.FixtureRequest) -> dict[str, Any]:
    settings: dict[str, Any] = {
        "LLM_MAX_RETRIES": 0,
        "LLM_BREAKER_MIN_CALLS": 3,
        "LLM_BREAKER_FAILURE_RATE": 1,
        "LLM_BREAKER_COOLDOWN": COOLDOWN,
    }
    if request.param == "redis":
        settings["REDIS_URL"] = request.getfixturevalue("disposable_redis").url  # its own: /readyz lists all
    return settings


def breakers_table(app: Flask) -> str:
    result = app.test_cli_runner().invoke(args=["llm", "breakers"])
    assert result.exit_code == 0, result.output
    return result.output


def readyz(app: Flask) -> tuple[int, dict[str, Any]]:
    response = app.test_client().get("/readyz")
    return response.status_code, json.loads(response.data)


def test_the_breaker_opens_rejects_without_a_request_and_is_visible(make_app, breaker_settings):
    model = f"fake/m{uuid.uuid4().hex[:8]}"  # a breaker of its own in the shared redis-server
    backend = "redis" if "REDIS_URL" in breaker_settings else "local"
    app, fake = layer(make_app, **breaker_settings)
    assert readyz(app)[1]["status"] == "pass"  # and imports what /readyz needs before the clock runs
    with app.app_context():
        for _ in range(3):  # a 400 does not count: three of them leave it closed
            fake.add_error(LLMBadRequestError("bad", status_code=400))
            chat_error(model)
        for _ in range(3):
            fake.add_error(unavailable())
            assert isinstance(chat_error(model), LLMServerError)
        calls = len(fake.calls)
        fake.add_response("not while open")
        error = chat_error(model)
        assert isinstance(error, LLMCircuitOpenError)
        assert len(fake.calls) == calls  # no request
        assert 0 < error.retry_after <= COOLDOWN
        assert path(error.attempts) == [(model, "LLMCircuitOpenError")]

    row = next(line for line in breakers_table(app).splitlines() if line.startswith(model))
    match = re.fullmatch(rf"{re.escape(model)}\s+open\s+100% of 3\s+(\d+\.\d)s\s+{backend}", row)
    assert match, row
    assert 0 < float(match.group(1)) <= COOLDOWN

    status, body = readyz(app)
    assert (status, body["status"]) == (200, "warn")
    [check] = body["checks"][f"llm:{model}:circuitBreaker"]
    assert check["status"] == "warn" and check["output"].startswith("circuit open")

    if backend == "redis":  # shared: another app (another worker) rejects without asking its provider
        other_app, other_fake = layer(make_app, **breaker_settings)
        with other_app.app_context():
            assert isinstance(chat_error(model), LLMCircuitOpenError)
        assert other_fake.calls == []

    time.sleep(COOLDOWN + 0.05)
    with app.app_context():
        assert get_llm().chat(MESSAGES, model=model).content == "not while open"  # the trial call
    assert re.search(rf"^{re.escape(model)}\s+closed\s", breakers_table(app), re.MULTILINE)
    status, body = readyz(app)
    assert (status, body["status"]) == (200, "pass")
    assert f"llm:{model}:circuitBreaker" not in body["checks"]


def test_a_failed_trial_call_reopens_the_breaker(make_app, breaker_settings):
    model = f"fake/m{uuid.uuid4().hex[:8]}"
    app, fake = layer(make_app, **breaker_settings)
    with app.app_context():
        for _ in range(3):
            fake.add_error(unavailable())
            chat_error(model)
        assert isinstance(chat_error(model), LLMCircuitOpenError)
        time.sleep(COOLDOWN + 0.05)
        fake.add_error(unavailable())
        assert isinstance(chat_error(model), LLMServerError)  # the trial, which fails
        calls = len(fake.calls)
        error = chat_error(model)
        assert isinstance(error, LLMCircuitOpenError) and error.retry_after > COOLDOWN / 2
        assert len(fake.calls) == calls


# --- no nested retries under the layer -------------------------------------------------------


def test_the_sdk_does_not_retry_beneath_the_layer(make_app, local_server):
    import openai

    from app.services.openai_service import get_openai_client

    local_server.expect_request("/v1/chat/completions", method="POST").respond_with_json(
        {"error": {"message": "upstream failed", "type": "server_error"}},
        status=500,
        headers={"retry-after-ms": "10"},  # so the SDK's own retries, where they run, are quick
    )
    base_url = local_server.url_for("/v1")
    app = make_app(
        OPENAI_API_KEY="sk-test", OPENAI_BASE_URL=base_url, OPENAI_MAX_RETRIES=2, LLM_MAX_RETRIES=0
    )
    with app.app_context():
        error = chat_error("openai/gpt-4o-mini")
        assert isinstance(error, LLMServerError) and error.status_code == 500
        assert len(local_server.log) == 1  # one attempt: the SDK's max_retries=2 is off underneath
        with pytest.raises(openai.InternalServerError):  # the client used directly keeps its retries
            get_openai_client().chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        assert len(local_server.log) == 1 + 3

    local_server.clear_log()
    app = make_app(
        OPENAI_API_KEY="sk-test",
        OPENAI_BASE_URL=base_url,
        OPENAI_MAX_RETRIES=2,
        LLM_MAX_RETRIES=2,
        LLM_BACKOFF_BASE=0,
    )
    with app.app_context():
        error = chat_error("openai/gpt-4o-mini")
    assert len(error.attempts) == 3
    assert len(local_server.log) == 3  # 3, not 3 x 3
