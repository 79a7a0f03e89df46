"""Config: every bad value fails at start-up naming its key, sources stack in order, secret keys."""

from __future__ import annotations

import json
import math

import pytest
from flask import Flask

from app import create_app
from app.config import MIN_SECRET_KEY_LENGTH, check_secret_key
from app.errors import ConfigError
from tests.conftest import CANARY_KEY, ROOT

# --- bad values: ConfigError at create_app, naming the key and what was expected ---


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"OPENAI_TIMEOUT": "abc"}, "OPENAI_TIMEOUT must be a positive number of seconds, got 'abc'"),
        ({"OPENAI_TIMEOUT": -1}, "OPENAI_TIMEOUT must be a positive number of seconds, got -1"),
        ({"OPENAI_TIMEOUT": 0}, "OPENAI_TIMEOUT must be a positive number of seconds, got 0"),
        ({"OPENAI_TIMEOUT": "0"}, "OPENAI_TIMEOUT must be a positive number of seconds, got '0'"),
        ({"OPENAI_TIMEOUT": math.nan}, "OPENAI_TIMEOUT must be a positive number of seconds, got nan"),
        ({"OPENAI_TIMEOUT": "nan"}, "OPENAI_TIMEOUT must be a positive number of seconds, got 'nan'"),
        ({"OPENAI_TIMEOUT": "inf"}, "OPENAI_TIMEOUT must be a positive number of seconds, got 'inf'"),
        ({"OPENAI_TIMEOUT": True}, "OPENAI_TIMEOUT must be a positive number of seconds, got True"),
        ({"OPENAI_TIMEOUT": None}, "OPENAI_TIMEOUT must be a positive number of seconds, got None"),
        ({"OPENAI_CONNECT_TIMEOUT": "-0.5"}, "OPENAI_CONNECT_TIMEOUT must be a positive number of seconds"),
        ({"OPENAI_MAX_RETRIES": -1}, "OPENAI_MAX_RETRIES must be a whole number of 0 or more, got -1"),
        ({"OPENAI_MAX_RETRIES": "two"}, "OPENAI_MAX_RETRIES must be a whole number of 0 or more, got 'two'"),
        ({"OPENAI_MAX_RETRIES": 1.5}, "OPENAI_MAX_RETRIES must be a whole number of 0 or more, got 1.5"),
        ({"OPENAI_MAX_RETRIES": False}, "OPENAI_MAX_RETRIES must be a whole number of 0 or more, got False"),
        ({"OPENAI_API_KEY": 12345}, "OPENAI_API_KEY must be a string, got 12345"),
        ({"OPENAI_BASE_URL": ["http://x"]}, "OPENAI_BASE_URL must be a string"),
        (
            {"REDIS_URL": "http://127.0.0.1:6379/0"},
            "REDIS_URL must start with redis://, rediss:// or unix://, got http scheme",
        ),
        ({"REDIS_URL": "127.0.0.1:6379"}, "REDIS_URL must start with redis://, rediss:// or unix://"),
        ({"REDIS_SOCKET_TIMEOUT": "soon"}, "REDIS_SOCKET_TIMEOUT must be a positive number of seconds"),
        ({"REDIS_CONNECT_TIMEOUT": 0}, "REDIS_CONNECT_TIMEOUT must be a positive number of seconds"),
        ({"REDIS_MAX_RETRIES": "-3"}, "REDIS_MAX_RETRIES must be a whole number of 0 or more"),
        ({"REDIS_HEALTH_CHECK_INTERVAL": "often"}, "REDIS_HEALTH_CHECK_INTERVAL must be a whole number"),
        (
            {"DATABASE_URL": "mysql://u@db.example/app"},
            "DATABASE_URL must be a sqlite:///, postgres:// or postgresql:// URL, got 'mysql://***@db.example/app'",
        ),
        ({"DATABASE_URL": "app.db"}, "DATABASE_URL must be a sqlite:///, postgres:// or postgresql:// URL"),
        (
            {"SQLALCHEMY_DATABASE_URI": "oracle://db/app"},
            "SQLALCHEMY_DATABASE_URI must be a sqlite:///, postgres:// or postgresql:// URL",
        ),
        ({"DATABASE_CONNECT_TIMEOUT": "x"}, "DATABASE_CONNECT_TIMEOUT must be a positive number of seconds"),
        ({"DATABASE_POOL_PRE_PING": "sometimes"}, "DATABASE_POOL_PRE_PING must be true or false"),
        ({"GENAI_TIMEOUT": "abc"}, "GENAI_TIMEOUT must be a positive number of seconds, got 'abc'"),
        ({"GENAI_TIMEOUT": -5}, "GENAI_TIMEOUT must be a positive number of seconds, got -5"),
        (
            {"GOOGLE_GENAI_USE_VERTEXAI": "maybe"},
            "GOOGLE_GENAI_USE_VERTEXAI must be true or false, got 'maybe'",
        ),
        ({"GEMINI_API_KEY": 42}, "GEMINI_API_KEY must be a string, got 42"),
    ],
)
def test_bad_scalar_setting_fails_at_start(make_app, settings, message):
    with pytest.raises(ConfigError) as info:
        make_app(settings)
    assert message in str(info.value)


