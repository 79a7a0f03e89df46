"""Serving many users at once: the worker, its capacity, timeouts that agree, warm starts, disconnects.

- :mod:`app.serving.worker`: which gunicorn worker this is and how many
  requests it holds (the bulkhead's default follows it).
- :mod:`app.serving.timeouts`: the heartbeat, attempt timeouts, deadline and
  worker timeout, checked at start to nest.
- :mod:`app.serving.warm`: the SDK imports done before the first request.
- :mod:`app.serving.disconnect` and :mod:`app.serving.background`: a request's
  upstream work, stopped when its client goes away.
- :mod:`app.serving.gunicorn_hooks`: what ``gunicorn.conf.py``'s hooks call.
"""

from __future__ import annotations

from app.serving.worker import FALLBACK_CAPACITY, current_worker, gevent_patched, llm_capacity, set_worker

__all__ = ["FALLBACK_CAPACITY", "current_worker", "gevent_patched", "llm_capacity", "set_worker"]
