"""Per-key quotas on ``/api`` (Flask-Limiter): per key, across workers in Redis, in memory without it.

The acceptance test runs two gunicorn workers on one real redis-server and
sends two keys' requests from two client addresses (127.0.0.1 and
127.0.0.2): each key gets exactly its own quota, whichever worker serves it.
"""

from __future__ import annotations

import http.client
import json
import secrets
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest

from app.llm import LLMRateLimitError
from app.llm.testing import install_fake_llm
from tests.conftest import CANARY_KEY, api_key_for_env, api_key_headers
from tests.servers import Recorded, Reply, ScriptedServer, default_responder, free_port
from tests.test_gunicorn import clean_env, run_gunicorn, wait_until_listening

CHAT = {"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "Hi"}]}


def away_from_a_window_edge(margin: float = 8.0) -> None:
    """Start a burst well inside one minute's window.

    The sliding-window counter weighs the previous minute's count by how much of it is left,
    so a burst that straddles a minute boundary may be let one request more: the algorithm's
    documented approximation, not a fault. Exact counts are asserted away from that edge.
    """
    into = time.time() % 60
    if into > 60 - margin:
        time.sleep(60 - into + 0.2)


@pytest.fixture(autouse=True)
def _inside_one_window() -> None:
    away_from_a_window_edge()


@pytest.fixture
def quota_app(make_app, upstream: ScriptedServer):
    return make_app(OPENAI_API_KEY=CANARY_KEY, OPENAI_BASE_URL=upstream.url_for("/v1"))


def chat(app, headers: dict[str, str], body: dict | None = None):
    return app.test_client().post("/api/chat", json=body or CHAT, headers=headers)


def assert_over_quota(response, remaining: str = "0") -> None:
    assert response.status_code == 429, response.get_data(as_text=True)
    assert response.json["error"]["type"] == "rate_limited"
    assert "quota" in response.json["error"]["message"]
    assert 1 <= int(response.headers["Retry-After"]) <= 60
    assert response.headers["RateLimit-Remaining"] == remaining


def test_a_key_over_its_requests_per_minute_gets_429_with_retry_after_and_ratelimit_headers(
    quota_app, upstream
):
    headers = api_key_headers(quota_app, rpm=2)

    first, second, third = (chat(quota_app, headers) for _ in range(3))

    assert (first.status_code, second.status_code) == (200, 200)
    assert (first.headers["RateLimit-Limit"], first.headers["RateLimit-Remaining"]) == ("2", "1")
    assert 0 <= int(first.headers["RateLimit-Reset"]) <= 60  # seconds, not a timestamp
    assert "Retry-After" not in first.headers  # only on the refusal
    assert_over_quota(third)
    assert len(upstream.requests) == 2


def test_one_keys_burst_does_not_block_another_key(quota_app, upstream):
    busy = api_key_headers(quota_app, "busy", rpm=3)
    quiet = api_key_headers(quota_app, "quiet", rpm=3)

    burst = [chat(quota_app, busy).status_code for _ in range(6)]

    assert burst == [200, 200, 200, 429, 429, 429]
    assert [chat(quota_app, quiet).status_code for _ in range(3)] == [200, 200, 200]


def test_the_default_quota_applies_to_keys_without_their_own(make_app, upstream):
    app = make_app(API_DEFAULT_RPM="1", OPENAI_API_KEY=CANARY_KEY, OPENAI_BASE_URL=upstream.url_for("/v1"))
    headers = api_key_headers(app)

    assert chat(app, headers).status_code == 200
    assert_over_quota(chat(app, headers))


def test_a_key_with_rpm_0_has_no_request_limit(make_app, upstream):
    app = make_app(API_DEFAULT_RPM="1", OPENAI_API_KEY=CANARY_KEY, OPENAI_BASE_URL=upstream.url_for("/v1"))
    headers = api_key_headers(app, rpm=0)

    assert [chat(app, headers).status_code for _ in range(4)] == [200] * 4


def test_tokens_per_minute_count_the_prompt_and_max_tokens(quota_app, upstream):
    headers = api_key_headers(quota_app, tpm=100)
    body = {**CHAT, "max_tokens": 60}  # about 61 tokens: one such request fits in 100

    assert chat(quota_app, headers, body).status_code == 200
    refused = chat(quota_app, headers, body)
    assert_over_quota(refused, remaining=refused.headers["RateLimit-Remaining"])
    assert refused.headers["RateLimit-Limit"] == "100"  # the token quota is the one reached
    assert 0 < int(refused.headers["RateLimit-Remaining"]) < 61  # tokens left, fewer than this request's
    assert len(upstream.requests) == 1


def test_a_providers_retry_after_is_not_replaced_by_the_quotas(make_app):
    app = make_app()
    fake = install_fake_llm(app)
    fake.add_error(LLMRateLimitError("slow down", retry_after=3))
    headers = api_key_headers(app, rpm=5)

    response = app.test_client().post("/api/chat", json={**CHAT, "model": "fake/m"}, headers=headers)

    assert response.status_code == 429
    assert response.json["error"]["type"] == "rate_limited"
    assert response.headers["Retry-After"] == "3"  # the provider's, not the quota window's
    assert response.headers["RateLimit-Remaining"] == "4"


def test_without_keys_the_quota_is_per_address(make_app, upstream):
    app = make_app(
        API_AUTH="off",
        API_DEFAULT_RPM="1",
        OPENAI_API_KEY=CANARY_KEY,
        OPENAI_BASE_URL=upstream.url_for("/v1"),
    )
    client = app.test_client()

    def from_address(address: str) -> int:
        return client.post("/api/chat", json=CHAT, environ_base={"REMOTE_ADDR": address}).status_code

    assert [from_address("10.0.0.1"), from_address("10.0.0.1"), from_address("10.0.0.2")] == [200, 429, 200]


def test_probes_have_no_quota(make_app):
    app = make_app(API_DEFAULT_RPM="1")
    client = app.test_client()

    assert [client.get("/livez").status_code for _ in range(3)] == [200] * 3
    assert "RateLimit-Limit" not in client.get("/livez").headers


# --- Redis: shared, and failing open ---------------------------------------------------------


def test_quotas_are_shared_by_two_apps_on_one_redis(make_app, upstream, redis_server, tmp_path):
    database = f"sqlite:///{tmp_path}/shared.db"
    settings = {
        "REDIS_URL": redis_server.url,
        "DATABASE_URL": database,
        "SECRET_KEY": "k" * 40,
        "OPENAI_API_KEY": CANARY_KEY,
        "OPENAI_BASE_URL": upstream.url_for("/v1"),
    }
    one, two = make_app(settings), make_app(settings)  # two workers' apps: one database, one Redis
    headers = api_key_headers(one, rpm=3)

    statuses = [chat(app, headers).status_code for app in (one, two, one, two)]

    assert statuses == [200, 200, 200, 429]


def test_a_dead_redis_never_fails_api(make_app, upstream, disposable_redis, caplog):
    app = make_app(
        REDIS_URL=disposable_redis.url, OPENAI_API_KEY=CANARY_KEY, OPENAI_BASE_URL=upstream.url_for("/v1")
    )
    headers = api_key_headers(app, rpm=3)
    assert chat(app, headers).status_code == 200  # counted in Redis
    disposable_redis.stop()

    started = time.monotonic()
    statuses = [chat(app, headers).status_code for _ in range(4)]
    elapsed = time.monotonic() - started

    assert statuses == [200, 200, 200, 429]  # counted in this process meanwhile: still a quota
    assert elapsed < 5
    assert "Traceback" not in caplog.text


# --- the acceptance: two keys, two addresses, two workers, one Redis ------------------------------


def _post_from(address: str, port: int, headers: dict[str, str]) -> tuple[int, int]:
    """POST /api/chat from a given local address; (status, the worker's pid)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10, source_address=(address, 0))
    try:
        connection.request(
            "POST", "/api/chat", json.dumps(CHAT), {"Content-Type": "application/json", **headers}
        )
        response = connection.getresponse()
        response.read()
        return response.status, int(response.headers["X-Worker-Pid"])
    finally:
        connection.close()


@pytest.mark.slow
def test_two_keys_from_two_addresses_have_separate_quotas_across_two_workers(
    tmp_path, upstream, redis_server
):
    quota = 5
    env = clean_env(
        tmp_path,
        PORT=str(free_port()),
        SECRET_KEY=secrets.token_hex(32),
        REDIS_URL=redis_server.url,
        OPENAI_API_KEY=CANARY_KEY,
        OPENAI_BASE_URL=upstream.url_for("/v1"),
        # A gthread worker accepts only as many connections as it has threads: with 2 each, one
        # worker cannot take every request of a burst, however the kernel hands them out.
        GUNICORN_THREADS="2",
    )
    alice = api_key_for_env(env, "alice", rpm=quota)
    bob = api_key_for_env(env, "bob", rpm=quota)

    def slowly(request: Recorded) -> Reply:
        time.sleep(0.05)  # so that concurrent requests spread over both workers
        return default_responder(request)

    upstream.responder = slowly
    with run_gunicorn(env, "-w", "2", "tests.resilience_app:app", log=tmp_path / "g.log") as server:
        wait_until_listening(server)
        answers: dict[str, list[tuple[int, int]]] = {"alice": [], "bob": []}
        with ThreadPoolExecutor(max_workers=4) as pool:
            for _ in range(10):  # 4 at a time per key, until both workers served each key (bounded)
                for name, address, headers in (("alice", "127.0.0.1", alice), ("bob", "127.0.0.2", bob)):
                    answers[name] += pool.map(lambda _: _post_from(address, server.port, headers), range(4))
                if all(len(got) > quota and len({pid for _, pid in got}) == 2 for got in answers.values()):
                    break
        output = server.output()

    for name, got in answers.items():
        statuses = Counter(status for status, _ in got)
        assert statuses == {200: quota, 429: len(got) - quota}, (name, statuses)
        assert len({pid for _, pid in got}) == 2, f"one worker served all of {name}'s requests"
    assert len(upstream.requests) == 2 * quota
    assert "Traceback" not in output
