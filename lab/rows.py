"""Catalogs of any size in seconds: image rows written straight into a lab Glance's database
(its SQLite, or the production lab's PostgreSQL through ``psql``).

Creating thousands of images through the API takes minutes (23-192 ms each); tests and the
benchmark insert them as Glance's own rows instead, then read them only through the API and the
mount. The images have no data (no location): they are listed, never read.
"""

from __future__ import annotations

import io
import random
import sqlite3
import subprocess
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

from lab.production import DB_NAME, PostgresServer, postgres_bin_dir

__all__ = ["insert_images", "insert_images_postgres", "remove_inserted", "remove_inserted_postgres"]

_IMAGE_COLUMNS = (
    "id, name, size, status, created_at, updated_at, deleted, disk_format, container_format,"
    " checksum, min_disk, min_ram, protected, virtual_size, visibility, os_hidden, os_hash_algo,"
    " os_hash_value"
)
_PROPERTY_COLUMNS = "image_id, name, value, created_at, updated_at, deleted"
_TAG_COLUMNS = "image_id, value, created_at, updated_at, deleted"
Row = tuple[object, ...]


def _rows(
    count: int, prefix: str, tag: str | None, seed: int
) -> tuple[list[tuple[str, str]], list[Row], list[Row], list[Row]]:
    """``[(id, name)]`` and the rows of the images, image_properties and image_tags tables.

    Booleans are 0/1, which both SQLite and PostgreSQL (boolean input) take.
    """
    rng = random.Random(f"{prefix}-{seed}")  # ids differ between prefixes
    start = datetime(2026, 1, 1, tzinfo=UTC)
    distros = ("ubuntu", "debian", "fedora", "centos", "cirros")
    images: list[Row] = []
    properties: list[Row] = []
    tags: list[Row] = []
    made = []
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
    return made, images, properties, tags


def insert_images(
    sqlite_path: Path, count: int, prefix: str, tag: str | None = None, seed: int = 3
) -> list[tuple[str, str]]:
    """Insert ``count`` active images as Glance's own rows (one transaction); ``[(id, name)]``.

    Each row has what an uploaded qcow2 image has (size, virtual size, md5 and sha512 fields,
    formats, visibility), one ``os_distro`` property; every tenth (or every one, with ``tag``)
    carries a tag. Glance reads them like any other image (no data file: they are never read).
    """
    made, images, properties, tags = _rows(count, prefix, tag, seed)
    with sqlite3.connect(sqlite_path) as db:
        db.executemany(f"INSERT INTO images ({_IMAGE_COLUMNS}) VALUES ({_marks(images)})", images)
        db.executemany(
            f"INSERT INTO image_properties ({_PROPERTY_COLUMNS}) VALUES ({_marks(properties)})",
            properties,
        )
        db.executemany(f"INSERT INTO image_tags ({_TAG_COLUMNS}) VALUES ({_marks(tags)})", tags)
    return made


def _marks(rows: list[Row]) -> str:
    return ", ".join("?" * len(rows[0])) if rows else ""


def insert_images_postgres(
    postgres: PostgresServer, count: int, prefix: str, tag: str | None = None, seed: int = 3
) -> list[tuple[str, str]]:
    """:func:`insert_images` into the production lab's PostgreSQL (``COPY`` through ``psql``,
    one transaction; about 0.1 s per thousand images)."""
    made, images, properties, tags = _rows(count, prefix, tag, seed)
    script = io.StringIO()
    script.write("BEGIN;\n")
    for table, columns, rows in (
        ("images", _IMAGE_COLUMNS, images),
        ("image_properties", _PROPERTY_COLUMNS, properties),
        ("image_tags", _TAG_COLUMNS, tags),
    ):
        script.write(f"COPY {table} ({columns}) FROM STDIN;\n")
        script.writelines("\t".join(map(str, row)) + "\n" for row in rows)  # no tabs in values
        script.write("\\.\n")
    script.write("COMMIT;\n")
    _psql(postgres, script.getvalue())
    return made


def remove_inserted_postgres(postgres: PostgresServer, ids: list[str]) -> None:
    """:func:`remove_inserted` for rows from :func:`insert_images_postgres`."""
    listed = ",".join(f"'{image_id}'" for image_id in ids)  # uuids: nothing to quote
    _psql(postgres, f"UPDATE images SET deleted = true, status = 'deleted' WHERE id IN ({listed});")


def _psql(postgres: PostgresServer, script: str) -> None:
    """Run an SQL script in the glance database; stop at the first error."""
    subprocess.run(
        [str(postgres_bin_dir() / "psql"), "-q", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1",
         "-p", str(postgres.port), "-U", DB_NAME, DB_NAME],
        input=script, text=True, check=True, capture_output=True,
    )  # fmt: skip


def remove_inserted(sqlite_path: Path, ids: list[str]) -> None:
    """Mark rows from :func:`insert_images` deleted, as Glance's own delete does."""
    with sqlite3.connect(sqlite_path) as db:
        db.executemany(
            "UPDATE images SET deleted = 1, status = 'deleted' WHERE id = ?", [(i,) for i in ids]
        )
