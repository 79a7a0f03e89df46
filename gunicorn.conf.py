"""gunicorn settings, read from the environment.

``PORT`` (8000), ``BIND`` (127.0.0.1:$PORT), ``WEB_CONCURRENCY`` (workers, 2),
``GUNICORN_THREADS`` (1), ``GUNICORN_TIMEOUT`` (60 s), ``GUNICORN_PRELOAD``
(0). With ``--preload`` (or ``GUNICORN_PRELOAD=1``) the app is built once in
the master; the services build no client there, and a forked worker builds
its own on first use, so preloading is safe.
"""

from __future__ import annotations

import os
from typing import Any

from app.config import parse_count, parse_seconds

port = parse_count(os.environ.get("PORT", "8000"), "PORT")
bind = os.environ.get("BIND") or f"127.0.0.1:{port}"
workers = parse_count(os.environ.get("WEB_CONCURRENCY", "2"), "WEB_CONCURRENCY") or 1
threads = parse_count(os.environ.get("GUNICORN_THREADS", "1"), "GUNICORN_THREADS") or 1
timeout = int(parse_seconds(os.environ.get("GUNICORN_TIMEOUT", "60"), "GUNICORN_TIMEOUT"))
graceful_timeout = 30
preload_app = os.environ.get("GUNICORN_PRELOAD", "0").lower() in ("1", "true", "yes")
accesslog = os.environ.get("GUNICORN_ACCESS_LOG", "-")


def worker_exit(server: Any, worker: Any) -> None:
    """Close the clients this worker built, so sockets end cleanly, not by the kernel."""
    from app.services import reset_services

    wsgi = getattr(worker, "wsgi", None)
    if wsgi is not None and hasattr(wsgi, "extensions"):
        reset_services(wsgi)
