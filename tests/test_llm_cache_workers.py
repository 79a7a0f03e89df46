"""The cache under a real gunicorn: two workers share Redis hits; a gevent worker's greenlets single-flight.

Requests go to ``POST /api/chat`` of the real app (``tests.resilience_app``,
which adds ``X-Worker-Pid``), with an API key made as ``flask api-keys
create`` would; what reached the upstream is read from the scripted server.
"""

from __future__ import annotations

import http.client
import json
import secrets
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import redis as redis_lib

from tests.conftest import CANARY_KEY, api_key_for_env
from tests.payloads import chat_completion
from tests.servers import Reply, ScriptedServer, free_port
from tests.test_gunicorn import clean_env, run_gunicorn, wait_until_listening

CHAT = "/v1/chat/completions"
BODY = {"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "Hi"}]}

pytestmark = pytest.mark.slow


def post(port: int, headers: dict[str, str]) -> tuple[int, int, dict[str, Any]]:
    """(status, worker pid, body) of one /api/chat on a connection of its own."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    try:
        connection.request(
            "POST", "/api/chat", json.dumps(BODY), {**headers, "Content-Type": "application/json"}
        )
        response = connection.getresponse()
        body = json.loads(response.read())
        return response.status, int(response.headers["X-Worker-Pid"]), body
    finally:
        connection.close()


def environment(tmp_path, upstream: ScriptedServer, **settings: str) -> tuple[dict[str, str], dict[str, str]]:
    env = clean_env(
        tmp_path,
        PORT=str(free_port()),
        SECRET_KEY=secrets.token_hex(32),
        OPENAI_API_KEY=CANARY_KEY,
        OPENAI_BASE_URL=upstream.url_for("/v1"),
        **settings,
    )
    return env, api_key_for_env(env, rpm=0, tpm=0)


@pytest.mark.parametrize("backend", ["redis", "disk"])
def test_two_gunicorn_workers_share_hits(tmp_path, upstream, redis_server, backend):
    """Redis, and the disk back end's one folder (diskcache: SQLite in WAL mode, a connection per process)."""
    if backend == "redis":
        redis_lib.Redis.from_url(redis_server.url).flushdb()
        env, headers = environment(tmp_path, upstream, LLM_CACHE="redis", REDIS_URL=redis_server.url)
    else:
        env, headers = environment(
            tmp_path, upstream, LLM_CACHE="disk", LLM_CACHE_DIR=str(tmp_path / "cache")
        )
    answers: list[tuple[int, int, dict[str, Any]]] = []
    with run_gunicorn(env, "-w", "2", "tests.resilience_app:app", log=tmp_path / "g.log") as server:
        wait_until_listening(server)
        with ThreadPoolExecutor(max_workers=4) as pool:
            for _ in range(50):  # bursts of 4 until both workers have answered (bounded)
                answers += pool.map(lambda _: post(server.port, headers), range(4))
                if len({pid for _, pid, _ in answers}) == 2 and len(answers) >= 12:
                    break
        output = server.output()

    assert {status for status, _, _ in answers} == {200}, answers
    assert {body["content"] for _, _, body in answers} == {"hi"}
    assert len({pid for _, pid, _ in answers}) == 2, "one worker served every request"
    assert len(upstream.requests) == 1  # one worker asked; both answered from the shared store after it
    assert "Traceback" not in output


def test_twenty_greenlets_of_one_gevent_worker_make_one_request(tmp_path, upstream):
    upstream.script(CHAT, Reply(body=chat_completion("Hello"), delay=0.5))
    env, headers = environment(tmp_path, upstream, LLM_CACHE="memory", GUNICORN_WORKER_CLASS="gevent")
    with run_gunicorn(env, "-w", "1", "tests.resilience_app:app", log=tmp_path / "g.log") as server:
        wait_until_listening(server)
        with ThreadPoolExecutor(max_workers=20) as pool:
            answers = list(pool.map(lambda _: post(server.port, headers), range(20)))
        output = server.output()

    assert [status for status, _, _ in answers] == [200] * 20, answers
    assert {body["content"] for _, _, body in answers} == {"Hello"}
    assert len({pid for _, pid, _ in answers}) == 1  # one process, one thread: greenlets
    assert len(upstream.requests) == 1
    assert "Traceback" not in output
