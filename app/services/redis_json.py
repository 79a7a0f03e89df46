"""JSON values in Redis for the app's own data, failing open through the app's Redis gate.

Three tools, for views and for the LLM response cache alike:

* :class:`GatedRedis`: Redis commands through the app's one
  :class:`~app.connectors.redis_gate.RedisGate` (the one breakers and rate
  limits use), on connections with short timeouts and no retries. While
  Redis is down it hands out no client, so nobody waits on a dead server; a
  failure is reported to the gate, which logs once per interval and probes
  once a second.
* :func:`get_json` / :func:`set_json`: a JSON value under a key, with a TTL.
  By default they fail open: Redis down (or unset), a get is the default and
  a set is dropped (False). ``fail_open=False`` raises instead, for data the
  caller cannot do without.
* :func:`cached`: a decorator that keeps what a view-data function returns
  (JSON values) for ``ttl`` seconds under a key made from its arguments.

Why not Flask-Caching: its Redis back end (cachelib's) pickles values, so
anyone who can write to the Redis server can run code in every worker that
reads them; it builds a second Redis client with its own settings beside the
app's connector (redis-py's 5 s timeouts and retries unless configured
again), and a dead Redis raises or waits out a timeout on every call rather
than failing open once for the whole app. What it would add here (memcached,
filesystem back ends, template fragment caching) the app does not use.
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar, cast

from flask import current_app

from app.connectors.redis_gate import RedisGate, fail_fast_pool, redis_failures

if TYPE_CHECKING:
    from redis import Redis

logger = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])

#: Seconds a fail-open command may wait on Redis: a cache in front of a request must not cost more.
FAIL_FAST_TIMEOUT = 0.5
#: Where :func:`cached` keeps values (``key`` is appended).
CACHED_PREFIX = "cached:"
#: How :class:`GatedRedis` users of the JSON helpers are named in the gate's log lines.
USER = "the JSON helpers"


class GatedRedis:
    """Redis for one user of the app's gate: a fail-fast client while the gate allows, else None."""

    def __init__(self, gate: RedisGate, user: str, timeout: float = FAIL_FAST_TIMEOUT) -> None:
        self.gate = gate
        self.user = user
        self.timeout = timeout
        #: (the app's client it was built from, the fail-fast client on the same server).
        self._fast: tuple[Any, Redis] | None = None
        self._lock = threading.Lock()
        gate.join(user)

    def client(self) -> Redis | None:
        """The client to use now, or None (Redis unset, or down until the gate's probe succeeds)."""
        source = self.gate.client()
        if source is None:
            return None
        fast = self._fast
        if fast is not None and fast[0] is source:
            return fast[1]
        with self._lock:
            if self._fast is None or self._fast[0] is not source:  # first use, or the app's client changed
                from redis import Redis

                try:
                    self._fast = (source, Redis(connection_pool=fail_fast_pool(source, self.timeout)))
                except Exception as exc:  # could not even be built: a failure like any other
                    self.failed(exc)
                    return None
            return self._fast[1]

    def failed(self, exc: BaseException) -> None:
        """A command failed: nobody uses Redis until the gate's probe succeeds (logged once per interval)."""
        self.gate.failed(self.user, exc)


def _gated() -> GatedRedis:
    """The JSON helpers' gated Redis of the current app (made on first use)."""
    extensions = current_app.extensions
    gated = extensions.get("redis_json")
    if gated is None:
        from app.llm import get_llm

        gated = extensions.setdefault("redis_json", GatedRedis(get_llm().redis_gate, USER))
    return cast(GatedRedis, gated)


def get_json(key: str, default: Any = None, *, fail_open: bool = True) -> Any:
    """The JSON value stored under ``key``, or ``default`` when there is none.

    Fail-open (the default): Redis unset or down, or a value that is not JSON, is
    ``default`` (a value that is not JSON is deleted). ``fail_open=False``: Redis
    errors raise (``redis.exceptions.RedisError``), as does a value that is not
    JSON (``ValueError``).
    """
    if not fail_open:
        from app.services.redis_service import get_redis_client

        raw = get_redis_client().get(key)
        return default if raw is None else json.loads(raw)
    gated = _gated()
    client = gated.client()
    if client is None:
        return default
    try:
        raw = client.get(key)
    except redis_failures() as exc:
        gated.failed(exc)
        return default
    if raw is None:
        return default
    try:
        return json.loads(raw)
    except ValueError:
        logger.warning("get_json: the value under a key is not JSON; deleted, and read as missing")
        _quietly(gated, lambda c: c.delete(key))
        return default


def set_json(key: str, value: Any, ttl: float | None = None, *, fail_open: bool = True) -> bool:
    """Store ``value`` (JSON; ``TypeError``/``ValueError`` if it is not) under ``key`` for ``ttl`` seconds.

    Returns whether it was stored. Fail-open (the default): with Redis unset or
    down nothing is stored and the answer is False. ``fail_open=False`` raises.
    """
    if ttl is not None and not ttl > 0:
        raise ValueError(f"ttl must be a positive number of seconds, got {ttl!r}")
    data = json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    milliseconds = None if ttl is None else max(1, round(ttl * 1000))
    if not fail_open:
        from app.services.redis_service import get_redis_client

        get_redis_client().set(key, data, px=milliseconds)
        return True
    return _quietly(_gated(), lambda client: client.set(key, data, px=milliseconds)) is not None


def _quietly(gated: GatedRedis, command: Callable[[Redis], Any]) -> Any:
    """``command(client)``, or None when Redis is not usable (a failure is told to the gate)."""
    client = gated.client()
    if client is None:
        return None
    try:
        return command(client)
    except redis_failures() as exc:
        gated.failed(exc)
        return None


def cached(ttl: float, key: str | Callable[..., str] | None = None) -> Callable[[F], F]:
    """Keep what the decorated function returns (a JSON value) in Redis for ``ttl`` seconds.

    ``key``: a format string of the function's arguments (``"weather:{city}"``), a
    function of the same arguments that returns the key, or None (the function's
    module and name, and its arguments). Stored under ``cached:<key>``. A value in
    Redis is returned without calling the function; otherwise the function is called
    and its value stored. Fails open: Redis unset or down, the function is simply
    called. A value that is not JSON is a ``TypeError`` from the first call.
    """
    if not ttl > 0:
        raise ValueError(f"cached(ttl=...) must be a positive number of seconds, got {ttl!r}")

    def decorate(function: F) -> F:
        signature = inspect.signature(function)

        def key_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
            if callable(key):
                return CACHED_PREFIX + key(*args, **kwargs)
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            if key is None:
                named = ",".join(f"{name}={value!r}" for name, value in bound.arguments.items())
                return f"{CACHED_PREFIX}{function.__module__}.{function.__qualname__}({named})"
            return CACHED_PREFIX + key.format(**bound.arguments)

        @functools.wraps(function)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            name = key_of(args, kwargs)
            missing = _MISSING
            value = get_json(name, missing)
            if value is not missing:
                return value
            value = function(*args, **kwargs)
            set_json(name, value, ttl)
            return value

        return cast(F, wrapper)

    return decorate


_MISSING: Any = object()

__all__ = ["CACHED_PREFIX", "GatedRedis", "cached", "get_json", "set_json"]
