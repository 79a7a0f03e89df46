"""The breaker state machine alone: no Redis, no threads, no clock but the milliseconds given.

Every transition of :class:`LocalBreakers`; the Lua scripts are held to the
same answers in test_breaker_store.py.
"""

from __future__ import annotations

import pytest

from app.llm.resilience.breaker_state import (
    ADMIT,
    BUCKETS,
    FULL,
    OPEN,
    TRIAL,
    BreakerState,
    LocalBreakers,
    Timing,
    make_state,
    timing_of,
)
from app.llm.resilience.settings import BreakerPolicy

KEY = "openai/gpt-4o"
POLICY = BreakerPolicy(window=10, min_calls=4, failure_rate=0.5, cooldown=5, half_open_calls=2)
TIMING = timing_of(POLICY)
T0 = 1_000_000_000  # ms, on a bucket boundary


def record(
    book: LocalBreakers, now: int, outcome: str | None, batch: int = 0, policy: BreakerPolicy = POLICY
):
    return book.record(KEY, policy, timing_of(policy), now, outcome, batch)  # type: ignore[arg-type]


def open_book(now: int = T0) -> LocalBreakers:
    """A book whose breaker just opened at ``now`` (4 failures of 4 calls)."""
    book = LocalBreakers()
    for _ in range(3):
        assert record(book, now, "failure") == ("closed", 0, "")
    assert record(book, now, "failure") == ("open", now + 5000, "opened")
    return book


