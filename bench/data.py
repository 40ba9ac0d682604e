"""The benchmark's data: a random file and images made through the API (rows: lab.rows)."""

from __future__ import annotations

import os
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


def sparse_file(path: Path, size: int = GIB, data: int = GIB // 4, extents: int = 16) -> Path:
    """A sparse file of ``size`` holding ``data`` random bytes in ``extents`` runs spread over
    it, the rest holes (as most raw disk images are); it ends in a hole."""
    run = data // extents
    with path.open("wb") as f:
        f.truncate(size)
        for index in range(extents):
            f.seek(index * (size // extents))
            f.write(os.urandom(run))
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
