"""OpenAI and OpenAI-compatible profiles, exercised against local HTTP servers.

Every assertion is on what the SDK really sent (path, auth header, body) or on
what it really did (timed out, retried).
"""

from __future__ import annotations

import asyncio
import json
import time

import openai
import pytest
from werkzeug import Request, Response

from app.errors import ServiceNotConfiguredError, UnknownProfileError
from app.services.openai_service import get_async_openai_client, get_openai_client, reset_openai_client
from tests.conftest import CANARY_KEY, chat_completion

MESSAGES = [{"role": "user", "content": "Say hi"}]


def expect_chat(server, path: str = "/v1/chat/completions", content: str = "hello") -> None:
    server.expect_request(path, method="POST").respond_with_json(chat_completion(content))


def ask(client, model: str = "gpt-4o-mini") -> str:
    return client.chat.completions.create(model=model, messages=MESSAGES).choices[0].message.content


def only_request(server) -> Request:
    ((request, _),) = server.log
    return request


# --- the default profile ---------------------------------------------------------


def test_default_profile_sends_key_path_and_body(make_app, local_server):
    expect_chat(local_server)
    app = make_app(
        OPENAI_API_KEY=CANARY_KEY,
        OPENAI_BASE_URL=local_server.url_for("/v1"),
        OPENAI_ORGANIZATION="org-test",
        OPENAI_PROJECT="proj_test",
    )
    with app.app_context():
        client = get_openai_client()
        assert type(client) is openai.OpenAI
        assert ask(client) == "hello"
    request = only_request(local_server)
    assert request.method == "POST"
    assert request.path == "/v1/chat/completions"
    assert request.headers["Authorization"] == f"Bearer {CANARY_KEY}"
    assert request.headers["OpenAI-Organization"] == "org-test"
    assert request.headers["OpenAI-Project"] == "proj_test"
    assert request.json == {"model": "gpt-4o-mini", "messages": MESSAGES}


def test_default_timeouts_and_retries_are_safe(make_app):
    app = make_app(OPENAI_API_KEY=CANARY_KEY)
    with app.app_context():
        client = get_openai_client()
    assert client.timeout.read == 60.0
    assert client.timeout.write == 60.0
    assert client.timeout.connect == 5.0
    assert client.max_retries == 2
    assert str(client.base_url) == "https://api.openai.com/v1/"


def test_timeouts_and_retries_are_configurable(make_app):
    app = make_app(
        OPENAI_API_KEY=CANARY_KEY, OPENAI_TIMEOUT="2.5", OPENAI_CONNECT_TIMEOUT=1, OPENAI_MAX_RETRIES=0
    )
    with app.app_context():
        client = get_openai_client()
    assert (client.timeout.read, client.timeout.connect, client.max_retries) == (2.5, 1.0, 0)


def test_a_slow_server_makes_the_sdk_time_out(make_app, local_server):
    def slow(_request: Request) -> Response:
        time.sleep(1.5)
        return Response(json.dumps(chat_completion()), content_type="application/json")

    local_server.expect_request("/v1/chat/completions").respond_with_handler(slow)
    app = make_app(
        OPENAI_API_KEY=CANARY_KEY,
        OPENAI_BASE_URL=local_server.url_for("/v1"),
        OPENAI_TIMEOUT=0.3,
        OPENAI_MAX_RETRIES=0,
    )
    with app.app_context(), pytest.raises(openai.APITimeoutError):
        ask(get_openai_client())


def failing_with_500(server, path: str = "/v1/chat/completions") -> None:
    # retry-after-ms keeps the SDK's backoff to a millisecond.
    server.expect_request(path).respond_with_json(
        {"error": {"message": "boom", "type": "server_error"}}, status=500, headers={"retry-after-ms": "1"}
    )


