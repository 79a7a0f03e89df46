"""Azure AD / managed identity: an Azure profile with ``azure_ad_token_provider`` instead of a key.

The provider is named as ``"module:callable"`` and checked at start (imported,
callable without arguments, not async), never called there; the SDK calls it for
every request, so a refreshed token is used at once. Checked against a local
server speaking Azure OpenAI: the bearer token on the wire, sync and async, and a
per-call key on the same profile sent as ``api-key`` instead.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections.abc import Callable
from typing import Any

import pytest
from flask import Flask

from app.errors import ConfigError
from app.llm import get_llm
from tests.payloads import chat_completion, openai_embeddings
from tests.servers import ScriptedServer

USER = [{"role": "user", "content": "Hi"}]
DEPLOYMENT = "/openai/deployments/prod-gpt-4o/chat/completions"
PROVIDER = "tests.test_llm_azure_ad:token_provider"

_tokens = itertools.count(1)
_calls_lock = threading.Lock()
calls: list[int] = []


def token_provider() -> str:
    """What azure-identity's get_bearer_token_provider(...) returns: a fresh token when asked."""
    with _calls_lock:
        number = next(_tokens)
        calls.append(number)
    return f"aad-token-{number}"


async def async_provider() -> str:
    return "never"


def needs_an_argument(scope: str) -> str:
    return scope


NOT_CALLABLE = "a token"


def azure(upstream: ScriptedServer, **settings: Any) -> dict[str, Any]:
    profile = {
        "azure_endpoint": upstream.base_url,
        "api_version": "2024-10-21",
        "azure_ad_token_provider": PROVIDER,
        **settings,
    }
    return {"OPENAI_PROFILES": {"azure": profile}}


@pytest.fixture
def app(make_app: Callable[..., Flask], upstream: ScriptedServer) -> Flask:
    return make_app(azure(upstream))


def test_every_request_carries_a_token_from_the_provider(app, upstream):
    upstream.script(DEPLOYMENT, chat_completion("one"), chat_completion("two"))
    upstream.script("/openai/deployments/prod-embed/embeddings", openai_embeddings([0.5]))
    before = len(calls)
    with app.app_context():
        llm = get_llm()
        assert llm.chat(USER, model="azure/prod-gpt-4o").content == "one"
        assert llm.chat(USER, model="azure/prod-gpt-4o").content == "two"
        assert llm.embed(["x"], model="azure/prod-embed") == [[0.5]]
    tokens = [r.headers.get("authorization") for r in upstream.requests]
    numbers = calls[before:]
    assert tokens == [f"Bearer aad-token-{n}" for n in numbers] and len(numbers) == 3
    assert all("api-key" not in r.headers for r in upstream.requests)
    assert all(r.query == {"api-version": "2024-10-21"} for r in upstream.requests)


def test_async_calls_ask_the_provider_too(app, upstream):
    upstream.script(DEPLOYMENT, chat_completion("async"))
    before = len(calls)
    with app.app_context():
        response = asyncio.run(get_llm().achat(USER, model="azure/prod-gpt-4o"))
    assert response.content == "async"
    assert upstream.only_request().headers["authorization"] == f"Bearer aad-token-{calls[before]}"


def test_a_per_call_key_on_the_profile_is_sent_as_its_api_key_instead(app, upstream):
    upstream.script(DEPLOYMENT, chat_completion("tenant"), chat_completion("platform"))
    with app.app_context():
        get_llm().chat(USER, model="azure/prod-gpt-4o", api_key="tenant-azure-key-0123456789")
        get_llm().chat(USER, model="azure/prod-gpt-4o")
    tenant, platform = upstream.requests
    assert tenant.headers.get("api-key") == "tenant-azure-key-0123456789"
    assert "authorization" not in tenant.headers
    assert platform.headers["authorization"].startswith("Bearer aad-token-")
    assert tenant.port == platform.port


def test_the_profile_is_configured_and_says_how_it_authenticates(app):
    info = app.extensions["openai_service"].info()["azure"]
    assert (info["configured"], info["missing"], info["auth"]) == (True, None, "azure_ad_token_provider")
    result = app.test_cli_runner().invoke(args=["services", "info"])
    assert result.exit_code == 0 and "azure" in result.output


def test_start_up_imports_the_provider_without_calling_it(make_app, upstream):
    before = len(calls)
    make_app(azure(upstream))
    assert len(calls) == before


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"azure_ad_token_provider": "tests.test_llm_azure_ad"}, "must be 'module:callable'"),
        ({"azure_ad_token_provider": ":token_provider"}, "must be 'module:callable'"),
        (
            {"azure_ad_token_provider": "no_such_module_xyz:provider"},
            "cannot load 'no_such_module_xyz:provider'",
        ),
        ({"azure_ad_token_provider": "tests.test_llm_azure_ad:missing"}, "cannot load"),
        ({"azure_ad_token_provider": "tests.test_llm_azure_ad:NOT_CALLABLE"}, "is not a function"),
        ({"azure_ad_token_provider": "tests.test_llm_azure_ad:async_provider"}, "is an async function"),
        (
            {"azure_ad_token_provider": "tests.test_llm_azure_ad:needs_an_argument"},
            "callable without arguments",
        ),
        ({"api_key": "k-0123456789"}, "sets both a key and azure_ad_token_provider"),
        ({"api_key_env": "AZURE_OPENAI_API_KEY"}, "sets both a key and azure_ad_token_provider"),
    ],
)
def test_a_bad_provider_stops_start_up_naming_the_setting(make_app, upstream, settings, message):
    with pytest.raises(ConfigError) as caught:
        make_app(azure(upstream, **settings))
    assert "OPENAI_PROFILES['azure']" in str(caught.value) and message in str(caught.value)


def test_only_an_azure_profile_takes_a_token_provider(make_app, upstream):
    with pytest.raises(ConfigError, match=r"azure_ad_token_provider is for an Azure profile"):
        make_app(
            OPENAI_PROFILES={
                "vllm": {"base_url": upstream.url_for("/v1"), "azure_ad_token_provider": PROVIDER}
            }
        )
