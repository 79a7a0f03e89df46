"""The circuit breakers' shared state in Redis: one hash per breaker, every transition one Lua script.

Why Lua: concurrent workers on many hosts must never race, so each
transition reads and writes a breaker's hash atomically (EVALSHA): half-open
admits exactly ``half_open_calls`` trial calls across all processes. The
scripts are the same state machine as :class:`.breaker_state.LocalBreakers`.

Time: the scripts take the caller's clock (milliseconds) rather than Redis
``TIME``, so that tests can inject a clock; hosts are assumed NTP-synced.
Redis key expiry (``window + cooldown + 1 s`` after the last write) is real
time, so a breaker no one calls vanishes.

This module only talks to Redis: it raises what redis-py raises, and the
caller (:class:`.breaker.CircuitBreakers`) decides what a failure means.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING, Any, cast

from app.llm.resilience.breaker_state import BreakerState, Outcome, StateName, Timing, make_state
from app.llm.resilience.settings import BreakerPolicy

if TYPE_CHECKING:
    from redis import Redis

__all__ = ["RecordReply", "RedisBreakerStore"]


class _Lua:
    """A script and its SHA1, computed once: EVALSHA sends 40 bytes instead of the script."""

    __slots__ = ("sha", "source")

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode(), usedforsecurity=False).hexdigest()


# KEYS[1] = breaker; ARGV = now_ms, cooldown_ms, half_open_calls, ttl_ms.
# Returns {code, ms}: admit / open (ms left) / trial admitted / half-open full (ms until the round lapses).
_BEFORE = _Lua(
    """
local key = KEYS[1]
local s = redis.call('HMGET', key, 'state', 'until', 'permits', 'since')
local state = s[1]
if not state or state == 'closed' then return {0, 0} end
local now = tonumber(ARGV[1])
local cooldown = tonumber(ARGV[2])
if state == 'open' then
  local left = (tonumber(s[2]) or 0) - now
  if left > 0 then return {1, left} end
  redis.call('HSET', key, 'state', 'half_open', 'permits', 1, 'successes', 0, 'since', now)
  redis.call('PEXPIRE', key, ARGV[4])
  return {2, 0}
end
local since = tonumber(s[4]) or now
if now - since >= cooldown then
  redis.call('HSET', key, 'permits', 1, 'successes', 0, 'since', now)
  redis.call('PEXPIRE', key, ARGV[4])
  return {2, 0}
end
if (tonumber(s[3]) or 0) < tonumber(ARGV[3]) then
  redis.call('HINCRBY', key, 'permits', 1)
  return {2, 0}
end
return {3, since + cooldown - now}
"""
)

# KEYS[1] = breaker; ARGV = now_ms, outcome, window_ms, bucket_ms, min_calls, failure_rate,
# cooldown_ms, half_open_calls, ttl_ms, batch.
# outcome: success / failure / ignored, or none (only the batch); batch: successes of calls
# admitted while closed, counted only while it still is (they say nothing about trial calls).
# Returns {state, until_ms, counted (0/1), transition ('' / opened / reopened / closed)}.
_RECORD = _Lua(
    """
local key = KEYS[1]
local now = tonumber(ARGV[1])
local outcome = ARGV[2]
local ttl = ARGV[9]
local batch = tonumber(ARGV[10])
local s = redis.call('HMGET', key, 'state', 'until', 'permits')
local state = s[1] or 'closed'
if state == 'open' then return {'open', tonumber(s[2]) or 0, 0, ''} end
if state == 'half_open' then
  if outcome == 'failure' then
    local reopen = now + tonumber(ARGV[7])
    redis.call('HSET', key, 'state', 'open', 'until', reopen, 'permits', 0, 'successes', 0)
    redis.call('PEXPIRE', key, ttl)
    return {'open', reopen, 0, 'reopened'}
  end
  if outcome == 'success' then
    if redis.call('HINCRBY', key, 'successes', 1) >= tonumber(ARGV[8]) then
      redis.call('DEL', key)
      redis.call('HSET', key, 'state', 'closed', 'window', ARGV[3])
      redis.call('PEXPIRE', key, ttl)
      return {'closed', 0, 0, 'closed'}
    end
    return {'half_open', 0, 0, ''}
  end
  if outcome == 'ignored' and (tonumber(s[3]) or 0) > 0 then
    redis.call('HINCRBY', key, 'permits', -1)
  end
  return {'half_open', 0, 0, ''}
end
local added = batch
if outcome == 'success' or outcome == 'failure' then added = added + 1 end
if added == 0 then return {'closed', 0, 0, ''} end
local bucket = tonumber(ARGV[4])
local start = string.format('%d', math.floor(now / bucket) * bucket)
redis.call('HINCRBY', key, 'c:' .. start, added)
if outcome == 'failure' then redis.call('HINCRBY', key, 'f:' .. start, 1) end
local horizon = now - tonumber(ARGV[3])
local calls, failures = 0, 0
local fields = redis.call('HGETALL', key)
for i = 1, #fields, 2 do
  local name = fields[i]
  local kind = string.sub(name, 1, 2)
  if kind == 'c:' or kind == 'f:' then
    if (tonumber(string.sub(name, 3)) or 0) <= horizon then
      redis.call('HDEL', key, name)
    elseif kind == 'c:' then
      calls = calls + tonumber(fields[i + 1])
    else
      failures = failures + tonumber(fields[i + 1])
    end
  end
