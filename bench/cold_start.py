"""A cold ``create_app()`` plus the first ``/livez``, against a bare Flask app with a database.

The baseline is what a user would write without this project: Flask,
Flask-SQLAlchemy on a ``DeclarativeBase`` and one model, attached to the app.
Both sides define the same model, so the comparison is the project's own
start-up (settings, services, blueprints, commands), not the import of
SQLAlchemy, which every app with a database pays.

Each sample is a fresh interpreter, timed from the parent (interpreter start
included for both), alternating between the two programs; a run's figure is
the ratio of the medians. As the other benchmarks, the figure is the median
over 3 runs in fresh processes (:mod:`bench.processes`), with their range.
Target: under 1.5x.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.processes import SMOKE, in_processes, is_worker, ratio_text, report, spread  # noqa: E402

SAMPLES = 2 if SMOKE else 15

MODEL = """
from sqlalchemy import String
from sqlalchemy.orm import Mapped, mapped_column
class Note(Base):
    __tablename__ = "note"
    id: Mapped[int] = mapped_column(primary_key=True)
    text: Mapped[str] = mapped_column(String(500))
"""

BARE = (
    """
import os
from flask import Flask
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy.orm import DeclarativeBase
class Base(DeclarativeBase):
    pass
db = SQLAlchemy(model_class=Base)
"""
    + MODEL
    + """
app = Flask(__name__, instance_path=os.environ["INSTANCE_PATH"])
app.config["SQLALCHEMY_DATABASE_URI"] = "sqlite:///" + os.environ["INSTANCE_PATH"] + "/bare.db"
db.init_app(app)
@app.get("/livez")
def livez():
    return {"status": "pass"}
assert app.test_client().get("/livez").status_code == 200
"""
)

OURS = (
    """
from app.services.db_service import Base
"""
    + MODEL
    + """
from app import create_app
app = create_app()
assert app.test_client().get("/livez").status_code == 200
"""
)


def _run(code: str, env: dict[str, str]) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, check=True)
    return time.perf_counter() - started


def measure() -> dict[str, float]:
    instance = tempfile.mkdtemp(prefix="bench-instance-")
    env = {
        **os.environ,
        "INSTANCE_PATH": instance,
        "DOTENV_PATH": f"{instance}/none.env",
        "SECRET_KEY": "b" * 64,
        "OPENAI_API_KEY": "sk-bench",
        "REDIS_URL": "redis://127.0.0.1:9/0",
        "GEMINI_API_KEY": "bench-gemini",
    }
    for code in (BARE, OURS):  # warm the page cache and .pyc files
        _run(code, env)
    bare, ours = [], []
    for _ in range(SAMPLES):
        bare.append(_run(BARE, env))
        ours.append(_run(OURS, env))
    bare_median, ours_median = statistics.median(bare), statistics.median(ours)
    return {"bare_ms": bare_median * 1000, "ours_ms": ours_median * 1000, "ratio": ours_median / bare_median}


def main() -> None:
    if is_worker():
        report(measure())
        return
    results = in_processes("bench.cold_start")
    ours, ours_low, ours_high = spread(results, "ours_ms")
    bare, bare_low, bare_high = spread(results, "bare_ms")
    print(
        f"cold create_app() + first /livez: {ours:.0f} ms ({ours_low:.0f}-{ours_high:.0f}),"
        f" bare Flask + Flask-SQLAlchemy + one model: {bare:.0f} ms ({bare_low:.0f}-{bare_high:.0f}),"
        f" ratio {ratio_text(results, 'ratio')} (target < 1.5x)"
    )


if __name__ == "__main__":
    main()