@pytest.mark.parametrize(
    ("settings", "attempts"), [({}, 3), ({"OPENAI_MAX_RETRIES": 0}, 1), ({"OPENAI_MAX_RETRIES": "4"}, 5)]
)
def test_the_sdk_makes_max_retries_plus_one_attempts(make_app, local_server, settings, attempts):
    failing_with_500(local_server)
    app = make_app(settings, OPENAI_API_KEY=CANARY_KEY, OPENAI_BASE_URL=local_server.url_for("/v1"))
    with app.app_context(), pytest.raises(openai.InternalServerError):
        ask(get_openai_client())
    assert len(local_server.log) == attempts


def test_missing_key_names_the_setting(make_app):
    app = make_app()
    with app.app_context(), pytest.raises(ServiceNotConfiguredError) as info:
        get_openai_client()
    assert info.value.setting == "OPENAI_API_KEY"
    assert "set OPENAI_API_KEY" in str(info.value)


def test_missing_key_is_not_cached(make_app):
    """A failed build leaves nothing behind: setting the key and resetting makes the next get work."""
    app = make_app()
    with app.app_context():
        with pytest.raises(ServiceNotConfiguredError):
            get_openai_client()
        app.config["OPENAI_API_KEY"] = CANARY_KEY
        reset_openai_client()
        assert get_openai_client().api_key == CANARY_KEY


def test_default_profile_overrides_from_openai_profiles(make_app, local_server):
    expect_chat(local_server)
    app = make_app(
        OPENAI_API_KEY=CANARY_KEY,
        OPENAI_BASE_URL=local_server.url_for("/v1"),
        OPENAI_PROFILES={"default": {"default_headers": {"X-Team": "search"}, "max_retries": 0}},
    )
    with app.app_context():
        client = get_openai_client()
        ask(client)
    assert client.max_retries == 0
    request = only_request(local_server)
    assert request.headers["X-Team"] == "search"
    assert request.headers["Authorization"] == f"Bearer {CANARY_KEY}"


# --- named profiles ---------------------------------------------------------------


def test_unknown_profile_lists_the_configured_ones(make_app):
    app = make_app(OPENAI_PROFILES={"groq": {"api_key": "gsk-x"}, "ollama": {}})
    with app.app_context():
        for get in (get_openai_client, get_async_openai_client):
            with pytest.raises(UnknownProfileError) as info:
                get("mistral")
            assert info.value.configured == ["default", "groq", "ollama"]
            assert "unknown OpenAI profile 'mistral'" in str(info.value)
            assert "'default', 'groq', 'ollama'" in str(info.value)
            assert "OPENAI_PROFILES" in str(info.value)


def test_openrouter_profile_with_api_key_env(make_app, local_server, monkeypatch):
    monkeypatch.setenv("MY_OPENROUTER_KEY", "sk-or-from-env-000000")
    expect_chat(local_server, "/api/v1/chat/completions")
    app = make_app(
        OPENAI_PROFILES={
            "openrouter": {
                "base_url": local_server.url_for("/api/v1"),
                "api_key_env": "MY_OPENROUTER_KEY",
                "default_headers": {"HTTP-Referer": "https://example.test", "X-Title": "demo"},
            }
        }
    )
    with app.app_context():
        ask(get_openai_client("openrouter"), model="openai/gpt-4o-mini")
    request = only_request(local_server)
    assert request.path == "/api/v1/chat/completions"
    assert request.headers["Authorization"] == "Bearer sk-or-from-env-000000"
    assert request.headers["HTTP-Referer"] == "https://example.test"
    assert request.json["model"] == "openai/gpt-4o-mini"


def test_openrouter_preset_knows_its_url_and_key_variable(make_app, monkeypatch):
    app = make_app(OPENAI_PROFILES={"openrouter": {}})
    with app.app_context(), pytest.raises(ServiceNotConfiguredError) as info:
        get_openai_client("openrouter")
    assert info.value.setting == "OPENROUTER_API_KEY"
    monkeypatch.setenv("OPENROUTER_API_KEY", "sk-or-0000000000")
    app = make_app(OPENAI_PROFILES={"openrouter": {}})
    with app.app_context():
        client = get_openai_client("openrouter")
    assert str(client.base_url) == "https://openrouter.ai/api/v1/"
    assert client.api_key == "sk-or-0000000000"


