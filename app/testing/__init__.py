"""The test kit for apps built on this project: a pytest plugin and what it stands on.

``app.testing.plugin`` (registered by ``tests/conftest.py``) gives fixtures
(``app``, ``app_settings``, ``client``, ``api_headers``, ``db``, ``redis``,
``fake_llm``), the real-call guard (:mod:`app.testing.guard`) and record and
replay of provider answers (:mod:`app.testing.cassettes`). See the README's
"Testing your app".
"""
