"""How each client is built from config, kept apart from the Flask-facing services.

A connector owns one service's validated settings and its lazily built
clients; :mod:`app.services` registers connectors on apps and resolves them
from ``current_app``.
"""
