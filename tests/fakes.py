"""A fake Glance client below FUSE, to drive the filesystem's state machines quickly in unit tests.

It answers like glancefs.Client's public API (``client.images.list/get/...``) from records
in memory. What a server defines (HTTP, Glance's own rules) is tested against the real Glance in
tests/integration; this fake is for what glancefs decides: caching, ordering, failure handling.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import trio

from glancefs import Image, NotFound


def record(n: int, name: str | None = None, **fields: Any) -> dict[str, Any]:
    return {
        "id": f"{n:08x}-0000-4000-8000-000000000000",
        "name": f"image-{n}" if name is None else name,
        "status": "active",
        "size": n * 10,
        "updated_at": "2026-01-01T00:00:00Z",
        "tags": [],
        "os_distro": "x" * 100,
        **fields,
    }


class FakeImages:
    def __init__(self, records: list[dict[str, Any]]) -> None:
        self.records = records
        self.lists: list[dict[str, Any]] = []
        self.gets = 0
        #: When set: the listing stops after this many records until ``resume`` is set, then
        #: raises ``error`` if there is one (a second page that is slow, then fails).
        self.pause_after: int | None = None
        self.resume = trio.Event()
        self.error: Exception | None = None

    async def list(self, **query: Any) -> AsyncIterator[Image]:
        self.lists.append(query)
        for index, r in enumerate(self.records):
            if index == self.pause_after:
                await self.resume.wait()
                if self.error is not None:
                    raise self.error
            yield Image(r)

    async def get(self, image_id: str) -> Image:
        self.gets += 1
        for r in self.records:
            if r["id"] == image_id:
                return Image(r)
        raise NotFound(404, image_id)


class FakeClient:
    def __init__(self, records: list[dict[str, Any]]) -> None:
        self.images = FakeImages(records)
