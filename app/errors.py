"""Exceptions shared by the configuration loader and the services.

They live in one small module so that views, the CLI and the health checks
can catch them without importing any service (and so any SDK).
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A setting has a value the app cannot use; raised at start-up.

    The message always names the key and what was expected, and never
    contains the value of a secret.
    """


class ServiceNotConfiguredError(RuntimeError):
    """A client was asked for, but a setting it needs is missing.

    ``setting`` names the missing key so that views can tell operators
    exactly what to set (the API answers 503 with it).
    """

    def __init__(self, service: str, setting: str, hint: str = "") -> None:
        self.service = service
        self.setting = setting
        message = f"{service} is not configured: set {setting}"
        super().__init__(f"{message} ({hint})" if hint else message)


class UnknownProfileError(LookupError):
    """``get_openai_client(name)`` was called with a profile nobody configured."""

    def __init__(self, name: str, configured: list[str]) -> None:
        self.name = name
        self.configured = configured
        listed = ", ".join(repr(n) for n in configured) or "none"
        super().__init__(
            f"unknown OpenAI profile {name!r}; configured profiles: {listed} (add it to OPENAI_PROFILES)"
        )
