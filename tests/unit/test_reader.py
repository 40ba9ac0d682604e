"""The read path below FUSE: shared per-image feeds, verification, the connection budget.

Driven with the fake client's ``open_data`` (tests/fakes.py), whose responses can break, flip a
byte or pause at a chosen image offset.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
import trio
import trio.testing
from fakes import DataFault, FakeClient

from glancefs import ConnectError, IntegrityError
from glancefs.fs.read import ImageReader, Readers, ReadTuning
from glancefs.plumbing import ConnectionBudget

MiB = 1024 * 1024
READ = 128 * 1024  # the kernel's FUSE read size here (any will do)
FAST = ReadTuning(idle_release=0.05, slot_slice=0.05, stream_idle=0.05, failure_grace=0.2)


@dataclass
class Mount:
    readers: Readers
    client: FakeClient
    images: list[dict[str, Any]]
    data: dict[str, bytes]
    #: (image id, error) for every mismatch reported.
    corrupt: list[tuple[str, IntegrityError]] = field(default_factory=list)

    def open(self, index: int = 0) -> ImageReader:
        return self.readers.open(_image(self.images[index]))

    def gets(self, index: int = 0) -> list[tuple[str, int, int | None]]:
        image_id = self.images[index]["id"]
        return [get for get in self.client.images.data_gets if get[0] == image_id]


def _image(record: dict[str, Any]) -> Any:
    from glancefs import Image

    return Image(record)


@asynccontextmanager
async def mount(
    *sizes: int,
    max_connections: int = 8,
    retries: int = 1,
    tuning: ReadTuning = FAST,
    **options: Any,
) -> AsyncIterator[Mount]:
    rng = random.Random(sum(sizes))
    payloads = [rng.randbytes(size) for size in sizes]
    client, records, data = FakeClient.serving(
        payloads, max_connections=max_connections, retries=retries
    )
    async with trio.open_nursery() as nursery:
        state: Mount
        readers = Readers(
            client,
            nursery,
            lambda image_id, error: state.corrupt.append((image_id, error)),
            tuning=tuning,
            **options,
        )
        state = Mount(readers, client, records, data)
        with trio.fail_after(60):
            yield state
        nursery.cancel_scope.cancel()


async def read_all(reader: ImageReader, offset: int = 0, pause_at: int | None = None) -> bytes:
    """Read like cat: READ-sized reads from ``offset`` until one returns nothing."""
    parts: list[bytes] = []
    while True:
        if pause_at is not None and offset >= pause_at:
            await trio.sleep(0.3)  # longer than idle_release: the stream gives its slot back
            pause_at = None
        data = await reader.read(offset, READ)
        if not data:
            return b"".join(parts)
        parts.append(data)
        offset += len(data)


async def test_a_sequential_read_is_one_verified_stream() -> None:
    async with mount(5 * MiB + 17) as m:
        reader = m.open()
        assert await read_all(reader) == m.data[m.images[0]["id"]]
        assert m.gets() == [(m.images[0]["id"], 0, None)]
        assert reader.feed.clean
        assert not m.corrupt
        await m.readers.release(reader)
        assert m.readers.keeps_cache(m.images[0]["id"])


async def test_pages_of_unverified_data_are_dropped_at_the_next_open() -> None:
    async with mount(3 * MiB) as m:
        image_id = m.images[0]["id"]
        assert not m.readers.keeps_cache(image_id)  # nothing known: drop what may be cached
        seeker = m.open()
        assert m.readers.keeps_cache(image_id)  # while open: only what this feed served
        await seeker.read(MiB, 4096)
        await m.readers.release(seeker)
        assert not m.readers.keeps_cache(image_id)  # it served unverified bytes


async def test_a_broken_download_resumes_at_its_offset_and_the_hash_continues() -> None:
    async with mount(4 * MiB, retries=2) as m:
        m.client.images.faults.append(DataFault("reset", at=MiB + 5, times=2))
        reader = m.open()
        assert await read_all(reader) == m.data[m.images[0]["id"]]
        assert [offset for _, offset, _ in m.gets()] == [0, MiB + 5, MiB + 5]
        assert reader.feed.clean
        assert not m.corrupt


async def test_a_download_that_keeps_breaking_fails_the_read_after_the_retries() -> None:
    async with mount(4 * MiB, retries=1) as m:
        m.client.images.faults.append(DataFault("reset", at=MiB + 5, times=2))
        reader = m.open()
        with pytest.raises(ConnectError):
            await reader.read(0, 2 * MiB)  # waits where the download breaks
        assert [offset for _, offset, _ in m.gets()] == [0, MiB + 5]
        # The kernel retries a failed readahead page at once: that read fails at once too.
        with pytest.raises(ConnectError):
            await reader.read(MiB, READ)
        assert len(m.gets()) == 2
        await trio.sleep(FAST.failure_grace)
        # The next read starts again where the data is missing; reading all of it verifies.
        assert await read_all(reader, MiB) == m.data[m.images[0]["id"]][MiB:]
        assert await read_all(reader) == m.data[m.images[0]["id"]]
        assert reader.feed.clean
        assert not m.corrupt


async def test_a_flipped_byte_fails_the_end_of_a_read_in_step() -> None:
    async with mount(4 * MiB) as m:
        m.client.images.faults.append(DataFault("flip", at=3 * MiB + 1))
        reader = m.open()
        with pytest.raises(IntegrityError, match="sha512"):
            await read_all(reader)
        ((image_id, error),) = m.corrupt
        assert image_id == m.images[0]["id"]
        assert "corrupt" in str(error)
        with pytest.raises(IntegrityError):  # sticky: every later read
            await reader.read(0, READ)


async def test_a_paused_reader_gives_the_connection_back_and_still_gets_the_mismatch() -> None:
    async with mount(16 * MiB) as m:
        reader = m.open()
        head = await reader.read(0, 2 * MiB)
        # The window fills, then the stream lets go (the budget has no event to wait on).
        while m.client.connections.in_use:  # noqa: ASYNC110
            await trio.sleep(0.01)
        buffered_to = m.gets()[0][1]
        # The flip is in the response that resumes the stream.
        m.client.images.faults.append(DataFault("flip", at=12 * MiB))
        with pytest.raises(IntegrityError, match="sha512"):
            await read_all(reader, len(head))
        assert buffered_to == 0
        assert [get[1] > 2 * MiB for get in m.gets()] == [False, True]
        assert len(m.corrupt) == 1


async def test_four_readers_of_one_image_share_one_stream_and_all_fail_on_a_flip() -> None:
    async with mount(6 * MiB, 3 * MiB) as m:
        image_id = m.images[0]["id"]
        readers = [m.open() for _ in range(4)]
        results: list[bytes | Exception] = [b""] * 4

        async def run(index: int) -> None:
            try:
                results[index] = await read_all(readers[index], pause_at=None)
            except IntegrityError as error:
                results[index] = error

        async with trio.open_nursery() as nursery:
            for index in range(4):
                nursery.start_soon(run, index)
        assert results == [m.data[image_id]] * 4
        assert m.client.images.peak_streams[image_id] == 1
        assert len(m.gets()) == 1

        m.client.images.faults.append(DataFault("flip", image_id=m.images[1]["id"]))
        others = [m.open(1) for _ in range(4)]
        async with trio.open_nursery() as nursery:
            for index in range(4):
                readers[index] = others[index]
                nursery.start_soon(run, index)
        assert all(isinstance(result, IntegrityError) for result in results)
        assert len(m.corrupt) == 1
        assert m.client.images.peak_streams[m.images[1]["id"]] == 1


async def test_a_mismatch_fails_the_files_open_and_the_next_open_reads_afresh() -> None:
    """A byte flipped on the wire: every file open during the bad pass fails, with no SIGHUP
    the next open starts a new download and a new hash and reads exact."""
    async with mount(2 * MiB) as m:
        m.client.images.faults.append(DataFault("flip", at=10))
        first, second = m.open(), m.open()
        assert len(await second.read(0, READ)) == READ  # served the flipped byte
        with pytest.raises(IntegrityError):
            await read_all(first)
        with pytest.raises(IntegrityError):
            await second.read(READ, READ)
        third = m.open()  # while the bad pass's files are still open
        assert await read_all(third) == m.data[m.images[0]["id"]]
        for reader in (first, second, third):
            await m.readers.release(reader)
        assert len(m.corrupt) == 1
        assert len(m.gets()) == 2


async def test_two_bad_passes_in_a_row_stick_until_reset() -> None:
    async with mount(2 * MiB) as m:
        m.client.images.faults.append(DataFault("flip", at=10, times=2))
        for _ in range(2):
            reader = m.open()
            with pytest.raises(IntegrityError):
                await read_all(reader)
            await m.readers.release(reader)
        sticky = m.open()
        with pytest.raises(IntegrityError):
            await sticky.read(0, READ)
        assert len(m.gets()) == 2  # the sticky image asks Glance nothing
        m.readers.reset()  # SIGHUP; the fault is used up
        assert await read_all(sticky) == m.data[m.images[0]["id"]]
        await m.readers.release(sticky)
        assert len(m.corrupt) == 2


async def test_a_reader_that_reads_twice_is_verified_twice() -> None:
    async with mount(12 * MiB) as m:
        reader = m.open()
        assert await read_all(reader) == m.data[m.images[0]["id"]]
        assert [get[1:] for get in m.gets()] == [(0, None)]  # one stream
        # The second read is served by a new download (no page cache below FUSE), or from what
        # the first one still buffers: a flip in it is found by a new pass from 0 that runs
        # along. (How many requests that takes depends on how far the hash lagged the first
        # read: under load a block may be fetched and a paused download resumed on the way.)
        m.client.images.faults.append(DataFault("flip", at=2 * MiB))
        with pytest.raises(IntegrityError):
            await read_all(reader)
        assert (0, None) in [get[1:] for get in m.gets()[1:]], m.gets()


@pytest.mark.parametrize("flip_in", [None, "served", "hashed"])
async def test_a_stream_ahead_of_the_hash_leaves_a_gap_that_is_filled(
    flip_in: str | None,
) -> None:
    """The tail is read first (a stream starting ahead of the hash, checked by crc32), then the
    head: the read that serves the head's last bytes completes the image, so it waits while the
    hash fills the gap and passes the tail (the tail's pages are in the page cache by then, so
    no read of the end would ask)."""
    async with mount(4 * MiB) as m:
        image_id, half = m.images[0]["id"], 2 * MiB
        if flip_in == "served":  # the first response that covers 3 MiB: the tail's stream
            m.client.images.faults.append(DataFault("flip", at=3 * MiB))
        if flip_in == "hashed":  # the stream from 0 that fills the gap and hashes the tail
            m.client.images.faults.append(DataFault("flip", at=3 * MiB, response_start=0))
        tail_reader, head_reader = m.open(), m.open()
        tail = await read_all(tail_reader, half)  # no verdict: the head was never served
        assert len(tail) == half

        async def read_head() -> bytes:
            head = b""
            while len(head) < half:
                head += await head_reader.read(len(head), READ)
            return head

        if flip_in is None:
            assert await read_head() + tail == m.data[image_id]
            assert tail_reader.feed.clean
            assert not m.corrupt
        else:
            with pytest.raises(IntegrityError, match="crc32"):
                await read_head()
            assert len(m.corrupt) == 1
            with pytest.raises(IntegrityError):
                await tail_reader.read(4 * MiB - READ, READ)


async def test_readahead_out_of_order_cannot_take_the_end_before_the_verdict() -> None:
    """The kernel reads a file ahead with several reads at once, which may complete in any
    order: the one that reaches the end may finish while reads before it are still waiting (its
    page is cached, and the kernel answers end of file itself). The read that serves the last
    bytes no read had still waits for the verdict, so the reader gets EIO, not the flipped byte.
    """
    size = 4 * MiB
    async with mount(size) as m:
        m.client.images.faults.append(DataFault("flip", at=size - 3 * READ + 7))
        reader = m.open()
        head = size - 4 * READ
        assert len(await reader.read(0, head)) == head
        # The end first: not all served yet, so no verdict; its page is cached.
        assert len(await reader.read(size - READ, READ)) == READ
        assert len(await reader.read(head, READ)) == READ
        assert len(await reader.read(head + READ, READ)) == READ
        with pytest.raises(IntegrityError, match="sha512"):  # the last bytes nobody was served
            await reader.read(head + 2 * READ, READ)
        assert len(m.corrupt) == 1


async def test_random_reads_are_checked_when_the_hash_passes_them() -> None:
    async with mount(3 * MiB) as m:
        m.client.images.faults.append(DataFault("flip", at=MiB + 100))
        seeker, cat = m.open(), m.open()
        assert len(await seeker.read(MiB, 4096)) == 4096  # a block GET, with the flip
        assert not m.corrupt
        with pytest.raises(IntegrityError, match="crc32"):
            await read_all(cat)


async def test_seeking_reads_alone_get_no_verdict() -> None:
    async with mount(3 * MiB) as m:
        data = m.data[m.images[0]["id"]]
        reader = m.open()
        assert await reader.read(3 * MiB - 10, READ) == data[-10:]
        assert await reader.read(5, 10) == data[5:15]
        assert all(length is not None for _, _, length in m.gets())  # blocks only
        assert not reader.feed.clean  # served bytes no hash checked


async def test_many_readers_on_a_tiny_budget_never_deadlock() -> None:
    sizes = [3 * MiB + n for n in range(5)]
    async with mount(*sizes, max_connections=2) as m:
        m.client.images.chunk_delay = 0.001
        rng = random.Random(3)

        async def sequential(index: int) -> None:
            reader = m.open(index)
            assert await read_all(reader) == m.data[m.images[index]["id"]]
            await m.readers.release(reader)

        async def seeking(index: int) -> None:
            reader = m.open(index)
            data = m.data[m.images[index]["id"]]
            for _ in range(20):
                offset = rng.randrange(len(data))
                assert await reader.read(offset, 4096) == data[offset : offset + 4096]
            await m.readers.release(reader)

        async with trio.open_nursery() as nursery:
            for index in range(len(sizes)):
                for _ in range(3):
                    nursery.start_soon(sequential, index)
                nursery.start_soon(seeking, index)
        assert not m.corrupt
        assert m.client.connections.in_use == 0
        assert max(m.client.images.peak_streams.values()) <= 2


async def test_budget_kinds_and_order() -> None:
    budget = ConnectionBudget(4)
    for _ in range(2):
        await budget.acquire("upload")
    await budget.acquire("download")
    order: list[str] = []

    async def take(kind: Any, name: str) -> None:
        await budget.acquire(kind)
        order.append(name)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(take, "upload", "third upload")  # uploads hold half already
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(take, "download", "second download")  # long kinds hold 3 of 4
        await trio.testing.wait_all_tasks_blocked()
        assert budget.waiting == 2
        nursery.start_soon(take, "short", "short")  # the slot kept for short requests
        await trio.testing.wait_all_tasks_blocked()
        assert order == ["short"]
        budget.release("short")
        budget.release("download")
        await trio.testing.wait_all_tasks_blocked()
        assert order == ["short", "second download"]
        budget.release("upload")
        await trio.testing.wait_all_tasks_blocked()
        assert order == ["short", "second download", "third upload"]
    assert budget.in_use == 3
    assert budget.waiting == 0