@pytest.mark.parametrize(
    ("profiles", "message"),
    [
        ("{not json", "OPENAI_PROFILES must be a JSON object, got invalid JSON"),
        ("[1, 2]", "OPENAI_PROFILES must be a mapping (a JSON object), got list"),
        (["groq"], "OPENAI_PROFILES must be a mapping (a JSON object), got list"),
        ({"groq": "gsk-..."}, "OPENAI_PROFILES['groq'] must be a mapping of settings, got str"),
        (
            {"vllm": {"base_url": "http://127.0.0.1:8000/v1", "model": "llama"}},
            "OPENAI_PROFILES['vllm'] has unknown settings ['model']",
        ),
        (
            {"azure": {"azure_endpoint": "https://x.openai.azure.com", "api_key": "k"}},
            "OPENAI_PROFILES['azure'].api_version is required for an Azure profile",
        ),
        (
            {
                "azure": {
                    "azure_endpoint": "https://x.openai.azure.com",
                    "api_version": "2024-10-21",
                    "base_url": "https://elsewhere/v1",
                }
            },
            "OPENAI_PROFILES['azure'] sets both azure_endpoint and base_url",
        ),
        (
            {"vllm": {"base_url": "http://h/v1", "api_key": "k", "api_key_env": "VLLM_KEY"}},
            "OPENAI_PROFILES['vllm'] sets both api_key and api_key_env; keep one",
        ),
        ({"vllm": {"api_key": "k"}}, "OPENAI_PROFILES['vllm'].base_url is required"),
        ({"vllm": {"base_url": 8000}}, "OPENAI_PROFILES['vllm'].base_url must be a string, got int"),
        (
            {"vllm": {"base_url": "http://h/v1", "default_headers": {"X-Tenant": 7}}},
            "OPENAI_PROFILES['vllm'].default_headers must be a mapping of header names to strings",
        ),
        (
            {"vllm": {"base_url": "http://h/v1", "default_headers": "X-Tenant: a"}},
            "OPENAI_PROFILES['vllm'].default_headers must be a mapping of header names to strings",
        ),
        (
            {"groq": {"timeout": "fast"}},
            "OPENAI_PROFILES['groq'].timeout must be a positive number of seconds, got 'fast'",
        ),
        ({"groq": {"connect_timeout": 0}}, "OPENAI_PROFILES['groq'].connect_timeout must be a positive"),
        (
            {"groq": {"max_retries": -2}},
            "OPENAI_PROFILES['groq'].max_retries must be a whole number of 0 or more, got -2",
        ),
    ],
)
def test_bad_openai_profiles_fail_at_start(make_app, profiles, message):
    with pytest.raises(ConfigError) as info:
        make_app(OPENAI_PROFILES=profiles)
    assert message in str(info.value)


def test_config_errors_do_not_show_secrets(make_app):
    with pytest.raises(ConfigError) as info:
        make_app(DATABASE_URL=f"mysql://app:{CANARY_KEY}@db.example/app")
    assert CANARY_KEY not in str(info.value)
    assert "mysql://app:***@db.example/app" in str(info.value)
    with pytest.raises(ConfigError) as info:
        make_app(REDIS_URL=f"http://:{CANARY_KEY}@127.0.0.1:6379/0")
    assert CANARY_KEY not in str(info.value)
    with pytest.raises(ConfigError) as info:
        make_app(OPENAI_PROFILES={"vllm": {"api_key": CANARY_KEY, "api_key_env": "X"}})
    assert CANARY_KEY not in str(info.value)


