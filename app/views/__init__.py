"""Your blueprints: ``create_app`` registers every blueprint in :data:`blueprints`, in order.

Put each in a module of this package and list it here::

    from app.views.notes import bp as notes

    blueprints: list[Blueprint] = [notes]

An explicit list rather than discovery: the URL map stays readable here, and
a module that is not listed is not served.
"""

from __future__ import annotations

from flask import Blueprint

blueprints: list[Blueprint] = []
