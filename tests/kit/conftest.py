"""Tests written with the test kit, as a user's would be: the kit's ``app`` fixture, not the project's.

``tests/conftest.py`` defines an ``app`` of its own for the project's tests; importing the
plugin's here gives this folder the kit's fixtures exactly as a user gets them.
"""

from app.testing.plugin import app  # noqa: F401 (a fixture, registered by import)
