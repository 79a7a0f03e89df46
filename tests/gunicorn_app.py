"""A test-only WSGI module: the real app plus one diagnostic route, for gunicorn tests.

``gunicorn -c gunicorn.conf.py --preload -w 2 tests.gunicorn_app:app`` imports
this module once, in the master. ``GET /_diag`` then reports, from whichever
worker answered: its pid, what the process held before it first used a
service (SDK modules, clients inherited from the master), and the identity of
each client it uses (the OpenAI client, after one chat completion against
``OPENAI_BASE_URL``; the PostgreSQL backend pid; the Redis ``CLIENT ID``), and
what the master held when it forked (SDKs imported by gunicorn's hooks, clients).

At exit, after gunicorn's ``worker_exit`` hook has run, each worker that
served ``/_diag`` writes ``exit-<pid>.json`` into ``GUNICORN_DIAG_DIR``: whether
its OpenAI client is closed, and whether PostgreSQL and Redis, asked over
fresh connections while the worker process is still alive, still list its
connections. A worker that leaves its clients open to be closed by the kernel
at process death shows up here, where it cannot after the process is gone.
"""

from __future__ import annotations

import atexit
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

from flask import Response, jsonify

from app import create_app, serving
from app.connectors import _base
from app.services import db_service
from app.services.openai_service import get_openai_client
from app.services.redis_service import get_redis_client

#: Loaded on first use. SQLAlchemy (and psycopg, for its engine) load with the app, by design.
SDKS = ("openai", "redis", "httpx", "httpx2", "google.genai")

#: The process that imported this module: the gunicorn master under --preload.
MASTER_PID = os.getpid()
app = create_app()


def _built_clients() -> list[str]:
    return sorted(
        f"{key}.{name}"
        for key, ext in app.extensions.items()
        if isinstance(ext, _base.Connector)
        for name, entry in ext.info().items()
        if entry.get("client_built")
    )


def _master_state() -> dict[str, Any]:
    """What the master holds once gunicorn's hooks have run: SDKs imported, no client, no connection."""
    return {
        "sdks_loaded": sorted(m for m in SDKS if m in sys.modules),
        "db_connections": app.extensions["db_service"].holds_connections,
        "clients_built": _built_clients(),
    }


#: What the master held when it forked its first worker (after gunicorn's on_starting hook ran).
MASTER_STATE: dict[str, Any] = {}


def _before_fork() -> None:
    if os.getpid() == MASTER_PID and not MASTER_STATE:
        MASTER_STATE.update(_master_state())


os.register_at_fork(before=_before_fork)

#: Per process, what it held before its first use of a service.
_first_use: dict[int, dict[str, Any]] = {}
_first_use_lock = threading.Lock()
#: Per process, the clients and connection ids it used, for the exit report.
_seen: dict[int, dict[str, Any]] = {}


def _inherited_clients() -> list[str]:
    """The clients this process inherited across a fork (the master's, if it built any)."""
    found: list[str] = []
    for held in _base._inherited:
        for client in held if isinstance(held, list) else [held]:
            if client is not None:
                found.append(type(client).__name__)
    return found


def _service_state() -> dict[str, Any]:
    return {
        "sdks_loaded": sorted(m for m in SDKS if m in sys.modules),
        "inherited_clients": _inherited_clients(),
        "clients_built": {
            key: {name: entry.get("client_built") for name, entry in ext.info().items()}
            for key, ext in app.extensions.items()
            if isinstance(ext, _base.Connector)
        },
    }


