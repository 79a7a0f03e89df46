"""The budgets' shared counters in Redis: one hash per budget window, every change one Lua script.

A counter hash holds ``spent`` (nano-USD, settled calls) and, per process
that holds part of the budget, ``h:<lease>`` (the amount it holds: its calls in
flight, plus room it was lent ahead) and ``u:<lease>`` (until when, epoch ms).
:data:`_SYNC` checks and changes every counter of a call atomically, so
concurrent workers on any number of hosts never admit more than a budget
holds: it adds what the process settled since its last visit to ``spent``,
drops the holds of processes that stopped renewing them (a killed worker's
reservations lapse after ``LLM_BUDGET_RESERVATION_TTL``), and, when asked to
admit a call, refuses it unless ``spent + other processes' holds + this
process's calls in flight + the call`` fits under the limit of every counter.

Keys share the hash tag ``{b}``, so a script's keys are in one slot of a Redis
Cluster. Hosts' clocks are assumed NTP-synced (the leases' expiries are
absolute times). This module only talks to Redis: it raises what redis-py
raises, and :mod:`.accounts` decides what a failure means.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, unquote

if TYPE_CHECKING:
    from redis import Redis

__all__ = ["PREFIX", "CounterReply", "RedisBudgetStore", "SyncRequest", "counter_key", "parse_counter_key"]

#: Every budget counter's key starts with this (``{b}``: one Redis Cluster slot for all).
PREFIX = "llm:budget:{b}:"
#: Room lent ahead is at most this fraction of what is free (the script's 16), so workers cannot pin a budget.
LEND_DIVISOR = 16

# KEYS: the counters. ARGV: now_ms, lease_until_ms, lease, admit (0/1), amount, min_lend, then per key:
# limit, push, in_flight, want (room wanted ahead), expire_at_ms. All amounts are nano-USD.
# Returns {refused (0: none, else the index of the first counter without room), then per key:
# spent, others' holds, this lease's hold}.
_SYNC_SOURCE = """
local now = tonumber(ARGV[1])
local lease = ARGV[3]
local admit = ARGV[4] == '1'
local amount = tonumber(ARGV[5])
local min_lend = tonumber(ARGV[6])
local rows = {}
local refused = 0
for i, key in ipairs(KEYS) do
  local base = 6 + (i - 1) * 5
  local limit = tonumber(ARGV[base + 1])
  local inflight = tonumber(ARGV[base + 3])
  local spent = redis.call('HINCRBY', key, 'spent', ARGV[base + 2])
  local fields = redis.call('HGETALL', key)
  local holds, untils = {}, {}
  for j = 1, #fields, 2 do
    local kind = string.sub(fields[j], 1, 2)
    if kind == 'h:' then
      holds[string.sub(fields[j], 3)] = tonumber(fields[j + 1])
    elseif kind == 'u:' then
      untils[string.sub(fields[j], 3)] = tonumber(fields[j + 1])
    end
  end
  local others = 0
  for id, held in pairs(holds) do
    if id ~= lease then
      if (untils[id] or 0) <= now then
        redis.call('HDEL', key, 'h:' .. id, 'u:' .. id)
      else
        others = others + held
      end
    end
  end
  rows[i] = {spent, others, limit, inflight, tonumber(ARGV[base + 4]), ARGV[base + 5]}
  if admit and refused == 0 and spent + others + inflight + amount > limit then
    refused = i
  end
