"""The model catalogue (genai-prices, the project's models.json, LLM_MODELS) and what the layer does with it.

The README's example of "Parameters, usage and the model catalogue" runs as
written against local servers; every ``provider/model`` the README names must
be known; a model nobody knows is "unknown", never a guess.
"""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import pytest
from flask import Flask
from genai_prices.data_snapshot import get_snapshot

from app.errors import ConfigError
from app.llm import LLMBadRequestError, get_llm
from app.llm.catalogue import GENAI_PRICES_PROVIDER, PRICE_KEYS, Catalogue, UnknownModelError, load_data_file
from tests import payloads as p
from tests.conftest import CANARY_GEMINI_KEY, CANARY_KEY, ROOT
from tests.readme import README, python_blocks, section
from tests.servers import ScriptedServer

SECTION = "Parameters, usage and the model catalogue"
OPENAI_PATH = "/v1/chat/completions"


def readme_llm_models() -> dict[str, Any]:
    """The ``LLM_MODELS`` JSON of the README's example, as a user would paste it."""
    match = re.search(r"LLM_MODELS='(.*?)'", section(SECTION), re.S)
    assert match, "the README shows an LLM_MODELS example"
    value: dict[str, Any] = json.loads(match.group(1))
    return value


def readme_models() -> list[str]:
    """Every ``provider/model`` address the README names for chat and embeddings.

    Placeholders such as ``openai/…`` or ``gemini/imagen-…`` aside, and the image and video
    models of "Jobs and media", which are priced per image or per second by their own table
    (app/llm/media/prices.py, checked in tests/test_images.py), not by this token catalogue.
    """
    from app.llm.media.prices import BUILT_IN as MEDIA_MODELS

    providers = "openai|gemini|anthropic|groq|openrouter|ollama|azure|vllm"
    text = README.read_text()
    found = {
        match.group(1)
        for match in re.finditer(rf"\b((?:{providers})/[A-Za-z0-9][A-Za-z0-9._:-]*)", text)
        if not text.startswith("…", match.end())  # a placeholder such as gemini/imagen-…
    }
    return sorted(found - set(MEDIA_MODELS))


@pytest.fixture
def app(make_app: Callable[..., Flask], upstream: ScriptedServer) -> Flask:
    """A user's settings: the providers' keys, a vLLM profile, and the README's LLM_MODELS."""
    return make_app(
        OPENAI_API_KEY=CANARY_KEY,
        OPENAI_BASE_URL=upstream.url_for("/v1"),
        OPENAI_PROFILES={
            "vllm": {"base_url": upstream.url_for("/v1")},
            "azure": {
                "azure_endpoint": upstream.base_url,
                "api_version": "2024-10-21",
                "api_key": CANARY_KEY,
            },
        },
        GEMINI_API_KEY=CANARY_GEMINI_KEY,
        GENAI_BASE_URL=upstream.url_for("/"),
        GENAI_API_VERSION="v1beta",
        ANTHROPIC_API_KEY=CANARY_KEY,
        ANTHROPIC_BASE_URL=upstream.base_url,
        LLM_MODELS=json.dumps(readme_llm_models()),
    )


# --- the README --------------------------------------------------------------------------------


def test_the_readme_example_runs_as_written(app, upstream):
    (example,) = python_blocks(SECTION)
    upstream.script(
        OPENAI_PATH,
        {**p.chat_completion("Suppose...", "o4-mini-2025-04-16", usage=(1117, 946)),
         "usage": {"prompt_tokens": 1117, "completion_tokens": 946, "total_tokens": 2063,
                   "prompt_tokens_details": {"cached_tokens": 1024},
                   "completion_tokens_details": {"reasoning_tokens": 704}}},
        p.chat_completion("From vLLM", "qwen3-8b"),
        p.chat_completion('{"primes": "infinite"}'),
    )  # fmt: skip
    upstream.script(
        "/v1beta/models/gemini-2.5-flash:generateContent", p.gemini_reply(p.gemini_text("From Gemini"))
    )
    upstream.script("/v1/messages", p.anthropic_message(model="claude-sonnet-4-6"))
    namespace: dict[str, Any] = {}

    with app.app_context():
        exec(compile(example, "README.md", "exec"), namespace)

    bodies = {request.path: request.json for request in upstream.requests}
    o4, vllm, json_mode = (r.json for r in upstream.requests_to(OPENAI_PATH))
    assert (o4["model"], o4["reasoning_effort"], o4["max_completion_tokens"]) == ("o4-mini", "low", 4000)
    gemini = bodies["/v1beta/models/gemini-2.5-flash:generateContent"]
    assert gemini["generationConfig"]["topK"] == 40
    assert gemini["generationConfig"]["thinkingConfig"] == {"thinking_budget": 512}
    assert gemini["safetySettings"] == [
        {"category": "HARM_CATEGORY_HARASSMENT", "threshold": "BLOCK_ONLY_HIGH"}
    ]
    anthropic = bodies["/v1/messages"]
    assert (anthropic["thinking"], anthropic["max_tokens"]) == (
        {"type": "enabled", "budget_tokens": 2048},
        4096,
    )
    assert (vllm["model"], vllm["top_k"], vllm["repetition_penalty"]) == ("qwen3-8b", 20, 1.05)
    assert json_mode["response_format"] == {"type": "json_object"}
    assert namespace["r"].parsed == {"primes": "infinite"}
    info = namespace["info"]
    assert (info.context_window, info.max_output_tokens, info.supports_reasoning) == (1_000_000, 64000, True)
    assert info.input_price == Decimal(3)


