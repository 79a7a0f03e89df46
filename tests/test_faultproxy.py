"""The fault proxy itself, against real peers: local HTTP servers, redis-server and PostgreSQL."""

from __future__ import annotations

import http.client
import socket
import threading
import time
from collections.abc import Iterator

import psycopg
import pytest
import redis
from pytest_httpserver import HTTPServer
from redis.backoff import NoBackoff
from redis.retry import Retry

from tests.faultproxy import FaultProxy
from tests.servers import PostgresServer, RedisServer, ScriptedServer, free_port

#: Generous upper bound for "it happened at once / within its timeout" on a loaded 2-core machine.
SLACK = 3.0


@pytest.fixture
def http_proxy(local_server: HTTPServer) -> Iterator[FaultProxy]:
    with FaultProxy((local_server.host, local_server.port)) as proxy:
        yield proxy


@pytest.fixture
def redis_proxy(redis_server: RedisServer) -> Iterator[FaultProxy]:
    with FaultProxy(("127.0.0.1", redis_server.port)) as proxy:
        yield proxy


def http_get(proxy: FaultProxy, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def redis_client(proxy: FaultProxy, timeout: float = 5.0) -> redis.Redis:
    """A client that tries once: redis-py's default would retry a timeout 10 times."""
    return redis.Redis.from_url(
        proxy.url_for("redis", "/0"),
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 0),
    )


def raw_request(proxy: FaultProxy, path: str) -> socket.socket:
    sock = socket.create_connection(proxy.address, timeout=5)
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n".encode())
    return sock


def read_to_eof(sock: socket.socket) -> bytes:
    """Everything until EOF; a reset raises ConnectionResetError (what was read is in ``exc.received``)."""
    received = bytearray()
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError as exc:
            exc.received = bytes(received)  # type: ignore[attr-defined]
            raise
        if not chunk:
            return bytes(received)
        received += chunk


