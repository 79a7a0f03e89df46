"""One client per app and per process: sixteen threads build one, a forked child builds its own.

The fork tests need a server on which connection reuse is observable.
pytest-httpserver cannot show it: werkzeug's server sends ``Connection: close``
on every response, so each request arrives on a new connection whatever the
client does. :class:`KeepAliveServer` is a plain ``http.server`` speaking
HTTP/1.1 with keep-alive; it records the client port of every request, and
which connections the client closed.
"""

from __future__ import annotations

import asyncio
import os
import pickle
import threading
import traceback
from collections.abc import Callable
from typing import Any

import pytest

from app.services import db_service
from app.services.genai_service import get_genai_client
from app.services.openai_service import get_async_openai_client, get_openai_client
from app.services.redis_service import get_redis_client
from tests.conftest import CANARY_GEMINI_KEY, CANARY_KEY


def run_in_child(work: Callable[[], Any]) -> Any:
    """Fork; run ``work`` in the child and return what it returned (or raise what it raised)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        status = 0
        try:
            os.close(read_end)
            try:
                payload = pickle.dumps(("ok", work()))
            except BaseException:
                payload, status = pickle.dumps(("error", traceback.format_exc())), 1
            with os.fdopen(write_end, "wb") as pipe:
                pipe.write(payload)
        finally:
            os._exit(status)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        data = pipe.read()
    _, wait_status = os.waitpid(pid, 0)
    kind, value = pickle.loads(data)
    if kind == "error":
        pytest.fail(f"the forked child failed:\n{value}")
    assert os.waitstatus_to_exitcode(wait_status) == 0
    return value


def ask_openai(client: Any) -> str:
    completion = client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
    )
    return str(completion.choices[0].message.content)


def ask_gemini(client: Any) -> str:
    return str(client.models.generate_content(model="gemini-2.0-flash", contents="hi").text)


# --- fork -------------------------------------------------------------------------


def test_forked_child_builds_its_own_openai_client(make_app, keepalive_server):
    app = make_app(OPENAI_API_KEY=CANARY_KEY, OPENAI_BASE_URL=keepalive_server.url_for("/v1"))
    with app.app_context():
        parent_client = get_openai_client()
        assert ask_openai(parent_client) == "hi"

        def child() -> dict[str, Any]:
            with app.app_context():
                client = get_openai_client()
                return {
                    "same_object": client is parent_client,
                    "again_same": get_openai_client() is client,
                    "reply": ask_openai(client),
                }

        result = run_in_child(child)
        assert ask_openai(parent_client) == "hi"
        assert get_openai_client() is parent_client

    assert result == {"same_object": False, "again_same": True, "reply": "hi"}
    first, in_child, second = keepalive_server.requests
    assert all(r.path == "/v1/chat/completions" for r in (first, in_child, second))
    assert all(r.headers["authorization"] == f"Bearer {CANARY_KEY}" for r in (first, in_child, second))
    # Keep-alive is observable: the parent's two requests share one connection ...
    assert second.port == first.port
    # ... and the child's request came on a connection of its own.
    assert in_child.port != first.port


def test_forked_child_builds_its_own_async_openai_client(make_app, keepalive_server):
    app = make_app(OPENAI_API_KEY=CANARY_KEY, OPENAI_BASE_URL=keepalive_server.url_for("/v1"))
    with app.app_context():
        parent_client = get_async_openai_client()  # outside any loop

        def child() -> dict[str, Any]:
            async def ask() -> str:
                completion = await get_async_openai_client().chat.completions.create(
                    model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
                )
                return str(completion.choices[0].message.content)

            with app.app_context():
                client = get_async_openai_client()
                return {"same_object": client is parent_client, "reply": asyncio.run(ask())}

        assert run_in_child(child) == {"same_object": False, "reply": "hi"}
        assert get_async_openai_client() is parent_client
    assert keepalive_server.requests[0].headers["authorization"] == f"Bearer {CANARY_KEY}"


def test_forked_child_builds_its_own_genai_client(make_app, keepalive_server):
    app = make_app(
        GEMINI_API_KEY=CANARY_GEMINI_KEY,
        GENAI_BASE_URL=keepalive_server.url_for("/"),
        GENAI_API_VERSION="v1beta",
    )
    with app.app_context():
        parent_client = get_genai_client()
        assert ask_gemini(parent_client) == "hi"

        def child() -> dict[str, Any]:
            with app.app_context():
                client = get_genai_client()
                return {"same_object": client is parent_client, "reply": ask_gemini(client)}

        result = run_in_child(child)
        assert ask_gemini(parent_client) == "hi"

    assert result == {"same_object": False, "reply": "hi"}
    first, in_child, second = keepalive_server.requests
    assert all(r.path == "/v1beta/models/gemini-2.0-flash:generateContent" for r in (first, in_child, second))
    assert all(r.headers["x-goog-api-key"] == CANARY_GEMINI_KEY for r in (first, in_child, second))
    assert second.port == first.port
    assert in_child.port != first.port


def test_forked_child_builds_its_own_redis_client(make_app, redis_server):
    app = make_app(REDIS_URL=redis_server.url)
    with app.app_context():
        parent_client = get_redis_client()
        parent_id = parent_client.client_id()

        def child() -> dict[str, Any]:
            with app.app_context():
                client = get_redis_client()
                client.set("fork-test:child", "written by the child")
                return {"same_object": client is parent_client, "client_id": client.client_id()}

        result = run_in_child(child)
        # The parent's client still works, on its own connection, after the child exited.
        assert parent_client.client_id() == parent_id
        assert parent_client.get("fork-test:child") == b"written by the child"
        assert get_redis_client() is parent_client

    assert result["same_object"] is False
    assert result["client_id"] != parent_id


@pytest.mark.postgres
def test_forked_child_gets_its_own_database_connection(make_app, postgres_server):
    from sqlalchemy import text

    app = make_app(DATABASE_URL=postgres_server.url)

    def backend_pid() -> int:
        with db_service.engine().connect() as connection:
            return int(connection.execute(text("SELECT pg_backend_pid()")).scalar_one())

    with app.app_context():
        parent_pid = backend_pid()

        def child() -> int:
            with app.app_context():
                return backend_pid()

        child_pid = run_in_child(child)
        # The pooled connection survived the child: same backend, and it still answers.
        assert backend_pid() == parent_pid

    assert child_pid != parent_pid
    assert postgres_server.psql(f"SELECT count(*) FROM pg_stat_activity WHERE pid = {child_pid}") == "0"


# --- threads ------------------------------------------------------------------------

THREADS = 16


def call_at_once(app: Any, get: Callable[[], Any]) -> list[Any]:
    """``get()`` from sixteen threads released together; every result, or the first error."""
    barrier = threading.Barrier(THREADS)
    results: list[Any] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def worker() -> None:
        try:
            with app.app_context():
                barrier.wait(timeout=10)
                client = get()
            with lock:
                results.append(client)
        except BaseException as exc:
            with lock:
                errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    if errors:
        raise errors[0]
    assert len(results) == THREADS
    return results


def test_sixteen_threads_build_one_openai_client(make_app, keepalive_server):
    app = make_app(OPENAI_API_KEY=CANARY_KEY, OPENAI_BASE_URL=keepalive_server.url_for("/v1"))
    clients = call_at_once(app, get_openai_client)
    assert len({id(client) for client in clients}) == 1
    with app.app_context():
        assert get_openai_client() is clients[0]


def test_sixteen_threads_build_one_client_per_openai_profile(make_app, keepalive_server):
    app = make_app(
        OPENAI_API_KEY=CANARY_KEY,
        OPENAI_PROFILES={"vllm": {"base_url": keepalive_server.url_for("/v1")}},
    )
    clients = call_at_once(app, lambda: get_openai_client("vllm"))
    assert len({id(client) for client in clients}) == 1
    with app.app_context():
        assert get_openai_client() is not clients[0]


def test_sixteen_threads_build_one_redis_client(make_app, redis_server):
    app = make_app(REDIS_URL=redis_server.url)
    clients = call_at_once(app, get_redis_client)
    assert len({id(client) for client in clients}) == 1
    assert clients[0].ping()


def test_sixteen_threads_build_one_genai_client(make_app, keepalive_server):
    app = make_app(GEMINI_API_KEY=CANARY_GEMINI_KEY, GENAI_BASE_URL=keepalive_server.url_for("/"))
    clients = call_at_once(app, get_genai_client)
    assert len({id(client) for client in clients}) == 1


def test_sixteen_threads_share_one_database_engine(make_app):
    app = make_app()
    engines = call_at_once(app, db_service.engine)
    assert len({id(engine) for engine in engines}) == 1


def test_threads_using_one_openai_client_at_once(make_app, keepalive_server):
    """The shared client is usable from many threads at once (httpx pools are thread-safe)."""
    app = make_app(OPENAI_API_KEY=CANARY_KEY, OPENAI_BASE_URL=keepalive_server.url_for("/v1"))
    replies = call_at_once(app, lambda: ask_openai(get_openai_client()))
    assert replies == ["hi"] * THREADS
    assert len(keepalive_server.requests) == THREADS