def test_every_model_the_readme_names_is_in_the_catalogue(app):
    models = readme_models()
    assert {"openai/gpt-4o-mini", "gemini/gemini-2.5-flash", "anthropic/claude-sonnet-4-5",
            "groq/llama-3.3-70b-versatile", "azure/prod-gpt-4o", "vllm/qwen3-8b"} <= set(models)  # fmt: skip

    with app.app_context():
        infos = {address: get_llm().model_info(address) for address in models}

    for address, info in infos.items():
        assert info.address == address
        assert info.context_window, address
        assert info.input_price is not None, f"{address} has no price"
        if "models.json" in info.sources:
            capabilities = (info.supports_images, info.supports_tools, info.supports_json_schema)
            assert None not in (*capabilities, info.supports_reasoning), address
            assert info.max_output_tokens or info.kind == "embedding", address


def test_the_readme_documents_every_parameter_with_its_mapping():
    text = section(SECTION)
    from app.llm.params import VALIDATORS

    rows = {m.group(1): m.group(0) for m in re.finditer(r"^\| `(\w+)` \|.*$", text, re.M)}
    for name in [*VALIDATORS, "response_format"]:
        assert name in rows, f"the README's table has no row for {name}"
        assert rows[name].count("|") == 6, f"{name}: a cell per provider"


# --- unknown rather than a guess -----------------------------------------------------------------


@pytest.mark.parametrize(
    "address", ["openai/gpt-99", "openai/gpt-4o-foo", "ollama/mystery:7b", "vllm/gpt-4o", "fake/gpt-4o"]
)
def test_a_model_nobody_knows_is_unknown(app, address):
    with app.app_context():
        with pytest.raises(UnknownModelError) as excinfo:
            get_llm().model_info(address)
        assert get_llm().catalogue.lookup(*address.split("/", 1)) is None
    assert f"unknown model {address!r}" in str(excinfo.value)
    assert "LLM_MODELS" in str(excinfo.value)
    assert isinstance(excinfo.value, LookupError)


def test_an_unknown_model_gets_no_max_tokens_check_and_no_cost(app, upstream):
    upstream.script(OPENAI_PATH, p.chat_completion("ok", "gpt-99"))
    with app.app_context():
        response = get_llm().chat(
            [{"role": "user", "content": "Hi"}], model="openai/gpt-99", max_tokens=1_000_000
        )
    assert response.cost is None
    assert upstream.only_request().json["max_completion_tokens"] == 1_000_000


def test_model_info_needs_a_provider_and_a_model(app):
    with app.app_context(), pytest.raises(LLMBadRequestError) as excinfo:
        get_llm().model_info("gpt-4o")
    assert excinfo.value.field == "model"


# --- what the layer does with it ---------------------------------------------------------------


def test_max_tokens_above_the_models_maximum_output_is_a_400_naming_it(app, upstream):
    with app.app_context(), pytest.raises(LLMBadRequestError) as excinfo:
        get_llm().chat([{"role": "user", "content": "Hi"}], model="openai/gpt-4o-mini", max_tokens=16385)

    assert excinfo.value.field == "max_tokens"
    assert "16384" in excinfo.value.message
    assert upstream.requests == []


def test_max_tokens_at_the_maximum_is_sent(app, upstream):
    upstream.script(OPENAI_PATH, p.chat_completion("ok"))
    with app.app_context():
        get_llm().chat([{"role": "user", "content": "Hi"}], model="openai/gpt-4o-mini", max_tokens=16384)
    assert upstream.only_request().json["max_completion_tokens"] == 16384


def test_llm_models_sets_a_deployments_maximum_output(app, upstream):
    with app.app_context(), pytest.raises(LLMBadRequestError) as excinfo:
        get_llm().chat([{"role": "user", "content": "Hi"}], model="vllm/qwen3-8b", max_tokens=8193)
    assert excinfo.value.field == "max_tokens"
    assert upstream.requests == []


