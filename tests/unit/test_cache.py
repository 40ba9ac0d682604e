"""Unit tests of the persistent data cache (glancefs/fs/cache.py) on a real local directory.

What the cache promises and these tests hold it to: only whole blocks that pass their checks are
served; damage of any kind is discarded, never served; the bound holds at every moment, also
under concurrent writers; a restart reuses what is complete; a process killed (SIGKILL) while
writing leaves a cache that the next open serves exactly; one process per directory.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import logging
import os
import random
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from click.testing import CliRunner

import glancefs.fs.cache as cache_module
from glancefs.cli import main
from glancefs.fs.cache import CHECKED_PIECE, CacheEntry, CacheError, DataCache
from glancefs.fs.config import (
    MIN_CACHE_SIZE,
    CacheOptions,
    ConfigError,
    default_cache_dir,
    parse_cache_options,
    parse_size,
)

BLOCK = 2 * CHECKED_PIECE  # 128 KiB: several blocks per small image, two checked pieces each
FILE = 4096 + BLOCK  # a full block file on disk (header + data)
SIZE = 5 * BLOCK + 1000  # five full blocks and a short one


def image_data(seed: int, size: int = SIZE) -> bytes:
    return random.Random(seed).randbytes(size)


def sha512(data: bytes) -> str:
    return hashlib.sha512(data).hexdigest()


def open_cache(directory: Path, max_bytes: int | None = 100 * FILE) -> DataCache:
    return DataCache.open(directory, max_bytes, block_size=BLOCK)


def entry_of(cache: DataCache, data: bytes) -> CacheEntry:
    entry = cache.entry("sha512", sha512(data), len(data))
    assert entry is not None
    return entry


async def fill(entry: CacheEntry, data: bytes, blocks: range | list[int] | None = None) -> None:
    for index in range(entry.block_count) if blocks is None else blocks:
        start = index * entry.block_size
        assert await entry.write_block(index, data[start : start + entry.block_length(index)])


def cache_files(directory: Path) -> list[Path]:
    """Every file under v1/ (robust to a worker thread deleting the trash meanwhile)."""
    found = []
    for parent, _, names in os.walk(directory / "v1"):
        found += [Path(parent, name) for name in names]
    return sorted(found)


def file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:  # in the trash, deleted since it was listed
        return 0


def block_files(directory: Path) -> list[Path]:
    """The blocks of entries (not those evicted that wait in the trash)."""
    return [
        path
        for path in cache_files(directory)
        if path.suffix == ".blk" and not path.parent.name.startswith(".trash-")
    ]


def disk_bytes(directory: Path) -> int:
    """What block files take on disk, those in the trash included."""
    return sum(file_size(path) for path in cache_files(directory) if path.suffix == ".blk")


@pytest.fixture
def directory(tmp_path: Path) -> Path:
    return tmp_path / "cache"


@pytest.fixture
def cache(directory: Path) -> Iterator[DataCache]:
    with open_cache(directory) as opened:
        yield opened


class TestReadWrite:
    async def test_reads_return_exactly_the_stored_bytes(self, cache: DataCache) -> None:
        data = image_data(1)
        entry = entry_of(cache, data)
        assert entry.block_count == 6
        assert entry.block_length(5) == 1000
        await fill(entry, data)
        assert entry.complete
        rng = random.Random(2)
        ranges = [(0, SIZE), (SIZE - 1, 10), (BLOCK - 1, 2), (0, 4096), (3 * BLOCK + 5, 2 * BLOCK)]
        ranges += [(rng.randrange(SIZE), rng.randrange(1, 3 * BLOCK)) for _ in range(50)]
        for offset, length in ranges:
            assert await entry.read(offset, length) == data[offset : offset + length]
        assert await entry.read(SIZE, 10) == b""
        stats = cache.stats()
        assert stats.hits == len(ranges)
        assert stats.misses == 0
        assert stats.written_bytes == SIZE
        assert stats.bytes == disk_bytes(cache.directory)

    @pytest.mark.parametrize("refused", [None, "open", "read"])
    async def test_block_files_are_read_directly_where_the_filesystem_allows(
        self, refused: str | None, directory: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """O_DIRECT where the filesystem takes it (no second copy in the page cache); one that
        refuses it with EINVAL, at open or at the read (an alignment it does not take), gets
        ordinary reads: the same bytes either way, whole blocks and pieces."""
        real_open, real_preadv = os.open, os.preadv

        def refusing_open(path: Path, flags: int, *args: int) -> int:
            if refused == "open" and flags & os.O_DIRECT:
                raise OSError(errno.EINVAL, "Invalid argument")
            return real_open(path, flags, *args)

        def refusing_preadv(fd: int, buffers: list[memoryview], offset: int) -> int:
            if refused == "read":
                raise OSError(errno.EINVAL, "Invalid argument")
            return real_preadv(fd, buffers, offset)

        monkeypatch.setattr(os, "open", refusing_open)
        monkeypatch.setattr(os, "preadv", refusing_preadv)
        data = image_data(3)
        with open_cache(directory) as cache:
            entry = entry_of(cache, data)
            await fill(entry, data)
            fd, direct = cache_module._open_block(block_files(directory)[0])
            os.close(fd)
            assert direct == (refused != "open")
            for offset, length in [(0, SIZE), (BLOCK + CHECKED_PIECE, 10), (SIZE - 7, 7)]:
                assert await entry.read(offset, length) == data[offset : offset + length]
            assert await entry.verify()
            assert cache.stats().damaged_blocks == 0

    async def test_a_read_needs_every_block_it_touches(self, cache: DataCache) -> None:
        data = image_data(1)
        entry = entry_of(cache, data)
        await fill(entry, data, [0, 2])
        assert await entry.read(0, BLOCK) == data[:BLOCK]
        assert await entry.read(BLOCK - 10, 20) is None
        assert entry.missing(entry.blocks_of(0, 3 * BLOCK)) == [1]
        assert entry.missing() == [1, 3, 4, 5]
        assert not entry.complete
        assert cache.stats().misses == 1

    async def test_blocks_must_have_their_exact_length(self, cache: DataCache) -> None:
        entry = entry_of(cache, image_data(1))
        with pytest.raises(ValueError, match="1000 bytes"):
            await entry.write_block(5, b"x" * BLOCK)
        with pytest.raises(ValueError, match="block 6 of a"):
            await entry.write_block(6, b"x")
        assert cache_files(cache.directory) == []

    async def test_images_with_the_same_hash_share_one_entry(self, cache: DataCache) -> None:
        data = image_data(1)
        first, second = entry_of(cache, data), entry_of(cache, data)
        await fill(first, data)
        assert await second.read(0, SIZE) == data
        assert len(block_files(cache.directory)) == 6

    def test_what_cannot_be_cached(self, cache: DataCache) -> None:
        value = sha512(b"x")
        assert cache.entry("sha512", value, 0) is None
        assert cache.entry("sha512", value, None) is None
        assert cache.entry("sha512", value, cache.max_bytes + 1) is None
        assert cache.entry("sha512", value[:-2], 10) is None  # not a whole digest
        assert cache.entry("sha512", "../" + value[3:], 10) is None
        assert cache.entry("shake_128", "00" * 16, 10) is None  # no fixed length
        assert cache.entry("nosuchhash", "00" * 16, 10) is None
        entry = cache.entry("SHA512", value.upper(), 10)
        assert entry is not None
        assert entry.size == 10

    async def test_a_hash_recorded_with_another_size_starts_over(self, cache: DataCache) -> None:
        data = image_data(1)
        await fill(entry_of(cache, data), data)
        other = cache.entry("sha512", sha512(data), SIZE - 1)
        assert other is not None
        assert other.missing() == list(range(6))
        assert block_files(cache.directory) == []
        assert cache.stats().bytes == 0
        await fill(other, data[:-1], [0])  # the old files are gone before new ones are written
        assert disk_bytes(cache.directory) == FILE

    async def test_files_are_private(self, cache: DataCache) -> None:
        data = image_data(1)
        entry = entry_of(cache, data)
        await fill(entry, data)
        assert await entry.verify()
        assert stat.S_IMODE(cache.directory.stat().st_mode) == 0o700
        for path in [cache.directory / "lock", *(cache.directory / "v1").rglob("*")]:
            expected = 0o700 if path.is_dir() else 0o600
            assert stat.S_IMODE(path.stat().st_mode) == expected, path


class TestVerification:
    async def test_a_complete_entry_that_matches_is_verified_once(
        self, cache: DataCache, directory: Path
    ) -> None:
        data = image_data(1)
        entry = entry_of(cache, data)
        await fill(entry, data, range(5))
        assert not await entry.verify()
        assert not entry.verified
        assert entry.agrees(0, data[:BLOCK]) is None
        await fill(entry, data, [5])
        assert await entry.verify()
        assert entry.verified
        assert (cache_files(directory)[-1]).name == "verified"
        assert cache.stats().verified_entries == 1
        assert entry.agrees(5, data[5 * BLOCK :])
        assert entry.agrees(0, data[:BLOCK])
        assert not entry.agrees(0, data[BLOCK : 2 * BLOCK])
        assert not entry.agrees(5, b"short")

    async def test_a_mismatch_drops_the_entry(
        self, cache: DataCache, caplog: pytest.LogCaptureFixture
    ) -> None:
        data = image_data(1)
        entry = entry_of(cache, data)
        wrong = bytearray(data)
        wrong[3 * BLOCK + 7] ^= 1
        await fill(entry, bytes(wrong))
        with caplog.at_level(logging.WARNING, "glancefs.cache"):
            assert not await entry.verify()
        assert [r.getMessage() for r in caplog.records] == [
            f"cache: sha512 of the stored {sha512(data)[:16]}... is {sha512(bytes(wrong))[:16]}"
            "..., not the image's: entry dropped"
        ]
        assert entry.missing() == list(range(6))
        assert not entry.verified
        assert cache_files(cache.directory) == []
        assert cache.stats().bytes == 0
        assert cache.stats().rejected_entries == 1
        await fill(entry, data)  # the same handle fills again
        assert await entry.verify()

    async def test_a_verified_entry_takes_back_only_the_data_it_verified(
        self, cache: DataCache
    ) -> None:
        data = image_data(1)
        entry = entry_of(cache, data)
        await fill(entry, data)
        assert await entry.verify()
        damage_by_flipping_data(block_files(cache.directory)[1], Path())  # block 1
        assert await entry.read(BLOCK + CHECKED_PIECE, 10) is None
        assert entry.missing() == [1]
        assert entry.verified  # what is left is still what the hash saw
        assert await entry.read(0, BLOCK) == data[:BLOCK]
        wrong = bytearray(data[BLOCK : 2 * BLOCK])
        wrong[100] ^= 1
        assert not await entry.write_block(1, bytes(wrong))
        assert cache.stats().mismatched_blocks == 1
        assert entry.missing() == [1]
        assert await entry.write_block(1, data[BLOCK : 2 * BLOCK])
        assert entry.complete
        assert await entry.read(0, SIZE) == data
        assert await entry.verify()  # already verified: no second hash
        assert cache.stats().verified_entries == 1

    async def test_a_damaged_manifest_is_removed_and_verified_again(self, directory: Path) -> None:
        data = image_data(1)
        with open_cache(directory) as cache:
            entry = entry_of(cache, data)
            await fill(entry, data)
            assert await entry.verify()
        manifest = directory / "v1" / f"sha512-{sha512(data)}" / "verified"
        damage_by_flipping_the_header(manifest, Path())
        with open_cache(directory) as cache:
            entry = entry_of(cache, data)
            assert not entry.verified
            assert not manifest.exists()
            assert entry.complete
            assert await entry.verify()
            assert manifest.exists()


def damage_by_flipping_data(path: Path, other: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[4096 + CHECKED_PIECE + 3] ^= 0x40
    path.write_bytes(raw)


def damage_by_flipping_the_header(path: Path, other: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[20] ^= 1  # the length field
    path.write_bytes(raw)


def damage_a_crc(path: Path, other: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[33] ^= 1  # inside the CRC of the first piece: the header's own CRC catches it
    path.write_bytes(raw)


def damage_the_header_padding(path: Path, other: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[3000] ^= 1  # nothing reads it, yet the header's CRC covers it
    path.write_bytes(raw)


def damage_by_truncating(path: Path, other: Path) -> None:
    os.truncate(path, path.stat().st_size - 1)


def damage_by_appending(path: Path, other: Path) -> None:
    with path.open("ab") as file:
        file.write(b"\0")


def damage_by_zeroing(path: Path, other: Path) -> None:  # what a power loss may leave
    path.write_bytes(b"\0" * path.stat().st_size)


def damage_by_copying_another_block(path: Path, other: Path) -> None:
    shutil.copyfile(other, path)


DAMAGES = [
    damage_by_flipping_data,
    damage_by_flipping_the_header,
    damage_a_crc,
    damage_the_header_padding,
    damage_by_truncating,
    damage_by_appending,
    damage_by_zeroing,
    damage_by_copying_another_block,
]


class TestDamage:
    @pytest.mark.parametrize("damage", DAMAGES)
    async def test_a_damaged_block_is_discarded_never_served(
        self, directory: Path, damage: object, caplog: pytest.LogCaptureFixture
    ) -> None:
        data = image_data(1)
        with open_cache(directory) as cache:
            entry = entry_of(cache, data)
            await fill(entry, data)
            assert await entry.verify()
        target = directory / "v1" / f"sha512-{sha512(data)}" / "2.blk"
        damage(target, target.with_name("1.blk"))  # type: ignore[operator]
        with open_cache(directory) as cache, caplog.at_level(logging.WARNING, "glancefs.cache"):
            entry = entry_of(cache, data)
            assert entry.verified  # nothing reads the data at open
            assert await entry.read(0, SIZE) is None
            assert len(caplog.records) == 1
            assert "block 2 of sha512" in caplog.records[0].getMessage()
            assert not target.exists()
            assert entry.missing() == [2]
            assert entry.verified
            assert (target.parent / "verified").exists()
            stats = cache.stats()
            assert stats.damaged_blocks == 1
            assert stats.bytes == disk_bytes(directory)
            # Fetched again (and matching the manifest): served again.
            await fill(entry, data, [2])
            assert await entry.read(0, SIZE) == data

    async def test_every_file_damaged_nothing_wrong_is_served(self, directory: Path) -> None:
        data = image_data(1)
        with open_cache(directory) as cache:
            await fill(entry_of(cache, data), data)
        blocks = block_files(directory)
        for number, path in enumerate(blocks):
            DAMAGES[number % len(DAMAGES)](path, blocks[(number + 1) % len(blocks)])
        with open_cache(directory) as cache:
            entry = entry_of(cache, data)
            for index in range(entry.block_count):
                assert await entry.read(index * BLOCK, BLOCK) is None
            assert block_files(directory) == []
            assert cache.stats().bytes == 0

    async def test_only_the_touched_pieces_are_checked(self, cache: DataCache) -> None:
        """A 4 KiB read checks its 64 KiB piece, not the block: intact pieces are still served."""
        data = image_data(1)
        entry = entry_of(cache, data)
        await fill(entry, data)
        damage_by_flipping_data(block_files(cache.directory)[0], Path())  # piece 1 of block 0
        assert await entry.read(0, 4096) == data[:4096]
        assert await entry.read(CHECKED_PIECE, 4096) is None
        assert entry.missing() == [0]

    async def test_a_block_file_copied_into_another_entry_is_refused(
        self, cache: DataCache
    ) -> None:
        data, other = image_data(1), image_data(2)
        entry, other_entry = entry_of(cache, data), entry_of(cache, other)
        await fill(entry, data)
        await fill(other_entry, other)
        source = cache.directory / "v1" / f"sha512-{sha512(data)}" / "0.blk"
        shutil.copyfile(source, cache.directory / "v1" / f"sha512-{sha512(other)}" / "0.blk")
        assert await other_entry.read(0, 10) is None
        assert await entry.read(0, 10) == data[:10]

    async def test_a_block_deleted_behind_its_back_is_a_miss(self, cache: DataCache) -> None:
        data = image_data(1)
        entry = entry_of(cache, data)
        await fill(entry, data)
        shutil.rmtree(cache.directory / "v1" / f"sha512-{sha512(data)}")
        assert await entry.read(0, 10) is None
        assert entry.missing() == [0]
        await fill(entry, data, [0])  # the directory comes back
        assert await entry.read(0, 10) == data[:10]


class TestRestart:
    async def test_a_restart_reuses_complete_blocks(self, directory: Path) -> None:
        data, partial = image_data(1), image_data(2)
        with open_cache(directory) as cache:
            entry = entry_of(cache, data)
            await fill(entry, data)
            assert await entry.verify()
            await fill(entry_of(cache, partial), partial, [1, 3])
        with open_cache(directory) as cache:
            entry = entry_of(cache, data)
            assert entry.complete
            assert entry.verified
            assert await entry.read(0, SIZE) == data
            partial_entry = entry_of(cache, partial)
            assert partial_entry.missing() == [0, 2, 4, 5]
            assert not partial_entry.verified
            assert await partial_entry.read(BLOCK, BLOCK) == partial[BLOCK : 2 * BLOCK]
            assert cache.stats().written_bytes == 0
            assert cache.stats().bytes == disk_bytes(directory) == 7 * FILE + 4096 + 1000

    async def test_leftovers_are_cleaned_at_open(self, directory: Path) -> None:
        data = image_data(1)
        with open_cache(directory) as cache:
            await fill(entry_of(cache, data), data)
        entry_dir = directory / "v1" / f"sha512-{sha512(data)}"
        (entry_dir / ".3.blk.0123abcd.tmp").write_bytes(b"half a block")
        (entry_dir / "99.blk").write_bytes(b"past the end")
        (directory / "v1" / ".trash-0011223344556677").mkdir()
        (directory / "v1" / "not-an-entry").mkdir()
        (directory / "v1" / f"md5-{'0' * 32}").mkdir()  # no meta
        other_blocks = directory / "v1" / f"sha512-{sha512(b'x')}"
        other_blocks.mkdir()
        (other_blocks / "meta").write_text('{"size": 10, "block_size": 4096}')
        (directory / "unrelated").write_text("not ours: left alone")
        with open_cache(directory) as cache:
            assert sorted(p.name for p in (directory / "v1").iterdir()) == [entry_dir.name]
            assert sorted(p.name for p in entry_dir.iterdir()) == sorted(
                ["meta", *(f"{n}.blk" for n in range(6))]
            )
            assert await entry_of(cache, data).read(0, SIZE) == data
        assert (directory / "unrelated").exists()

    async def test_a_verified_entry_missing_a_block_stays_verified(self, directory: Path) -> None:
        data = image_data(1)
        with open_cache(directory) as cache:
            entry = entry_of(cache, data)
            await fill(entry, data)
            assert await entry.verify()
        (directory / "v1" / f"sha512-{sha512(data)}" / "4.blk").unlink()
        with open_cache(directory) as cache:
            entry = entry_of(cache, data)
            assert entry.verified
            assert entry.missing() == [4]
            assert not await entry.write_block(4, bytes(BLOCK))
            await fill(entry, data, [4])
            assert await entry.read(0, SIZE) == data


class TestEviction:
    async def test_the_bound_holds_least_recently_used_first(self, directory: Path) -> None:
        images = [image_data(seed) for seed in range(4)]
        with open_cache(directory, max_bytes=14 * FILE) as cache:  # two images and a bit
            entries = [entry_of(cache, data) for data in images]
            for entry in entries:
                entry.release()
            await fill(entries[0], images[0])
            await fill(entries[1], images[1])
            assert await entries[0].read(0, 10) is not None  # 1 is now the least recently used
            await fill(entries[2], images[2])
            assert cache.stats().evictions == 1
            assert entries[1].missing() == list(range(6))
            assert entries[0].complete
            assert entries[2].complete
            await fill(entries[3], images[3])
            assert entries[0].missing() == list(range(6))
            assert entries[2].complete
            stats = cache.stats()
            assert stats.evictions == 2
            assert stats.bytes == disk_bytes(directory) <= 14 * FILE
            assert not list((directory / "v1").glob(".trash-*"))

    async def test_open_files_are_evicted_last(self, directory: Path) -> None:
        images = [image_data(seed) for seed in range(3)]
        with open_cache(directory, max_bytes=14 * FILE) as cache:
            in_use, idle, new = (entry_of(cache, data) for data in images)
            await fill(in_use, images[0])  # least recently used, but open
            await fill(idle, images[1])
            idle.release()
            await fill(new, images[2])
            assert in_use.complete
            assert idle.missing() == list(range(6))

    async def test_the_entry_being_written_never_evicts_itself(self, directory: Path) -> None:
        data = image_data(1)
        with open_cache(directory, max_bytes=4 * FILE) as cache:
            assert cache.entry("sha512", sha512(data), len(data)) is None  # larger than all
            small = image_data(2, 4 * BLOCK)
            first = entry_of(cache, small)
            await fill(first, small, range(3))
            concurrent = image_data(3, 3 * BLOCK)
            second = entry_of(cache, concurrent)
            await fill(second, concurrent, range(2))  # evicts the first (open, but not writing)
            assert first.missing() == [0, 1, 2, 3]
            assert await first.write_block(0, small[:BLOCK])
            assert await first.write_block(1, small[BLOCK : 2 * BLOCK])
            assert await first.write_block(2, small[2 * BLOCK : 3 * BLOCK])
            assert second.missing() == [0, 1, 2]
            assert cache.stats().bytes <= 4 * FILE

    async def test_least_recently_used_survives_a_restart(self, directory: Path) -> None:
        images = [image_data(seed) for seed in range(3)]
        with open_cache(directory) as cache:
            for data in images:
                with entry_of(cache, data) as entry:
                    await fill(entry, data)
        for age, data in zip((100, 300, 200), images, strict=True):
            meta = directory / "v1" / f"sha512-{sha512(data)}" / "meta"
            os.utime(meta, (meta.stat().st_mtime - age,) * 2)
        with open_cache(directory, max_bytes=13 * FILE) as cache:  # one entry must go at once
            assert cache.stats().evictions == 1
            assert disk_bytes(directory) == 2 * (5 * FILE + 4096 + 1000)
            assert entry_of(cache, images[1]).missing() == list(range(6))
            assert entry_of(cache, images[0]).complete
            assert entry_of(cache, images[2]).complete

    async def test_an_open_marks_the_use_on_disk(self, directory: Path) -> None:
        data = image_data(1)
        with open_cache(directory) as cache:
            await fill(entry_of(cache, data), data)
        meta = directory / "v1" / f"sha512-{sha512(data)}" / "meta"
        os.utime(meta, (1000, 1000))
        with open_cache(directory) as cache:
            entry_of(cache, data)
        assert meta.stat().st_mtime > 1000

    async def test_concurrent_writers_keep_the_bound(self, directory: Path) -> None:
        """Eight tasks write blocks of six images (two share data) in random order at once."""
        images = [image_data(seed) for seed in range(5)] + [image_data(0)]
        bound = 20 * FILE
        worst = 0
        with open_cache(directory, max_bytes=bound) as cache:
            entries = [entry_of(cache, data) for data in images]

            async def writer(seed: int) -> None:
                nonlocal worst
                rng = random.Random(seed)
                for _ in range(40):
                    number = rng.randrange(len(images))
                    entry, data = entries[number], images[number]
                    index = rng.randrange(entry.block_count)
                    start = index * BLOCK
                    await entry.write_block(index, data[start : start + entry.block_length(index)])
                    worst = max(worst, cache.stats().bytes, disk_bytes(directory))
                    offset = rng.randrange(SIZE)
                    got = await entry.read(offset, 3 * BLOCK)
                    assert got is None or got == data[offset : offset + 3 * BLOCK]

            async with trio.open_nursery() as nursery:
                for seed in range(8):
                    nursery.start_soon(writer, seed)
            assert worst <= bound
            assert cache.stats().bytes == disk_bytes(directory)
            assert not [p for p in cache_files(directory) if p.suffix == ".tmp"]
            for entry, data in zip(entries, images, strict=True):
                for index in range(entry.block_count):
                    got = await entry.read(index * BLOCK, BLOCK)
                    assert got is None or got == data[index * BLOCK : (index + 1) * BLOCK]
        with open_cache(directory, max_bytes=bound) as cache:
            assert cache.stats().bytes == disk_bytes(directory)

    async def test_a_disk_error_refuses_the_block_and_logs_once(
        self, cache: DataCache, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
    ) -> None:
        data = image_data(1)
        entry = entry_of(cache, data)

        def full(*args: object) -> int:
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(cache_module, "_write_block_file", full)
        with caplog.at_level(logging.WARNING, "glancefs.cache"):
            for index in range(3):
                assert not await entry.write_block(index, data[index * BLOCK : (index + 1) * BLOCK])
        assert [r.getMessage() for r in caplog.records] == [
            f"cache {cache.directory}: cannot store data (No space left on device); reads go to "
            "Glance until a write works"
        ]
        stats = cache.stats()
        assert stats.refused_blocks == 3
        assert stats.bytes == 0
        monkeypatch.undo()
        await fill(entry, data)
        assert await entry.read(0, SIZE) == data


class TestOneProcessPerDirectory:
    def test_a_second_open_refuses_clearly(self, cache: DataCache) -> None:
        with pytest.raises(CacheError) as refused:
            open_cache(cache.directory)
        assert str(refused.value) == (
            f"cache directory {cache.directory} is in use by another glancefs mount "
            f"(pid {os.getpid()}); give each mount its own --cache-dir"
        )
        cache.close()
        open_cache(cache.directory).close()

    def test_another_process_refuses_and_the_lock_dies_with_its_holder(
        self, directory: Path
    ) -> None:
        holder = subprocess.Popen(
            [sys.executable, "-c", HOLD_SCRIPT, str(directory)],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert holder.stdout is not None
            assert holder.stdout.readline() == "open\n"
            refused = subprocess.run(
                [sys.executable, "-c", HOLD_SCRIPT, str(directory)],
                capture_output=True,
                text=True,
                check=False,
            )
            assert refused.returncode == 1
            assert refused.stderr.strip().splitlines()[-1] == (
                f"glancefs.fs.cache.CacheError: cache directory {directory} is in use by another "
                f"glancefs mount (pid {holder.pid}); give each mount its own --cache-dir"
            )
        finally:
            holder.send_signal(signal.SIGKILL)
            holder.wait()
        open_cache(directory).close()

    def test_a_directory_others_can_enter_is_refused(self, tmp_path: Path) -> None:
        shared = tmp_path / "shared"
        shared.mkdir(mode=0o755)
        shared.chmod(0o755)
        with pytest.raises(CacheError, match=r"open to other users \(mode 755\): chmod 700 it"):
            open_cache(shared)
        assert stat.S_IMODE(shared.stat().st_mode) == 0o755  # never chmod'ed behind the back
        assert list(shared.iterdir()) == []

    @pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chown")
    def test_a_directory_of_another_user_is_refused(self, tmp_path: Path) -> None:
        theirs = tmp_path / "theirs"
        theirs.mkdir(mode=0o700)
        os.chown(theirs, 65534, 65534)
        with pytest.raises(CacheError, match="belongs to uid 65534, not to this user"):
            open_cache(theirs)

    def test_a_file_is_no_cache_directory(self, tmp_path: Path) -> None:
        (tmp_path / "file").write_text("")
        with pytest.raises(CacheError, match="file"):
            open_cache(tmp_path / "file")


HOLD_SCRIPT = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from glancefs.fs.cache import DataCache
    cache = DataCache.open(Path(sys.argv[1]), 10**9)
    print("open", flush=True)
    time.sleep(600)
    """
)

