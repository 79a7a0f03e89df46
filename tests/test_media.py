"""Media storage: content-hash names per tenant, a local folder or fsspec, and /api/media."""

from __future__ import annotations

import hashlib

import pytest

from app.media.storage import MediaStorage, parse_storage, tenant_folder
from tests.conftest import api_key_headers
from tests.fake_gemini import MP4, PNG


def test_files_are_named_by_content_hash_in_the_tenants_folder(tmp_path):
    storage = MediaStorage(str(tmp_path))
    stored = storage.put(PNG, "image/png", "acme")
    assert stored.id == hashlib.sha256(PNG).hexdigest() + ".png" and stored.size == len(PNG)
    path = tmp_path / tenant_folder("acme") / stored.id
    assert path.read_bytes() == PNG and "acme" not in str(path)
    assert storage.put(PNG, "image/png", "acme") == stored  # the same bytes: the same file
    assert storage.find(stored.id, "acme") == stored
    assert storage.find(stored.id, "other") is None and storage.find(stored.id, None) is None
    for bad in ("../" + stored.id, stored.id.upper(), stored.id[:-4] + ".exe", "x.png", ""):
        assert storage.find(bad, "acme") is None
    assert [p.name for p in (tmp_path / tenant_folder("acme")).iterdir()] == [stored.id]  # no temp file left


def test_unknown_content_types_are_refused(tmp_path):
    with pytest.raises(ValueError, match="not stored"):
        MediaStorage(str(tmp_path)).put(b"<svg/>", "image/svg+xml", None)


def test_the_default_folder_and_file_urls(tmp_path):
    assert parse_storage({}, str(tmp_path)).root == str(tmp_path / "media")
    assert parse_storage({"MEDIA_STORAGE_URL": f"file://{tmp_path}/m"}, "/x").root == f"{tmp_path}/m"
    assert parse_storage({"MEDIA_STORAGE_URL": str(tmp_path / "n")}, "/x").local


def test_an_fsspec_back_end_serves_ranges_to_its_tenant(make_app):
    app = make_app(MEDIA_STORAGE_URL="memory://media-test")
    with app.app_context():
        from app.media import get_media_storage

        storage = get_media_storage()
        assert not storage.local
        stored = storage.put(MP4, "video/mp4", "acme")
    client = app.test_client()
    mine = api_key_headers(app, "ann", tenant="acme")
    whole = client.get(f"/api/media/{stored.id}", headers=mine)
    assert whole.status_code == 200 and whole.data == MP4 and whole.mimetype == "video/mp4"
    part = client.get(f"/api/media/{stored.id}", headers={**mine, "Range": "bytes=0-99"})
    assert part.status_code == 206 and part.data == MP4[:100]
    assert (
        client.get(f"/api/media/{stored.id}", headers=api_key_headers(app, "bob", tenant="b")).status_code
        == 404
    )
    assert client.get(f"/api/media/{stored.id}", headers=api_key_headers(app, "nobody")).status_code == 404
    assert client.get("/api/media/..%2Fsecret.png", headers=mine).status_code == 404
