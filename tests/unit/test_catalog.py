"""The catalog's listings and caches, against a fake client; statfs from quota usage."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from glancefs._exceptions import NotFound
from glancefs._images import Image
from glancefs.catalog import Catalog, Entry
from glancefs.config import MountConfig, View
from glancefs.fs import statvfs_of
from glancefs.namespace import BY_ID, ROOT


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

    async def list(self, **query: Any) -> AsyncIterator[Image]:
        self.lists.append(query)
        for r in self.records:
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


class Clock:
    now = 100.0

    def __call__(self) -> float:
        return self.now


def catalog(records: list[dict[str, Any]], **config: Any) -> tuple[Catalog, FakeClient, Clock]:
    client, clock = FakeClient(records), Clock()
    return Catalog(client, MountConfig(**config), clock=clock), client, clock  # type: ignore[arg-type]


async def test_listing_keeps_compact_entries_in_server_order() -> None:
    records = [record(3), record(1, "dup"), record(2, "dup"), record(4, status="deleted")]
    cat, client, _ = catalog(records, view=View(sort="size:desc", tags=("t",), limit=7))
    listing = await cat.listing(ROOT)
    assert client.images.lists == [{"sort": "size:desc", "filters": {"tag": ["t"]}, "limit": 7}]
    assert listing.names == ("image-3", "dup~00000001", "dup~00000002")
    assert all(type(entry) is Entry for entry in listing.entries)
    assert listing.by_name["image-3"].size == 30
    assert listing.entries[0].updated_ns == 1767225600 * 10**9


async def test_attributes_come_from_the_listing_until_the_metadata_ttl() -> None:
    cat, client, clock = catalog([record(1)], metadata_ttl=1.0)
    await cat.listing(BY_ID)
    image_id = record(1)["id"]
    assert (await cat.attributes(image_id)).size == 10
    assert client.images.gets == 0
    clock.now += 2
    assert (await cat.attributes(image_id)).size == 10
    assert client.images.gets == 1


async def test_listings_are_reused_for_the_listing_ttl_and_dropped_by_sighup() -> None:
    cat, client, clock = catalog([record(1)], listing_ttl=5.0)
    first = await cat.listing(ROOT)
    clock.now += 4
    assert await cat.listing(ROOT) is first
    cat.drop_all()
    assert await cat.listing(ROOT) is not first
    clock.now += 6
    await cat.listing(ROOT)
    assert len(client.images.lists) == 3


def test_statfs_without_limits_is_large_and_free() -> None:
    stats = statvfs_of({})
    assert stats.f_bsize == stats.f_frsize == 4096
    assert stats.f_blocks == stats.f_bfree == stats.f_bavail > 0
    assert stats.f_files == stats.f_ffree > 0
    assert statvfs_of({"image_size_total": {"limit": -1, "usage": 5}}).f_blocks == stats.f_blocks


def test_statfs_from_quota_usage() -> None:
    stats = statvfs_of(
        {
            "image_size_total": {"limit": 1000, "usage": 250},  # MiB
            "image_count_total": {"limit": 100, "usage": 7},
        }
    )
    assert stats.f_blocks == 1000 * 256
    assert stats.f_bfree == stats.f_bavail == 750 * 256
    assert (stats.f_files, stats.f_ffree) == (100, 93)
    over = statvfs_of({"image_size_total": {"limit": 10, "usage": 20}})
    assert over.f_bfree == 0
