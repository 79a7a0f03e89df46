"""README's "Extending the app", followed as a user would, in a copy of the project.

The code blocks of that section that start with ``# <path>`` are written to
those paths of a fresh copy (without .venv, .git and instance); then the
user's files go through the project's ruff and mypy (strict) settings,
``flask db migrate`` writes a revision against a temporary SQLite database,
``flask db upgrade`` applies it, and pytest runs the user's new test. So the
README's instructions are what is tested, and drift between the two fails here.
"""

from __future__ import annotations

import os
import re
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

BIN = Path(sys.executable).parent
#: What the README section must show: a model, a blueprint and its registration, a command, a test.
USER_FILES = (
    "app/models.py",
    "app/views/notes.py",
    "app/views/__init__.py",
    "app/commands.py",
    "tests/test_notes.py",
)
#: Checked by mypy as ``make typecheck`` does (tests are not in its ``files``), with the factory.
TYPED_FILES = ("app/__init__.py", "app/models.py", "app/views", "app/commands.py")
COPY_IGNORE = shutil.ignore_patterns(
    ".venv",
    ".git",
    "instance",
    ".env",
    "__pycache__",
    ".*_cache",
    "*.egg-info",
    ".coverage*",
    "htmlcov",
    ".tmp",
)


def readme_files() -> dict[str, str]:
    """The ``# <path>`` code blocks of the README's "Extending the app" section: path -> content."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Extending the app\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n# (\S+)\n(.*?)```", section, flags=re.DOTALL)
    return {path: body for path, body in blocks}


def run(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture
def mypy_cache(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A mypy cache kept between runs (pytest's cache folder), so only a fresh clone pays for a cold one."""
    cache = getattr(request.config, "cache", None)
    if cache is not None:
        return Path(cache.mkdir("mypy-extending"))
    return tmp_path_factory.mktemp("mypy-cache")


def test_a_user_extends_the_app_as_the_readme_says(tmp_path, mypy_cache):
    files = readme_files()
    assert set(files) == set(USER_FILES), "the README section must show each of these files"
    project = tmp_path / "project"
    shutil.copytree(ROOT, project, ignore=COPY_IGNORE)
    for path, body in files.items():
        (project / path).write_text(body)

    env = {key: value for key, value in os.environ.items() if not key.startswith(("COV_", "COVERAGE_"))}
    env.update(
        PYTHONPATH=str(project),  # the copy's `app`, not the editable install's
        MYPY_CACHE_DIR=str(mypy_cache),
        FLASK_APP="wsgi",
        SECRET_KEY="e" * 64,
        DATABASE_URL=f"sqlite:///{tmp_path / 'app.db'}",
        INSTANCE_PATH=str(tmp_path / "instance"),
        DOTENV_PATH=str(tmp_path / "none.env"),
    )
    # mypy takes the longest: it runs while the rest goes on.
    mypy = subprocess.Popen(
        [BIN / "mypy", *TYPED_FILES, "--follow-imports=silent"],
        cwd=project,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        imported = run([sys.executable, "-c", "import app; print(app.__file__)"], project, env)
        assert Path(imported.stdout.strip()) == project / "app" / "__init__.py"
        user_files = [str(project / path) for path in USER_FILES]
        run([BIN / "ruff", "check", *user_files], project, env)
        run([BIN / "ruff", "format", "--check", *user_files], project, env)

        # Autogenerate compares with an up-to-date database: the project's revisions first.
        run([BIN / "flask", "db", "upgrade"], project, env)
        (head,) = re.findall(
            r"^(\w+) \(head\)", run([BIN / "flask", "db", "heads"], project, env).stdout, re.M
        )
        run([BIN / "flask", "db", "migrate", "-m", "add note"], project, env)
        (revision,) = (project / "migrations" / "versions").glob("*_add_note.py")
        script = revision.read_text()
        assert f"down_revision = '{head}'" in script.replace('"', "'")  # it follows the project's last
        # Only the user's table: the project's own models and revisions agree (nothing else to migrate).
        upgrade = script.split("def downgrade")[0]
        assert re.findall(r"op\.(create|drop)_table\(\s*['\"](\w+)['\"]", upgrade) == [("create", "note")], (
            script
        )
        run([BIN / "flask", "db", "upgrade"], project, env)
        with sqlite3.connect(tmp_path / "app.db") as connection:
            columns = {row[1] for row in connection.execute("PRAGMA table_info(note)")}
        assert columns == {"id", "text"}

        tests = run(
            [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "tests/test_notes.py"], project, env
        )
        assert re.search(r"\b1 passed\b", tests.stdout), tests.stdout

        out, _ = mypy.communicate(timeout=300)
        assert mypy.returncode == 0, out
        assert "Success: no issues found" in out, out
    finally:
        if mypy.poll() is None:
            mypy.kill()
            mypy.wait()


def test_the_factory_imports_the_models_even_when_no_view_does(tmp_path):
    """``flask db migrate`` sees a model that only ``app/models.py`` mentions."""
    code = (
        "import sys; from app import create_app;"
        f"create_app({{'TESTING': True, 'INSTANCE_PATH': {str(tmp_path)!r}}});"
        "print('app.models' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"
