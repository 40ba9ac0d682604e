"""The persistent data cache: image data on local disk, keyed by content, checked on every read.

An active Glance image never changes and records its own hash (``os_hash_algo`` and
``os_hash_value``), so the cache is keyed by that hash, not by image id: an entry survives
remounts without asking Glance whether it is still current, and two images with the same data
(one base image uploaded into several projects) share one copy. The caller decides whether an
image may use an entry (only when the record the mount's credentials get carries that hash);
this module only stores and checks bytes. It does file I/O and nothing else: no FUSE, no HTTP.

Layout (the directory is 0700, every file 0600)::

    DIR/lock                      flock(LOCK_EX) by the one process using DIR; holds its pid
    DIR/v1/<algo>-<hex>/meta      {"size": ..., "block_size": ...}; its mtime is the last use
    DIR/v1/<algo>-<hex>/<n>.blk   block n: a 4 KiB header, then the block's bytes
    DIR/v1/<algo>-<hex>/verified  the manifest, once the whole entry matched the image hash

An image is cut into aligned blocks (1 MiB; the last one shorter). The header of a block holds
its index, its length, the first bytes of the entry's hash (so a block file copied into another
entry is refused) and a CRC-32 of every 64 KiB of data; a read checks the CRCs of the 64 KiB
pieces it touches, so a random 4 KiB read costs one piece's CRC, not the whole block's. A block
that fails any check is deleted and reported missing, never served.

Verification: once every block is stored, :meth:`CacheEntry.verify` hashes the entry against its
key, once. A match writes the *manifest*: the CRC-32 of every 64 KiB of the image as it was
hashed. The entry then stays verified for good, also when a damaged block is deleted: the block
fetched again in its place is stored only if its CRCs are those of the manifest
(:meth:`CacheEntry.agrees` lets the caller check before it serves it), so every byte a verified
entry serves is one the image hash covered, up to CRC-32's odds against a random corruption that
keeps the CRC (2^-32 per 64 KiB piece).

Crash safety: a block is written to a temporary file and renamed into place, so a block file is
either absent or whole; temporary files left by a killed process are deleted at the next open.
Nothing is fsync'ed: after a power loss a renamed block may be torn, and its CRC catches that.

Size: ``max_bytes`` bounds the block files (headers included). Eviction frees whole entries,
least recently used first: entries that no open file uses go before entries in use, and the entry
being written is never its own victim. An image larger than ``max_bytes`` is not cached; when every
other entry is gone and a block still does not fit, it is not stored (the read is served anyway).
Evicting renames the entry's directory into ``v1/.trash-*`` (one atomic step: a write still in
flight for that entry then fails instead of landing in a half-deleted directory) and deletes it in a
worker thread.

Sharing: one process per directory. A second :meth:`DataCache.open` of a directory in use raises
:class:`CacheError` naming the pid that holds it (flock: the lock goes with the process, also on
``kill -9``).

Reads bypass the page cache (``O_DIRECT``, where the filesystem takes it): what a read
serves lands in the mount's own page cache, and a second copy of the block files there would
double the memory and cost a copy per byte (measured on a cold 1 GiB read: 1.9-2.0 CPU s in
the mount against 2.2-2.65 with buffered reads). Writes go through the page cache as usual.

Threads: disk I/O runs in ``trio.to_thread``; the index (which blocks exist, sizes, the LRU
order) is only touched on the trio thread, so it needs no lock. At most one write per block is in
flight (a block already stored or being written is not written again).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import mmap
import os
import re
import secrets
import shutil
import stat
import struct
import threading
import zlib
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import trio

__all__ = [
    "BLOCK_SIZE",
    "CHECKED_PIECE",
    "DEFAULT_FREE_SPACE_FRACTION",
    "CacheEntry",
    "CacheError",
    "CacheStats",
    "DataCache",
]

log = logging.getLogger("glancefs.cache")

#: Bytes per cached block: the unit of fetching, storing, and deleting a damaged part.
BLOCK_SIZE = 1024 * 1024
#: Bytes covered by one CRC-32: the least a read from the cache checks.
CHECKED_PIECE = 64 * 1024
#: Without ``max_bytes``, the cache may use this fraction of the free space of its filesystem
#: (counted with what the cache itself already holds, so a restart does not shrink it).
DEFAULT_FREE_SPACE_FRACTION = 0.10

_FORMAT = "v1"
_HEADER_SIZE = 4096  # data starts page-aligned: a 4 KiB read touches one page of the file
_HEADER = struct.Struct("<8sQII8s")  # magic, block index, data length, piece size, key tag
_MAGIC = b"GLFSBLK1"
_BLOCK_NAME = re.compile(r"(\d+)\.blk")
_ENTRY_NAME = re.compile(r"([a-z0-9_]+)-([0-9a-f]+)")
_TRASH_PREFIX = ".trash-"


class CacheError(Exception):
    """The cache directory cannot be used; the message is the one line the user sees."""


@dataclass(frozen=True)
class CacheStats:
    """Counters since the cache was opened, and what it holds now (for status and metrics)."""

    #: Reads of the disk answered from the cache (a sequential reader: one per block), and
    #: their bytes.
    hits: int
    hit_bytes: int
    #: Reads that found a block missing (the caller fetches it from Glance).
    misses: int
    #: Data bytes stored.
    written_bytes: int
    #: Bytes on disk now (block files with their headers), and the bound.
    bytes: int
    max_bytes: int
    entries: int
    verified_entries: int
    #: Entries removed to stay within ``max_bytes``.
    evictions: int
    #: Blocks deleted because they failed a check.
    damaged_blocks: int
    #: Entries dropped because the whole image did not match its hash.
    rejected_entries: int
    #: Blocks not stored: no room left, or a disk error.
    refused_blocks: int
    #: Blocks offered to a verified entry whose CRCs differ from its manifest (not stored).
    mismatched_blocks: int


@dataclass(frozen=True)
class _Key:
    algorithm: str
    value: str

    @property
    def name(self) -> str:
        return f"{self.algorithm}-{self.value}"

    @property
    def tag(self) -> bytes:
        """The first 8 bytes of the hash, stamped into every block header of the entry."""
        return bytes.fromhex(self.value[:16])


@dataclass
class _Block:
    """A stored block: its file's size (for the bound) and inode (which file a check saw)."""

    file_size: int
    inode: int