end
local reply = {refused}
for i, key in ipairs(KEYS) do
  local row = rows[i]
  local spent, others, limit = row[1], row[2], row[3]
  local hold = row[4]
  if admit and refused == 0 then
    hold = hold + amount
  end
  if refused == 0 and row[5] > 0 then
    local lend = math.min(row[5], math.floor((limit - spent - others - hold) / 16))
    if lend > 0 and lend >= min_lend then
      hold = hold + lend
    end
  end
  if hold > 0 then
    redis.call('HSET', key, 'h:' .. lease, hold, 'u:' .. lease, ARGV[2])
  else
    redis.call('HDEL', key, 'h:' .. lease, 'u:' .. lease)
  end
  redis.call('PEXPIREAT', key, row[6])
  reply[#reply + 1] = spent
  reply[#reply + 1] = others
  reply[#reply + 1] = hold
end
return reply
"""

_SYNC_SHA = hashlib.sha1(_SYNC_SOURCE.encode(), usedforsecurity=False).hexdigest()


@cache
def _no_script() -> type[BaseException]:
    from redis.exceptions import NoScriptError

    return NoScriptError


def counter_key(scope: str, subject: str | None, window: str, period: str) -> str:
    """``llm:budget:{b}:user:alice:daily:2026-11-30`` (the subject percent-encoded; ``-``: none)."""
    return f"{PREFIX}{scope}:{quote(subject, safe='') if subject is not None else '-'}:{window}:{period}"


def parse_counter_key(key: str) -> tuple[str, str | None, str, str] | None:
    """(scope, subject, window, period) of a counter key, or None for another key."""
    if not key.startswith(PREFIX):
        return None
    parts = key[len(PREFIX) :].split(":")
    if len(parts) != 4:
        return None
    scope, subject, window, period = parts
    return scope, None if subject == "-" else unquote(subject), window, period


@dataclass(frozen=True)
class SyncRequest:
    """One counter's part of a script call."""

    key: str
    limit: int
    push: int
    in_flight: int
    want: int
    expire_at_ms: int


@dataclass(frozen=True)
class CounterReply:
    spent: int
    others: int
    held: int


class RedisBudgetStore:
    """Runs :data:`_SYNC` (EVALSHA; EVAL once after Redis forgot the script) and reads counters."""

    def sync(
        self,
        client: Redis,
        counters: Sequence[SyncRequest],
        *,
        now_ms: int,
        lease_until_ms: int,
        lease: str,
        admit: bool,
        amount: int,
        min_lend: int,
    ) -> tuple[int, list[CounterReply]]:
        """(index of the refusing counter, 1-based, or 0; each counter's state after the script)."""
        args: list[Any] = [now_ms, lease_until_ms, lease, 1 if admit else 0, amount, min_lend]
        for counter in counters:
            args += [counter.limit, counter.push, counter.in_flight, counter.want, counter.expire_at_ms]
        keys = [counter.key for counter in counters]
        try:
            reply = client.evalsha(_SYNC_SHA, len(keys), *keys, *args)
        except _no_script():  # a restarted (or flushed) Redis forgot it: EVAL caches it again
            reply = client.eval(_SYNC_SOURCE, len(keys), *keys, *args)
        values = [int(value) for value in reply]
        states = [CounterReply(*values[1 + 3 * i : 4 + 3 * i]) for i in range(len(counters))]
        return values[0], states

    def read(self, client: Redis, now_ms: int, match: str = "*") -> dict[str, tuple[int, int]]:
        """Every counter under :data:`PREFIX` matching ``match``: key -> (spent, live holds)."""
        pattern = _glob(PREFIX) + match
        names = [_text(name) for name in client.scan_iter(match=pattern, count=500)]
        pipe = client.pipeline(transaction=False)
        for name in names:
            pipe.hgetall(name)
        found: dict[str, tuple[int, int]] = {}
        for name, raw in zip(names, pipe.execute(), strict=True):
            fields = {_text(k): _text(v) for k, v in raw.items()}
            held = sum(
                int(value)
                for field, value in fields.items()
                if field.startswith("h:") and int(fields.get("u:" + field[2:], "0")) > now_ms
            )
            found[name] = (int(fields.get("spent", "0")), held)
        return found


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _glob(text: str) -> str:
    """``text`` as a literal in a Redis MATCH pattern."""
    return "".join(f"\\{char}" if char in "*?[]\\" else char for char in text)