@app.get("/_diag")
def diag() -> Response:
    pid = os.getpid()
    with _first_use_lock:  # gthread workers: the first request of a process records
        if pid not in _first_use:
            _first_use[pid] = _service_state()
    from sqlalchemy import text

    client = get_openai_client()
    completion = client.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "hi"}],
        extra_headers={"X-Worker-Pid": str(pid)},
    )
    engine = db_service.engine()
    with engine.connect() as connection:
        backend_pid = connection.execute(text("SELECT pg_backend_pid()")).scalar_one()
    redis_client = get_redis_client()
    redis_id = redis_client.client_id()
    seen = _seen.setdefault(pid, {"openai": client, "backend_pids": set(), "redis_ids": set()})
    seen["backend_pids"].add(backend_pid)
    seen["redis_ids"].add(str(redis_id))
    return jsonify(
        pid=pid,
        ppid=os.getppid(),
        master_pid=MASTER_PID,
        master_state=MASTER_STATE,
        first_use=_first_use[pid],
        worker={
            "kind": serving.current_worker().kind,
            "concurrency": serving.current_worker().concurrency,
            "gevent_patched": serving.gevent_patched(),
        },
        openai_client=id(client),
        openai_client_again=id(get_openai_client()),
        content=completion.choices[0].message.content,
        pg_backend_pid=backend_pid,
        redis_client=id(redis_client),
        redis_client_id=redis_id,
    )


@app.get("/_diag/state")
def diag_state() -> Response:
    """What this worker held when its first request (this route's, or /_diag's) arrived; nothing needed."""
    pid = os.getpid()
    with _first_use_lock:
        if pid not in _first_use:
            _first_use[pid] = _service_state()
    worker = serving.current_worker()
    return jsonify(
        pid=pid,
        first_use=_first_use[pid],
        worker={
            "kind": worker.kind,
            "concurrency": worker.concurrency,
            "llm_capacity": serving.llm_capacity(),
        },
        gevent_patched=serving.gevent_patched(),
    )


@app.get("/_diag/wait/<service>")
def diag_wait(service: str) -> Response:
    """About a second's wait on ``service`` (Redis: 0.8 s), timed by the worker's clock (cooperation)."""
    from app.llm import get_llm

    started = time.monotonic()
    messages = [{"role": "user", "content": "hi"}]
    if service == "postgresql":
        from sqlalchemy import text

        with db_service.engine().connect() as connection:
            connection.execute(text("SELECT pg_sleep(1)"))
    elif service == "redis":
        get_redis_client().blpop(["serving-test-never-pushed"], timeout=0.8)  # within its 1 s socket timeout
    elif service in ("openai", "gemini", "anthropic"):
        get_llm().chat(messages, f"{service}/slow")
    else:
        return jsonify(error=f"unknown service {service!r}"), 404  # type: ignore[return-value]
    return jsonify(pid=os.getpid(), started=started, ended=time.monotonic())


@app.get("/_diag/now")
def diag_now() -> Response:
    return jsonify(pid=os.getpid(), now=time.monotonic())


def _poll(check: Any, timeout: float = 2.0) -> bool:
    """Whether ``check()`` turns true within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        if check():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)


def _exit_report() -> None:
    """Runs in each worker after gunicorn's worker_exit hook, while the process still lives."""
    pid = os.getpid()
    seen = _seen.get(pid)
    report_dir = os.environ.get("GUNICORN_DIAG_DIR")
    if pid == MASTER_PID or seen is None or not report_dir:
        return
    import psycopg
    import redis

    report: dict[str, Any] = {"pid": pid, "openai_closed": seen["openai"].is_closed()}
    observer = redis.Redis.from_url(os.environ["REDIS_URL"], socket_timeout=2)
    try:
        report["redis_connections_gone"] = _poll(
            lambda: not seen["redis_ids"] & {c["id"] for c in observer.client_list()}
        )
    finally:
        observer.close()
    with psycopg.connect(os.environ["DATABASE_URL"], connect_timeout=2, autocommit=True) as pg:
        report["pg_backends_gone"] = _poll(
            lambda: (
                pg.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE pid = ANY(%s)", (list(seen["backend_pids"]),)
                ).fetchone()
                == (0,)
            )
        )
    report["clients_built_at_exit"] = _service_state()["clients_built"]
    Path(report_dir, f"exit-{pid}.json").write_text(json.dumps(report))


atexit.register(_exit_report)
