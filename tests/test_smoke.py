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
    code = (
        "import sys; from app import create_app; create_app({'TESTING': True});"
        "print(sorted(m for m in ('openai', 'google.genai', 'redis', 'httpx2', 'sqlalchemy', 'alembic')"
        " if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


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
    assert sorted(app.extensions["openai_service"].profiles) == ["default", "groq", "ollama", "openrouter"]