def test_config_error_is_a_value_error_raised_before_any_service(make_app):
    # A ValueError subclass, so "except ValueError" in deployment scripts sees it too.
    with pytest.raises(ValueError, match="GENAI_TIMEOUT"):
        make_app(GENAI_TIMEOUT="later")


# --- values that parse -------------------------------------------------------


def test_environment_strings_parse(make_app, monkeypatch):
    monkeypatch.setenv("OPENAI_TIMEOUT", "2.5")
    monkeypatch.setenv("OPENAI_CONNECT_TIMEOUT", "0.75")
    monkeypatch.setenv("OPENAI_MAX_RETRIES", "4")
    monkeypatch.setenv("GENAI_TIMEOUT", "12")
    monkeypatch.setenv("GOOGLE_GENAI_USE_VERTEXAI", "False")
    monkeypatch.setenv("REDIS_SOCKET_TIMEOUT", "0.25")
    monkeypatch.setenv("REDIS_MAX_RETRIES", "0")
    monkeypatch.setenv("DATABASE_POOL_PRE_PING", "no")
    app = make_app()
    default = app.extensions["openai_service"].profile("default")
    assert (default.timeout, default.connect_timeout, default.max_retries) == (2.5, 0.75, 4)
    genai = app.extensions["genai_service"].settings
    assert genai.timeout == 12.0
    assert genai.vertexai is False
    redis_settings = app.extensions["redis_service"].settings
    assert (redis_settings.socket_timeout, redis_settings.max_retries) == (0.25, 0)
    assert app.config["SQLALCHEMY_ENGINE_OPTIONS"]["pool_pre_ping"] is False


@pytest.mark.parametrize(("raw", "expected"), [("1", True), ("true", True), ("YES", True), ("off", False)])
def test_boolean_words(make_app, raw, expected):
    app = make_app(GOOGLE_GENAI_USE_VERTEXAI=raw)
    assert app.extensions["genai_service"].settings.vertexai is expected


def test_whole_number_floats_are_counts(make_app):
    app = make_app(OPENAI_MAX_RETRIES=3.0)
    assert app.extensions["openai_service"].profile().max_retries == 3


def test_openai_profiles_as_json_from_the_environment(make_app, monkeypatch):
    monkeypatch.setenv(
        "OPENAI_PROFILES",
        json.dumps({"vllm": {"base_url": "http://127.0.0.1:8000/v1", "timeout": "7", "max_retries": 0}}),
    )
    app = make_app()
    connector = app.extensions["openai_service"]
    assert sorted(connector.profiles) == ["default", "vllm"]
    vllm = connector.profile("vllm")
    assert (vllm.base_url, vllm.timeout, vllm.max_retries) == ("http://127.0.0.1:8000/v1", 7.0, 0)


def test_empty_openai_profiles_string_means_none(make_app, monkeypatch):
    monkeypatch.setenv("OPENAI_PROFILES", "")
    assert sorted(make_app().extensions["openai_service"].profiles) == ["default"]


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("postgres://app:pw@db.example:5432/app", "postgresql+psycopg://app:pw@db.example:5432/app"),
        ("postgresql://app:pw@db.example/app", "postgresql+psycopg://app:pw@db.example/app"),
        ("postgresql+psycopg://app@db.example/app", "postgresql+psycopg://app@db.example/app"),
        ("sqlite:////tmp/some.db", "sqlite:////tmp/some.db"),
    ],
)
def test_database_urls_are_normalised(make_app, url, expected):
    app = make_app(DATABASE_URL=url)
    assert app.config["SQLALCHEMY_DATABASE_URI"] == expected


def test_sqlalchemy_database_uri_is_accepted(make_app):
    app = make_app(SQLALCHEMY_DATABASE_URI="postgres://app@db.example/app")
    assert app.config["SQLALCHEMY_DATABASE_URI"] == "postgresql+psycopg://app@db.example/app"


