"""Strict configuration: a malformed setting stops start-up with an error naming its key, or warns.

Each case of issue 10's list (misspelled keys, unknown providers, URLs that do not
parse, ports out of range, unknown service names, a profile that shadows a
built-in provider, a negative timeout) started silently before; each is tried
from the ``create_app`` mapping and from the environment, as the README says.
"""

from __future__ import annotations

import json
import logging

import pytest

from app import create_app
from app.errors import ConfigError
from tests.conftest import CANARY_KEY

#: (key, value as the environment carries it, what the error says besides naming the key).
MALFORMED = [
    # Misspelled keys: the closest known key is named.
    ("LLM_MAX_RETRY", "5", "is not a setting of this app; did you mean 'LLM_MAX_RETRIES'?"),
    ("OPENAI_TIMEOUTS", "30", "is not a setting of this app; did you mean 'OPENAI_TIMEOUT'?"),
    ("REDIS_URLS", "redis://127.0.0.1:6379/0", "is not a setting of this app; did you mean 'REDIS_URL'?"),
    (
        "LLM_RATE_LIMIT",
        '{"openai": {"rpm": 5}}',
        "is not a setting of this app; did you mean 'LLM_RATE_LIMITS'?",
    ),
    # Providers that do not exist.
    (
        "LLM_POLICY",
        '{"opneai": {"max_retries": 1}}',
        "['opneai'] names the provider 'opneai', which does not exist",
    ),
    ("LLM_RATE_LIMITS", '{"gemni/gemini-2.5-flash": {"rpm": 5}}', "names the provider 'gemni'"),
    ("LLM_FALLBACKS", '{"openai/gpt-4o": ["claude/opus"]}', "('claude/opus') names the provider 'claude'"),
    ("LLM_FALLBACKS", '{"opanai/gpt-4o": ["gemini/gemini-2.5-flash"]}', "names the provider 'opanai'"),
    (
        "LLM_DEFAULT_MODEL",
        "antropic/claude-sonnet-4-6",
        "names the provider 'antropic', which does not exist",
    ),
    # URLs: scheme, host and port.
    ("OPENAI_BASE_URL", "not a url", "must be a http:// or https:// URL, got 'not a url'"),
    (
        "OPENAI_BASE_URL",
        "ftp://files.example/v1",
        "must be a http:// or https:// URL, got 'ftp://files.example/v1'",
    ),
    ("OPENAI_BASE_URL", "http://not a host/v1", "has an invalid host in 'http://not a host/v1'"),
    ("GENAI_BASE_URL", "https://gemini.example:0", "must have a port from 1 to 65535"),
    ("ANTHROPIC_BASE_URL", "api.anthropic.com", "must be a http:// or https:// URL"),
    ("OLLAMA_HOST", "http://127.0.0.1:port", "must have a port from 1 to 65535"),
    ("REDIS_URL", "redis://127.0.0.1:notaport/0", "must have a port from 1 to 65535 after the host"),
    ("REDIS_URL", "redis://127.0.0.1:6379/zero", "must end with a database number (/0)"),
    (
        "DATABASE_URL",
        "postgresql://app:pw@127.0.0.1:99999/app",
        "must have a port from 1 to 65535, got 'postgresql+",
    ),
    (
        "DATABASE_URL",
        "postgresql://app:pw@127.0.0.1:notaport/app",
        "must be a database URL with a numeric port",
    ),
    ("DATABASE_URL", "postgresql://app@127.0.0.1/app?password=p@ss", "has more than one '@'"),
    # Names of services and profiles.
    ("HEALTH_OPTIONAL_SERVICES", "redsi", "must name services among database, redis, got 'redsi'"),
    ("HEALTH_REQUIRED_SERVICES", "databse", "got 'databse'; did you mean 'database'?"),
    (
        "OPENAI_PROFILES",
        '{"gemini": {"base_url": "http://h/v1"}}',
        "named like the built-in provider 'gemini'",
    ),
    (
        "OPENAI_PROFILES",
        '{"openai": {"base_url": "http://h/v1"}}',
        "named like the built-in provider 'openai'",
    ),
    ("OPENAI_PROFILES", '{"team/a": {"base_url": "http://h/v1"}}', "a profile name must be a non-empty name"),
    (
        "OPENAI_PROFILES",
        '{"vllm": {"base_url": "localhost:8000/v1"}}',
        "base_url must be a http:// or https:// URL",
    ),
    ("OPENAI_PROFILES", '{"vllm": {"base_url": "http://h/v1", "retries": 1}}', "did you mean 'max_retries'?"),
    # Numbers in range.
    ("HEALTH_CHECK_TIMEOUT", "-1", "must be a positive number of seconds, got '-1'"),
    ("OLLAMA_TIMEOUT", "0", "must be a positive number of seconds, got '0'"),
    ("LLM_BREAKER_FAILURE_RATE", "50", "must be a number in (0, 1], got '50'"),
]
UNKNOWN_KEYS = {"LLM_MAX_RETRY", "OPENAI_TIMEOUTS", "REDIS_URLS", "LLM_RATE_LIMIT"}
IDS = [f"{key}={value}"[:60] for key, value, _ in MALFORMED]


