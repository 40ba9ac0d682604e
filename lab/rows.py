"""Catalogs of any size in seconds: image rows written straight into a lab Glance's SQLite.

Creating thousands of images through the API takes minutes (23-192 ms each); tests and the
benchmark insert them as Glance's own rows instead, then read them only through the API and the
mount. The images have no data (no location): they are listed, never read.
"""

from __future__ import annotations

import random
import sqlite3
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

__all__ = ["insert_images", "remove_inserted"]


def insert_images(
    sqlite_path: Path, count: int, prefix: str, tag: str | None = None, seed: int = 3
) -> list[tuple[str, str]]:
    """Insert ``count`` active images as Glance's own rows (one transaction); ``[(id, name)]``.

    Each row has what an uploaded qcow2 image has (size, virtual size, md5 and sha512 fields,
    formats, visibility), one ``os_distro`` property; every tenth (or every one, with ``tag``)
    carries a tag. Glance reads them like any other image (no data file: they are never read).
    """
    rng = random.Random(f"{prefix}-{seed}")  # ids differ between prefixes
    start = datetime(2026, 1, 1, tzinfo=UTC)
    distros = ("ubuntu", "debian", "fedora", "centos", "cirros")
    images, properties, tags, made = [], [], [], []
    for i in range(count):
        image_id = str(uuid.UUID(int=rng.getrandbits(128), version=4))
        name = f"{prefix}-{i:06d}"
        made.append((image_id, name))
        when = (start + timedelta(seconds=i)).strftime("%Y-%m-%d %H:%M:%S.%f")
        size = rng.randrange(1 << 20, 1 << 32)
        images.append(
            (image_id, name, size, "active", when, when, 0, "qcow2", "bare",
             rng.getrandbits(128).to_bytes(16, "big").hex(), 0, 0, 0, size * 2, "shared", 0,
             "sha512", rng.getrandbits(512).to_bytes(64, "big").hex())
        )  # fmt: skip
        properties.append((image_id, "os_distro", distros[i % len(distros)], when, when, 0))
        if tag is not None or i % 10 == 0:
            tags.append((image_id, tag or f"{prefix}-tenth", when, when, 0))
    with sqlite3.connect(sqlite_path) as db:
        db.executemany(
            "INSERT INTO images (id, name, size, status, created_at, updated_at, deleted,"
            " disk_format, container_format, checksum, min_disk, min_ram, protected, virtual_size,"
            " visibility, os_hidden, os_hash_algo, os_hash_value)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            images,
        )
        db.executemany(
            "INSERT INTO image_properties (image_id, name, value, created_at, updated_at, deleted)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            properties,
        )
        db.executemany(
            "INSERT INTO image_tags (image_id, value, created_at, updated_at, deleted)"
            " VALUES (?, ?, ?, ?, ?)",
            tags,
        )
    return made


def remove_inserted(sqlite_path: Path, ids: list[str]) -> None:
    """Mark rows from :func:`insert_images` deleted, as Glance's own delete does."""
    with sqlite3.connect(sqlite_path) as db:
        db.executemany(
            "UPDATE images SET deleted = 1, status = 'deleted' WHERE id = ?", [(i,) for i in ids]
        )