def read_response(sock: socket.socket) -> bytes:
    """One whole HTTP/1.1 response with a Content-Length, from a kept-alive connection."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(
        next(line for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:"))[15:]
    )
    while len(body) < length:
        body += sock.recv(65536)
    return head + b"\r\n\r\n" + body


def proxy_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("faultproxy")]


# -- pass-through ---------------------------------------------------------------------


def test_pass_through_http_and_counters(local_server: HTTPServer, http_proxy: FaultProxy) -> None:
    body = b"hello through the proxy"
    local_server.expect_request("/hello").respond_with_data(body)

    assert http_proxy.url_for("http", "/hello") == f"http://127.0.0.1:{http_proxy.port}/hello"
    assert http_get(http_proxy, "/hello") == (200, body)
    assert http_get(http_proxy, "/hello") == (200, body)

    assert http_proxy.wait_idle()
    assert http_proxy.connections == 2
    assert http_proxy.bytes_up > 2 * len("GET /hello HTTP/1.1\r\n")
    assert http_proxy.bytes_down > 2 * len(body)
    assert len(local_server.log) == 2
    http_proxy.reset_stats()
    assert (http_proxy.connections, http_proxy.bytes_up, http_proxy.bytes_down) == (0, 0, 0)


def test_pass_through_redis(redis_server: RedisServer, redis_proxy: FaultProxy) -> None:
    client = redis_client(redis_proxy)
    try:
        assert client.ping() is True
        client.set("faultproxy:key", "value")
        assert client.get("faultproxy:key") == b"value"
    finally:
        client.close()
    direct = redis.Redis.from_url(redis_server.url)
    assert direct.get("faultproxy:key") == b"value"
    direct.delete("faultproxy:key")
    direct.close()
    assert redis_proxy.connections == 1
    assert redis_proxy.bytes_up > 0
    assert redis_proxy.bytes_down > 0


def test_rewrite_url_keeps_credentials_and_path(http_proxy: FaultProxy) -> None:
    assert (
        http_proxy.rewrite_url("postgresql://app:secret@127.0.0.1:5432/app?sslmode=disable")
        == f"postgresql://app:secret@127.0.0.1:{http_proxy.port}/app?sslmode=disable"
    )
    assert http_proxy.rewrite_url("redis://localhost:6379/0") == f"redis://127.0.0.1:{http_proxy.port}/0"


# -- latency --------------------------------------------------------------------------


@pytest.mark.parametrize(("direction", "chunks"), [("upstream", 1), ("downstream", 1), ("both", 2)])
def test_latency_delays_each_chunk(
    local_server: HTTPServer, http_proxy: FaultProxy, direction: str, chunks: int
) -> None:
    local_server.expect_request("/slow").respond_with_data("ok")
    delay = 0.2
    http_proxy.latency(delay, direction)  # type: ignore[arg-type]

    started = time.monotonic()
    assert http_get(http_proxy, "/slow") == (200, b"ok")
    elapsed = time.monotonic() - started

    # One request chunk up, at least one response chunk down.
    assert elapsed >= chunks * delay
    assert elapsed < chunks * delay + SLACK


def test_latency_applies_to_a_connection_in_progress(redis_proxy: FaultProxy) -> None:
    client = redis_client(redis_proxy)
    try:
        assert client.ping()
        redis_proxy.latency(0.5, "downstream")
        started = time.monotonic()
        assert client.ping()
        assert time.monotonic() - started >= 0.5
        redis_proxy.pass_through()
        started = time.monotonic()
        assert client.ping()
        assert time.monotonic() - started < 0.5  # the delay is gone: a local PING takes a millisecond
    finally:
        client.close()
    assert redis_proxy.connections == 1


def test_latency_rejects_bad_arguments(http_proxy: FaultProxy) -> None:
    with pytest.raises(ValueError, match="latency"):
        http_proxy.latency(-1)
    with pytest.raises(ValueError, match="latency"):
        http_proxy.latency(0.1, "sideways")  # type: ignore[arg-type]


# -- black hole -----------------------------------------------------------------------


def test_blackhole_makes_an_http_client_time_out(local_server: HTTPServer, http_proxy: FaultProxy) -> None:
    local_server.expect_request("/never").respond_with_data("too late")
    http_proxy.blackhole()

    started = time.monotonic()
    with pytest.raises(TimeoutError):
        http_get(http_proxy, "/never", timeout=0.3)
    elapsed = time.monotonic() - started

    assert 0.3 <= elapsed < SLACK
    assert http_proxy.connections == 1  # accepted...
    assert http_proxy.bytes_up == 0  # ...but nothing forwarded
    assert local_server.log == []


def test_blackhole_makes_redis_time_out(redis_proxy: FaultProxy) -> None:
    redis_proxy.blackhole()
    client = redis_client(redis_proxy, timeout=0.3)
    started = time.monotonic()
    try:
        with pytest.raises(redis.exceptions.TimeoutError):
            client.ping()
    finally:
        client.close()
    assert 0.3 <= time.monotonic() - started < SLACK
    assert redis_proxy.bytes_up == 0


def test_blackhole_swallows_a_connection_in_progress(redis_proxy: FaultProxy) -> None:
    client = redis_client(redis_proxy, timeout=0.3)
    try:
        assert client.ping()
        redis_proxy.blackhole()
        with pytest.raises(redis.exceptions.TimeoutError):
            client.ping()
    finally:
        client.close()
    redis_proxy.pass_through()
    fresh = redis_client(redis_proxy)
    try:
        assert fresh.ping()
    finally:
        fresh.close()


# -- reset and close mid-response -----------------------------------------------------

BIG = bytes(range(256)) * 800  # 200 KiB: several chunks


@pytest.mark.parametrize("body_bytes", [10, 150_000])
def test_reset_after_sends_exactly_n_bytes_then_a_rst(
    local_server: HTTPServer, http_proxy: FaultProxy, body_bytes: int
) -> None:
    local_server.expect_request("/big").respond_with_data(BIG)
    with raw_request(http_proxy, "/big") as sock:
        full = read_to_eof(sock)
    head_length = full.index(b"\r\n\r\n") + 4
    assert full[head_length:] == BIG

    n = head_length + body_bytes
    http_proxy.reset_after(n)
    with raw_request(http_proxy, "/big") as sock, pytest.raises(ConnectionResetError) as caught:
        read_to_eof(sock)
    received = caught.value.received  # type: ignore[attr-defined]
    assert len(received) == n
    assert received.startswith(b"HTTP/1.1 200 OK\r\n")
    assert received[head_length:] == BIG[:body_bytes]
    assert http_proxy.bytes_down == len(full) + n


def test_reset_after_counts_from_the_switch_on_a_connection_in_progress(
    upstream: ScriptedServer,
) -> None:
    request = b"POST /v1/chat/completions HTTP/1.1\r\nHost: test\r\nContent-Length: 2\r\n\r\n{}"
    with FaultProxy(("127.0.0.1", upstream.port)) as proxy:
        with socket.create_connection(proxy.address, timeout=5) as sock:
            sock.sendall(request)
            first = read_response(sock)
            assert first.startswith(b"HTTP/1.1 200")
            proxy.reset_after(25)
            sock.sendall(request)
            with pytest.raises(ConnectionResetError) as caught:
                read_to_eof(sock)
        assert caught.value.received == first[:25]  # type: ignore[attr-defined]
        assert proxy.connections == 1


def test_reset_after_makes_redis_fail(redis_proxy: FaultProxy) -> None:
    redis_proxy.reset_after(0)
    client = redis_client(redis_proxy)
    try:
        with pytest.raises(redis.exceptions.ConnectionError):
            client.ping()
    finally:
        client.close()


@pytest.mark.parametrize("body_bytes", [10, 150_000])
def test_close_after_sends_exactly_n_bytes_then_eof(
    local_server: HTTPServer, http_proxy: FaultProxy, body_bytes: int
) -> None:
    local_server.expect_request("/big").respond_with_data(BIG)
    with raw_request(http_proxy, "/big") as sock:
        head_length = read_to_eof(sock).index(b"\r\n\r\n") + 4

    n = head_length + body_bytes
    http_proxy.close_after(n)
    with raw_request(http_proxy, "/big") as sock:
        received = read_to_eof(sock)  # a clean EOF: no ConnectionResetError
    assert len(received) == n
    assert received[head_length:] == BIG[:body_bytes]


def test_close_after_makes_an_http_client_see_an_incomplete_body(
    local_server: HTTPServer, http_proxy: FaultProxy
) -> None:
    local_server.expect_request("/big").respond_with_data(BIG)
    http_proxy.close_after(5000)
    with pytest.raises(http.client.IncompleteRead):
        http_get(http_proxy, "/big")


# -- refuse ---------------------------------------------------------------------------


def test_refuse_then_pass_through_on_the_same_port(local_server: HTTPServer, http_proxy: FaultProxy) -> None:
    local_server.expect_request("/back").respond_with_data("back")
    port = http_proxy.port

    http_proxy.refuse()
    started = time.monotonic()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(http_proxy.address, timeout=5).close()
    assert time.monotonic() - started < 1.0

    http_proxy.pass_through()
    assert http_proxy.port == port
    assert http_get(http_proxy, "/back") == (200, b"back")


def test_refuse_keeps_connections_in_progress_until_dropped(redis_proxy: FaultProxy) -> None:
    client = redis_client(redis_proxy)
    try:
        assert client.ping()
        redis_proxy.refuse()
        assert client.ping()  # the open connection still works
        assert redis_proxy.drop_connections() == 1
        with pytest.raises(redis.exceptions.ConnectionError):
            client.ping()  # the connection was reset, and a new one is refused
    finally:
        client.close()


# -- PostgreSQL -----------------------------------------------------------------------


@pytest.mark.postgres
def test_postgres_through_the_proxy_and_refused(postgres_server: PostgresServer) -> None:
    with FaultProxy(("127.0.0.1", postgres_server.port)) as proxy:
        url = proxy.rewrite_url(postgres_server.url)
        with psycopg.connect(url, connect_timeout=5) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        assert proxy.bytes_up > 0
        assert proxy.bytes_down > 0

        proxy.refuse()
        started = time.monotonic()
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(url, connect_timeout=5)
        assert time.monotonic() - started < 1.0

        proxy.pass_through()
        with psycopg.connect(url, connect_timeout=5) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)


# -- the proxy's own behaviour -------------------------------------------------------


def test_target_down_resets_the_client() -> None:
    with FaultProxy(("127.0.0.1", free_port())) as proxy, pytest.raises(ConnectionResetError):
        # The reset may even beat connect() back to the client.
        with socket.create_connection(proxy.address, timeout=5) as sock:
            read_to_eof(sock)


def test_max_connections_bounds_the_threads(redis_server: RedisServer) -> None:
    with FaultProxy(("127.0.0.1", redis_server.port), max_connections=1) as proxy:
        proxy.blackhole()
        with socket.create_connection(proxy.address, timeout=5) as held:
            held.sendall(b"PING\r\n")
            with (
                pytest.raises(ConnectionResetError),
                socket.create_connection(proxy.address, timeout=5) as extra,
            ):
                read_to_eof(extra)  # one over the bound: reset at once, maybe before connect() returns
            assert proxy.active == 1
        assert proxy.connections == 2


def test_stop_ends_every_thread(redis_server: RedisServer) -> None:
    proxy = FaultProxy(("127.0.0.1", redis_server.port)).start()
    idle = redis_client(proxy)
    assert idle.ping()  # a connection left open
    proxy.blackhole()
    hung = socket.create_connection(proxy.address, timeout=5)
    hung.sendall(b"PING\r\n")  # a connection swallowed
    proxy.latency(30)
    slow = socket.create_connection(proxy.address, timeout=5)
    slow.sendall(b"PING\r\n")  # a chunk waiting out its latency
    deadline = time.monotonic() + 5
    while proxy.active < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert proxy.active == 3
    assert proxy_threads()

    started = time.monotonic()
    proxy.stop()
    assert time.monotonic() - started < SLACK
    assert proxy_threads() == []
    assert proxy.active == 0
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(proxy.address, timeout=5).close()
    for sock in (hung, slow):
        assert read_to_eof(sock) == b""  # closed cleanly by stop()
        sock.close()
    idle.close()