@dataclass(eq=False)
class _EntryState:
    """What the index knows of one entry; shared by every :class:`CacheEntry` handle of it."""

    key: _Key
    size: int
    directory: Path
    blocks: dict[int, _Block] = field(default_factory=dict)
    writing: set[int] = field(default_factory=set)
    #: The CRC-32 of every piece of the image as its hash verified it; None: not verified.
    manifest: tuple[int, ...] | None = None
    #: Open handles; an entry in use is evicted only when nothing else can go.
    pins: int = 0
    #: Bumped when the entry's files go (eviction, a failed hash): a write or check that started
    #: before must not touch the index afterwards.
    generation: int = 0
    #: Whether ``directory`` and its ``meta`` exist on disk.
    created: bool = False

    def stored_bytes(self) -> int:
        return sum(block.file_size for block in self.blocks.values())

    def expected_crcs(self, index: int, block_size: int) -> tuple[int, ...] | None:
        """The manifest's CRCs of block ``index`` (None: the entry is not verified)."""
        if self.manifest is None:
            return None
        per_block = block_size // CHECKED_PIECE
        return self.manifest[index * per_block : (index + 1) * per_block]


@dataclass(frozen=True)
class _Reservation:
    """Room in the cache for one block being written, and the entry's generation when it began."""

    state: _EntryState
    index: int
    file_size: int
    generation: int


class _Damaged(Exception):
    """Block ``index`` failed a check; ``inode`` says which file (None: it is gone)."""

    def __init__(self, index: int, inode: int | None, reason: str) -> None:
        super().__init__(f"block {index}: {reason}")
        self.index = index
        self.inode = inode
        self.reason = reason


