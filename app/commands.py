"""Your ``flask`` commands: each command defined on :data:`cli` becomes ``flask <name>``.

They run inside the app context, so the services work as in a view::

    @cli.command("warm-cache", help="Fill the cache before traffic arrives.")
    def warm_cache() -> None:
        get_redis_client().set("warm", 1)

``create_app`` adds them to ``app.cli`` one by one (``cli`` only collects
them), so they stand beside ``flask run`` rather than under a group name.
"""

from __future__ import annotations

from flask.cli import AppGroup

cli = AppGroup("commands", help="The project's own commands (registered one by one on `flask`).")
