from __future__ import annotations

import subprocess
import sys

from tests.conftest import ROOT


def test_livez(client):
    response = client.get("/livez")
    assert response.status_code == 200
    assert response.json == {"status": "pass"}
    assert response.mimetype == "application/health+json"


def test_create_app_imports_no_sdk():
    """The LLM SDKs, redis-py and Alembic load on first use; SQLAlchemy is imported at start-up (``db``)."""
    code = (
        "import sys; from app import create_app; create_app({'TESTING': True});"
        "print(sorted(m for m in ('openai', 'google.genai', 'anthropic', 'redis', 'httpx2', 'alembic')"
        " if m in sys.modules), 'sqlalchemy' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[] True"


def test_redis_and_postgres_fixtures(redis_server, postgres_server):
    import redis

    assert redis.Redis.from_url(redis_server.url).ping()
    assert postgres_server.psql("select 1") == "1"


def test_env_example_lists_every_key_and_loads(tmp_path, make_app):
    from app.config import DEFAULTS

    text = (ROOT / ".env.example").read_text()
    keys = {line.split("=", 1)[0] for line in text.splitlines() if line and not line.startswith("#")}
    assert set(DEFAULTS) <= keys, sorted(set(DEFAULTS) - keys)
    dotenv = tmp_path / ".env"
    dotenv.write_text(text.replace("SECRET_KEY=\n", f"SECRET_KEY={'k' * 64}\n"))
    app = make_app(DOTENV_PATH=str(dotenv), TESTING=False)
    assert app.config["SECRET_KEY"] == "k" * 64
    # As copied, it configures no profile that needs a key or a server (GROQ_API_KEY, OLLAMA_HOST add them).
    assert sorted(app.extensions["openai_service"].profiles) == ["default"]


def test_a_preset_provider_exists_when_its_key_is_set(make_app, monkeypatch):
    app = make_app()
    assert "groq" not in app.extensions["openai_service"].profiles
    monkeypatch.setenv("GROQ_API_KEY", "gsk-preset-key-0123456789")
    app = make_app(OLLAMA_HOST="http://127.0.0.1:11500")
    profiles = app.extensions["openai_service"].profiles
    assert profiles["groq"].base_url == "https://api.groq.com/openai/v1"
    assert profiles["groq"].api_key.reveal() == "gsk-preset-key-0123456789"
    assert profiles["ollama"].base_url == "http://127.0.0.1:11500/v1"
    assert "openrouter" not in profiles