end
redis.call('HSET', key, 'state', 'closed', 'window', ARGV[3])
redis.call('PEXPIRE', key, ttl)
if calls >= tonumber(ARGV[5]) and failures / calls >= tonumber(ARGV[6]) - 1e-9 then
  local reopen = now + tonumber(ARGV[7])
  redis.call('HSET', key, 'state', 'open', 'until', reopen, 'permits', 0, 'successes', 0)
  return {'open', reopen, 1, 'opened'}
end
return {'closed', 0, 1, ''}
"""
)

# KEYS[1] = breaker; ARGV = until_ms, ttl_ms, window_ms. Opens it unless Redis already holds it open.
_SEED = _Lua(
    """
local state = redis.call('HGET', KEYS[1], 'state')
if state == 'open' or state == 'half_open' then return 0 end
redis.call('HSET', KEYS[1], 'state', 'open', 'until', ARGV[1], 'permits', 0, 'successes', 0,
  'window', ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""
)


@cache
def _no_script() -> type[BaseException]:
    from redis.exceptions import NoScriptError

    return NoScriptError


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@dataclass(frozen=True)
class RecordReply:
    """What Redis holds after a record."""

    state: StateName
    reopen_at: int  #: ms, when open
    counted: bool  #: whether the outcomes were counted in the window (only while closed)
    transition: str  #: "", "opened", "reopened" or "closed"


class RedisBreakerStore:
    """The breakers under ``namespace`` in a Redis; each method takes the client to use this time."""

    def __init__(self, namespace: str) -> None:
        self.namespace = namespace
        self._prefix = f"{namespace}:"

    def before_call(
        self, client: Redis, key: str, policy: BreakerPolicy, timing: Timing, now: int
    ) -> tuple[int, int]:
        """Whether a call may go ahead: ``(code, ms)`` as in :mod:`.breaker_state` (ADMIT, OPEN, ...)."""
        reply = self._run(client, _BEFORE, key, now, timing.cooldown, policy.half_open_calls, timing.ttl)
        return int(reply[0]), int(reply[1])

    def record(
        self,
        client: Redis,
        key: str,
        policy: BreakerPolicy,
        timing: Timing,
        now: int,
        outcome: Outcome | None,
        batch: int,
    ) -> RecordReply:
        """Count ``outcome`` (None: only the batch) and ``batch`` successes of calls admitted as closed."""
        reply = self._run(
            client,
            _RECORD,
            key,
            now,
            outcome or "none",
            timing.window,
            timing.bucket,
            policy.min_calls,
            repr(float(policy.failure_rate)),
            timing.cooldown,
            policy.half_open_calls,
            timing.ttl,
            batch,
        )
        state = cast(StateName, _text(reply[0]))
        return RecordReply(state, int(reply[1]), bool(int(reply[2])), _text(reply[3]))

    def seed_open(self, client: Redis, key: str, timing: Timing, reopen_at: int) -> bool:
        """Open ``key`` until ``reopen_at`` unless Redis already holds it open or half-open."""
        return bool(int(cast(Any, self._run(client, _SEED, key, reopen_at, timing.ttl, timing.window))))

    def state(self, client: Redis, key: str, window: int, now: int) -> BreakerState:
        """One breaker, its window counted over ``window`` ms."""
        fields = cast(dict[Any, Any], client.hgetall(self._prefix + key))
        return _redis_state(key, fields, window, now)

    def states(self, client: Redis, now: int) -> list[BreakerState]:
        """Every breaker under the namespace (SCAN), each counted over its own window."""
        names = [_text(name) for name in client.scan_iter(match=_glob(self._prefix) + "*", count=500)]
        pipe = client.pipeline(transaction=False)
        for name in names:
            pipe.hgetall(name)
        replies = pipe.execute()
        return [
            _redis_state(name[len(self._prefix) :], fields, None, now)
            for name, fields in zip(names, replies, strict=True)
            if fields
        ]

    def _run(self, client: Redis, script: _Lua, key: str, *args: Any) -> Any:
        keys_and_args = (self._prefix + key, *(str(arg) for arg in args))
        try:
            return client.evalsha(script.sha, 1, *keys_and_args)
        except _no_script():  # a restarted (or flushed) Redis forgot it: EVAL caches it again
            return client.eval(script.source, 1, *keys_and_args)


def _redis_state(key: str, raw: dict[Any, Any], window: int | None, now: int) -> BreakerState:
    fields = {_text(name): _text(value) for name, value in raw.items()}
    if window is None:
        window = int(fields.get("window") or 0)
    horizon = now - window
    calls = failures = 0
    for name, value in fields.items():
        kind, _, start = name.partition(":")
        if kind in ("c", "f") and start.lstrip("-").isdigit() and int(start) > horizon:
            if kind == "c":
                calls += int(value)
            else:
                failures += int(value)
    reopen_at = int(float(fields.get("until") or 0))
    return make_state(key, fields.get("state", "closed"), reopen_at, calls, failures, now, "redis")


def _glob(text: str) -> str:
    """``text`` as a literal in a Redis MATCH pattern."""
    return "".join(f"\\{char}" if char in "*?[]\\" else char for char in text)