def _assert_names_the_key(message: str, key: str, expected: str, source: str) -> None:
    assert key in message
    assert expected in message
    if key in UNKNOWN_KEYS:  # where it was set, and how to make it a warning
        assert f"{key} (in {source}) is not a setting" in message
        assert "CONFIG_STRICT=false turns this into a warning" in message


@pytest.mark.parametrize(("key", "value", "expected"), MALFORMED, ids=IDS)
def test_a_malformed_setting_in_the_mapping_stops_start_up(make_app, key, value, expected):
    with pytest.raises(ConfigError) as info:
        make_app({key: value})
    _assert_names_the_key(str(info.value), key, expected, "create_app()")


@pytest.mark.parametrize(("key", "value", "expected"), MALFORMED, ids=IDS)
def test_a_malformed_setting_in_the_environment_stops_start_up(make_app, monkeypatch, key, value, expected):
    monkeypatch.setenv(key, value)
    with pytest.raises(ConfigError) as info:
        make_app()
    _assert_names_the_key(str(info.value), key, expected, "the environment")


def test_misspelled_keys_in_files_name_the_file(make_app, tmp_path):
    dotenv = tmp_path / "settings.env"
    dotenv.write_text("OPENAI_TIMEOUTS=30\n")
    with pytest.raises(ConfigError, match=r"OPENAI_TIMEOUTS \(in settings.env\) is not a setting"):
        make_app(DOTENV_PATH=str(dotenv))
    instance = tmp_path / "instance"
    instance.mkdir()
    (instance / "config.py").write_text("REDIS_URLS = 'redis://127.0.0.1:6379/0'\n")
    with pytest.raises(
        ConfigError, match=r"REDIS_URLS \(in instance/config.py\) is not a setting.*'REDIS_URL'"
    ):
        create_app({"TESTING": True, "INSTANCE_PATH": str(instance), "DOTENV_PATH": str(tmp_path / "none")})


def test_every_mistake_is_named_at_once(make_app):
    with pytest.raises(ConfigError) as info:
        make_app(LLM_MAX_RETRY=1, OPENAI_TIMEOUTS=2)
    assert "LLM_MAX_RETRY (in create_app())" in str(info.value)
    assert "OPENAI_TIMEOUTS (in create_app())" in str(info.value)
    assert "CONFIG_STRICT=false turns this into a warning" in str(info.value)


