"""Keeping secrets out of every output: reprs, logs, error bodies, CLI and health.

Small tools, written by hand because no library covers them (and each is short):

* :class:`Secret` wraps a credential so that ``repr``, ``str`` and f-strings
  show ``'***'``; the value is only reachable through :meth:`Secret.reveal`,
  which the connectors call when they hand the key to an SDK.
* A process-wide registry of secret values, fed by the connectors, and a
  :mod:`logging` record factory that scrubs those values (and the passwords
  of URLs) from every log record, including formatted tracebacks. A factory,
  rather than a filter, because filters attached to a logger do not see the
  records of its child loggers (``openai._base_client``, ``httpx`` ...).
* :func:`redact_url` and :func:`url_secrets`, which find a URL's password
  wherever a library might read it: in the userinfo, even when it holds a raw
  ``#``, ``/`` or ``@`` (SQLAlchemy accepts ``#`` and ``/`` there, and
  ``urlsplit`` then sees a different URL), and in the query string
  (``?password=``: redis-py and psycopg both take it).
* :func:`scrub_exception`, which masks known secrets in an exception and the
  ones chained to it, in place: the SDKs put whatever the provider echoed
  (a key in an error message, say) into the exceptions the layer keeps as
  ``__cause__``.
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Any
from urllib.parse import unquote, unquote_plus, urlsplit

MASK = "***"

#: Query parameters whose value is a credential (compared without case).
SECRET_PARAMETERS = (
    "password", "passwd", "pass", "pwd", "sslpassword", "secret", "client_secret", "token",
    "access_token", "auth", "auth_token", "api_key", "api-key", "apikey", "key", "sig", "signature",
)  # fmt: skip

_SCHEME = r"[a-zA-Z][a-zA-Z0-9+.\-]*://"
#: The userinfo of a URL in free text: everything from ``scheme://`` to the last ``@`` of the
#: same run of non-space characters. Greedy on purpose: a password may hold ``/``, ``#``,
#: ``?`` or ``@``, and masking too much is safe where masking too little is not.
_URL_USERINFO = re.compile(rf"(?P<scheme>{_SCHEME})(?P<userinfo>[^\s]*)@")
#: A credential in a query string: the value runs to the next ``&`` (a raw ``#`` included).
_QUERY_SECRET = re.compile(
    r"(?P<lead>[?&;](?:" + "|".join(re.escape(name) for name in SECRET_PARAMETERS) + r")=)(?P<value>[^&\s]*)",
    re.IGNORECASE,
)


class Secret:
    """A credential that will not print itself."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        """The real value: only for handing to the client that needs it."""
        return self._value

    def __repr__(self) -> str:
        return f"Secret({MASK!r})"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __bool__(self) -> bool:
        return bool(self._value)


def redact_url(url: str) -> str:
    """``scheme://user:password@host/path?password=x`` -> ``scheme://user:***@host/path?password=***``.

    A URL with a username and no password (``redis://token@host``) may carry
    the secret in the username, so the whole userinfo is masked then. The
    URL is read as text, not parsed: a raw ``#`` or ``/`` in a password makes
    parsers disagree on where the host starts, and this must be right for all
    of them.
    """
    return _mask_url_passwords(url)


def _mask_url_passwords(text: str) -> str:
    if "=" in text and ("?" in text or "&" in text or ";" in text):  # a query string, cheaply ruled out
        text = _QUERY_SECRET.sub(lambda m: f"{m['lead']}{MASK}", text)
    if "@" in text:
        text = _URL_USERINFO.sub(_mask_userinfo, text)
    return text


def _mask_userinfo(match: re.Match[str]) -> str:
    user, sep, _ = match["userinfo"].partition(":")
    keep_user = sep and user and not any(c in user for c in "/?#")
    return f"{match['scheme']}{user}:{MASK}@" if keep_user else f"{match['scheme']}{MASK}@"


def url_secrets(url: str) -> set[str]:
    """Every form of the passwords in ``url``, as any parser might read them, to register.

    The userinfo's password (up to the last ``@``, and as ``urlsplit`` cuts it
    at a raw ``#`` or ``/``), and the values of credential parameters in the
    query string, each raw, percent-decoded and in the pieces a raw ``#``,
    ``/``, ``?`` or ``@`` splits it into. Usernames are not included: they
    are often ordinary words (the registry ignores values under 6 characters).
    """
    found: set[str] = set()
    match = _URL_USERINFO.search(url)
    if match and ":" in match["userinfo"]:
        found.add(match["userinfo"].partition(":")[2])
    try:
        password = urlsplit(url).password
    except ValueError:
        password = None
    if password:
        found.add(password)
    for query in _QUERY_SECRET.finditer(url):
        value = query["value"]
        found.update((value, value.partition("#")[0]))
    decoded = {form for value in found for form in (unquote(value), unquote_plus(value))}
    # The pieces between raw delimiters too: a parser that cut the URL there shows one of them.
    pieces = {piece for value in found | decoded for piece in re.split(r"[#/?@]", value)}
    return {value for value in found | decoded | pieces if value}


def register_url_secrets(url: str | None) -> None:
    """Remember the passwords of a configured URL (see :func:`url_secrets`)."""
    if url:
        for value in url_secrets(url):
            register_secret(value)


class _SecretRegistry:
    """The secret values this process knows of, longest first."""

    # Values this short would mask ordinary words; real keys are far longer.
    MIN_LENGTH = 6

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: tuple[str, ...] = ()

    def add(self, value: str | Secret | None) -> None:
        raw = value.reveal() if isinstance(value, Secret) else value
        if not raw or len(raw) < self.MIN_LENGTH or raw in self._values:
            return
        with self._lock:
            values = {*self._values, raw}
            self._values = tuple(sorted(values, key=len, reverse=True))

    def redact(self, text: str) -> str:
        here = _masked_here.get()
        for value in here + self._values if here else self._values:
            if value in text:
                text = text.replace(value, MASK)
        return _mask_url_passwords(text)


secrets = _SecretRegistry()

#: Secrets of the work at hand (a caller's own API key), masked like registered ones while it runs.
_masked_here: ContextVar[tuple[str, ...]] = ContextVar("masked_here", default=())


@contextlib.contextmanager
def masking(*values: str) -> Iterator[None]:
    """Mask ``values`` too, in this context only: a per-call key is not registered process-wide
    (there may be one per tenant), yet nothing it reaches (an error, a log record) may show it."""
    token = _masked_here.set((*_masked_here.get(), *(value for value in values if value)))
    try:
        yield
    finally:
        _masked_here.reset(token)


def register_secret(value: str | Secret | None) -> None:
    """Remember a credential so that logs and error bodies never show it."""
    secrets.add(value)


def redact(text: str) -> str:
    """``text`` with every known secret and URL password masked."""
    return secrets.redact(text)


_factory_lock = threading.Lock()
_installed = False


def install_log_redaction() -> None:
    """Wrap the log record factory once per process so every record is scrubbed."""
    global _installed  # noqa: PLW0603 - one factory per process, by design
    with _factory_lock:
        if _installed:
            return
        previous = logging.getLogRecordFactory()

        def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
            record = previous(*args, **kwargs)
            _scrub(record)
            return record

        logging.setLogRecordFactory(factory)
        _installed = True


def _scrub(record: logging.LogRecord) -> None:
    try:
        message = record.getMessage()
    except Exception:  # a broken format string is the logging call's problem, not ours
        return
    cleaned = redact(message)
    if cleaned != message or record.args:
        record.msg, record.args = cleaned, None
    if record.exc_info and not record.exc_text:
        text = logging.Formatter().formatException(record.exc_info)
        record.exc_text = redact(text)


def scrub_exception(exc: BaseException) -> BaseException:
    """Mask every known secret in ``exc`` and in the exceptions chained to it, in place.

    What an exception shows (``str``, tracebacks) comes from its ``args``; the
    SDKs also keep what the provider said in attributes (``message``, ``body``,
    ``details``). Those strings, and the strings in those dicts and lists, are
    replaced by their redacted form; objects (a request, a response) are left
    as they are. ``__cause__`` and ``__context__`` are followed, once each.
    """
    seen: set[int] = set()
    pending: list[BaseException | None] = [exc]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        with contextlib.suppress(AttributeError, TypeError):  # a type that does not let args be set
            current.args = _scrubbed(current.args)
        attributes = getattr(current, "__dict__", None)
        if isinstance(attributes, dict):
            for name, value in list(attributes.items()):
                cleaned = _scrubbed(value)
                if cleaned is not value:
                    attributes[name] = cleaned
        pending += [current.__cause__, current.__context__]
    return exc


def _scrubbed(value: Any, depth: int = 0) -> Any:
    """``value`` with its strings redacted (the same object when nothing changed)."""
    if isinstance(value, str):
        cleaned = redact(value)
        return value if cleaned == value else cleaned
    if depth > 10:  # a deeper body is not a message anyone reads
        return value
    if isinstance(value, dict):
        items = {key: _scrubbed(item, depth + 1) for key, item in value.items()}
        changed = any(items[key] is not item for key, item in value.items())
        return items if changed else value
    if isinstance(value, list | tuple):
        items_list = [_scrubbed(item, depth + 1) for item in value]
        if all(new is old for new, old in zip(items_list, value, strict=True)):
            return value
        return tuple(items_list) if isinstance(value, tuple) else items_list
    return value