def test_an_llm_models_entry_overrides_field_by_field(make_app):
    app = make_app(LLM_MODELS={"openai/gpt-4o-mini": {"max_output_tokens": 1000, "input_price": "0.2"}})
    with app.app_context():
        info = get_llm().model_info("openai/gpt-4o-mini")
    assert (info.max_output_tokens, info.input_price) == (1000, Decimal("0.2"))
    assert (info.context_window, info.output_price) == (128000, Decimal("0.6"))  # the rest stands
    assert info.sources == ("genai-prices", "models.json", "LLM_MODELS")


# --- LLM_MODELS is validated at start ----------------------------------------------------------

BAD_MODELS = [
    ("{not json", "invalid JSON"),
    ('["openai/x"]', "JSON object"),
    ('{"gpt-4o": {}}', "'provider/model'"),
    ('{"openai/x": 5}', "JSON object of model fields"),
    ('{"openai/x": {"context": 5}}', "unknown field(s) context"),
    ('{"openai/x": {"context_window": 0}}', "context_window must be a positive whole number"),
    ('{"openai/x": {"max_output_tokens": true}}', "max_output_tokens must be a positive whole number"),
    ('{"openai/x": {"max_output_tokens": 1.5}}', "max_output_tokens must be a positive whole number"),
    ('{"openai/x": {"supports_tools": "yes"}}', "supports_tools must be true or false"),
    ('{"openai/x": {"input_price": -1}}', "input_price must be a finite number of 0 or more"),
    ('{"openai/x": {"input_price": "NaN"}}', "input_price must be a finite number of 0 or more"),
    ('{"openai/x": {"input_price": "Infinity"}}', "input_price must be a finite number of 0 or more"),
    ('{"openai/x": {"input_price": "cheap"}}', "input_price must be a finite number of 0 or more"),
    ('{"openai/x": {"output_price": [1]}}', "output_price must be a number"),
    ('{"openai/x": {"kind": "image"}}', "kind must be one of chat, embedding"),
]


@pytest.mark.parametrize(("value", "message"), BAD_MODELS)
def test_a_bad_llm_models_fails_at_start_naming_the_setting(make_app, value, message):
    with pytest.raises(ConfigError) as excinfo:
        make_app(LLM_MODELS=value)
    assert "LLM_MODELS" in str(excinfo.value)
    assert message in str(excinfo.value)


# --- the data file -----------------------------------------------------------------------------


def test_the_data_file_has_no_prices_and_never_shadows_genai_prices():
    data = load_data_file()
    snapshot = get_snapshot()
    for name, fields in data.items():
        assert not set(fields) & set(PRICE_KEYS), f"models.json[{name!r}] holds a price"
        if "/" in name:  # a provider's own entry: genai-prices does not know it
            continue
        found = [
            snapshot.find_provider_model(name, None, provider, None)[1]
            for provider in ("openai", "google", "anthropic", "groq")
            if _known(name, provider)
        ]
        assert found, f"models.json[{name!r}]: genai-prices knows no such model (give it a provider/ key)"
        if "context_window" in fields:
            assert all(model.context_window is None for model in found), (
                f"{name}: genai-prices has the window"
            )


def _known(name: str, provider: str) -> bool:
    try:
        get_snapshot().find_provider_model(name, None, provider, None)
    except LookupError:
        return False
    return True


def test_the_data_file_is_package_data():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "models.json" in pyproject["tool"]["setuptools"]["package-data"]["app.llm"]


def test_gemini_is_looked_up_as_google_and_with_the_models_prefix():
    catalogue = Catalogue()
    assert GENAI_PRICES_PROVIDER["gemini"] == "google"
    assert catalogue.info("gemini/models/gemini-2.5-flash").input_price == Decimal("0.3")


def test_a_profile_named_as_a_genai_prices_provider_is_priced_as_it():
    info = Catalogue().info("deepseek/deepseek-chat")
    assert info.input_price is not None and info.sources == ("genai-prices",)


# --- flask llm models --------------------------------------------------------------------------


def test_flask_llm_models_shows_the_catalogue_columns(app, upstream):
    upstream.script(
        "/v1/models",
        {"object": "list", "data": [{"id": m, "object": "model", "created": 1, "owned_by": "openai"}
                                    for m in ("gpt-4o-mini", "my-finetune")]},
    )  # fmt: skip

    result = app.test_cli_runner().invoke(args=["llm", "models", "--provider", "openai"])

    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == "openai:"
    assert lines[1].split() == ["MODEL", "CONTEXT", "MAX", "OUT", "IMAGES", "TOOLS", "JSON", "SCHEMA",
                                "REASONING", "IN", "$/M", "OUT", "$/M", "CACHED", "$/M"]  # fmt: skip
    assert lines[2].split() == [
        "gpt-4o-mini",
        "128000",
        "16384",
        "yes",
        "yes",
        "yes",
        "no",
        "0.15",
        "0.6",
        "0.075",
    ]
    assert lines[3].split() == ["my-finetune", *["-"] * 9]
    assert CANARY_KEY not in result.output
