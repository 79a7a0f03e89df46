"""Per-key quotas on ``/api`` with Flask-Limiter: requests and tokens per minute.

Each API key has two limits over a sliding minute (the ``limits`` library's
sliding-window counter), shared by ``/api/chat`` and ``/api/embeddings``:
requests (``rpm``) and tokens (``tpm``, a request costing its estimated
tokens: prompt characters / 4 plus ``max_tokens``, or 512 when the request
sets none; counted when admitted, not corrected by the answer's usage). A
key's own ``rpm``/``tpm`` override ``API_DEFAULT_RPM`` / ``API_DEFAULT_TPM``;
0 means no limit. The counters are per key, so one
client's burst never spends another key's quota; with ``API_AUTH=off`` they
are per client address.

Over a limit the answer is 429 JSON (``rate_limited``) with ``Retry-After``;
every ``/api`` answer carries ``RateLimit-Limit``, ``RateLimit-Remaining`` and
``RateLimit-Reset`` (seconds until the window frees up, as the IETF draft has
it; Flask-Limiter sends a timestamp, which :func:`_reset_as_seconds` turns
into seconds) for the limit nearest to being reached.

Storage: with ``REDIS_URL``, Redis, through the app's
:class:`~app.connectors.redis_gate.RedisGate` (the one the LLM breakers and
rate limits use) and its fail-fast pool, so the quotas hold across workers
and hosts; without it, each process counts alone. Flask-Limiter's
``in_memory_fallback`` keeps ``/api`` serving when Redis fails (each process
then counts alone until Redis answers again; Flask-Limiter looks again after
1, 2, 4 ... 32 s) and ``swallow_errors`` makes any other limiter failure let
the request through, logged, rather than fail it.

Neither redis-py nor the ``limits`` Redis storage is imported at start-up:
:class:`GateStorage` builds its Redis storage on first use (start-up time is
measured, and redis-py alone costs a quarter of it).
"""

from __future__ import annotations

import math
import threading
import time
from typing import TYPE_CHECKING, Any

from flask import Blueprint, Flask, Response, current_app, g, request
from limits.storage import SlidingWindowCounterSupport, Storage

from app.config import get_count

if TYPE_CHECKING:
    from limits.storage import RedisStorage
    from redis import Redis

    from app.api_keys import ApiCaller
    from app.connectors.redis_gate import RedisGate

__all__ = ["init_quotas"]

#: The ``limits`` storage scheme of :class:`GateStorage`.
GATE_SCHEME = "flask-services-gate"
#: How the quotas are named in the Redis gate's log lines.
GATE_USER = "API quotas"
#: Seconds a quota check may wait on Redis before the request goes on without it.
REDIS_TIMEOUT = 0.5
#: Characters per token in the admission estimate (the LLM rate limits use the same).
CHARS_PER_TOKEN = 4
#: Tokens assumed for an answer whose request sets no ``max_tokens`` (as the LLM rate limits do).
DEFAULT_ANSWER_TOKENS = 512


class GateStorage(Storage, SlidingWindowCounterSupport):
    """A ``limits`` storage in the app's Redis, used only while the app's Redis gate allows it.

    Written here because the library's Redis storage connects with the
    settings of a URL and imports redis-py when built; this one is built at
    start-up for nothing, and on first use wraps the library's own
    ``RedisStorage`` around a fail-fast pool to the server of the app's Redis
    client (0.5 s timeouts, no retries). When the gate says Redis is down, or
    a command fails (the gate is told), it raises, and Flask-Limiter counts
    in memory.
    """

    STORAGE_SCHEME = [GATE_SCHEME]

    def __init__(self, uri: str, wrap_exceptions: bool = False, **options: Any) -> None:
        super().__init__(uri, wrap_exceptions=wrap_exceptions)
        self._lock = threading.Lock()
        self._redis: tuple[Redis, RedisStorage] | None = None

    @property
    def base_exceptions(self) -> type[Exception] | tuple[type[Exception], ...]:
        from app.connectors.redis_gate import redis_failures

        return tuple(e for e in redis_failures() if issubclass(e, Exception))

    @staticmethod
    def _gate() -> RedisGate:
        from app.llm import get_llm

        return get_llm().guards.limiter.gate

    def _storage(self) -> RedisStorage:
        gate = self._gate()
        client = gate.client()
        if client is None:
            raise ConnectionError("Redis is not available now (the app's Redis gate is closed)")
        held = self._redis
        if held is None or held[0] is not client:
            with self._lock:
                held = self._redis
                if held is None or held[0] is not client:
                    from limits.storage import RedisStorage

                    from app.connectors.redis_gate import fail_fast_pool

                    # The URI only tells the library to use redis-py; the pool says where and how.
                    pool = fail_fast_pool(client, REDIS_TIMEOUT)
                    held = self._redis = (client, RedisStorage("redis://", connection_pool=pool))
        return held[1]

    def _run(self, method: str, *args: Any) -> Any:
        storage = self._storage()
        try:
            return getattr(storage, method)(*args)
        except Exception as exc:
            self._gate().failed(GATE_USER, exc)
            raise

    def incr(self, key: str, expiry: int, amount: int = 1) -> int:
        return int(self._run("incr", key, expiry, amount))

    def get(self, key: str) -> int:
        return int(self._run("get", key))

    def get_expiry(self, key: str) -> float:
        return float(self._run("get_expiry", key))

    def check(self) -> bool:
        """Whether Redis may be used again (Flask-Limiter asks while it counts in memory)."""
        try:
            return bool(self._storage().check())
        except Exception:
            return False

    def reset(self) -> int | None:
        result = self._run("reset")
        return None if result is None else int(result)

    def clear(self, key: str) -> None:
        self._run("clear", key)

    def acquire_sliding_window_entry(self, key: str, limit: int, expiry: int, amount: int = 1) -> bool:
        return bool(self._run("acquire_sliding_window_entry", key, limit, expiry, amount))

    def get_sliding_window(self, key: str, expiry: int) -> tuple[int, float, int, float]:
        previous, previous_ttl, current, current_ttl = self._run("get_sliding_window", key, expiry)
        return int(previous), float(previous_ttl), int(current), float(current_ttl)

    def clear_sliding_window(self, key: str, expiry: int) -> None:
        self._run("clear_sliding_window", key, expiry)


