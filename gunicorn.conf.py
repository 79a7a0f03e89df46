"""gunicorn settings, read from the environment.

``GUNICORN_WORKER_CLASS`` (``gthread``; or ``gevent``, with the extra
``.[gevent]``), ``PORT`` (8000), ``BIND`` (127.0.0.1:$PORT),
``WEB_CONCURRENCY`` (workers, 2), ``GUNICORN_THREADS`` (64, gthread),
``GUNICORN_WORKER_CONNECTIONS`` (1000, gevent), ``GUNICORN_TIMEOUT`` (130 s,
rounded up to whole seconds), ``GUNICORN_PRELOAD`` (0),
``GUNICORN_ACCESS_LOG`` (``-``, stdout), ``GUNICORN_CONTROL_SOCKET`` (unset: no
control socket). A bad value stops gunicorn with a ``ConfigError`` naming the
variable. README "Serving" says which class to pick and why.

Under gevent this file patches the standard library first, before anything
(the app included, with ``--preload``) is imported: what is imported before
the patch keeps real locks and blocking sockets (psycopg, for one, chooses its
blocking wait at import). gunicorn's own worker patches only after the fork,
too late for a preloaded app. So the class comes from the environment: a
``-k`` given on the command line instead stops gunicorn with a message.

With ``--preload`` the app is built once in the master, which also imports
the SDKs of the configured services (never a client: importing is fork-safe,
clients are not); each worker builds its own clients on first use, warms up
before it takes requests, and closes its clients in ``worker_exit``.
"""

from __future__ import annotations

import os

# Nothing of the app is imported before gevent's patch (app.serving.gunicorn_hooks has the same tuple).
worker_class = os.environ.get("GUNICORN_WORKER_CLASS") or "gthread"
if worker_class == "gevent":
    try:
        from gevent import monkey
    except ImportError:
        monkey = None
    if monkey is not None:
        monkey.patch_all()

import math  # noqa: E402 (after gevent's patch, on purpose)
from typing import Any  # noqa: E402

from app.config import get_bool, parse_count, parse_seconds  # noqa: E402
from app.errors import ConfigError  # noqa: E402
from app.serving import gunicorn_hooks  # noqa: E402

if worker_class not in gunicorn_hooks.WORKER_CLASSES:
    choices = ", ".join(gunicorn_hooks.WORKER_CLASSES)
    raise ConfigError(f"GUNICORN_WORKER_CLASS must be one of {choices}, got {worker_class!r}")
if worker_class == "gevent" and monkey is None:
    raise ConfigError("GUNICORN_WORKER_CLASS=gevent needs gevent: pip install '.[gevent]'")

port = parse_count(os.environ.get("PORT", "8000"), "PORT")
if not 0 < port < 65536:
    raise ConfigError(f"PORT must be a TCP port from 1 to 65535, got {port}")
bind = os.environ.get("BIND") or f"127.0.0.1:{port}"
workers = parse_count(os.environ.get("WEB_CONCURRENCY", "2"), "WEB_CONCURRENCY") or 1
threads = parse_count(os.environ.get("GUNICORN_THREADS", "64"), "GUNICORN_THREADS") or 1
if worker_class == "gevent":
    # One greenlet per connection: this is the worker's concurrency (gunicorn's own default).
    worker_connections = (
        parse_count(os.environ.get("GUNICORN_WORKER_CONNECTIONS", "1000"), "GUNICORN_WORKER_CONNECTIONS") or 1
    )
    threads = 1
else:
    # A gthread worker accepts only connections it has a thread for: one it cannot serve waits in
    # the listen queue, where the other workers can take it, not in this worker's thread queue
    # (where a probe would wait behind streams). So no idle kept-alive connection may hold a place.
    worker_connections = threads
    keepalive = 0
timeout = math.ceil(parse_seconds(os.environ.get("GUNICORN_TIMEOUT", "130"), "GUNICORN_TIMEOUT"))
graceful_timeout = 30
preload_app = get_bool(os.environ, "GUNICORN_PRELOAD")
accesslog = os.environ.get("GUNICORN_ACCESS_LOG", "-")
# gunicorn 23+ opens a control socket at one path per user by default, so two
# instances of the same user (a deploy beside `make run`, parallel tests)
# replace each other's; it is opened only where GUNICORN_CONTROL_SOCKET says.
control_socket = os.environ.get("GUNICORN_CONTROL_SOCKET") or "gunicorn.ctl"
control_socket_disable = not os.environ.get("GUNICORN_CONTROL_SOCKET")


def on_starting(server: Any) -> None:
    """The master: the worker class is the one prepared for; a preloaded app's timeouts and SDKs."""
    gunicorn_hooks.on_starting(server, worker_class)


def post_fork(server: Any, worker: Any) -> None:
    """Each worker: record its kind and concurrency (the bulkhead's default follows them)."""
    gunicorn_hooks.post_fork(server, worker)


def post_worker_init(worker: Any) -> None:
    """Each worker, before it accepts: the timeouts nest, and the SDKs are imported."""
    gunicorn_hooks.post_worker_init(worker)


def worker_exit(server: Any, worker: Any) -> None:
    """Close the clients this worker built, so sockets end cleanly, not by the kernel."""
    from app.services import reset_services

    wsgi = getattr(worker, "wsgi", None)
    if wsgi is not None and hasattr(wsgi, "extensions"):
        reset_services(wsgi)