class DataCache:
    """The cache in one directory, opened by one process; see the module docstring.

    Open with :meth:`open`, get a :class:`CacheEntry` per image with :meth:`entry`, close with
    :meth:`close` (or use it as a context manager) to release the directory.
    """

    def __init__(self, directory: Path, max_bytes: int, block_size: int, lock_fd: int) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self.block_size = block_size
        self._lock_fd = lock_fd
        self._root = directory / _FORMAT
        self._trash_pending = False  # evicted directories wait in the trash to be deleted
        self._trash_lock = trio.Lock()
        #: Every entry, least recently used first.
        self._entries: OrderedDict[_Key, _EntryState] = OrderedDict()
        self._used = 0  # block file bytes stored or being written
        self._write_failing = False  # a disk error was logged and no write succeeded since
        self._hits = self._hit_bytes = self._misses = self._written = 0
        self._evictions = self._damaged = self._rejected = self._refused = self._mismatched = 0

    # -- opening and closing --------------------------------------------------------------------

    @classmethod
    def open(
        cls, directory: Path, max_bytes: int | None = None, *, block_size: int = BLOCK_SIZE
    ) -> DataCache:
        """Lock ``directory`` (created 0700 if missing), index what it holds, and return the cache.

        What a killed process left is cleaned up: temporary files, trash, entries whose metadata
        is unreadable. ``max_bytes`` None means :data:`DEFAULT_FREE_SPACE_FRACTION` of the free
        space; when what is stored exceeds the bound, least recently used entries go at once.
        Raises :class:`CacheError` when the directory is in use by another process, is not
        private to this user, or cannot be written. Blocking: call it before serving.
        """
        if block_size <= 0 or block_size % CHECKED_PIECE:
            raise ValueError(f"block size must be a multiple of {CHECKED_PIECE}")
        directory = directory.expanduser().absolute()
        try:
            _make_private_directory(directory)
            lock_fd = _lock(directory)
        except OSError as error:
            raise CacheError(f"cache directory {directory}: {error.strerror or error}") from None
        try:
            root = directory / _FORMAT
            root.mkdir(mode=0o700, exist_ok=True)
            cache = cls(directory, max_bytes or 0, block_size, lock_fd)
            cache._load()
            if max_bytes is None:
                free = shutil.disk_usage(directory).free
                cache.max_bytes = int((free + cache._used) * DEFAULT_FREE_SPACE_FRACTION)
            cache._evict_at_open()
        except OSError as error:
            os.close(lock_fd)
            raise CacheError(f"cache directory {directory}: {error.strerror or error}") from None
        except BaseException:
            os.close(lock_fd)
            raise
        log.info(
            "cache %s: %d entries, %d of %d bytes",
            directory,
            len(cache._entries),
            cache._used,
            cache.max_bytes,
        )
        return cache

    def close(self) -> None:
        """Release the directory for another process (open handles must not be used after)."""
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    def __enter__(self) -> DataCache:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _load(self) -> None:
        """Index the entries on disk, oldest use first; clean up what a killed process left."""
        for state in _load_entries(self._root, self.block_size):
            self._entries[state.key] = state
            self._used += state.stored_bytes()

    def _evict_at_open(self) -> None:
        while self._used > self.max_bytes:
            victim = next(iter(self._entries.values()))
            self._forget_files(victim)
            del self._entries[victim.key]
            self._evictions += 1
        _empty_trash(self._root)
        self._trash_pending = False

    # -- entries --------------------------------------------------------------------------------

    def entry(self, algorithm: str, value: str, size: int | None) -> CacheEntry | None:
        """The entry of the image whose data hashes to ``value`` with ``algorithm``; pins it.

        None when that image cannot be cached: an algorithm hashlib does not know or whose digest
        has no fixed length, a value that is not its hex digest, no data, or larger than the
        cache. Call :meth:`CacheEntry.release` when the file is closed. Sizes are part of the
        data: an entry recorded with another size for this hash is dropped and starts over.
        """
        key = _key(algorithm.lower(), value.lower())
        if key is None or not size or size <= 0 or size > self.max_bytes:
            return None
        state = self._entries.get(key)
        if state is not None and state.size != size:
            log.warning(
                "cache: %s %s... was stored with %d bytes, the image has %d: dropped",
                key.algorithm,
                key.value[:16],
                state.size,
                size,
            )
            self._forget_files(state)
            del self._entries[key]
            state = None
        if state is None:
            state = _EntryState(key, size, self._root / key.name)
            self._entries[key] = state
        self._entries.move_to_end(key)
        state.pins += 1
        if state.created:
            _touch(state.directory / "meta")
        return CacheEntry(self, state)

    def stats(self) -> CacheStats:
        return CacheStats(
            hits=self._hits,
            hit_bytes=self._hit_bytes,
            misses=self._misses,
            written_bytes=self._written,
            bytes=self._used,
            max_bytes=self.max_bytes,
            entries=sum(1 for state in self._entries.values() if state.blocks),
            verified_entries=sum(1 for s in self._entries.values() if s.manifest and s.blocks),
            evictions=self._evictions,
            damaged_blocks=self._damaged,
            rejected_entries=self._rejected,
            refused_blocks=self._refused,
            mismatched_blocks=self._mismatched,
        )

    # -- what the entries call ------------------------------------------------------------------

    def unpin(self, state: _EntryState) -> None:
        """A handle of the entry is released: it may go once nothing else holds it."""
        state.pins -= 1
        self._forget_if_unused(state)

    def hit(self, state: _EntryState, length: int) -> None:
        """Count a read of ``length`` bytes served from the entry, which is now the most
        recently used (unless it was dropped meanwhile)."""
        self._hits += 1
        self._hit_bytes += length
        if self._entries.get(state.key) is state:
            self._entries.move_to_end(state.key)

    def miss(self) -> None:
        """Count a read that found a block missing (or damaged, or unreadable)."""
        self._misses += 1

    def reserve(self, state: _EntryState, index: int, file_size: int) -> _Reservation | None:
        """Room for block ``index`` of the entry (a file of ``file_size`` bytes), marked as being
        written; None when the entry was replaced in the index or no room can be made (then
        nothing is reserved). Pair with :meth:`unreserve` once the write is over."""
        current = self._entries.setdefault(state.key, state)  # back in after a release
        if current is not state:  # dropped for a size mismatch, another entry took its place
            return None
        if not self._make_room(file_size, state):
            self._refused += 1
            return None
        state.writing.add(index)
        self._used += file_size
        return _Reservation(state, index, file_size, state.generation)

    def unreserve(self, reservation: _Reservation) -> None:
        """The write of a reserved block is over, either way."""
        reservation.state.writing.discard(reservation.index)
        self._used -= reservation.file_size

    def commit(self, reservation: _Reservation, inode: int | None, failure: OSError | None) -> bool:
        """Index a block whose write is over: stored as the file ``inode``, not stored because
        it disagreed with the manifest (``inode`` None), or failed (``failure``). True when the
        block is now stored; a file that lands in an entry evicted or dropped meanwhile goes."""
        state, index, file_size = reservation.state, reservation.index, reservation.file_size
        moved_on = state.generation != reservation.generation
        if failure is not None and not moved_on:  # else: its directory went away under it
            self._note_write_failure(failure)
        if moved_on or self._entries.get(state.key) is not state:
            # Evicted or dropped while the block was written: its file either went to the trash
            # with the old directory or landed in a new one that the index does not count.
            if inode is not None:
                _remove_if_same(state.directory / _block_name(index), inode)
            self._forget_if_unused(state)
            return False
        if failure is not None:
            return False
        if inode is None:
            self._mismatched += 1
            return False
        state.created = True
        state.blocks[index] = _Block(file_size, inode)
        self._used += file_size
        self._written += file_size - _HEADER_SIZE
        self._write_failing = False
        self._entries.move_to_end(state.key)
        return True

    async def reject(self, state: _EntryState) -> None:
        """Drop an entry whose data did not match the image hash, and count it."""
        self._rejected += 1
        await self.drop(state)

    async def drop(self, state: _EntryState) -> None:
        """Delete the entry's data, and wait until it is off the disk."""
        self._forget_files(state)
        await self.take_out_trash()

    def _forget_if_unused(self, state: _EntryState) -> None:
        """Drop an entry from the index once nothing is stored, written or open for it."""
        unused = state.pins == 0 and not state.blocks and not state.writing
        if unused and self._entries.get(state.key) is state:
            del self._entries[state.key]

    def _make_room(self, needed: int, writer: _EntryState) -> bool:
        """Evict until ``needed`` more bytes fit; False when only ``writer`` itself is left."""
        while self._used + needed > self.max_bytes:
            candidates = [s for s in self._entries.values() if s is not writer and s.blocks]
            if not candidates:
                return False
            idle = [s for s in candidates if s.pins == 0]
            victim = (idle or candidates)[0]
            log.debug("cache: evicting %s (%d bytes)", victim.key.name, victim.stored_bytes())
            self._forget_files(victim)
            self._forget_if_unused(victim)
            self._evictions += 1
        return True

    def _forget_files(self, state: _EntryState) -> None:
        """Take the entry's files out of the index and off the disk (moved to the trash now)."""
        self._used -= state.stored_bytes()
        state.blocks.clear()
        state.manifest = None
        state.generation += 1
        if state.created:
            state.created = False
            _move_to_trash(self._root, state.directory)
            self._trash_pending = True

    async def take_out_trash(self) -> None:
        """Wait until evicted directories are deleted (in a thread): every write calls this
        before it writes, so that the disk never holds evicted data and new data together."""
        async with self._trash_lock:
            if self._trash_pending:
                self._trash_pending = False
                await trio.to_thread.run_sync(_empty_trash, self._root)

    def discard(self, state: _EntryState, generation: int, damage: _Damaged) -> None:
        """Delete a block that failed a check, unless the index moved on since the check."""
        index = damage.index
        block = state.blocks.get(index)
        if state.generation != generation or block is None:
            return
        if damage.inode is not None and block.inode != damage.inode:
            return
        log.warning(
            "cache: block %d of %s %s... is damaged (%s): discarded, fetched again",
            index,
            state.key.algorithm,
            state.key.value[:16],
            damage.reason,
        )
        self._damaged += 1
        del state.blocks[index]
        self._used -= block.file_size
        # Synchronous, on purpose: no write of this block can be in flight while the index holds
        # it, so the file on disk is the one the check saw; a thread would race the next write.
        _remove(state.directory / _block_name(index))

    def _note_write_failure(self, error: OSError) -> None:
        self._refused += 1
        if not self._write_failing:
            self._write_failing = True
            log.warning(
                "cache %s: cannot store data (%s); reads go to Glance until a write works",
                self.directory,
                error.strerror or error,
            )