# --- the limits ------------------------------------------------------------------------


def _caller() -> ApiCaller | None:
    caller: ApiCaller | None = g.get("api_caller")
    return caller


def quota_bucket() -> str:
    """Whose counters a request uses: its key's (a hash prefix), or its address without keys."""
    caller = _caller()
    if caller is not None:
        return f"key:{caller.bucket}"
    return f"address:{request.remote_addr or 'unknown'}"


def _per_minute(own: int | None, default_key: str) -> str:
    amount = own if own is not None else get_count(current_app.config, default_key)
    return f"{amount}/minute" if amount else ""  # "": no limit


def requests_limit() -> str:
    caller = _caller()
    return _per_minute(caller.rpm if caller else None, "API_DEFAULT_RPM")


def tokens_limit() -> str:
    caller = _caller()
    return _per_minute(caller.tpm if caller else None, "API_DEFAULT_TPM")


def estimated_tokens() -> int:
    """A request's admission cost in tokens: its prompt's characters / 4, plus its answer's budget.

    It never raises (Flask-Limiter would take an error for a storage failure):
    a body the view will refuse costs 1. A cost above the key's whole limit is
    charged the limit, so the request waits for an empty window rather than
    being refused forever.
    """
    from app.api_body import BodyError, json_body, text_size

    try:
        body = json_body()
    except BodyError:
        return 1
    prompt = sum(text_size(body.get(name)) for name in ("messages", "tools", "response_format", "input"))
    answer = body.get("max_tokens")
    if isinstance(answer, bool) or not isinstance(answer, int) or answer < 1:
        answer = DEFAULT_ANSWER_TOKENS if "messages" in body else 0
    cost = math.ceil(prompt / CHARS_PER_TOKEN) + min(
        answer, get_count(current_app.config, "LLM_MAX_TOKENS_LIMIT")
    )
    limit = tokens_limit()
    ceiling = int(limit.partition("/")[0]) if limit else cost
    return max(1, min(cost, ceiling))


#: Where Flask-Limiter writes its Retry-After, so that it cannot replace a provider's own.
_QUOTA_RETRY_AFTER = "X-Quota-Retry-After"


def _finish_headers(response: Response) -> Response:
    """The quota headers as clients read them, after Flask-Limiter has written its own.

    ``RateLimit-Reset`` becomes seconds from now (the IETF draft), not
    Flask-Limiter's timestamp. Flask-Limiter writes a ``Retry-After`` on every
    answer, and on a 429 from a provider replaces the provider's with its
    window's when that is later; so it writes elsewhere, and ``Retry-After``
    is set from it only on the quota's own 429.
    """
    reset = response.headers.get("RateLimit-Reset")
    if reset is not None and reset.isdigit():
        # Flask-Limiter writes int(reset time + 1): one less is the whole second at or before the
        # window's reset, so a 60 s window never reads 61 (int(reset) - int(now) could).
        response.headers["RateLimit-Reset"] = str(max(0, math.ceil(int(reset) - 1 - time.time())))
    quota_retry_after = response.headers.pop(_QUOTA_RETRY_AFTER, None)
    if g.get("api_over_quota") and quota_retry_after is not None:
        response.headers["Retry-After"] = str(max(1, int(quota_retry_after)))
    return response


def init_quotas(app: Flask, bp: Blueprint) -> None:
    """Give ``app`` a Flask-Limiter with the per-key limits on ``bp``.

    Call it after the authentication hook is registered: Flask-Limiter checks
    in an ``app.before_request`` of its own, which must run after the key is
    known. :func:`_finish_headers`, registered before Flask-Limiter's hooks,
    runs after they have written their headers (Flask runs ``after_request``
    functions in reverse order).
    """
    from flask_limiter import HeaderNames, Limiter

    from app.connectors.redis_connector import EXTENSION_KEY as REDIS_KEY

    redis = app.extensions.get(REDIS_KEY)
    app.after_request(_finish_headers)
    limiter = Limiter(
        quota_bucket,
        app=app,
        storage_uri=f"{GATE_SCHEME}://" if getattr(redis, "configured", False) else "memory://",
        strategy="sliding-window-counter",
        key_prefix="api-quota",
        headers_enabled=True,
        header_name_mapping={
            HeaderNames.LIMIT: "RateLimit-Limit",
            HeaderNames.REMAINING: "RateLimit-Remaining",
            HeaderNames.RESET: "RateLimit-Reset",
            HeaderNames.RETRY_AFTER: _QUOTA_RETRY_AFTER,
        },
        swallow_errors=True,
        in_memory_fallback_enabled=True,
    )
    limiter.shared_limit(requests_limit, scope="requests")(bp)
    limiter.shared_limit(tokens_limit, scope="tokens", cost=estimated_tokens)(bp)
    app.extensions["api_quotas"] = limiter
