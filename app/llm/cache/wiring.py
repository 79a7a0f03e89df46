"""The response cache of one app, from its settings: its store, policy and endpoints."""

from __future__ import annotations

import weakref

from flask import Flask

from app.errors import ConfigError
from app.llm.cache.hook import ResponseCache
from app.llm.cache.keys import endpoints
from app.llm.cache.settings import CacheOption, CacheSettings
from app.llm.cache.store import Store


def response_cache(app: Flask, settings: CacheSettings) -> ResponseCache:
    """The hook ``init_app`` installs; ``LLM_CACHE=redis`` without ``REDIS_URL`` stops start-up."""
    if settings.backend == "redis" and not app.config.get("REDIS_URL"):
        raise ConfigError("LLM_CACHE=redis needs REDIS_URL (or choose LLM_CACHE=memory or disk)")
    app_ref = weakref.ref(app)

    def llm_of() -> object:
        target = app_ref()
        assert target is not None
        return target.extensions["llm"]

    def store() -> Store:
        if settings.backend == "memory":
            from app.llm.cache.memory import MemoryStore

            return MemoryStore(settings.max_bytes)
        if settings.backend == "disk":
            from app.llm.cache.disk import DiskStore

            return DiskStore(settings.directory)
        from app.llm.cache.redis_store import RedisStore

        return RedisStore(llm_of().redis_gate)  # type: ignore[attr-defined]

    def policy(provider: str, model: str) -> CacheOption:
        return llm_of().resilience.policy(provider, model).cache.enabled  # type: ignore[attr-defined, no-any-return]

    def app_endpoints() -> dict[str, str | None]:
        target = app_ref()
        return endpoints(target.extensions) if target is not None else {}

    return ResponseCache(settings, store, policy, app_endpoints)


__all__ = ["response_cache"]