def test_groq_preset_with_key_from_the_environment(make_app, local_server, monkeypatch):
    monkeypatch.setenv("GROQ_API_KEY", "gsk-from-env-000000")
    expect_chat(local_server, "/openai/v1/chat/completions")
    app = make_app(OPENAI_PROFILES={"groq": {"base_url": local_server.url_for("/openai/v1")}})
    with app.app_context():
        ask(get_openai_client("groq"), model="llama-3.3-70b-versatile")
    request = only_request(local_server)
    assert request.headers["Authorization"] == "Bearer gsk-from-env-000000"


def test_groq_preset_with_key_from_config(make_app):
    # The key variable may live in .env, instance/config.py or the create_app mapping.
    app = make_app(GROQ_API_KEY="gsk-from-config-000000", OPENAI_PROFILES={"groq": {}})
    with app.app_context():
        client = get_openai_client("groq")
    assert str(client.base_url) == "https://api.groq.com/openai/v1/"
    assert client.api_key == "gsk-from-config-000000"


def test_preset_profile_with_an_inline_key(make_app):
    app = make_app(OPENAI_PROFILES={"groq": {"api_key": "gsk-inline-000000"}})
    with app.app_context():
        assert get_openai_client("groq").api_key == "gsk-inline-000000"


def test_groq_without_key_names_groq_api_key(make_app):
    app = make_app(OPENAI_API_KEY=CANARY_KEY, OPENAI_PROFILES={"groq": {}})
    with app.app_context():
        with pytest.raises(ServiceNotConfiguredError) as info:
            get_openai_client("groq")
        assert get_openai_client() is not None  # the default profile is unaffected
    assert info.value.setting == "GROQ_API_KEY"
    assert "GROQ_API_KEY" in str(info.value)


def test_ollama_is_keyless(make_app, local_server):
    expect_chat(local_server)
    app = make_app(OPENAI_PROFILES={"ollama": {"base_url": local_server.url_for("/v1")}})
    with app.app_context():
        ask(get_openai_client("ollama"), model="llama3.2")
    # The SDK insists on a key; keyless endpoints get a placeholder, never another profile's key.
    assert only_request(local_server).headers["Authorization"] == "Bearer not-needed"


def test_ollama_preset_default_url(make_app):
    app = make_app(OPENAI_PROFILES={"ollama": {}})
    with app.app_context():
        assert str(get_openai_client("ollama").base_url) == "http://127.0.0.1:11434/v1/"


def test_custom_profile_with_default_headers(make_app, local_server):
    expect_chat(local_server)
    app = make_app(
        OPENAI_API_KEY=CANARY_KEY,
        OPENAI_PROFILES={
            "vllm": {
                "base_url": local_server.url_for("/v1"),
                "api_key": "vllm-token-000000",
                "default_headers": {"X-Tenant": "acme"},
                "organization": "org-vllm",
            }
        },
    )
    with app.app_context():
        vllm = get_openai_client("vllm")
        assert vllm is not get_openai_client()
        ask(vllm, model="meta-llama/Llama-3.1-8B-Instruct")
    request = only_request(local_server)
    assert request.headers["X-Tenant"] == "acme"
    assert request.headers["Authorization"] == "Bearer vllm-token-000000"
    assert request.headers["OpenAI-Organization"] == "org-vllm"
    assert request.json["model"] == "meta-llama/Llama-3.1-8B-Instruct"


