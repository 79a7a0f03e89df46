"""Media storage: generated images and videos, named by content hash and tenant.

``MEDIA_STORAGE_URL`` says where: unset, a folder ``media/`` in the instance
folder; a path or ``file://`` URL, that folder; any other URL (``s3://``,
``gs://``, ``memory://``) through fsspec, the optional extra ``.[fsspec]``.
"""

from __future__ import annotations

from app.media.storage import MediaStorage, StoredMedia, get_media_storage, init_app

__all__ = ["MediaStorage", "StoredMedia", "get_media_storage", "init_app"]