def test_database_url_wins_over_sqlalchemy_database_uri(make_app):
    app = make_app(DATABASE_URL="postgres://a@one/app", SQLALCHEMY_DATABASE_URI="postgres://b@two/app")
    assert app.config["SQLALCHEMY_DATABASE_URI"] == "postgresql+psycopg://a@one/app"


def test_default_database_is_sqlite_in_the_instance_folder(make_app):
    app = make_app()
    assert app.config["SQLALCHEMY_DATABASE_URI"] == f"sqlite:///{app.instance_path}/app.db"
    assert app.config["SQLALCHEMY_ENGINE_OPTIONS"]["pool_pre_ping"] is True


def test_user_engine_options_win_over_ours(make_app):
    app = make_app(SQLALCHEMY_ENGINE_OPTIONS={"pool_pre_ping": False, "echo": False})
    assert app.config["SQLALCHEMY_ENGINE_OPTIONS"]["pool_pre_ping"] is False


def test_google_api_key_is_accepted_and_gemini_api_key_wins(make_app):
    google_only = make_app(GOOGLE_API_KEY="AIza-google-key-000")
    assert google_only.extensions["genai_service"].settings.api_key.reveal() == "AIza-google-key-000"
    assert google_only.extensions["genai_service"].settings.api_key_setting == "GOOGLE_API_KEY"
    both = make_app(GOOGLE_API_KEY="AIza-google-key-000", GEMINI_API_KEY="AIza-gemini-key-111")
    assert both.extensions["genai_service"].settings.api_key.reveal() == "AIza-gemini-key-111"


def test_the_example_env_file_is_valid_config(make_app):
    app = make_app(DOTENV_PATH=str(ROOT / ".env.example"))
    assert app.extensions["openai_service"].profile().timeout == 60.0
    assert app.extensions["redis_service"].settings.url is None


def test_unset_services_still_start(make_app):
    app = make_app()
    assert set(app.extensions) >= {"db_service", "redis_service", "openai_service", "genai_service"}
    assert app.extensions["redis_service"].configured is False
    assert app.extensions["openai_service"].profile().configured is False
    assert app.extensions["genai_service"].settings.missing == "GEMINI_API_KEY"


# --- precedence: defaults < instance/config.py < .env < environment < mapping ---


def test_sources_stack_in_order(tmp_path, monkeypatch):
    instance = tmp_path / "instance"
    instance.mkdir()
    (instance / "config.py").write_text(
        "OPENAI_TIMEOUT = 11.0\n"
        "OPENAI_CONNECT_TIMEOUT = 11.0\n"
        "GENAI_TIMEOUT = 11.0\n"
        "REDIS_SOCKET_TIMEOUT = 11.0\n"
        "OPENAI_BASE_URL = 'http://from-instance/v1'\n"
    )
    dotenv = tmp_path / "settings.env"
    dotenv.write_text(
        "OPENAI_TIMEOUT=22\nOPENAI_CONNECT_TIMEOUT=22\nGENAI_TIMEOUT=22\n"
        "OPENAI_API_KEY=sk-from-dotenv-0000\nlowercase_ignored=1\n"
    )
    monkeypatch.setenv("OPENAI_TIMEOUT", "33")
    monkeypatch.setenv("OPENAI_CONNECT_TIMEOUT", "33")
    app = create_app(
        {"TESTING": True, "INSTANCE_PATH": str(instance), "DOTENV_PATH": str(dotenv), "OPENAI_TIMEOUT": 44}
    )
    assert app.config["OPENAI_TIMEOUT"] == 44  # the mapping beats everything
    assert app.config["OPENAI_CONNECT_TIMEOUT"] == "33"  # the environment beats .env
    assert app.config["GENAI_TIMEOUT"] == "22"  # .env beats instance/config.py
    assert app.config["REDIS_SOCKET_TIMEOUT"] == 11.0  # instance/config.py beats the defaults
    assert app.config["OPENAI_BASE_URL"] == "http://from-instance/v1"
    assert app.config["REDIS_CONNECT_TIMEOUT"] == 1.0  # the built-in default
    assert "lowercase_ignored" not in app.config
    profile = app.extensions["openai_service"].profile()
    assert (profile.timeout, profile.connect_timeout) == (44.0, 33.0)
    assert profile.api_key.reveal() == "sk-from-dotenv-0000"
    assert app.extensions["genai_service"].settings.timeout == 22.0


