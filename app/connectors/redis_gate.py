"""One answer to "may I use Redis now?" for everything that keeps shared state in Redis and fails open.

Why it exists: circuit breakers, rate limits (and later a response cache and
budgets) keep state in Redis but must carry on without it. Each used to
decide on its own when Redis was down, when to try it again and what to log,
with different intervals: so one dead Redis made several retry loops and
several warnings per process. A :class:`RedisGate` per app decides once for
all its users:

* **Fail open.** :meth:`RedisGate.client` returns the app's client, or None
  (not configured, or failed less than ``probe_interval`` ago): the caller
  then uses its in-process fallback.
* **No retry storm.** After a failure nobody touches Redis until the
  interval (1 s) has passed; then one background thread probes it (PING,
  then the users' recovery hooks), so no caller waits on a dead or hung
  Redis but those in flight when it failed. Only a probe that succeeds
  opens the gate again; a success seen by a caller proves nothing about the
  calls that follow, so callers report failures only.
* **Quiet.** One warning per ``warn_interval`` (60 s) naming who saw the
  failure and which users are now local, one line when Redis answers again,
  one line ever when Redis is not configured; never a traceback per call.
* **Fork-safe, thread-safe.** A forked child starts fresh (the parent's
  probe thread and lock stay the parent's); state changes happen under one
  lock, the hot path (Redis up) reads two attributes.

:func:`fail_fast_pool` gives a user whose every call is on a request's path
(the rate limits) connections to the same server with a shorter timeout and
no retries.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import weakref
from collections.abc import Callable
from functools import cache
from typing import TYPE_CHECKING

from app.connectors._base import on_fork_in_child
from app.errors import ServiceNotConfiguredError
from app.redaction import redact

if TYPE_CHECKING:
    from redis import ConnectionPool, Redis

__all__ = ["RecoveryHook", "RedisGate", "fail_fast_pool", "redis_failures"]

logger = logging.getLogger(__name__)

#: Run by the probe with the client before the gate opens again (e.g. write back what was decided locally).
RecoveryHook = Callable[["Redis"], object]


@cache
def redis_failures() -> tuple[type[BaseException], ...]:
    """What a Redis call raises when Redis (or the network) fails; imported on first use."""
    from redis.exceptions import RedisError

    return (RedisError, OSError)


class RedisGate:
    """Whether the app's users may use Redis now; one per app, shared by all of them.

    ``redis_client()`` returns the app's client (it opens no connection), or
    None, or raises :class:`~app.errors.ServiceNotConfiguredError`, when
    REDIS_URL is unset. It is called in the caller's thread (it may need the
    app context) on each :meth:`client`, so a reset client is picked up.
    """

    def __init__(
        self,
        redis_client: Callable[[], Redis | None],
        *,
        probe_interval: float = 1.0,
        warn_interval: float = 60.0,
    ) -> None:
        self._redis_client = redis_client
        #: Seconds between two tries of a failed Redis (and two looks at an unset REDIS_URL).
        self.probe_interval = probe_interval
        #: Seconds between two warnings that Redis is unavailable.
        self.warn_interval = warn_interval
        #: (user, its recovery hook or None), in the order they joined; replaced, never changed in place.
        self._users: tuple[tuple[str, RecoveryHook | None], ...] = ()
        self._reset()
        _gates.add(self)

    def _reset(self) -> None:
        self._lock = threading.Lock()
        #: time.monotonic() before which client() answers None without asking; 0 while Redis is used.
        self._skip_until = 0.0
        #: Redis failed, and no probe has succeeded since.
        self._down = False
        self._probing = False
        self._last_warning = -math.inf
        self._told_unconfigured = False

    def join(self, user: str, on_recovery: RecoveryHook | None = None) -> None:
        """Name a user (for the log lines) and what the probe must run before Redis is used again."""
        with self._lock:  # copied on write: readers need no lock
            self._users = (*self._users, (user, on_recovery))

    def client(self) -> Redis | None:
        """The client to use now, or None: use the local fallback (and report no failure)."""
        skip_until = self._skip_until
        if skip_until:
            now = time.monotonic()
            if now < skip_until:
                return None
            if self._down:
                self._start_probe(now)
                return None
        try:
            client = self._redis_client()
        except ServiceNotConfiguredError:
            client = None
        except Exception as exc:  # the client could not even be built: as good as down
            self.failed("the Redis connector", exc)
            return None
        if client is None:
            self._unconfigured()
        elif skip_until:
            with self._lock:
                if not self._down:
                    self._skip_until = 0.0  # REDIS_URL is set now
        return client

    def failed(self, user: str, exc: BaseException) -> None:
        """Report that a Redis call of ``user`` failed: nobody uses Redis until a probe succeeds."""
        self._failed(user, exc, reschedule=True)

    @property
    def available(self) -> bool:
        """Whether Redis is configured and not known to be down (starts no probe, logs nothing)."""
        if self._down:
            return False
        try:
            return self._redis_client() is not None
        except Exception:  # not configured, or not buildable
            return False

    def _failed(self, user: str, exc: BaseException, *, reschedule: bool) -> None:
        now = time.monotonic()
        with self._lock:
            self._down = True
            if reschedule and not self._probing:  # a probe keeps its schedule: one per interval
                self._skip_until = max(self._skip_until, now + self.probe_interval)
            warn = now - self._last_warning >= self.warn_interval
            if warn:
                self._last_warning = now
        if warn:  # one line per interval, never a traceback per call
            logger.warning(
                "Redis is unavailable (%s: %s, seen by %s): %s keep their state in this process"
                " until Redis answers again (tried every %.1f s; this warning repeats at most every %.0f s)",
                type(exc).__name__,
                redact(str(exc)),
                user,
                self._names(),
                self.probe_interval,
                self.warn_interval,
            )

    # --- the probe ---------------------------------------------------------------

    def _start_probe(self, now: float) -> None:
        with self._lock:
            if self._probing or now < self._skip_until or not self._down:
                return
            self._probing = True
            self._skip_until = now + self.probe_interval  # the next probe, at the earliest
        try:
            client = self._redis_client()  # in the caller's context; opens no connection
        except Exception as exc:  # unset since, or unbuildable: stays down, tried again later
            self._probing = False
            self._failed("the probe", exc, reschedule=False)
            return
        if client is None:  # REDIS_URL unset since: nothing to probe
            with self._lock:
                self._probing = self._down = False
            self._unconfigured()
            return
        try:
            threading.Thread(target=self._probe, args=(client,), name="redis-gate-probe", daemon=True).start()
        except RuntimeError:  # no new threads (the interpreter is shutting down): stay local
            self._probing = False

    def _probe(self, client: Redis) -> None:
        try:
            client.ping()
            for hook in self._hooks():
                hook(client)
        except Exception as exc:  # a Redis failure, or a hook's: Redis is not usable yet
            self._probing = False
            self._failed("the probe", exc, reschedule=False)
            return
        with self._lock:
            self._probing = False
            was_down, self._down, self._skip_until = self._down, False, 0.0
        if was_down:
            logger.warning("Redis answers again: %s share their state across processes again", self._names())

    def _hooks(self) -> list[RecoveryHook]:
        return [hook for _, hook in self._users if hook is not None]

    # --- not configured --------------------------------------------------------------

    def _unconfigured(self) -> None:
        with self._lock:
            self._skip_until = time.monotonic() + self.probe_interval
            tell, self._told_unconfigured = not self._told_unconfigured, True
        if tell:
            logger.warning(
                "REDIS_URL is not set: %s keep their state in each process, so each worker counts alone",
                self._names(),
            )

    def _names(self) -> str:
        names = list(dict.fromkeys(user for user, _ in self._users)) or ["its users"]
        return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def fail_fast_pool(client: Redis, timeout: float) -> ConnectionPool:
    """Connections to the server of ``client`` with at most ``timeout`` s socket timeouts and no retries.

    Why: the app's client retries a failed command once, with backoff, and
    waits up to its own timeout on a socket; a check made before every call
    must cost at most one short timeout when Redis hangs. redis-py keeps
    timeouts and retries per connection, so this is a pool of its own, built
    from the connector's connection settings (address, credentials, TLS,
    database): only the failure knobs differ.
    """
    from redis import ConnectionPool
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    source = client.connection_pool
    kwargs = {
        name: value
        for name, value in source.connection_kwargs.items()
        # what a pool adds to its connections' settings for itself: the new pool adds its own
        if name != "maint_notifications_pool_handler" and not name.startswith("orig_")
    }
    for name in ("socket_timeout", "socket_connect_timeout"):
        current = kwargs.get(name)
        kwargs[name] = timeout if current is None else min(float(current), timeout)
    kwargs["retry"] = Retry(NoBackoff(), 0)
    return ConnectionPool(
        connection_class=source.connection_class, max_connections=source.max_connections, **kwargs
    )


# --- fork safety -------------------------------------------------------------------

_gates: weakref.WeakSet[RedisGate] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    # A lock held by another thread at fork time stays locked forever in the child, and the
    # parent's probe thread does not exist here: the child starts as a new process would.
    for gate in list(_gates):
        gate._reset()


on_fork_in_child(_after_fork_in_child)
