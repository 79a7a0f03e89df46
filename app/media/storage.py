"""Where generated media is kept: one folder per tenant, each file named by its SHA-256.

A media id is ``<sha256>.<ext>``; the tenant's folder is ``t-<sha256 of the
tenant>`` (``_`` for callers without a tenant), so no name a caller chose ever
becomes part of a path, and one tenant never reads another's file: it is looked
up in the caller's own folder only. The same bytes stored twice are one file.

The local folder is the default (writes go to a temporary file renamed into
place, so a reader never sees half a file). Other back ends go through fsspec
(written by hand here would be one client per cloud); it is imported only when
``MEDIA_STORAGE_URL`` names one.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any
from urllib.parse import urlsplit

from flask import Flask, current_app

from app.config import get_str
from app.errors import ConfigError
from app.redaction import redact_url, register_url_secrets

if TYPE_CHECKING:
    from collections.abc import Mapping

EXTENSION_KEY = "media_storage"

#: Content types the storage takes, and the extension each file gets.
EXTENSIONS: dict[str, str] = {
    "image/png": "png",
    "image/jpeg": "jpg",
    "image/webp": "webp",
    "image/gif": "gif",
    "video/mp4": "mp4",
    "video/webm": "webm",
    "video/quicktime": "mov",
}
CONTENT_TYPES = {extension: mime for mime, extension in EXTENSIONS.items()}
MEDIA_ID = re.compile(r"^[0-9a-f]{64}\.(?:" + "|".join(CONTENT_TYPES) + r")$")


@dataclass(frozen=True)
class StoredMedia:
    """One stored file: its id (what ``/api/media/<id>`` takes), type and size."""

    id: str
    content_type: str
    size: int


def tenant_folder(tenant: str | None) -> str:
    return "_" if tenant is None else "t-" + hashlib.sha256(tenant.encode()).hexdigest()[:32]


def extension_for(content_type: str) -> str:
    extension = EXTENSIONS.get(content_type.split(";", maxsplit=1)[0].strip().lower())
    if extension is None:
        raise ValueError(f"media of type {content_type!r} is not stored (known: {', '.join(EXTENSIONS)})")
    return extension


class MediaStorage:
    """A local folder, or an fsspec file system and root."""

    def __init__(self, root: str, fs: Any = None) -> None:
        self.root = root.rstrip("/") or "/"
        #: None: the local file system (plain ``os`` calls, and Flask's ``send_file`` for ranges).
        self.fs = fs

    @property
    def local(self) -> bool:
        return self.fs is None

    def _key(self, tenant: str | None, media_id: str) -> str:
        return f"{self.root}/{tenant_folder(tenant)}/{media_id}"

    def put(self, data: bytes, content_type: str, tenant: str | None) -> StoredMedia:
        """Store ``data`` for ``tenant`` (idempotent: the same bytes are the same id)."""
        media_id = f"{hashlib.sha256(data).hexdigest()}.{extension_for(content_type)}"
        key = self._key(tenant, media_id)
        stored = StoredMedia(media_id, CONTENT_TYPES[media_id.rsplit(".", 1)[1]], len(data))
        if self.fs is not None:
            if not self.fs.exists(key):
                self.fs.makedirs(key.rsplit("/", 1)[0], exist_ok=True)
                self.fs.pipe_file(key, data)
            return stored
        path = Path(key)
        if path.exists():
            return stored
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=".incoming-")
        try:
            with os.fdopen(handle, "wb") as file:
                file.write(data)
            os.replace(temporary, path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
        return stored

    def find(self, media_id: str, tenant: str | None) -> StoredMedia | None:
        """The file ``media_id`` of ``tenant``, or None (a malformed id, another tenant's, none)."""
        if not MEDIA_ID.match(media_id):
            return None
        key = self._key(tenant, media_id)
        try:
            size = int(self.fs.size(key)) if self.fs is not None else os.path.getsize(key)
        except (FileNotFoundError, OSError):
            return None
        return StoredMedia(media_id, CONTENT_TYPES[media_id.rsplit(".", 1)[1]], size)

    def local_path(self, media: StoredMedia, tenant: str | None) -> str:
        assert self.fs is None
        return self._key(tenant, media.id)

    def open(self, media: StoredMedia, tenant: str | None) -> IO[bytes]:
        key = self._key(tenant, media.id)
        if self.fs is not None:
            return self.fs.open(key, "rb")  # type: ignore[no-any-return]
        return open(key, "rb")

    def read(self, media: StoredMedia, tenant: str | None) -> bytes:
        with self.open(media, tenant) as file:
            return file.read()

    def describe(self) -> str:
        return self.root if self.fs is None else redact_url(self.root)


def parse_storage(config: Mapping[str, Any], instance_path: str) -> MediaStorage:
    """``MEDIA_STORAGE_URL``: a local folder (default ``<instance>/media``) or an fsspec URL."""
    url = get_str(config, "MEDIA_STORAGE_URL")
    if url is None:
        return MediaStorage(os.path.join(instance_path, "media"))
    scheme = urlsplit(url).scheme
    if scheme in ("", "file"):
        path = urlsplit(url).path if scheme == "file" else url
        return MediaStorage(os.path.abspath(path))
    register_url_secrets(url)
    try:
        import fsspec  # type: ignore[import-untyped]
    except ImportError:
        raise ConfigError(
            f"MEDIA_STORAGE_URL={redact_url(url)!r} needs fsspec: pip install '.[fsspec]'"
        ) from None
    try:
        fs, root = fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as exc:
        raise ConfigError(
            f"MEDIA_STORAGE_URL={redact_url(url)!r}: fsspec cannot open it ({type(exc).__name__})"
        ) from None
    return MediaStorage(root if root.startswith("/") else "/" + root if scheme == "memory" else root, fs)


def init_app(app: Flask) -> None:
    app.extensions[EXTENSION_KEY] = parse_storage(app.config, app.instance_path)


def get_media_storage() -> MediaStorage:
    storage = current_app.extensions.get(EXTENSION_KEY)
    if not isinstance(storage, MediaStorage):
        raise RuntimeError("media storage is not set up: app.jobs.init_app(app) registers it")
    return storage


__all__ = ["MEDIA_ID", "MediaStorage", "StoredMedia", "get_media_storage", "init_app"]