def test_instance_path_and_dotenv_path_from_the_environment(tmp_path, monkeypatch):
    instance = tmp_path / "inst"
    instance.mkdir()
    (instance / "config.py").write_text("GENAI_TIMEOUT = 9\n")
    dotenv = tmp_path / "x.env"
    dotenv.write_text("REDIS_URL=redis://127.0.0.1:1/0\n")
    monkeypatch.setenv("INSTANCE_PATH", str(instance))
    monkeypatch.setenv("DOTENV_PATH", str(dotenv))
    app = create_app({"TESTING": True})
    assert app.instance_path == str(instance.resolve())
    assert app.extensions["genai_service"].settings.timeout == 9.0
    assert app.extensions["redis_service"].configured


def test_only_known_keys_are_read_from_the_environment(make_app, monkeypatch):
    monkeypatch.setenv("SOME_UNRELATED_SETTING", "x")
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:6379/3")
    app = make_app()
    assert "SOME_UNRELATED_SETTING" not in app.config
    assert app.config["REDIS_URL"] == "redis://127.0.0.1:6379/3"


def test_bad_value_in_dotenv_names_the_key(make_app, tmp_path):
    dotenv = tmp_path / "bad.env"
    dotenv.write_text("OPENAI_MAX_RETRIES=-1\n")
    with pytest.raises(ConfigError, match="OPENAI_MAX_RETRIES must be a whole number of 0 or more, got '-1'"):
        make_app(DOTENV_PATH=str(dotenv))


# --- SECRET_KEY ----------------------------------------------------------------


def test_missing_secret_key_outside_testing_is_an_error(make_app):
    with pytest.raises(ConfigError, match="SECRET_KEY must be set outside debug and testing"):
        make_app(TESTING=False)


@pytest.mark.parametrize("key", ["short-key", "changeme", "x" * (MIN_SECRET_KEY_LENGTH - 1)])
def test_weak_secret_key_outside_testing_is_an_error(make_app, key):
    with pytest.raises(ConfigError) as info:
        make_app(TESTING=False, SECRET_KEY=key)
    assert f"SECRET_KEY must be a random string of at least {MIN_SECRET_KEY_LENGTH} characters" in str(
        info.value
    )
    assert key not in str(info.value)  # the weak key is a secret too


def test_non_string_secret_key_is_an_error(make_app):
    with pytest.raises(ConfigError, match="SECRET_KEY must be a random string"):
        make_app(TESTING=False, SECRET_KEY=12345678901234567890123456789012345)


def test_strong_secret_key_outside_testing_is_kept(make_app):
    key = "k" * 16 + "0123456789abcdef0123456789"
    app = make_app(TESTING=False, SECRET_KEY=key)
    assert app.config["SECRET_KEY"] == key


def test_secret_key_from_the_instance_config(tmp_path):
    instance = tmp_path / "instance"
    instance.mkdir()
    key = "0123456789abcdef" * 4
    (instance / "config.py").write_text(f"SECRET_KEY = {key!r}\n")
    app = create_app({"INSTANCE_PATH": str(instance), "DOTENV_PATH": str(tmp_path / "none.env")})
    assert not app.testing
    assert app.config["SECRET_KEY"] == key


def test_testing_and_debug_get_an_ephemeral_secret_key(make_app):
    first, second = make_app(), make_app()
    assert len(first.config["SECRET_KEY"]) >= MIN_SECRET_KEY_LENGTH
    assert first.config["SECRET_KEY"] != second.config["SECRET_KEY"]
    debug = make_app(TESTING=False, DEBUG=True)
    assert len(debug.config["SECRET_KEY"]) >= MIN_SECRET_KEY_LENGTH


def test_check_secret_key_on_a_plain_flask_app():
    app = Flask("plain")
    with pytest.raises(ConfigError, match="SECRET_KEY must be set"):
        check_secret_key(app)
    app.config["SECRET_KEY"] = b"b" * MIN_SECRET_KEY_LENGTH
    check_secret_key(app)  # bytes of the right length are fine
    app.testing = True
    app.config["SECRET_KEY"] = "short"
    check_secret_key(app)  # testing keeps a key it was given, however weak
    assert app.config["SECRET_KEY"] == "short"