class CacheEntry:
    """One image's data in the cache, as one open file uses it.

    Blocks are ``block_size`` aligned pieces of the image. :meth:`read` answers only from blocks
    that are stored and pass their checks; :meth:`write_block` stores one whole block. When every
    block is stored, :meth:`verify` hashes the entry against its key, once.
    """

    def __init__(self, cache: DataCache, state: _EntryState) -> None:
        self._cache = cache
        self._state = state
        self._released = False
        self.size = state.size
        self.block_size = cache.block_size
        self.block_count = _block_count(state.size, cache.block_size)

    def __repr__(self) -> str:
        return f"<CacheEntry {self._state.key.name[:24]}... {len(self._state.blocks)} blocks>"

    def __enter__(self) -> CacheEntry:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    def release(self) -> None:
        """The file using the entry is closed; the entry may now be evicted first."""
        if not self._released:
            self._released = True
            self._cache.unpin(self._state)

    @property
    def complete(self) -> bool:
        """Whether every block of the image is stored."""
        return len(self._state.blocks) == self.block_count

    @property
    def verified(self) -> bool:
        """Whether the entry matched the image hash: what it serves is verified data."""
        return self._state.manifest is not None

    def blocks_of(self, offset: int, length: int) -> range:
        """Indices of the blocks that hold bytes ``[offset, offset + length)`` of the image."""
        end = min(offset + length, self.size)
        if offset >= end:
            return range(0)
        return range(offset // self.block_size, (end - 1) // self.block_size + 1)

    def block_length(self, index: int) -> int:
        """Bytes of block ``index`` (the last block of an image is shorter)."""
        return min(self.block_size, self.size - index * self.block_size)

    def missing(self, blocks: Iterable[int] | None = None) -> list[int]:
        """Which of ``blocks`` (default: all) are not stored; from the index, no I/O."""
        wanted = range(self.block_count) if blocks is None else blocks
        return [index for index in wanted if index not in self._state.blocks]

    def agrees(self, index: int, data: bytes) -> bool | None:
        """Whether ``data`` is block ``index`` as the image hash verified it (its CRCs are the
        manifest's); None when the entry is not verified. Costs a CRC-32 of ``data`` (about
        0.5 ms per MiB) on the calling thread."""
        expected = self._state.expected_crcs(index, self.block_size)
        if expected is None:
            return None
        return len(data) == self.block_length(index) and _crcs(data) == expected

    async def read(self, offset: int, length: int) -> bytes | None:
        """Bytes ``[offset, offset + length)`` (fewer at the end), or None if any is missing.

        Every 64 KiB piece the range touches is checked against its CRC; a block that fails is
        deleted and the read returns None (the caller fetches it again).
        """
        state, cache = self._state, self._cache
        end = min(offset + length, self.size)
        if offset >= end:
            return b""
        indices = self.blocks_of(offset, end - offset)
        if any(index not in state.blocks for index in indices):
            cache.miss()
            return None
        generation = state.generation
        spans = [
            (
                index,
                max(offset - index * self.block_size, 0),
                min(end - index * self.block_size, self.block_length(index)),
            )
            for index in indices
        ]
        try:
            parts = await trio.to_thread.run_sync(
                _read_spans, state.directory, state.key.tag, self.block_size, self.size, spans
            )
        except _Damaged as damage:
            cache.discard(state, generation, damage)
            cache.miss()
            return None
        except OSError as error:
            log.warning("cache %s: cannot read: %s", cache.directory, error.strerror)
            cache.miss()
            return None
        data = parts[0] if len(parts) == 1 else b"".join(parts)
        cache.hit(state, len(data))
        return data

    async def write_block(self, index: int, data: bytes) -> bool:
        """Store block ``index`` (exactly its bytes); True once it is stored (or already was).

        False when it was not stored: no room (only this entry left to evict), a disk error
        (logged once), the entry was evicted or dropped while the block was being written, or
        the entry is verified and ``data`` is not what it verified (see :meth:`agrees`). Never
        raises for the disk's sake: the cache is an optimisation, the read goes on.
        """
        state, cache = self._state, self._cache
        if not 0 <= index < self.block_count or len(data) != self.block_length(index):
            raise ValueError(
                f"block {index} of a {self.size}-byte image is {self.block_length(index)} bytes, "
                f"not {len(data)}"
            )
        if index in state.blocks or index in state.writing:
            return True
        reservation = cache.reserve(state, index, _HEADER_SIZE + len(data))
        if reservation is None:
            return False
        expected = state.expected_crcs(index, self.block_size)
        inode: int | None = None  # of the stored file; None: it disagreed with the manifest
        failure: OSError | None = None
        try:
            await cache.take_out_trash()
            inode = await trio.to_thread.run_sync(
                _write_block_file, state, index, data, self.size, self.block_size, expected
            )
        except OSError as error:
            failure = error
        finally:
            cache.unreserve(reservation)
        return cache.commit(reservation, inode, failure)

    async def verify(self) -> bool:
        """Hash the stored entry against its key once it is complete; True if it matches.

        True at once for an entry verified before (also while a damaged block is missing). A
        mismatch deletes the entry's data (it is fetched again) and logs one line; a damaged
        block is deleted as by :meth:`read`. Both return False, as does an incomplete entry.
        """
        state, cache = self._state, self._cache
        if state.manifest is not None:
            return True
        if not self.complete:
            return False
        generation = state.generation
        try:
            digest, manifest = await trio.to_thread.run_sync(_hash_entry, state, self.block_size)
        except _Damaged as damage:
            cache.discard(state, generation, damage)
            return False
        except OSError as error:
            log.warning("cache %s: cannot read: %s", cache.directory, error.strerror)
            return False
        if state.generation != generation or not self.complete:
            return False
        if digest != state.key.value:
            log.warning(
                "cache: %s of the stored %s... is %s..., not the image's: entry dropped",
                state.key.algorithm,
                state.key.value[:16],
                digest[:16],
            )
            await cache.reject(state)
            return False
        try:
            await trio.to_thread.run_sync(
                _write_file_atomically,
                state.directory / "verified",
                [_format_manifest(manifest, state.key, state.size)],
            )
        except OSError as error:
            log.warning("cache %s: cannot store a manifest: %s", cache.directory, error.strerror)
            return False
        if state.generation != generation:
            return False
        state.manifest = manifest
        return True

    async def drop(self) -> None:
        """Delete the entry's data (the caller found it, or the image, corrupt)."""
        await self._cache.drop(self._state)


# -- file formats and disk I/O (worker threads) ---------------------------------------------------


def _key(algorithm: str, value: str) -> _Key | None:
    """The key of a hash Glance recorded, or None if it cannot name a cache entry."""
    if algorithm not in hashlib.algorithms_available or not _ENTRY_NAME.fullmatch(
        f"{algorithm}-{value}"
    ):
        return None
    try:
        digest_size = hashlib.new(algorithm).digest_size
    except ValueError:
        return None
    if digest_size == 0 or len(value) != 2 * digest_size:  # shake_*: no fixed length
        return None
    return _Key(algorithm, value)


def _block_count(size: int, block_size: int) -> int:
    return -(-size // block_size)


def _block_name(index: int) -> str:
    return f"{index}.blk"


def _make_private_directory(directory: Path) -> None:
    """Create ``directory`` 0700, or check that an existing one is this user's and private.

    An existing directory is never chmod'ed: ``--cache-dir /tmp`` must not lock others out of
    /tmp. The user gets told to pick another.
    """
    with contextlib.suppress(FileExistsError):
        directory.mkdir(mode=0o700, parents=True)
    info = directory.stat()
    if not stat.S_ISDIR(info.st_mode):
        raise CacheError(f"cache directory {directory} is not a directory")
    if info.st_uid != os.geteuid():
        raise CacheError(
            f"cache directory {directory} belongs to uid {info.st_uid}, not to this user"
        )
    if info.st_mode & 0o077:
        raise CacheError(
            f"cache directory {directory} is open to other users (mode "
            f"{stat.S_IMODE(info.st_mode):o}): chmod 700 it, or name a new directory"
        )


def _lock(directory: Path) -> int:
    """Take the directory's lock (flock, released by the kernel when the process dies)."""
    fd = os.open(directory / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise CacheError(
            f"cache directory {directory} is in use by another glancefs mount (pid {holder}); "
            "give each mount its own --cache-dir"
        ) from None
    except BaseException:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _load_entries(root: Path, block_size: int) -> list[_EntryState]:
    """The entries under ``root``, oldest use first; what a killed process left is removed."""
    found: list[tuple[float, _EntryState]] = []
    _empty_trash(root)
    for item in os.scandir(root):
        path = Path(item.path)
        state = _load_entry(path, block_size) if item.is_dir(follow_symlinks=False) else None
        if state is None:
            log.info("cache: removing %s, not a cache entry of this version", path.name)
            _remove(path)
        elif not state.blocks:
            _remove(path)
        else:
            found.append(((path / "meta").stat().st_mtime, state))
    return [state for _, state in sorted(found, key=lambda pair: pair[0])]


def _load_entry(directory: Path, block_size: int) -> _EntryState | None:
    """The entry stored in ``directory``, with its blocks and manifest; None when it is not an
    entry of this format and block size."""
    match = _ENTRY_NAME.fullmatch(directory.name)
    key = _key(*match.groups()) if match else None
    if key is None:
        return None
    try:
        meta = json.loads((directory / "meta").read_text())
        size, stored_block_size = int(meta["size"]), int(meta["block_size"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if stored_block_size != block_size or size <= 0:
        return None
    state = _EntryState(key, size, directory, created=True)
    count = _block_count(size, block_size)
    for item in os.scandir(directory):
        match = _BLOCK_NAME.fullmatch(item.name)
        if match and int(match.group(1)) < count:
            info = item.stat(follow_symlinks=False)
            if stat.S_ISREG(info.st_mode):
                state.blocks[int(match.group(1))] = _Block(info.st_size, info.st_ino)
                continue
        if item.name == "verified":
            state.manifest = _parse_manifest(Path(item.path).read_bytes(), key, size)
            if state.manifest is None:
                log.warning("cache: the manifest of %s is damaged: removed", directory.name)
                _remove(Path(item.path))
        elif item.name != "meta":  # a temporary file of a killed write, or a stranger
            _remove(Path(item.path))
    return state


def _remove(path: Path) -> None:
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    except FileNotFoundError:
        pass


def _remove_if_same(path: Path, inode: int) -> None:
    """Unlink ``path`` if it is still the file with ``inode`` (no write of it is in flight)."""
    try:
        if os.stat(path, follow_symlinks=False).st_ino == inode:
            path.unlink()
    except FileNotFoundError:
        pass


def _move_to_trash(root: Path, directory: Path) -> None:
    """Take an entry's directory out of the cache in one rename (:func:`_empty_trash` deletes it);
    deleted at once when it cannot be renamed."""
    trash = root / f"{_TRASH_PREFIX}{secrets.token_hex(8)}"
    try:
        os.rename(directory, trash)
    except FileNotFoundError:
        pass
    except OSError as error:
        log.warning("cache: cannot remove %s: %s", directory, error.strerror)
        shutil.rmtree(directory, ignore_errors=True)


def _empty_trash(root: Path) -> None:
    for item in os.scandir(root):
        if item.name.startswith(_TRASH_PREFIX):
            shutil.rmtree(item.path, ignore_errors=True)


def _touch(path: Path) -> None:
    """Record a use in the entry's mtime (the LRU order of the next open); best effort."""
    with contextlib.suppress(OSError):
        os.utime(path)


def _write_all(fd: int, buffers: Sequence[bytes | memoryview]) -> None:
    views = [memoryview(buffer) for buffer in buffers]
    while views:
        written = os.writev(fd, views)
        while views and written >= len(views[0]):
            written -= len(views.pop(0))
        if views and written:
            views[0] = views[0][written:]


def _crcs(data: bytes) -> tuple[int, ...]:
    """The CRC-32 of every piece of ``data``."""
    view = memoryview(data)
    return tuple(
        zlib.crc32(view[at : at + CHECKED_PIECE]) for at in range(0, len(data), CHECKED_PIECE)
    )


def _header(index: int, data: bytes, tag: bytes, crcs: tuple[int, ...]) -> bytes:
    fields = _HEADER.pack(_MAGIC, index, len(data), CHECKED_PIECE, tag)
    body = (fields + struct.pack(f"<{len(crcs)}I", *crcs)).ljust(_HEADER_SIZE - 4, b"\0")
    return body + struct.pack("<I", zlib.crc32(body))  # the whole header, padding included


def _write_block_file(
    state: _EntryState,
    index: int,
    data: bytes,
    size: int,
    block_size: int,
    expected: tuple[int, ...] | None,
) -> int | None:
    """Write block ``index`` to a temporary file and rename it into place; its inode, or None
    (nothing written) when its CRCs are not the ``expected`` ones of a verified entry.

    The entry's directory is made with the first block, and made again if it went away
    (deleted by hand; an eviction meanwhile is the caller's to notice).
    """
    crcs = _crcs(data)
    if expected is not None and crcs != expected:
        return None
    directory = state.directory
    buffers: list[bytes | memoryview] = [_header(index, data, state.key.tag, crcs), data]

    def create_directory() -> None:
        directory.mkdir(mode=0o700, exist_ok=True)
        meta = json.dumps({"size": size, "block_size": block_size}).encode()
        _write_file_atomically(directory / "meta", [meta])

    if not state.created:
        create_directory()
        return _write_file_atomically(directory / _block_name(index), buffers)
    try:
        return _write_file_atomically(directory / _block_name(index), buffers)
    except FileNotFoundError:
        create_directory()
        return _write_file_atomically(directory / _block_name(index), buffers)


def _write_file_atomically(path: Path, buffers: Sequence[bytes | memoryview]) -> int:
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        _write_all(fd, buffers)
        inode = os.fstat(fd).st_ino
    except BaseException:
        os.close(fd)
        _remove(temporary)
        raise
    os.close(fd)
    try:
        os.rename(temporary, path)
    except BaseException:
        _remove(temporary)
        raise
    return inode


def _open_block(path: Path) -> tuple[int, bool]:
    """The block file opened for reading, and whether with ``O_DIRECT``.

    Direct reads where the filesystem allows them (some refuse with EINVAL: tmpfs before
    Linux 6.6, many FUSE filesystems): the data goes from the disk into one reused buffer per
    thread instead of through the page cache, which would keep a second copy of what the mount's
    own page cache holds, and cost a copy and fresh pages.
    """
    flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW
    try:
        return os.open(path, flags | os.O_DIRECT), True
    except OSError as error:
        if error.errno != errno.EINVAL:
            raise
    return os.open(path, flags), False


#: The page-aligned buffer each worker thread reads block files into with O_DIRECT.
_direct_buffers = threading.local()


def _pread(fd: int, direct: bool, offset: int, *lengths: int) -> list[bytes]:
    """Consecutive pieces of ``lengths`` bytes from ``offset`` on, in one read (shorter or
    empty at the end of the file); ``offset`` is page-aligned when ``direct``."""
    total = sum(lengths)
    source: bytes | mmap.mmap | None = None
    if direct:
        size = -(-total // _HEADER_SIZE) * _HEADER_SIZE  # O_DIRECT reads whole pages
        buffer: mmap.mmap | None = getattr(_direct_buffers, "buffer", None)
        if buffer is None or len(buffer) < size:
            buffer = _direct_buffers.buffer = mmap.mmap(-1, max(size, BLOCK_SIZE + _HEADER_SIZE))
        try:
            available = min(os.preadv(fd, [memoryview(buffer)[:size]], offset), total)
            source = buffer
        except OSError as error:
            if error.errno != errno.EINVAL:  # a device that wants another alignment
                raise
            flags = fcntl.fcntl(fd, fcntl.F_GETFL)
            fcntl.fcntl(fd, fcntl.F_SETFL, flags & ~os.O_DIRECT)  # then read it as any file
    if source is None:
        source = os.pread(fd, total, offset)
        available = len(source)
        if len(lengths) == 1:
            return [source]
    pieces: list[bytes] = []
    at = 0
    for length in lengths:
        pieces.append(source[at : max(at, min(at + length, available))])
        at += length
    return pieces


def _read_checked(
    fd: int, direct: bool, index: int, tag: bytes, length: int, start: int, stop: int
) -> tuple[bytes, tuple[int, ...]]:
    """Bytes ``[start, stop)`` of the open block file ``fd``, after every check they need, and
    the CRCs of the whole block its (checked) header holds."""
    info = os.fstat(fd)
    if info.st_size != _HEADER_SIZE + length:
        raise _Damaged(
            index, info.st_ino, f"{info.st_size} bytes, expected {_HEADER_SIZE + length}"
        )
    first, last = start // CHECKED_PIECE, (stop - 1) // CHECKED_PIECE
    low, high = first * CHECKED_PIECE, min((last + 1) * CHECKED_PIECE, length)
    if low == 0:  # the header and the data in one read (a sequential reader's whole block)
        header, data = _pread(fd, direct, 0, _HEADER_SIZE, high)
    else:
        (header,) = _pread(fd, direct, 0, _HEADER_SIZE)
        (data,) = _pread(fd, direct, _HEADER_SIZE + low, high - low)
    count = -(-length // CHECKED_PIECE)
    if len(header) < _HEADER_SIZE:
        raise _Damaged(index, info.st_ino, "short header")
    (header_crc,) = struct.unpack_from("<I", header, _HEADER_SIZE - 4)
    if zlib.crc32(memoryview(header)[: _HEADER_SIZE - 4]) != header_crc:
        raise _Damaged(index, info.st_ino, "header checksum")
    magic, stored_index, stored_length, piece, stored_tag = _HEADER.unpack_from(header)
    if (magic, stored_index, stored_length, piece, stored_tag) != (
        _MAGIC, index, length, CHECKED_PIECE, tag,
    ):  # fmt: skip
        raise _Damaged(index, info.st_ino, "header of another block")
    crcs = struct.unpack_from(f"<{count}I", header, _HEADER.size)
    if len(data) != high - low:
        raise _Damaged(index, info.st_ino, "short data")
    view = memoryview(data)
    for piece_index in range(first, last + 1):
        at = piece_index * CHECKED_PIECE - low
        if zlib.crc32(view[at : at + CHECKED_PIECE]) != crcs[piece_index]:
            raise _Damaged(index, info.st_ino, f"checksum of bytes {piece_index * CHECKED_PIECE}+")
    if start == low and stop == high:
        return data, crcs
    return data[start - low : stop - low], crcs


def _read_spans(
    directory: Path, tag: bytes, block_size: int, size: int, spans: list[tuple[int, int, int]]
) -> list[bytes]:
    parts: list[bytes] = []
    for index, start, stop in spans:
        length = min(block_size, size - index * block_size)
        try:
            fd, direct = _open_block(directory / _block_name(index))
        except FileNotFoundError:
            raise _Damaged(index, None, "file missing") from None
        try:
            parts.append(_read_checked(fd, direct, index, tag, length, start, stop)[0])
        finally:
            os.close(fd)
    return parts


def _hash_entry(state: _EntryState, block_size: int) -> tuple[str, tuple[int, ...]]:
    """The hex digest of the stored entry, every block checked on the way, and its manifest."""
    digest = hashlib.new(state.key.algorithm)
    manifest: list[int] = []
    for index in range(_block_count(state.size, block_size)):
        length = min(block_size, state.size - index * block_size)
        path = state.directory / _block_name(index)
        try:
            fd, direct = _open_block(path)
        except FileNotFoundError:
            raise _Damaged(index, None, "file missing") from None
        try:
            data, crcs = _read_checked(fd, direct, index, state.key.tag, length, 0, length)
        finally:
            os.close(fd)
        digest.update(data)
        manifest += crcs
    return digest.hexdigest(), tuple(manifest)


_MANIFEST = struct.Struct("<8s8sQII")  # magic, key tag, image size, piece size, piece count
_MANIFEST_MAGIC = b"GLFSMAN1"


def _format_manifest(crcs: tuple[int, ...], key: _Key, size: int) -> bytes:
    body = _MANIFEST.pack(_MANIFEST_MAGIC, key.tag, size, CHECKED_PIECE, len(crcs))
    body += struct.pack(f"<{len(crcs)}I", *crcs)
    return body + struct.pack("<I", zlib.crc32(body))


def _parse_manifest(raw: bytes, key: _Key, size: int) -> tuple[int, ...] | None:
    """The CRCs of a manifest file, or None unless it is whole and of this entry."""
    count = -(-size // CHECKED_PIECE)
    if len(raw) != _MANIFEST.size + 4 * count + 4:
        return None
    if struct.unpack_from("<I", raw, len(raw) - 4)[0] != zlib.crc32(raw[:-4]):
        return None
    if _MANIFEST.unpack_from(raw) != (_MANIFEST_MAGIC, key.tag, size, CHECKED_PIECE, count):
        return None
    return struct.unpack_from(f"<{count}I", raw, _MANIFEST.size)