def test_timing_is_the_policy_in_milliseconds_and_computed_once_per_policy():
    assert TIMING == Timing(window=10_000, bucket=10_000 // BUCKETS, cooldown=5000, ttl=16_000)
    assert timing_of(POLICY) is TIMING
    assert timing_of(BreakerPolicy(window=10, cooldown=5)) == Timing(10_000, 500, 5000, 16_000)


# --- closed ---------------------------------------------------------------------------


def test_a_fresh_breaker_admits_and_an_ignored_or_empty_record_remembers_nothing():
    book = LocalBreakers()
    assert book.before_call(KEY, POLICY, T0) == (ADMIT, 0)
    assert record(book, T0, "ignored") == ("closed", 0, "")
    assert record(book, T0, None) == ("closed", 0, "")
    assert book.snapshots(T0) == []


def test_it_opens_at_the_rate_only_after_min_calls_and_the_threshold_is_inclusive():
    book = LocalBreakers()
    for _ in range(3):
        record(book, T0, "failure")  # 100 %, but 3 < min_calls
    assert book.before_call(KEY, POLICY, T0) == (ADMIT, 0)
    assert record(book, T0, None, batch=4) == ("closed", 0, "")  # 3 of 7
    assert record(book, T0, "failure") == ("open", T0 + 5000, "opened")  # 4 of 8 == 0.5


def test_a_rate_reached_exactly_opens_despite_float_rounding():
    policy = BreakerPolicy(window=10, min_calls=10, failure_rate=0.3, cooldown=5)
    book = LocalBreakers()
    record(book, T0, None, batch=7, policy=policy)
    record(book, T0, "failure", policy=policy)
    record(book, T0, "failure", policy=policy)
    assert record(book, T0, "failure", policy=policy)[0] == "open"  # 3/10; 0.3 * 10 != 3.0 in floats


def test_successes_alone_never_open_it():
    book = LocalBreakers()
    assert record(book, T0, None, batch=1000) == ("closed", 0, "")
    assert book.snapshot(KEY, None, T0) == BreakerState(KEY, "closed", 1000, 0, 0.0, 0.0, "local")


def test_the_window_slides_bucket_by_bucket():
    book = LocalBreakers()
    for step in range(40):  # a call every 250 ms over 10 s: buckets come and go
        record(book, T0 + step * 250, "success")
    now = T0 + 39 * 250
    assert book.snapshot(KEY, None, now).calls == 40
    now += 5000
    assert book.snapshot(KEY, None, now).calls == 20  # the first half left the window
    for _ in range(19):
        record(book, now, "failure")
    assert book.snapshot(KEY, None, now).state == "closed"  # 19 of 39
    assert record(book, now, "failure")[2] == "opened"  # 20 of 40


def test_old_outcomes_leave_the_window_and_a_failure_opens_only_on_what_is_in_it():
    book = LocalBreakers()
    for _ in range(3):
        record(book, T0, "failure")
    later = T0 + TIMING.window + 1
    assert record(book, later, "failure") == ("closed", 0, "")  # 1 of 1 in the window
    assert book.snapshot(KEY, None, later).calls == 1


# --- open -------------------------------------------------------------------------------


def test_open_rejects_with_the_milliseconds_left_and_outcomes_do_not_extend_it():
    book = open_book()
    assert book.before_call(KEY, POLICY, T0 + 2000) == (OPEN, 3000)
    assert record(book, T0 + 2000, "failure") == ("open", T0 + 5000, "")  # admitted before it opened
    assert record(book, T0 + 2000, None, batch=5) == ("open", T0 + 5000, "")
    assert book.snapshot(KEY, None, T0 + 2000) == BreakerState(KEY, "open", 4, 4, 1.0, 3.0, "local")


# --- half-open ----------------------------------------------------------------------------


def test_after_the_cooldown_exactly_the_trial_calls_pass_then_full_until_the_round_lapses():
    book = open_book()
    now = T0 + 5000
    assert book.snapshot(KEY, None, now).state == "half_open"  # shown so once the cool-down is over
    assert book.before_call(KEY, POLICY, now) == (TRIAL, 0)
    assert book.before_call(KEY, POLICY, now) == (TRIAL, 0)
    assert book.before_call(KEY, POLICY, now + 1000) == (FULL, 4000)
    assert book.before_call(KEY, POLICY, now + 4999) == (FULL, 1)
    assert book.before_call(KEY, POLICY, now + 5000) == (TRIAL, 0)  # the round lapsed: a new one
    assert book.before_call(KEY, POLICY, now + 5000) == (TRIAL, 0)
    assert book.before_call(KEY, POLICY, now + 5000)[0] == FULL


def test_one_failure_in_half_open_reopens_it():
    book = open_book()
    now = T0 + 5000
    book.before_call(KEY, POLICY, now)
    assert record(book, now, "success") == ("half_open", 0, "")
    assert record(book, now + 10, "failure") == ("open", now + 10 + 5000, "reopened")
    assert book.before_call(KEY, POLICY, now + 1010) == (OPEN, 4000)


def test_successful_trials_close_it_with_a_fresh_window():
    book = open_book()
    now = T0 + 5000
    book.before_call(KEY, POLICY, now)
    book.before_call(KEY, POLICY, now)
    assert record(book, now, None, batch=50) == ("half_open", 0, "")  # batched successes are no trials
    assert record(book, now, "success") == ("half_open", 0, "")
    assert record(book, now, "success") == ("closed", 0, "closed")
    assert book.snapshot(KEY, None, now) == BreakerState(KEY, "closed", 0, 0, 0.0, 0.0, "local")
    for _ in range(3):
        record(book, now, "failure")
    assert book.before_call(KEY, POLICY, now) == (ADMIT, 0)  # the failures before it opened are gone


def test_an_ignored_trial_gives_its_permit_back_without_closing():
    book = open_book()
    now = T0 + 5000
    book.before_call(KEY, POLICY, now)
    book.before_call(KEY, POLICY, now)
    assert book.before_call(KEY, POLICY, now)[0] == FULL
    assert record(book, now, "ignored") == ("half_open", 0, "")
    assert book.before_call(KEY, POLICY, now) == (TRIAL, 0)
    assert record(book, now, "ignored") == ("half_open", 0, "")
    assert record(book, now, "ignored") == ("half_open", 0, "")
    assert record(book, now, "ignored") == ("half_open", 0, "")  # no permit below 0
    assert book.before_call(KEY, POLICY, now) == (TRIAL, 0)
    assert book.before_call(KEY, POLICY, now) == (TRIAL, 0)
    assert book.before_call(KEY, POLICY, now)[0] == FULL


# --- mirroring Redis -----------------------------------------------------------------------


def test_mirror_open_remembers_what_redis_said_and_open_breakers_lists_it():
    book = LocalBreakers()
    book.mirror_open(KEY, TIMING, T0, T0 + 3000)
    assert book.before_call(KEY, POLICY, T0 + 1000) == (OPEN, 2000)
    assert book.open_breakers(T0 + 1000) == [(KEY, TIMING, T0 + 3000)]
    assert book.open_breakers(T0 + 3000) == []  # its cool-down is over: nothing to write back


def test_mirror_record_counts_this_processes_outcomes_and_takes_the_shared_state():
    book = LocalBreakers()
    book.mirror_record(KEY, TIMING, T0, (0, 0), "closed", 0, "")
    assert book.snapshots(T0) == []  # nothing worth remembering
    book.mirror_record(KEY, TIMING, T0, (2, 0), "closed", 0, "")
    book.mirror_record(KEY, TIMING, T0, (1, 1), "closed", 0, "")
    assert book.snapshot(KEY, None, T0) == BreakerState(
        KEY, "closed", 3, 1, pytest.approx(1 / 3), 0.0, "local"
    )
    # Redis opened it (other processes' failures): this process carries on from there.
    book.mirror_record(KEY, TIMING, T0, (0, 0), "open", T0 + 5000, "")
    assert book.before_call(KEY, POLICY, T0 + 1) == (OPEN, 4999)
    book.mirror_record(KEY, TIMING, T0 + 5000, (0, 0), "half_open", 0, "")
    assert book.snapshot(KEY, None, T0 + 5000).state == "half_open"
    book.mirror_record(KEY, TIMING, T0 + 5000, (0, 0), "closed", 0, "closed")
    assert book.snapshot(KEY, None, T0 + 5000) == BreakerState(KEY, "closed", 0, 0, 0.0, 0.0, "local")


def test_a_mirrored_window_carries_on_locally():
    book = LocalBreakers()
    book.mirror_record(KEY, TIMING, T0, (2, 0), "closed", 0, "")  # two successes seen through Redis
    record(book, T0, "failure")
    assert record(book, T0, "failure") == ("open", T0 + 5000, "opened")  # 2 of 4


# --- expiry and operators ---------------------------------------------------------------------


def test_a_breaker_nobody_touches_is_forgotten_after_its_ttl():
    book = open_book()
    assert len(book.snapshots(T0 + TIMING.ttl)) == 1
    assert book.snapshots(T0 + TIMING.ttl + 1) == []
    assert book.before_call(KEY, POLICY, T0 + TIMING.ttl + 1) == (ADMIT, 0)


def test_make_state_shows_an_open_breaker_past_its_time_as_half_open():
    assert make_state(KEY, "open", T0 + 1500, 4, 2, T0, "redis") == BreakerState(
        KEY, "open", 4, 2, 0.5, 1.5, "redis"
    )
    assert make_state(KEY, "open", T0, 4, 2, T0, "redis").state == "half_open"
    assert make_state(KEY, "bogus", 0, 0, 0, T0, "local") == BreakerState(
        KEY, "closed", 0, 0, 0.0, 0.0, "local"
    )
