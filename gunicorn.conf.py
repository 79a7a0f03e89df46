"""gunicorn settings, read from the environment.

``PORT`` (8000), ``BIND`` (127.0.0.1:$PORT), ``WEB_CONCURRENCY`` (workers, 2),
``GUNICORN_THREADS`` (1), ``GUNICORN_TIMEOUT`` (60 s, rounded up to whole
seconds), ``GUNICORN_PRELOAD`` (0), ``GUNICORN_ACCESS_LOG`` (``-``, stdout),
``GUNICORN_CONTROL_SOCKET`` (unset: no control socket).
A bad value stops gunicorn with a ``ConfigError`` naming the variable.

With ``--preload`` (or ``GUNICORN_PRELOAD=1``) the app is built once in the
master; the services build no client there, and a forked worker builds its
own on first use, so preloading is safe. ``worker_exit`` closes the clients a
worker built.
"""

from __future__ import annotations

import math
import os
from typing import Any

from app.config import get_bool, parse_count, parse_seconds
from app.errors import ConfigError

port = parse_count(os.environ.get("PORT", "8000"), "PORT")
if not 0 < port < 65536:
    raise ConfigError(f"PORT must be a TCP port from 1 to 65535, got {port}")
bind = os.environ.get("BIND") or f"127.0.0.1:{port}"
workers = parse_count(os.environ.get("WEB_CONCURRENCY", "2"), "WEB_CONCURRENCY") or 1
threads = parse_count(os.environ.get("GUNICORN_THREADS", "1"), "GUNICORN_THREADS") or 1
timeout = math.ceil(parse_seconds(os.environ.get("GUNICORN_TIMEOUT", "60"), "GUNICORN_TIMEOUT"))
graceful_timeout = 30
preload_app = get_bool(os.environ, "GUNICORN_PRELOAD")
accesslog = os.environ.get("GUNICORN_ACCESS_LOG", "-")
# gunicorn 23+ opens a control socket at one path per user by default, so two
# instances of the same user (a deploy beside `make run`, parallel tests)
# replace each other's; it is opened only where GUNICORN_CONTROL_SOCKET says.
control_socket = os.environ.get("GUNICORN_CONTROL_SOCKET") or "gunicorn.ctl"
control_socket_disable = not os.environ.get("GUNICORN_CONTROL_SOCKET")


def worker_exit(server: Any, worker: Any) -> None:
    """Close the clients this worker built, so sockets end cleanly, not by the kernel."""
    from app.services import reset_services

    wsgi = getattr(worker, "wsgi", None)
    if wsgi is not None and hasattr(wsgi, "extensions"):
        reset_services(wsgi)
