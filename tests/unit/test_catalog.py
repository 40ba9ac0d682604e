"""The catalog's listings and caches, against a fake client; statfs from quota usage."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing
from fakes import FakeClient, record

from glancefs import Image, ServiceUnavailable
from glancefs.fs.catalog import Catalog, Entry
from glancefs.fs.config import MountConfig, View
from glancefs.fs.namespace import BY_ID, ROOT


class Clock:
    now = 100.0

    def __call__(self) -> float:
        return self.now


@asynccontextmanager
async def catalog(
    records: list[dict[str, Any]], **config: Any
) -> AsyncIterator[tuple[Catalog, FakeClient, Clock]]:
    client, clock = FakeClient(records), Clock()
    async with trio.open_nursery() as nursery:
        yield Catalog(client, MountConfig(**config), nursery, clock), client, clock


async def test_listing_keeps_compact_entries_in_server_order() -> None:
    records = [record(3), record(1, "dup"), record(2, "dup"), record(4, status="deleted")]
    async with catalog(records, view=View(sort="size:desc", tags=("t",), limit=7)) as (
        cat,
        client,
        _,
    ):
        listing = await cat.listing(ROOT)
        assert client.images.lists == [{"sort": "size:desc", "filters": {"tag": ["t"]}, "limit": 7}]
        assert listing.names == ["image-3", "dup~00000001", "dup~00000002"]
        assert all(type(entry) is Entry for entry in listing.entries)
        assert listing.by_name["image-3"].size == 30
        assert listing.entries[0].updated_ns == 1767225600 * 10**9


async def test_attributes_come_from_the_listing_until_the_metadata_ttl() -> None:
    async with catalog([record(1)], metadata_ttl=1.0) as (cat, client, clock):
        await cat.listing(BY_ID)
        image_id = record(1)["id"]
        assert (await cat.attributes(image_id)).size == 10
        assert client.images.gets == 0
        clock.now += 2
        assert (await cat.attributes(image_id)).size == 10
        assert client.images.gets == 1


async def test_listings_are_reused_for_the_listing_ttl_and_dropped_by_sighup() -> None:
    async with catalog([record(1)], listing_ttl=5.0) as (cat, client, clock):
        first = await cat.listing(ROOT)
        clock.now += 4
        assert await cat.listing(ROOT) is first
        cat.drop_all()
        assert await cat.listing(ROOT) is not first
        clock.now += 6
        await cat.listing(ROOT)
        assert len(client.images.lists) == 3


async def test_the_listing_ttl_runs_from_the_end_of_the_fetch() -> None:
    async with catalog([record(n) for n in range(1, 4)], listing_ttl=5.0) as (cat, client, clock):
        client.images.pause_after = 2
        listing = cat.open_listing(ROOT)
        await listing.names_beyond(0)
        clock.now += 60  # a long listing
        client.images.resume.set()
        await listing.wait_complete()
        clock.now += 4
        assert cat.open_listing(ROOT) is listing
        clock.now += 2
        assert cat.open_listing(ROOT) is not listing


async def test_names_reach_readers_before_the_listing_ends() -> None:
    records = [record(n) for n in range(1, 6)]
    async with catalog(records) as (cat, client, _):
        client.images.pause_after = 3
        listing = cat.open_listing(ROOT)
        assert await listing.names_beyond(0)
        # image-3 waits: another image-3 could start the next page.
        assert (listing.names, listing.complete) == (["image-1", "image-2"], False)
        assert cat.open_listing(ROOT) is listing  # one fetch, shared
        found = await listing.find("image-2")  # a final name: no wait for the rest
        assert found is not None
        assert found.size == 20
        client.images.resume.set()
        await listing.wait_complete()
        assert listing.names == [f"image-{n}" for n in range(1, 6)]
        assert not await listing.names_beyond(5)


async def test_a_failed_listing_raises_for_its_readers_and_is_not_kept() -> None:
    async with catalog([record(n) for n in range(1, 6)]) as (cat, client, _):
        client.images.pause_after = 3
        client.images.error = ServiceUnavailable(503, "Glance is down")
        listing = cat.open_listing(ROOT)
        assert await listing.names_beyond(0)
        client.images.resume.set()
        with pytest.raises(ServiceUnavailable):
            await listing.names_beyond(2)
        client.images.pause_after = None
        assert (await cat.listing(ROOT)).names[-1] == "image-5"


async def test_a_record_fetched_across_a_change_is_not_kept() -> None:
    """A GET that started before glancefs changed the image (setfattr) and ended after it
    carries the old record: its caller gets it, the cache does not keep it."""
    records = [record(1, os_distro="old")]
    async with catalog(records) as (cat, client, _):
        image_id = records[0]["id"]
        answered = trio.Event()
        real_get = client.images.get

        async def slow_get(wanted: str) -> Image:
            image = await real_get(wanted)
            await answered.wait()
            return image

        client.images.get = slow_get  # type: ignore[assignment]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(cat.image, image_id)
            await trio.testing.wait_all_tasks_blocked()
            records[0]["os_distro"] = "new"  # the change, made by another request
            cat.invalidate(image_id)
            answered.set()
        client.images.get = real_get  # type: ignore[method-assign]
        assert (await cat.image(image_id))["os_distro"] == "new"