def test_profile_without_any_key_is_keyless(make_app, local_server):
    expect_chat(local_server)
    app = make_app(
        OPENAI_API_KEY=CANARY_KEY, OPENAI_PROFILES={"vllm": {"base_url": local_server.url_for("/v1")}}
    )
    with app.app_context():
        ask(get_openai_client("vllm"))
    assert only_request(local_server).headers["Authorization"] == "Bearer not-needed"


def test_profile_timeout_and_retries(make_app, local_server):
    failing_with_500(local_server)
    app = make_app(
        OPENAI_API_KEY=CANARY_KEY,
        OPENAI_MAX_RETRIES=4,
        OPENAI_PROFILES={
            "vllm": {
                "base_url": local_server.url_for("/v1"),
                "timeout": 7,
                "connect_timeout": "0.5",
                "max_retries": 1,
            }
        },
    )
    with app.app_context():
        vllm = get_openai_client("vllm")
        default = get_openai_client()
        with pytest.raises(openai.InternalServerError):
            ask(vllm)
    assert len(local_server.log) == 2
    assert (vllm.timeout.read, vllm.timeout.connect, vllm.max_retries) == (7.0, 0.5, 1)
    # Profiles inherit the global settings unless they set their own.
    assert (default.timeout.read, default.timeout.connect, default.max_retries) == (60.0, 5.0, 4)


def test_profile_timeout_makes_the_sdk_time_out(make_app, local_server):
    def slow(_request: Request) -> Response:
        time.sleep(1.5)
        return Response(json.dumps(chat_completion()), content_type="application/json")

    local_server.expect_request("/v1/chat/completions").respond_with_handler(slow)
    app = make_app(
        OPENAI_PROFILES={"vllm": {"base_url": local_server.url_for("/v1"), "timeout": 0.3, "max_retries": 0}}
    )
    with app.app_context(), pytest.raises(openai.APITimeoutError):
        ask(get_openai_client("vllm"))


# --- Azure --------------------------------------------------------------------------


def azure_profile(server, **extra):
    return {
        "azure": {
            "azure_endpoint": server.url_for("/"),
            "api_version": "2024-10-21",
            "azure_deployment": "gpt-4o-prod",
            **extra,
        }
    }


def test_azure_profile(make_app, local_server):
    local_server.expect_request(
        "/openai/deployments/gpt-4o-prod/chat/completions",
        method="POST",
        query_string={"api-version": "2024-10-21"},
    ).respond_with_json(chat_completion("from azure"))
    app = make_app(OPENAI_PROFILES=azure_profile(local_server, api_key="azure-key-000000000"))
    with app.app_context():
        client = get_openai_client("azure")
        assert isinstance(client, openai.AzureOpenAI)
        assert ask(client, model="gpt-4o") == "from azure"
    request = only_request(local_server)
    assert request.path == "/openai/deployments/gpt-4o-prod/chat/completions"
    assert request.args["api-version"] == "2024-10-21"
    assert request.headers["api-key"] == "azure-key-000000000"
    assert "Authorization" not in request.headers
    assert client.timeout.read == 60.0


def test_azure_profile_with_key_from_env(make_app, local_server, monkeypatch):
    monkeypatch.setenv("AZURE_OPENAI_API_KEY", "azure-env-key-000000")
    local_server.expect_request("/openai/deployments/gpt-4o-prod/chat/completions").respond_with_json(
        chat_completion()
    )
    app = make_app(OPENAI_PROFILES=azure_profile(local_server, api_key_env="AZURE_OPENAI_API_KEY"))
    with app.app_context():
        ask(get_openai_client("azure"))
    assert only_request(local_server).headers["api-key"] == "azure-env-key-000000"


def test_azure_profile_without_key_names_the_setting(make_app, local_server):
    app = make_app(OPENAI_PROFILES=azure_profile(local_server))
    with app.app_context(), pytest.raises(ServiceNotConfiguredError) as info:
        get_openai_client("azure")
    assert info.value.setting == "OPENAI_PROFILES['azure'].api_key"