def test_config_strict_false_turns_unknown_keys_into_a_warning(make_app, monkeypatch, caplog):
    caplog.set_level(logging.WARNING, logger="app.config")
    monkeypatch.setenv("CONFIG_STRICT", "false")
    monkeypatch.setenv("LLM_MAX_RETRY", "5")

    app = make_app(OPENAI_TIMEOUTS=30)

    assert app.config["LLM_MAX_RETRIES"] == 0  # the misspelt key changed nothing
    (record,) = [r for r in caplog.records if r.name == "app.config"]
    message = record.getMessage()
    assert "LLM_MAX_RETRY (in the environment) is not a setting of this app" in message
    assert "did you mean 'LLM_MAX_RETRIES'?" in message
    assert "OPENAI_TIMEOUTS (in create_app())" in message
    # Only unknown keys: a value that cannot work still stops start-up.
    with pytest.raises(ConfigError, match="REDIS_URL must have a port"):
        make_app(REDIS_URL="redis://127.0.0.1:notaport/0")


def test_keys_without_the_apps_prefixes_are_never_checked(make_app, tmp_path, monkeypatch):
    # Flask's own keys, Flask-SQLAlchemy's, Flask-Limiter's and the user's are theirs.
    dotenv = tmp_path / "mine.env"
    dotenv.write_text("MY_FEATURE_FLAG=1\nSQLALCHEMY_ECHO=false\nPOSTGRES_PASSWORD=compose-only\n")
    monkeypatch.setenv("SOME_TOOL_SETTING", "x")
    app = make_app(
        DOTENV_PATH=str(dotenv),
        SQLALCHEMY_RECORD_QUERIES=False,
        SESSION_COOKIE_SECURE=True,
        RATELIMIT_HEADERS_ENABLED=True,
        MY_OWN_SETTING={"a": 1},
    )
    assert app.config["MY_FEATURE_FLAG"] == "1"
    assert app.config["MY_OWN_SETTING"] == {"a": 1}


def test_variables_of_other_software_in_the_environment_are_left_alone(make_app, monkeypatch):
    foreign = {
        # Kubernetes service links of services named redis, database, ollama.
        "REDIS_PORT": "tcp://10.0.0.7:6379",
        "REDIS_PORT_6379_TCP_ADDR": "10.0.0.7",
        "REDIS_SERVICE_HOST": "10.0.0.7",
        # Another program's settings, like none of the app's: a user, a port, a host.
        "DATABASE_USER": "reporting",
        "DATABASE_PORT": "5432",
        "REDIS_USER": "worker",
        "API_KEY": "not-ours",
        "DATABASE_SERVICE_PORT": "5432",
        "OLLAMA_PORT": "tcp://10.0.0.9:11434",
        # Read by the SDKs themselves.
        "OPENAI_ORG_ID": "org-123",
        "OPENAI_PROJECT_ID": "proj-123",
        "OPENAI_LOG": "debug",
        "ANTHROPIC_LOG": "info",
        # The Ollama server's own, and other tools': not like any key of the app.
        "OLLAMA_MODELS": "/srv/models",
        "OLLAMA_KEEP_ALIVE": "5m",
        "OLLAMA_LOAD_TIMEOUT": "5m",
        "OLLAMA_TMPDIR": "/tmp",
        "GEMINI_MODEL": "gemini-2.5-pro",
        "LLM_USER_PATH": "/home/me/.llm",
    }
    for key, value in foreign.items():
        monkeypatch.setenv(key, value)
    app = make_app()
    assert "REDIS_PORT" not in app.config  # nor read


def test_the_variables_profiles_name_are_not_unknown_keys(make_app, tmp_path):
    # A profile's api_key_env may name any variable, even one with the app's prefixes.
    dotenv = tmp_path / "keys.env"
    dotenv.write_text(f"OPENAI_WORK_KEY={CANARY_KEY}\n")
    profiles = {"work": {"base_url": "http://127.0.0.1:8000/v1", "api_key_env": "OPENAI_WORK_KEY"}}
    app = make_app(DOTENV_PATH=str(dotenv), OPENAI_PROFILES=json.dumps(profiles))
    assert app.extensions["openai_service"].profile("work").api_key.reveal() == CANARY_KEY


