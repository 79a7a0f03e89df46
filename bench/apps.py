"""The app each bench measures: as a user's, with its tables made (as ``flask db upgrade`` makes them).

Why: the usage ledger is on by default and writes a row per call in the
background; without its table every write fails and is dropped, and a bench
would measure an app that does less than a deployed one.
"""

from __future__ import annotations

import tempfile
from typing import Any

from flask import Flask


def bench_app(**config: Any) -> Flask:
    """A new app in an instance folder of its own, with every table made."""
    from app import create_app
    from app.services.db_service import db

    instance = tempfile.mkdtemp(prefix="bench-instance-")
    app = create_app(
        {"TESTING": True, "INSTANCE_PATH": instance, "DOTENV_PATH": f"{instance}/none.env", **config}
    )
    with app.app_context():
        db.create_all()
    return app
