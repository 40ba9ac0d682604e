"""The read path through the persistent cache, below FUSE (glancefs/fs/cached.py and the feed).

A real cache directory, the fake client's ``open_data`` (tests/fakes.py) with its faults, and
"remounts" made of a new cache and a new ``Readers`` on the same directory.
"""

from __future__ import annotations

import dataclasses
import random
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from fakes import DataFault, FakeClient

from glancefs import Image, IntegrityError
from glancefs.fs import cache as cache_module
from glancefs.fs.cache import DataCache
from glancefs.fs.read import ImageReader, Readers, ReadTuning
from glancefs.fs.status import STATUS

MiB = 1024 * 1024
READ = 128 * 1024
FAST = ReadTuning(idle_release=0.05, slot_slice=0.05, stream_idle=0.05)


@dataclass
class Mount:
    readers: Readers
    cache: DataCache
    client: FakeClient
    records: list[dict[str, Any]]
    data: list[bytes]
    corrupt: list[tuple[str, IntegrityError]] = field(default_factory=list)

    def open(self, index: int = 0) -> ImageReader:
        return self.readers.open(Image(self.records[index]))

    def gets(self) -> list[tuple[str, int, int | None]]:
        return self.client.images.data_gets

    def entry_dir(self, index: int = 0) -> Path:
        return self.cache.directory / "v1" / f"sha512-{self.records[index]['os_hash_value']}"


def images(*sizes: int, seed: int = 1) -> list[bytes]:
    rng = random.Random(seed)
    return [rng.randbytes(size) for size in sizes]


@asynccontextmanager
async def mount(
    directory: Path,
    payloads: list[bytes],
    *,
    max_bytes: int = 64 * MiB,
    tuning: ReadTuning = FAST,
    **options: Any,
) -> AsyncIterator[Mount]:
    client, records, _ = FakeClient.serving(payloads)
    with DataCache.open(directory, max_bytes) as cache:
        async with trio.open_nursery() as nursery:
            state: Mount
            readers = Readers(
                client,
                nursery,
                lambda image_id, error: state.corrupt.append((image_id, error)),
                tuning=tuning,
                cache=cache,
                **options,
            )
            state = Mount(readers, cache, client, records, payloads)
            with trio.fail_after(60):
                yield state
            nursery.cancel_scope.cancel()


async def read_all(reader: ImageReader) -> bytes:
    parts, offset = [], 0
    while data := await reader.read(offset, READ):
        parts.append(data)
        offset += len(data)
    return b"".join(parts)


async def wait_until(condition: Callable[[], bool]) -> None:
    """Background work (storing, hashing in worker threads) has no event to wait on from
    outside: poll it (``wait_all_tasks_blocked`` does not wait for threads)."""
    while not condition():  # noqa: ASYNC110
        await trio.sleep(0.01)


async def read_and_close(m: Mount, index: int = 0) -> bytes:
    reader = m.open(index)
    try:
        return await read_all(reader)
    finally:
        await m.readers.release(reader)