def test_async_azure_profile(make_app, local_server):
    local_server.expect_request("/openai/deployments/gpt-4o-prod/chat/completions").respond_with_json(
        chat_completion()
    )
    app = make_app(OPENAI_PROFILES=azure_profile(local_server, api_key="azure-key-000000000"))

    async def main():
        client = get_async_openai_client("azure")
        assert isinstance(client, openai.AsyncAzureOpenAI)
        await client.chat.completions.create(model="gpt-4o", messages=MESSAGES)

    with app.app_context():
        asyncio.run(main())
    assert only_request(local_server).headers["api-key"] == "azure-key-000000000"


# --- async clients ---------------------------------------------------------------------


def test_async_client_in_asyncio_run(make_app, local_server):
    expect_chat(local_server, content="async hello")
    expect_chat(local_server, content="async hello")
    app = make_app(OPENAI_API_KEY=CANARY_KEY, OPENAI_BASE_URL=local_server.url_for("/v1"))

    async def main():
        client = get_async_openai_client()
        assert get_async_openai_client() is client  # one per loop
        completion = await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        return client, completion.choices[0].message.content

    with app.app_context():
        first, reply = asyncio.run(main())
        second, _ = asyncio.run(main())
        assert reply == "async hello"
        assert isinstance(first, openai.AsyncOpenAI)
        assert first is not second  # a new loop, a new client
        assert first.timeout.read == 60.0
        assert first.timeout.connect == 5.0
        assert get_openai_client() is not first
    request = local_server.log[0][0]
    assert request.headers["Authorization"] == f"Bearer {CANARY_KEY}"
    assert request.path == "/v1/chat/completions"
    assert request.json["messages"] == MESSAGES


def test_reset_closes_async_client_of_a_running_loop(make_app, local_server):
    expect_chat(local_server)
    app = make_app(OPENAI_API_KEY=CANARY_KEY, OPENAI_BASE_URL=local_server.url_for("/v1"))

    async def main():
        client = get_async_openai_client()
        await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        reset_openai_client(app)
        for _ in range(100):
            if client.is_closed():
                break
            await asyncio.sleep(0.01)
        assert client.is_closed()
        assert get_async_openai_client() is not client

    with app.app_context():
        asyncio.run(main())


def test_reset_closes_async_client_of_an_idle_loop(make_app, local_server):
    expect_chat(local_server)
    app = make_app(OPENAI_API_KEY=CANARY_KEY, OPENAI_BASE_URL=local_server.url_for("/v1"))

    async def main():
        client = get_async_openai_client()
        await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        return client

    loop = asyncio.new_event_loop()
    try:
        with app.app_context():
            client = loop.run_until_complete(main())
            assert not client.is_closed()
            reset_openai_client()
            assert client.is_closed()
    finally:
        loop.close()


def test_reset_closes_async_client_built_outside_a_loop(make_app, local_server):
    expect_chat(local_server)
    app = make_app(OPENAI_API_KEY=CANARY_KEY, OPENAI_BASE_URL=local_server.url_for("/v1"))
    with app.app_context():
        client = get_async_openai_client()
        assert get_async_openai_client() is client
        reset_openai_client()
        assert client.is_closed()
        assert get_async_openai_client() is not client


def test_reset_after_an_outside_client_was_used_in_a_finished_loop(make_app, local_server):
    """Built outside a loop, used in asyncio.run: its loop is gone at reset, and reset still works."""
    expect_chat(local_server)
    app = make_app(OPENAI_API_KEY=CANARY_KEY, OPENAI_BASE_URL=local_server.url_for("/v1"))
    with app.app_context():
        client = get_async_openai_client()
        asyncio.run(client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES))
        sync_client = get_openai_client()
        reset_openai_client()
        assert sync_client.is_closed()  # the rest of the reset happened
        assert get_async_openai_client() is not client
