"""A test-only process for the resilience fault tests: the real app, configured from the environment.

Two uses, both by :mod:`tests.test_resilience_faults`:

* under gunicorn (``tests.resilience_app:app``): the real app, plus an
  ``X-Worker-Pid`` header on every response, so a test can tell which worker
  served each request;
* as a driver process (``python -m tests.resilience_app``): it reads one JSON
  command per line on stdin, ``{"model": "openai/..."}``, makes that
  ``get_llm().chat`` call in an app context, and writes one JSON line per
  command on stdout: ``{"ok", "error", "retry_after", "elapsed", "pid"}``.
  Two such processes, each with its own app on one ``REDIS_URL``, stand for
  two workers whose calls the test orders exactly.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

from flask import Response

from app import create_app
from app.llm import LLMError, get_llm

app = create_app()


@app.after_request
def _worker_pid(response: Response) -> Response:
    response.headers["X-Worker-Pid"] = str(os.getpid())
    return response


def _call(command: dict[str, Any]) -> dict[str, Any]:
    started = time.monotonic()
    answer: dict[str, Any] = {"pid": os.getpid(), "ok": True, "error": None, "retry_after": None}
    try:
        with app.app_context():
            get_llm().chat([{"role": "user", "content": "hi"}], model=command["model"])
    except LLMError as exc:
        answer.update(ok=False, error=type(exc).__name__, retry_after=exc.retry_after)
    answer["elapsed"] = time.monotonic() - started
    return answer


def main() -> None:
    print(json.dumps({"ready": True, "pid": os.getpid()}), flush=True)
    for line in sys.stdin:
        if line.strip():
            print(json.dumps(_call(json.loads(line))), flush=True)


if __name__ == "__main__":
    main()