def test_provider_names_the_app_knows_are_accepted(make_app):
    app = make_app(
        OPENAI_PROFILES={"vllm": {"base_url": "http://127.0.0.1:8000/v1"}},
        GROQ_API_KEY="gsk-preset-0123456789",  # makes the groq profile exist
        LLM_POLICY={"vllm": {"max_retries": 1}, "gemini/gemini-2.5-flash": {"deadline": 30}},
        LLM_RATE_LIMITS={"groq": {"rpm": 30}, "anthropic": {"tpm": 1000}},
        LLM_FALLBACKS={"openai/gpt-4o": ["vllm/llama", "groq/llama-3.3-70b-versatile"]},
        LLM_DEFAULT_MODEL="openai/gpt-4o-mini",
    )
    assert app.extensions["llm"].resilience.policy("vllm", "m").retry.max_retries == 1


def test_urls_that_parse_are_accepted(make_app):
    app = make_app(
        OPENAI_BASE_URL="http://[::1]:8080/v1",
        GENAI_BASE_URL="https://gemini.internal.example",
        ANTHROPIC_BASE_URL="http://127.0.0.1:9000",
        OLLAMA_HOST="http://gpu-box:11434",
        REDIS_URL="rediss://:p%40ss%23word@cache.internal:6380/2?ssl_cert_reqs=required",
        DATABASE_URL="postgresql://app:pa#ss/word@db.internal:5432/app",  # SQLAlchemy takes '#' and '/' here
        OPENAI_PROFILES={
            "azure": {
                "azure_endpoint": "https://x.openai.azure.com",
                "api_version": "2024-10-21",
                "api_key": "k",
            }
        },
    )
    assert app.extensions["redis_service"].configured
    assert app.config["SQLALCHEMY_DATABASE_URI"].endswith("@db.internal:5432/app")
    assert make_app(REDIS_URL="unix:///run/redis.sock?db=1").extensions["redis_service"].configured


@pytest.mark.parametrize(
    "url",
    [
        "redis://:leftHalf9#rightHalf9@127.0.0.1:6379/0",  # redis-py ends the URL at '#'
        "redis://:leftHalf9/rightHalf9@127.0.0.1:6379/0",  # and starts the path at '/'
        "redis://127.0.0.1:6379/0?password=leftHalf9#rightHalf9",
    ],
)
def test_a_redis_password_that_needs_encoding_stops_start_up_without_showing_it(make_app, url):
    with pytest.raises(ConfigError) as info:
        make_app(REDIS_URL=url)
    message = str(info.value)
    assert "REDIS_URL" in message
    assert "percent-encoded" in message
    assert "leftHalf9" not in message
    assert "rightHalf9" not in message


def test_repr_of_the_config_masks_every_secret(make_app, tmp_path):
    dotenv = tmp_path / "keys.env"
    dotenv.write_text("GROQ_API_KEY=gsk-groq-secret-0123456789\n")
    app = make_app(
        DOTENV_PATH=str(dotenv),
        SECRET_KEY="s" * 48,
        OPENAI_API_KEY=CANARY_KEY,
        REDIS_URL="redis://:redis-secret-4711@127.0.0.1:6379/0",
        DATABASE_URL="postgresql://app@127.0.0.1:5432/app?password=pg-secret-4712",
        OPENAI_PROFILES={
            "work": {"base_url": "http://127.0.0.1:8000/v1", "api_key": "sk-inline-secret-4713"}
        },
    )
    for text in (repr(app.config), str(app.config)):
        for secret in ("s" * 48, CANARY_KEY, "gsk-groq-secret-0123456789", "redis-secret-4711",
                       "pg-secret-4712", "sk-inline-secret-4713"):  # fmt: skip
            assert secret not in text
        assert "'OPENAI_API_KEY': '***'" in text
        assert "redis://***@127.0.0.1:6379/0" in text
    assert app.config["OPENAI_API_KEY"] == CANARY_KEY  # the values themselves are untouched
