"""A fake Glance client below FUSE, to drive the filesystem's state machines quickly in unit tests.

It answers like glancefs.Client's public API (``client.images.list/get/...``) from records
in memory. What a server defines (HTTP, Glance's own rules) is tested against the real Glance in
tests/integration; this fake is for what glancefs decides: caching, ordering, failure handling.
"""

from __future__ import annotations

import hashlib
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


class FakeGlance:
    """The write side of a fake Glance: records that change, data that is stored and hashed,
    and failures to inject (``fail[method] = error``, raised by every later call of it;
    ``hold_upload``: an upload waits for it after its first chunk, to catch a session mid-PUT).

    Enough of Glance's behaviour for the filesystem's state machines: ``create`` makes a queued
    image, ``upload`` stores the data and makes it active with its size and hashes, a PATCH
    replaces top-level fields, ``delete`` removes it. Never a substitute for the real one.
    """

    def __init__(self, records: list[dict[str, Any]] | None = None) -> None:
        self.images = FakeWritableImages(self, records if records is not None else [])
        self.image_tags = FakeTags(self)
        self.data: dict[str, bytes] = {}
        self.calls: list[tuple[str, str]] = []
        self.fail: dict[str, Exception] = {}
        self.hold_upload: trio.Event | None = None

    def record(self, image_id: str) -> dict[str, Any]:
        for r in self.images.records:
            if r["id"] == image_id:
                return r
        raise NotFound(404, image_id)

    def named(self, name: str) -> list[dict[str, Any]]:
        return [r for r in self.images.records if r.get("name") == name]

    def called(self, method: str, image_id: str) -> None:
        """Note a call; raise the failure injected for ``method``, if any."""
        self.calls.append((method, image_id))
        if method in self.fail:
            raise self.fail[method]


class FakeWritableImages(FakeImages):
    def __init__(self, glance: FakeGlance, records: list[dict[str, Any]]) -> None:
        super().__init__(records)
        self._glance = glance
        self._created = 0

    async def create(self, **fields: Any) -> Image:
        self._created += 1
        image_id = f"{self._created:08x}-1111-4000-8000-000000000000"
        self._glance.called("create", image_id)
        r = {"id": image_id, "status": "queued", "size": None, "tags": [], "checksum": None,
             "updated_at": "2026-01-01T00:00:00Z", "protected": False, **fields}  # fmt: skip
        self.records.append(r)
        return Image(dict(r))

    async def update(self, image_id: str, **changes: Any) -> Image:
        self._glance.called("update", image_id)
        self._glance.record(image_id).update(changes)
        return Image(dict(self._glance.record(image_id)))

    async def patch(self, image_id: str, operations: list[dict[str, Any]]) -> Image:
        self._glance.called("patch", image_id)
        r = self._glance.record(image_id)
        for op in operations:
            key = op["path"][1:].replace("~1", "/").replace("~0", "~")
            if op["op"] == "remove":
                r.pop(key, None)
            else:
                r[key] = op["value"]
        return Image(dict(r))

    async def upload(self, image_id: str, data: Any, size: int | None = None) -> None:
        self._glance.called("upload", image_id)
        r = self._glance.record(image_id)
        r["status"] = "saving"
        chunks = []
        async for chunk in data:
            chunks.append(chunk)
            if self._glance.hold_upload is not None:
                await self._glance.hold_upload.wait()
        body = b"".join(chunks)
        self._glance.data[image_id] = body
        r.update(status="active", size=len(body), os_hash_algo="sha512",
                 os_hash_value=hashlib.sha512(body).hexdigest(),
                 checksum=hashlib.md5(body).hexdigest())  # fmt: skip

    async def delete(self, image_id: str) -> None:
        self._glance.called("delete", image_id)
        self.records.remove(self._glance.record(image_id))


class FakeTags:
    def __init__(self, glance: FakeGlance) -> None:
        self._glance = glance

    async def update(self, image_id: str, tag: str) -> None:
        self._glance.called("tag", image_id)
        tags = self._glance.record(image_id)["tags"]
        if tag not in tags:
            tags.append(tag)

    async def delete(self, image_id: str, tag: str) -> None:
        self._glance.called("untag", image_id)
        self._glance.record(image_id)["tags"].remove(tag)
