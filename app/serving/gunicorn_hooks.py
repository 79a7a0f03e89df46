"""What ``gunicorn.conf.py``'s server hooks do, kept here so that they are typed and tested.

- :func:`on_starting` (the master, after ``--preload`` loaded the app and
  before any worker exists): the worker class agrees with the one
  ``gunicorn.conf.py`` prepared for, the timeouts nest, and the SDKs of the
  configured services are imported (never a client).
- :func:`post_fork` (each worker, first thing): record the worker's kind and
  concurrency, which the bulkhead's default follows.
- :func:`post_worker_init` (each worker, app loaded, before it accepts): the
  timeouts nest (a worker that would break them does not boot), and the worker
  is warmed.
"""

from __future__ import annotations

import os
from typing import Any

from flask import Flask

from app.serving.timeouts import enforce_timeouts
from app.serving.warm import import_sdks, warm_worker
from app.serving.worker import WorkerKind, gevent_patched, set_worker

#: The worker classes ``gunicorn.conf.py`` supports (``GUNICORN_WORKER_CLASS``).
WORKER_CLASSES: tuple[WorkerKind, ...] = ("gthread", "gevent")


def worker_kind(cfg: Any) -> WorkerKind:
    name = str(cfg.worker_class_str)
    return "gevent" if name.startswith("gevent") else "gthread" if name == "gthread" else "unknown"


def worker_concurrency(cfg: Any) -> int:
    """Requests one worker holds at once: its connections under gevent, its threads otherwise."""
    return int(cfg.worker_connections) if worker_kind(cfg) == "gevent" else int(cfg.threads)


def check_worker_class(cfg: Any, prepared_for: str) -> None:
    """Stop when the command line chose another worker class than ``GUNICORN_WORKER_CLASS``.

    ``gunicorn.conf.py`` reads the class from the environment because gevent
    must patch the standard library before the app is imported, which a
    ``-k`` option, read later, cannot arrange.
    """
    actual = str(cfg.worker_class_str)
    if actual != prepared_for:
        raise SystemExit(
            f"Error: the worker class is {actual!r} (from -k/--worker-class or GUNICORN_CMD_ARGS) but"
            f" GUNICORN_WORKER_CLASS is {prepared_for!r}: set GUNICORN_WORKER_CLASS={actual} instead,"
            " so that gunicorn.conf.py prepares for it (gevent patches before the app is imported)"
        )


def flask_app(wsgi: Any) -> Flask | None:
    return wsgi if isinstance(wsgi, Flask) else None


def on_starting(server: Any, prepared_for: str) -> None:
    check_worker_class(server.cfg, prepared_for)
    if not server.cfg.preload_app:
        return
    app = flask_app(server.app.wsgi())
    if app is not None:
        enforce_timeouts(app, float(server.cfg.timeout), server.log)
        import_sdks(app)
    if gevent_patched():
        settle_greenlets()


def settle_greenlets(timeout: float = 1.0) -> None:
    """Let the greenlets that loading the app started finish before the master forks.

    In a patched master a thread is a greenlet, and one still pending at the fork
    (a library's ``threading.Timer``: Flask-Limiter's memory storage starts one)
    would run on in every worker, outside its ``threading`` bookkeeping. The hub
    runs until it has nothing left to do, or ``timeout``.
    """
    import gevent

    gevent.wait(timeout=timeout)


def post_fork(server: Any, worker: Any) -> None:
    set_worker(worker_kind(worker.cfg), worker_concurrency(worker.cfg))


def post_worker_init(worker: Any) -> None:
    app = flask_app(getattr(worker, "wsgi", None))
    if app is None:
        return
    if not worker.cfg.preload_app:  # a preloaded app was checked once, in the master
        enforce_timeouts(app, float(worker.cfg.timeout), worker.log)
    warmed = warm_worker(app, on_loop=worker_kind(worker.cfg) == "gthread")
    worker.log.info(
        "worker %s warm: %s; providers ready: %s",
        os.getpid(),
        ", ".join(warmed["modules"]) or "no SDK",
        ", ".join(warmed["providers"]) or "none",
    )


__all__ = [
    "WORKER_CLASSES",
    "check_worker_class",
    "on_starting",
    "post_fork",
    "post_worker_init",
    "worker_concurrency",
    "worker_kind",
]
