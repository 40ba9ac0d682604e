"""The benchmark's data: a random file, images made through the API, and 5,000 inserted rows."""

from __future__ import annotations

import hashlib
import os
import sqlite3
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

GIB = 1024 * 1024 * 1024


def random_file(path: Path, size: int = GIB) -> Path:
    """Write ``size`` random bytes (incompressible, so nothing can shortcut them)."""
    with path.open("wb") as f:
        left = size
        while left:
            piece = os.urandom(min(left, 16 * 1024 * 1024))
            f.write(piece)
            left -= len(piece)
    return path


class Glance:
    """The few Glance calls the benchmark makes directly (never through glancefs's client)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.http = httpx.Client(base_url=url, timeout=600)

    def create(self, name: str) -> str:
        response = self.http.post(
            "/v2/images", json={"name": name, "disk_format": "raw", "container_format": "bare"}
        )
        response.raise_for_status()
        return str(response.json()["id"])

    def get(self, image_id: str) -> dict[str, Any]:
        response = self.http.get(f"/v2/images/{image_id}")
        response.raise_for_status()
        return dict(response.json())

    def find(self, name: str) -> list[dict[str, Any]]:
        response = self.http.get("/v2/images", params={"name": name})
        response.raise_for_status()
        return list(response.json()["images"])

    def delete(self, image_id: str) -> None:
        self.http.delete(f"/v2/images/{image_id}")

    def close(self) -> None:
        self.http.close()


def insert_images(sqlite_path: Path, count: int, prefix: str = "list") -> None:
    """Insert ``count`` small active public images straight into Glance's SQLite.

    Creating thousands through the API takes minutes (glance-lab.md: 23-192 ms each); the
    listing benchmark then reads them only through the API. They have no data (no location).
    """
    now = datetime.now(UTC).replace(tzinfo=None).isoformat(sep=" ")
    rows = []
    for index in range(count):
        data = f"{prefix}-{index}".encode()
        rows.append(
            (
                str(uuid.uuid4()), f"{prefix}-{index:05d}.raw", len(data), "active", now, now,
                None, False, "raw", "bare", hashlib.md5(data).hexdigest(), None, 0, 0, False,
                None, "public", False, "sha512", hashlib.sha512(data).hexdigest(),
            )
        )  # fmt: skip
    with sqlite3.connect(sqlite_path) as db:
        db.executemany(
            "INSERT INTO images (id, name, size, status, created_at, updated_at, deleted_at, "
            "deleted, disk_format, container_format, checksum, owner, min_disk, min_ram, "
            "protected, virtual_size, visibility, os_hidden, os_hash_algo, os_hash_value) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            rows,
        )
