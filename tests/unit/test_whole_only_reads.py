"""Reads of images whose store takes no ranges (Ceph RBD, Swift), below FUSE.

The fake client refuses every ranged download of a store named in ``stores_without_ranges``
with :class:`~glancefs.RangesRefused`, as Glance's rbd and swift drivers do (400).
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio
from fakes import DataFault, FakeClient, data_record

from glancefs import Image, IntegrityError
from glancefs.fs.read import ImageReader, Readers, ReadTuning
from glancefs.fs.refusals import TooLarge
from glancefs.fs.spool import SpoolSpace
from glancefs.fs.status import STATUS

MiB = 1024 * 1024
READ = 128 * 1024
FAST = ReadTuning(idle_release=0.05, slot_slice=0.05, stream_idle=0.05, failure_grace=0.2)


@dataclass
class Mount:
    readers: Readers
    client: FakeClient
    spool: SpoolSpace
    records: list[dict[str, object]]
    data: list[bytes]
    corrupt: list[IntegrityError] = field(default_factory=list)

    def open(self, index: int = 0) -> ImageReader:
        return self.readers.open(Image(self.records[index]))

    def gets(self, index: int = 0) -> list[tuple[int, int | None]]:
        image_id = self.records[index]["id"]
        return [(o, n) for i, o, n in self.client.images.data_gets if i == image_id]

    def downloads(self, index: int = 0) -> list[tuple[int, int | None]]:
        """The requests Glance answered with data: the refused ranged ones left out."""
        return [(o, n) for o, n in self.gets(index) if (o, n) == (0, None)]


@asynccontextmanager
async def mount(
    tmp_path: Path, *sizes: int, spool_size: int = 64 * MiB, store: str = "ceph"
) -> AsyncIterator[Mount]:
    rng = random.Random(sum(sizes))
    payloads = [rng.randbytes(size) for size in sizes]
    records = [data_record(n + 1, p, stores=store) for n, p in enumerate(payloads)]
    client = FakeClient(
        records, data={str(r["id"]): p for r, p in zip(records, payloads, strict=True)}
    )
    client.images.stores_without_ranges.add("ceph")
    spool = SpoolSpace(tmp_path / "spool", spool_size)
    async with trio.open_nursery() as nursery:
        state: Mount
        readers = Readers(
            client,
            nursery,
            lambda image_id, error: state.corrupt.append(error),
            tuning=FAST,
            spool=spool,
        )
        state = Mount(readers, client, spool, records, payloads)
        with trio.fail_after(60):
            yield state
        nursery.cancel_scope.cancel()


async def read_all(reader: ImageReader, offset: int = 0) -> bytes:
    parts: list[bytes] = []
    while data := await reader.read(offset, READ):
        parts.append(data)
        offset += len(data)
    return b"".join(parts)


async def test_a_tail_read_waits_for_the_one_download_from_the_start(tmp_path: Path) -> None:
    async with mount(tmp_path, 3 * MiB + 17) as m:
        spooled_before = STATUS.spool_bytes
        reader = m.open()
        size = len(m.data[0])
        assert await reader.read(size - 4096, 4096) == m.data[0][-4096:]
        assert STATUS.spool_bytes - spooled_before == size  # the whole image, once
        assert await read_all(reader, 1000) == m.data[0][1000:]  # dd skip=: from the spool
        assert m.downloads() == [(0, None)]  # one download, no range
        await m.readers.release(reader)
        assert m.spool.used == 0  # freed with the last file
        assert STATUS.spool_bytes == spooled_before
        assert not m.corrupt


async def test_the_store_is_learnt_from_the_first_refusal(tmp_path: Path) -> None:
    async with mount(tmp_path, MiB, MiB, store="unknown-yet") as m:
        m.client.images.stores_without_ranges.add("unknown-yet")
        first = m.open(0)
        assert await first.read(MiB // 2, 4096) == m.data[0][MiB // 2 : MiB // 2 + 4096]
        assert m.gets(0) == [(MiB // 2, 262144), (0, None)]  # the refused block, the download
        second = m.open(1)
        assert await second.read(MiB // 2, 4096) == m.data[1][MiB // 2 : MiB // 2 + 4096]
        assert m.gets(1) == [(0, None)]  # never asked for a range again
        for reader in (first, second):
            await m.readers.release(reader)


async def test_two_readers_at_different_offsets_share_one_download(tmp_path: Path) -> None:
    async with mount(tmp_path, 6 * MiB) as m:
        one, two = m.open(), m.open()
        results: dict[str, bytes] = {}

        async def read(name: str, reader: ImageReader, offset: int) -> None:
            results[name] = await read_all(reader, offset)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read, "one", one, MiB)
            nursery.start_soon(read, "two", two, 5 * MiB)
        assert results == {"one": m.data[0][MiB:], "two": m.data[0][5 * MiB :]}
        assert m.downloads() == [(0, None)]
        rng = random.Random(3)
        for _ in range(50):  # random 4 KiB reads once the download passed: the spool alone
            offset = rng.randrange(0, 6 * MiB - 4096)
            assert await one.read(offset, 4096) == m.data[0][offset : offset + 4096]
        assert m.downloads() == [(0, None)]
        for reader in (one, two):
            await m.readers.release(reader)


async def test_a_sequential_reader_from_the_start_needs_no_spool(tmp_path: Path) -> None:
    async with mount(tmp_path, 4 * MiB) as m:
        reader = m.open()
        offset = 0
        while data := await reader.read(offset, READ):
            assert m.spool.used == 0
            assert data == m.data[0][offset : offset + len(data)]
            offset += len(data)
        assert offset == 4 * MiB
        assert m.gets() == [(0, None)]
        await m.readers.release(reader)


async def test_an_image_larger_than_the_spool_is_refused_where_it_needs_it(
    tmp_path: Path,
) -> None:
    async with mount(tmp_path, 4 * MiB, spool_size=2 * MiB) as m:
        reader = m.open()
        with pytest.raises(TooLarge):
            await reader.read(3 * MiB, 4096)
        assert await read_all(reader) == m.data[0]  # from the start: no spool needed
        await m.readers.release(reader)


async def test_a_broken_download_starts_over_and_skips_what_it_had(tmp_path: Path) -> None:
    async with mount(tmp_path, 4 * MiB) as m:
        m.client.images.faults.append(DataFault("reset", at=3 * MiB))
        reader = m.open()
        assert await reader.read(3 * MiB + 5, 4096) == m.data[0][3 * MiB + 5 : 3 * MiB + 4101]
        assert await read_all(reader) == m.data[0]
        assert m.downloads() == [(0, None), (0, None)]
        assert not m.corrupt
        await m.readers.release(reader)


async def test_a_flipped_byte_fails_the_pass_and_the_next_open_reads_exact(
    tmp_path: Path,
) -> None:
    async with mount(tmp_path, 2 * MiB) as m:
        m.client.images.faults.append(DataFault("flip", at=MiB + 3))
        reader = m.open()
        with pytest.raises(IntegrityError):
            await read_all(reader, MiB)
        await m.readers.release(reader)
        reader = m.open()
        assert await read_all(reader, MiB) == m.data[0][MiB:]
        await m.readers.release(reader)
        assert len(m.corrupt) == 1


async def test_a_second_whole_read_of_one_open_file_comes_from_the_spool(tmp_path: Path) -> None:
    async with mount(tmp_path, 3 * MiB + 1) as m:
        reader = m.open()
        size = len(m.data[0])
        assert await reader.read(size - 10, 10) == m.data[0][-10:]
        for _ in range(2):
            assert await read_all(reader) == m.data[0]
        assert m.downloads() == [(0, None)]
        assert not m.corrupt
        await m.readers.release(reader)
