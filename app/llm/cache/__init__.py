"""A response cache for LLM calls (``LLM_CACHE``: memory, disk or redis), built as a hook.

:mod:`~app.llm.cache.hook` is the hook; :mod:`~app.llm.cache.keys` the key
(the canonical request form of :mod:`app.llm.canonical`), :mod:`~app.llm.cache.codec`
the entries, :mod:`~app.llm.cache.memory`, :mod:`~app.llm.cache.disk` and
:mod:`~app.llm.cache.redis_store` the back ends, :mod:`~app.llm.cache.flight`
single flight in a process, :mod:`~app.llm.cache.cli` ``flask llm cache``.
Nothing is imported here: the settings module is read at start-up, the rest
on the first call.
"""

from __future__ import annotations


def current_cache() -> object | None:
    """The current app's response cache hook, or None when ``LLM_CACHE`` is unset."""
    from app.llm.cache.hook import ResponseCache
    from app.llm.client import get_llm

    return next((hook for hook in get_llm().hooks.hooks if isinstance(hook, ResponseCache)), None)


__all__ = ["current_cache"]