class TestWholeReads:
    async def test_a_remount_reads_from_the_cache_alone(self, tmp_path: Path) -> None:
        payloads = images(5 * MiB + 17)
        async with mount(tmp_path, payloads) as m:
            assert await read_and_close(m) == payloads[0]
            assert len(m.gets()) == 1
            await wait_until(lambda: (m.entry_dir() / "verified").exists())
        async with mount(tmp_path, payloads) as m:
            reader = m.open()
            assert await read_all(reader) == payloads[0]
            assert m.gets() == []
            assert reader.feed.clean
            assert not m.corrupt
            await m.readers.release(reader)
            assert m.readers.keeps_cache(m.records[0]["id"])
            stats = m.cache.stats()  # one disk read per block, read ahead of the reader
            assert (stats.hits, stats.hit_bytes, stats.misses) == (6, len(payloads[0]), 0)

    async def test_a_reader_with_reads_out_of_order_reads_each_block_once(
        self, tmp_path: Path
    ) -> None:
        """qemu-img convert (8 reads of 2 MiB in flight) and the kernel's readahead send a
        sequential reader's 1 MiB reads out of order and across block boundaries: still one
        whole-block disk read per block, not one read of the pieces per request."""
        payloads = images(40 * MiB + 5)
        async with mount(tmp_path, payloads) as m:
            assert await read_and_close(m) == payloads[0]
            await wait_until(lambda: (m.entry_dir() / "verified").exists())
        async with mount(tmp_path, payloads) as m:
            reader = m.open()
            head = 320 * 1024  # qcow2's data starts after its metadata: reads straddle blocks
            offsets = [head + n * MiB for n in range(39)]
            rng = random.Random(4)
            for start in range(0, len(offsets), 8):  # scrambled within 8 MiB windows
                window = offsets[start : start + 8]
                rng.shuffle(window)
                for offset in window:
                    data = await reader.read(offset, MiB)
                    assert data == payloads[0][offset : offset + MiB]
            await m.readers.release(reader)
            stats = m.cache.stats()
            assert m.gets() == []
            assert stats.misses == 0
            assert stats.hits <= 41, stats  # 41 blocks, each read once (plus reads ahead)

    async def test_images_with_the_same_data_share_one_entry(self, tmp_path: Path) -> None:
        payload = images(3 * MiB)[0]
        async with mount(tmp_path, [payload, payload]) as m:
            assert await read_and_close(m, 0) == payload
            await wait_until(lambda: (m.entry_dir(0) / "verified").exists())
            assert await read_and_close(m, 1) == payload
            assert [get[0] for get in m.gets()] == [m.records[0]["id"]]

    async def test_a_corrupt_download_is_not_kept(self, tmp_path: Path) -> None:
        payloads = images(4 * MiB)
        async with mount(tmp_path, payloads) as m:
            m.client.images.faults.append(DataFault("flip", at=2 * MiB + 3))
            reader = m.open()
            with pytest.raises(IntegrityError):
                await read_all(reader)
            await m.readers.release(reader)
            # A block being written when the entry was dropped is counted until its writer
            # sees the entry gone and deletes it.
            await wait_until(
                lambda: not list(m.entry_dir().glob("*.blk")) and m.cache.stats().bytes == 0
            )
            assert len(m.corrupt) == 1
            m.readers.reset()  # SIGHUP
            assert await read_and_close(m) == payloads[0]
            await wait_until(lambda: (m.entry_dir() / "verified").exists())

    async def test_a_complete_entry_is_hashed_by_the_first_verifying_read(
        self, tmp_path: Path
    ) -> None:
        payloads = images(3 * MiB + 1)
        async with mount(tmp_path, payloads, verify=False) as m:
            assert await read_and_close(m) == payloads[0]
            await wait_until(lambda: len(list(m.entry_dir().glob("*.blk"))) == 4)
            assert not (m.entry_dir() / "verified").exists()  # --no-verify hashes nothing
        async with mount(tmp_path, payloads) as m:
            reader = m.open()
            assert await reader.read(MiB, 10) == payloads[0][MiB : MiB + 10]
            assert (m.entry_dir() / "verified").exists()
            assert m.gets() == []
            assert await read_all(reader) == payloads[0]
            assert reader.feed.clean
            await m.readers.release(reader)

    async def test_what_is_not_cached(self, tmp_path: Path) -> None:
        payloads = images(2 * MiB, 2 * MiB, 70 * MiB)
        async with mount(tmp_path, payloads) as m:
            del m.records[0]["os_hash_algo"]
            m.records[1]["status"] = "deactivated"
            for index in range(3):  # no multihash, not active, larger than the cache
                assert await read_and_close(m, index) == payloads[index]
            assert list((tmp_path / "v1").iterdir()) == []

    async def test_blocks_waiting_for_the_disk_are_stored_after_the_file_closes(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A slow disk: the download holds whole blocks that wait for a write while the reader
        (served from memory) finishes and closes the file. They are still stored, so the entry
        completes and is hashed; lost, it would stay partial until some later read."""
        gate = threading.Event()
        write_block_file = cache_module._write_block_file

        def slow_write(*args: Any) -> int | None:
            gate.wait()
            return write_block_file(*args)

        monkeypatch.setattr(cache_module, "_write_block_file", slow_write)
        payloads = images(3 * MiB + 5)
        one_write = dataclasses.replace(FAST, cache_writes_in_flight=1)
        async with mount(tmp_path, payloads, tuning=one_write) as m:
            reader = m.open()
            for offset in range(0, 3 * MiB // 2, READ):  # the download runs ahead to block 2
                assert await reader.read(offset, READ) == payloads[0][offset : offset + READ]
            await trio.testing.wait_all_tasks_blocked()  # block 0 written, block 1 waiting
            await m.readers.release(reader)
            gate.set()
            with trio.move_on_after(10):
                await wait_until(lambda: (m.entry_dir() / "1.blk").exists())
            assert (m.entry_dir() / "1.blk").exists()


class TestVerifiedEntries:
    async def fill(self, directory: Path, payloads: list[bytes]) -> None:
        async with mount(directory, payloads) as m:
            assert await read_and_close(m) == payloads[0]
            await wait_until(lambda: (m.entry_dir() / "verified").exists())

    async def test_a_damaged_block_is_fetched_alone_and_checked(self, tmp_path: Path) -> None:
        payloads = images(4 * MiB + 5)
        await self.fill(tmp_path, payloads)
        async with mount(tmp_path, payloads) as m:
            block = m.entry_dir() / "2.blk"
            raw = bytearray(block.read_bytes())
            raw[5000] ^= 1
            block.write_bytes(raw)
            reader = m.open()
            assert await read_all(reader) == payloads[0]
            assert m.gets() == [(m.records[0]["id"], 2 * MiB, MiB)]
            assert reader.feed.clean
            await m.readers.release(reader)

    async def test_a_block_glance_sends_otherwise_than_verified_is_corrupt(
        self, tmp_path: Path
    ) -> None:
        payloads = images(4 * MiB + 5)
        await self.fill(tmp_path, payloads)
        async with mount(tmp_path, payloads) as m:
            (m.entry_dir() / "1.blk").unlink()
            m.client.images.faults.append(DataFault("flip", at=MiB + 77))
            reader = m.open()
            assert await reader.read(0, READ) == payloads[0][:READ]
            with pytest.raises(IntegrityError, match="block 1 from Glance differs"):
                await reader.read(MiB, READ)
            with pytest.raises(IntegrityError):  # sticky
                await reader.read(0, READ)
            assert len(m.corrupt) == 1
            await m.readers.release(reader)
            assert (m.entry_dir() / "verified").exists()  # the entry was right all along
            m.readers.reset()
            assert await read_and_close(m) == payloads[0]
            assert m.cache.stats().mismatched_blocks == 0  # the flipped block was not offered


class TestRandomReads:
    async def test_random_reads_fetch_and_keep_whole_blocks(self, tmp_path: Path) -> None:
        payloads = images(8 * MiB)
        async with mount(tmp_path, payloads) as m:
            reader = m.open()
            offset = 5 * MiB + MiB // 2
            assert await reader.read(offset, 4096) == payloads[0][offset : offset + 4096]
            assert m.gets() == [(m.records[0]["id"], 5 * MiB, MiB)]
            await wait_until(lambda: (m.entry_dir() / "5.blk").exists())
            assert await reader.read(offset - 4096, 4096) == payloads[0][offset - 4096 : offset]
            assert len(m.gets()) == 1
            await m.readers.release(reader)
        async with mount(tmp_path, payloads) as m:
            reader = m.open()
            assert await reader.read(offset, 4096) == payloads[0][offset : offset + 4096]
            assert m.gets() == []
            await m.readers.release(reader)

    async def test_cache_fill_completes_and_verifies_the_image(self, tmp_path: Path) -> None:
        payloads = images(40 * MiB + 3)
        received_before = STATUS.bytes_moved["read"]
        async with mount(tmp_path, payloads, cache_fill=True) as m:
            reader = m.open()
            assert await reader.read(30 * MiB, 4096) == payloads[0][30 * MiB : 30 * MiB + 4096]
            await wait_until(lambda: (m.entry_dir() / "verified").exists())
            image_id = m.records[0]["id"]
            assert m.gets()[0] == (image_id, 30 * MiB, MiB)
            # Then runs of missing blocks, 16 MiB at most per request.
            assert m.gets()[1:] == [(image_id, 0, 16 * MiB), (image_id, 16 * MiB, 14 * MiB),
                                    (image_id, 31 * MiB, 9 * MiB + 3)]  # fmt: skip
            await m.readers.release(reader)
        # Every byte fetched for the cache, by the read and by the fill, counts in
        # glancefs_read_bytes_total.
        assert STATUS.bytes_moved["read"] - received_before == 40 * MiB + 3
        async with mount(tmp_path, payloads) as m:
            assert await read_and_close(m) == payloads[0]
            assert m.gets() == []

    async def test_cache_fill_stops_with_the_last_file(self, tmp_path: Path) -> None:
        payloads = images(40 * MiB)
        async with mount(tmp_path, payloads, cache_fill=True) as m:
            m.client.images.chunk_delay = 0.001
            reader = m.open()
            await reader.read(20 * MiB, 4096)
            await wait_until(lambda: len(m.gets()) == 2)
            await m.readers.release(reader)
            await wait_until(lambda: m.client.images.open_streams[m.records[0]["id"]] == 0)
            assert len(m.gets()) == 2
            assert not (m.entry_dir() / "verified").exists()