#: Writes blocks of deterministic images forever, saying when each write starts; with "torn",
#: stops for good after writing half of the first block's temporary file.
WRITER_SCRIPT = textwrap.dedent(
    """
    import hashlib, os, random, sys, time
    from pathlib import Path
    import trio
    import glancefs.fs.cache as cache_module

    directory, mode = Path(sys.argv[1]), sys.argv[2]
    BLOCK, SIZE = 128 * 1024, 5 * 128 * 1024 + 1000

    if mode == "torn":
        def half_then_hang(fd, buffers):
            data = b"".join(buffers)
            os.write(fd, data[: len(data) // 2])
            print("torn", flush=True)
            time.sleep(600)
        cache_module._write_all = half_then_hang

    async def main():
        cache = cache_module.DataCache.open(directory, 12 * (4096 + BLOCK), block_size=BLOCK)
        rng = random.Random(0)
        while True:
            seed = rng.randrange(4)
            data = random.Random(seed).randbytes(SIZE)
            entry = cache.entry("sha512", hashlib.sha512(data).hexdigest(), SIZE)
            index = rng.randrange(entry.block_count)
            print("write", flush=True)
            start = index * BLOCK
            await entry.write_block(index, data[start : start + entry.block_length(index)])
            if rng.random() < 0.2:
                await entry.verify()
            entry.release()

    trio.run(main)
    """
)


