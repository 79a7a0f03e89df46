"""``get_json``, ``set_json`` and ``@cached`` on a real redis-server: TTLs, fail-open through the gate."""

from __future__ import annotations

import logging
import math

import pytest
import redis as redis_lib
from redis.exceptions import ConnectionError as RedisConnectionError

from app.errors import ServiceNotConfiguredError
from app.services.redis_service import cached, get_json, set_json

VALUE = {"city": "Paris", "temps": [12.5, 14], "ok": True, "none": None, "text": "é ✓"}


@pytest.fixture
def redis_app(make_app, redis_server):
    client = redis_lib.Redis.from_url(redis_server.url)
    client.flushdb()
    client.close()
    return make_app(REDIS_URL=redis_server.url)


@pytest.fixture
def raw(redis_server):
    client = redis_lib.Redis.from_url(redis_server.url)
    yield client
    client.close()


def test_a_value_round_trips_with_its_ttl(redis_app, raw):
    with redis_app.app_context():
        assert set_json("weather:paris", VALUE, ttl=30) is True
        assert get_json("weather:paris") == VALUE
        assert get_json("weather:nowhere") is None
        assert get_json("weather:nowhere", default={}) == {}
        assert set_json("forever", [1, 2]) is True
    assert 29_000 < raw.pttl("weather:paris") <= 30_000
    assert raw.pttl("forever") == -1  # no TTL
    assert (
        raw.get("weather:paris").decode()
        == '{"city":"Paris","temps":[12.5,14],"ok":true,"none":null,"text":"é ✓"}'
    )


def test_a_value_that_is_not_json_is_the_default_and_deleted(redis_app, raw, caplog):
    raw.set("broken", b"\x80not json")
    with redis_app.app_context():
        assert get_json("broken", default="fallback") == "fallback"
    assert raw.exists("broken") == 0
    assert "not JSON" in caplog.text


@pytest.mark.parametrize(
    ("value", "error"), [({1, 2}, TypeError), (math.nan, ValueError), (object(), TypeError)]
)
def test_a_value_that_cannot_be_json_is_refused(redis_app, value, error):
    with redis_app.app_context(), pytest.raises(error):
        set_json("k", value)


@pytest.mark.parametrize("ttl", [0, -1])
def test_a_ttl_must_be_positive(redis_app, ttl):
    with redis_app.app_context(), pytest.raises(ValueError, match="ttl"):
        set_json("k", 1, ttl=ttl)


def test_without_redis_a_get_is_the_default_and_a_set_is_dropped(make_app):
    app = make_app()
    with app.app_context():
        assert get_json("k", default=3) == 3
        assert set_json("k", 1) is False


def test_with_redis_down_nothing_raises_and_it_is_said_once(make_app, disposable_redis, caplog):
    caplog.set_level(logging.WARNING)
    app = make_app(REDIS_URL=disposable_redis.url)
    with app.app_context():
        assert set_json("k", 1) is True
        disposable_redis.stop()
        results = [(get_json("k", default="d"), set_json("k", 2)) for _ in range(20)]
    assert results == [("d", False)] * 20
    warnings = [r.getMessage() for r in caplog.records if "Redis is unavailable" in r.getMessage()]
    assert len(warnings) == 1 and "the JSON helpers" in warnings[0]
    assert not [r for r in caplog.records if r.exc_info]


def test_values_come_back_after_redis_does(make_app, disposable_redis):
    import time

    app = make_app(REDIS_URL=disposable_redis.url)
    with app.app_context():
        disposable_redis.stop()
        assert set_json("k", 1) is False
        disposable_redis.start()
        deadline = time.monotonic() + 3
        while not set_json("k", 5) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert get_json("k") == 5


def test_fail_open_false_raises(make_app, disposable_redis):
    app = make_app(REDIS_URL=disposable_redis.url)
    disposable_redis.stop()
    with app.app_context():
        with pytest.raises(RedisConnectionError):
            get_json("k", fail_open=False)
        with pytest.raises(RedisConnectionError):
            set_json("k", 1, fail_open=False)
    with make_app().app_context(), pytest.raises(ServiceNotConfiguredError, match="REDIS_URL"):
        get_json("k", fail_open=False)


def test_strict_mode_round_trips_too(redis_app, raw):
    with redis_app.app_context():
        assert set_json("strict", VALUE, ttl=5, fail_open=False) is True
        assert get_json("strict", fail_open=False) == VALUE
    raw.set("bad", b"{")
    with redis_app.app_context(), pytest.raises(ValueError):
        get_json("bad", fail_open=False)


def test_a_password_in_redis_url_reaches_no_log(make_app, disposable_redis, caplog):
    caplog.set_level(logging.DEBUG)
    password = "pw-canary-90d1c3"
    app = make_app(REDIS_URL=f"redis://:{password}@127.0.0.1:{disposable_redis.port}/0")
    with app.app_context():
        get_json("k"), set_json("k", 1)  # refused (the server has no such password): fails open
    assert password not in caplog.text


# --- @cached ---------------------------------------------------------------------------------------


def test_cached_calls_the_function_once_per_key_within_the_ttl(redis_app, raw):
    seen: list[str] = []

    @cached(ttl=60, key="forecast:{city}:{days}")
    def forecast(city: str, days: int = 3) -> dict[str, object]:
        seen.append(city)
        return {"city": city, "days": days}

    with redis_app.app_context():
        assert (
            forecast("Paris")
            == forecast("Paris")
            == forecast(city="Paris", days=3)
            == {"city": "Paris", "days": 3}
        )
        assert forecast("Oslo", 5) == {"city": "Oslo", "days": 5}
    assert seen == ["Paris", "Oslo"]
    assert sorted(raw.keys("cached:*")) == [b"cached:forecast:Oslo:5", b"cached:forecast:Paris:3"]
    assert 59_000 < raw.pttl("cached:forecast:Paris:3") <= 60_000


def test_cached_takes_a_key_function_or_none(redis_app, raw):
    @cached(ttl=10, key=lambda user_id: f"profile:{user_id}")
    def profile(user_id: int) -> dict[str, int]:
        return {"id": user_id}

    @cached(ttl=10)
    def totals(year: int) -> list[int]:
        return [year]

    with redis_app.app_context():
        profile(7), totals(2026)
    names = sorted(name.decode() for name in raw.keys("cached:*"))
    assert names[0] == "cached:profile:7"
    assert names[1].startswith("cached:tests.test_redis_json.") and names[1].endswith("totals(year=2026)")


def test_cached_without_redis_calls_the_function_every_time(make_app):
    calls = 0

    @cached(ttl=60, key="n")
    def number() -> int:
        nonlocal calls
        calls += 1
        return calls

    with make_app().app_context():
        assert [number(), number(), number()] == [1, 2, 3]


def test_cached_refuses_a_non_positive_ttl():
    with pytest.raises(ValueError, match="ttl"):
        cached(ttl=0)
