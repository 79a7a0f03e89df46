"""Redis through redis-py, against a private redis-server: short timeouts, one retry at most."""

from __future__ import annotations

import pytest
import redis

from app.errors import ServiceNotConfiguredError
from app.services.redis_service import get_redis_client, reset_redis_client
from tests.conftest import CANARY_KEY
from tests.servers import free_port, start_redis


def test_client_talks_to_the_configured_server(make_app, redis_server):
    app = make_app(REDIS_URL=redis_server.url.replace("/0", "/3"))
    with app.app_context():
        client = get_redis_client()
        assert isinstance(client, redis.Redis)
        client.set("redis-test:key", "value", ex=30)
        assert client.get("redis-test:key") == b"value"
        assert client.connection_pool.connection_kwargs["db"] == 3
        assert client.client_info()["db"] == 3
        client.delete("redis-test:key")


def test_safe_defaults(make_app, redis_server):
    app = make_app(REDIS_URL=redis_server.url)
    with app.app_context():
        client = get_redis_client()
    kwargs = client.connection_pool.connection_kwargs
    assert kwargs["socket_timeout"] == 1.0
    assert kwargs["socket_connect_timeout"] == 1.0
    assert kwargs["health_check_interval"] == 30
    # redis-py 8 retries ten times by default; here at most once.
    assert client.get_retry().get_retries() == 1
    assert kwargs["retry"].get_retries() == 1


def test_timeouts_and_retries_are_configurable(make_app, redis_server):
    app = make_app(
        REDIS_URL=redis_server.url,
        REDIS_SOCKET_TIMEOUT="0.25",
        REDIS_CONNECT_TIMEOUT="0.5",
        REDIS_MAX_RETRIES="0",
        REDIS_HEALTH_CHECK_INTERVAL=0,
    )
    with app.app_context():
        client = get_redis_client()
        assert client.ping()
    kwargs = client.connection_pool.connection_kwargs
    assert (kwargs["socket_timeout"], kwargs["socket_connect_timeout"]) == (0.25, 0.5)
    assert kwargs["health_check_interval"] == 0
    assert client.get_retry().get_retries() == 0


def test_a_closed_port_fails_with_a_connection_error(make_app):
    app = make_app(REDIS_URL=f"redis://127.0.0.1:{free_port()}/0")
    with app.app_context():
        client = get_redis_client()  # building opens no connection
        with pytest.raises(redis.ConnectionError):
            client.ping()
    assert client.get_retry().get_retries() <= 1


def test_missing_url_names_the_setting(make_app):
    app = make_app()
    with app.app_context(), pytest.raises(ServiceNotConfiguredError) as info:
        get_redis_client()
    assert info.value.setting == "REDIS_URL"
    assert "set REDIS_URL" in str(info.value)
    assert app.extensions["redis_service"].info()["redis"]["missing"] == "REDIS_URL"


def test_password_in_the_url_is_used_and_redacted(make_app):
    server = start_redis(password=CANARY_KEY)
    try:
        app = make_app(REDIS_URL=server.url)
        with app.app_context():
            assert get_redis_client().ping()
        info = app.extensions["redis_service"].info()["redis"]
        assert info["endpoint"] == f"redis://***@127.0.0.1:{server.port}/0"
        assert CANARY_KEY not in repr(app.extensions["redis_service"].settings)
        wrong = make_app(REDIS_URL=server.url.replace(CANARY_KEY, "wrong-password"))
        with wrong.app_context(), pytest.raises(redis.AuthenticationError):
            get_redis_client().ping()
    finally:
        server.stop()


def test_client_recovers_after_the_server_restarts(make_app, disposable_redis):
    app = make_app(REDIS_URL=disposable_redis.url)
    with app.app_context():
        client = get_redis_client()
        assert client.ping()
        disposable_redis.stop()
        with pytest.raises(redis.ConnectionError):
            client.ping()
        disposable_redis.start()
        assert client.ping()  # the same client reconnects; no reset needed
        assert get_redis_client() is client


def test_reset_then_get_builds_a_new_client(make_app, redis_server):
    app = make_app(REDIS_URL=redis_server.url)
    with app.app_context():
        old = get_redis_client()
        old_id = old.client_id()
    reset_redis_client(app)
    with app.app_context():
        new = get_redis_client()
        assert new is not old
        assert new.client_id() != old_id


@pytest.mark.parametrize("url", ["rediss://127.0.0.1:6380/0", "unix:///tmp/redis.sock?db=2"])
def test_tls_and_unix_urls_are_accepted(make_app, url):
    app = make_app(REDIS_URL=url)
    with app.app_context():
        client = get_redis_client()
    assert client.connection_pool.connection_kwargs["socket_timeout"] == 1.0