class TestKilledWriter:
    def run_writer(self, directory: Path, mode: str, wait_for: str, count: int) -> None:
        """Start the writer, wait for ``count`` lines ``wait_for``, and kill it (SIGKILL)."""
        writer = subprocess.Popen(
            [sys.executable, "-c", WRITER_SCRIPT, str(directory), mode],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert writer.stdout is not None
            seen = 0
            while seen < count:
                line = writer.stdout.readline()
                assert line, "the writer died"
                seen += line == f"{wait_for}\n"
        finally:
            writer.send_signal(signal.SIGKILL)
            writer.wait()

    async def check_consistent(self, directory: Path) -> None:
        with open_cache(directory, max_bytes=12 * FILE) as cache:
            assert not [p for p in cache_files(directory) if ".tmp" in p.name]
            assert cache.stats().bytes == disk_bytes(directory) <= 12 * FILE
            for seed in range(4):
                data = image_data(seed)
                with entry_of(cache, data) as entry:
                    for index in range(entry.block_count):
                        got = await entry.read(index * BLOCK, BLOCK)
                        assert got is None or got == data[index * BLOCK : (index + 1) * BLOCK]
                    if entry.verified:
                        assert await entry.read(0, SIZE) == data
            assert cache.stats().damaged_blocks == 0

    async def test_killed_in_the_middle_of_a_block(self, directory: Path) -> None:
        self.run_writer(directory, "torn", "torn", 1)
        assert [p.name for p in cache_files(directory) if ".tmp" in p.name]  # it was half done
        await self.check_consistent(directory)
        assert block_files(directory) == []

    @pytest.mark.parametrize("writes", [7, 60, 150])
    async def test_killed_at_any_moment(self, directory: Path, writes: int) -> None:
        self.run_writer(directory, "loop", "write", writes)
        await self.check_consistent(directory)
        # And the cache goes on being used after that.
        with open_cache(directory, max_bytes=12 * FILE) as cache:
            data = image_data(9)
            entry = entry_of(cache, data)
            await fill(entry, data)
            assert await entry.verify()
            assert await entry.read(0, SIZE) == data


class TestOptions:
    def test_sizes(self) -> None:
        assert parse_size("500M", "--x") == 500 * 1024**2
        assert parse_size("10G", "--x") == 10 * 1024**3
        assert parse_size("1.5GiB", "--x") == 3 * 1024**3 // 2
        assert parse_size(" 2t ", "--x") == 2 * 1024**4
        assert parse_size("4096", "--x") == 4096
        for bad in ("", "10GB", "iB", "-1G", "1 0G", "ten"):
            with pytest.raises(ConfigError, match="--x: expected a size like 500M or 10G"):
                parse_size(bad, "--x")

    def test_cache_options(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        assert parse_cache_options(None, None, False) is None
        for size, fill in (("1G", False), (None, True)):
            with pytest.raises(ConfigError, match="the cache is off; turn it on with --cache-dir"):
                parse_cache_options(None, size, fill)
        with pytest.raises(ConfigError, match="--cache-size: at least 8M"):
            parse_cache_options(str(tmp_path), "1M", False)
        monkeypatch.chdir(tmp_path)
        assert parse_cache_options("here", "300M", True) == CacheOptions(
            tmp_path / "here", 300 * 1024**2, True
        )
        assert parse_cache_options("", None, False) == CacheOptions(default_cache_dir())
        assert parse_size("8M", "--x") == MIN_CACHE_SIZE

    def test_default_directory(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(os, "geteuid", lambda: 1000)
        monkeypatch.setenv("XDG_CACHE_HOME", "/xdg")
        assert default_cache_dir() == Path("/xdg/glancefs")
        monkeypatch.setenv("XDG_CACHE_HOME", "relative")
        monkeypatch.setenv("HOME", "/home/u")
        assert default_cache_dir() == Path("/home/u/.cache/glancefs")
        monkeypatch.setattr(os, "geteuid", lambda: 0)
        assert default_cache_dir() == Path("/var/cache/glancefs")

    @pytest.mark.parametrize(
        ("args", "expected"),
        [
            (["--cache-dir", "c", "--cache-size", "1G"], CacheOptions(Path("c"), 1024**3)),
            (["--cache-dir"], CacheOptions(default_cache_dir())),
            (["--cache-dir", "--cache-fill"], CacheOptions(default_cache_dir(), None, True)),
            (
                ["-o", "cache_dir=c,cache_size=300M,cache_fill"],
                CacheOptions(Path("c"), 300 * 1024**2, True),
            ),
            (["-o", "cache_dir"], CacheOptions(default_cache_dir())),
            ([], None),
        ],
    )
    def test_the_command_line(
        self,
        args: list[str],
        expected: CacheOptions | None,
        tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """The options reach MountConfig (the mount itself stops before credentials)."""
        import glancefs.cli as cli

        seen: list[object] = []
        real = cli._config_from

        def capture(params: dict[str, object]) -> object:
            config = real(params)
            seen.append(config.cache)
            raise SystemExit(0)

        monkeypatch.setattr(cli, "_config_from", capture)
        monkeypatch.chdir(tmp_path)
        result = CliRunner().invoke(main, ["mount", str(tmp_path / "mnt"), *args])
        assert result.exit_code == 0, result.output
        if expected is not None and not expected.directory.is_absolute():
            expected = dataclasses.replace(expected, directory=tmp_path / expected.directory)
        assert seen == [expected]

    @pytest.mark.parametrize(
        ("args", "message"),
        [
            (["--cache-size", "1G"], "--cache-size: the cache is off; turn it on with --cache-dir"),
            (["--cache-fill"], "--cache-fill: the cache is off"),
            (["--cache-dir", "c", "--cache-size", "lots"], "--cache-size: expected a size like"),
            (["--cache-dir", "mnt/c"], "is inside the mount"),
        ],
    )
    def test_bad_options_are_one_line(
        self, args: list[str], message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.chdir(tmp_path)
        result = CliRunner().invoke(main, ["mount", "mnt", *args])
        assert result.exit_code == 2
        assert message in result.output.splitlines()[-1]
