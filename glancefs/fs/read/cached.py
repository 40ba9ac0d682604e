"""One image's data through the persistent cache (:mod:`glancefs.fs.cache`), for its feed.

An :class:`~glancefs.fs.read.feed.ImageFeed` whose image can be cached (active, with a recorded
``os_hash_algo``/``os_hash_value``: :func:`cached_image`) holds a :class:`CachedImage`. The
feed asks it first for every read, hands it every whole 1 MiB block its stream downloads, and
fetches the blocks of random reads through it, so that what Glance sends once is on disk for
every later read, in this mount and the next ones.

What is verified when (SEMANTICS.md says it for users):

* **A verified entry** (its blocks matched the image hash once, in this mount or an earlier one)
  makes the feed *trusted*: every read is served from the entry, and a block that is missing (it
  was damaged and deleted) is fetched from Glance and served only if its CRCs are those of the
  entry's manifest, else the image is corrupt for this mount (EIO) as for a hash mismatch. The
  feed's own running hash is off: nothing it serves needs it.
* **An entry that is complete but not verified yet** (a mount ended before it hashed it; a
  ``--no-verify`` mount filled it) is hashed from disk by the first read of a verifying mount,
  which waits for it (a local hash instead of a download and a hash).
* **A partial entry** serves what it holds, and those bytes go through the feed's verification
  like any bytes served from elsewhere than the hashed stream (their crc32 is compared with the
  bytes the running hash sees there); what it lacks comes from Glance and is stored. When the
  entry becomes complete it is hashed from disk in the background, once (not in a ``--no-verify``
  mount); a mismatch deletes it.
* A feed that finds the image corrupt deletes the entry unless it is verified (its data may be
  what was corrupt); a verified entry is right by its own hash, whatever Glance sent since.

``--cache-fill``: the first read of a partial entry that the stream does not serve (a random
reader: qemu-img, fio) starts a background download of every missing block, in ranged GETs of
at most ``ReadTuning.fill_request`` bytes (each holds one connection of the client's budget only
while it runs), then the hash of the entry; it stops when the last file of the image closes.
On a store without ranges there is no fill: the feed's one download from 0 stores every block.
"""

from __future__ import annotations

import logging

import trio

from glancefs import Image, IntegrityError

from ..background import failure_of
from ..cache import CacheEntry, DataCache
from .blocks import BlockLRU
from .policy import ReadTuning
from .source import ImageSource
from .stream import Stream

__all__ = ["CachedImage", "cached_image"]

log = logging.getLogger("glancefs.cache")


def cached_image(
    cache: DataCache | None,
    source: ImageSource,
    nursery: trio.Nursery,
    tuning: ReadTuning,
    *,
    verify: bool,
    fill: bool,
) -> CachedImage | None:
    """The image's data through ``cache``, or None when the image cannot be cached.

    Only active images with a multihash qualify, and the hash is the one in ``image``: the record
    this mount's credentials got from Glance, so an entry never serves an image the credentials
    cannot see, and a re-uploaded image with other data has another entry.
    """
    image = source.image
    algorithm, value = image.get("os_hash_algo"), image.get("os_hash_value")
    if cache is None or image.status != "active" or not algorithm or not value:
        return None
    entry = cache.entry(str(algorithm), str(value), image.size)
    if entry is None:
        return None
    return CachedImage(entry, source, nursery, tuning, verify=verify, fill=fill)


class CachedImage:
    """One feed's use of its image's cache entry; :meth:`aclose` with the feed."""

    def __init__(
        self,
        entry: CacheEntry,
        source: ImageSource,
        nursery: trio.Nursery,
        tuning: ReadTuning,
        *,
        verify: bool,
        fill: bool,
    ) -> None:
        self.entry = entry
        self.block_size = entry.block_size
        self._source = source
        self._image: Image = source.image
        self._nursery = nursery
        self._tuning = tuning
        self._verify = verify
        self._fill = fill and not source.whole_only
        self._writes = trio.Semaphore(tuning.cache_writes_in_flight)
        #: Blocks on their way to the disk: reads find them here meanwhile.
        self._pending: dict[int, bytes] = {}
        #: Whole blocks read from disk for a sequential reader (the last ones, and those ahead),
        #: and the reads ahead in flight.
        self._read = BlockLRU(tuning.cache_kept_blocks, entry.block_size)
        self._reading: dict[int, trio.Event] = {}
        self._checked = trio.Event()  # the first read's hash of a complete entry is done
        self._checking = False
        self._verifying = False  # a background hash of the entry runs or ran
        self._filling: trio.CancelScope | None = None
        self._closed = False
        #: Bumped when the image is found corrupt: blocks queued before are not written.
        self._epoch = 0

    @property
    def trusted(self) -> bool:
        """Whether every byte read through here is verified data (see the module docstring)."""
        return self._verify and self.entry.verified

    # -- reads --------------------------------------------------------------------------------

    async def read(self, offset: int, end: int, *, nearby: bool) -> bytes | None:
        """Bytes ``[offset, end)`` from the cache; None when the feed must fetch them. A trusted
        entry never answers None: what it lacks is fetched and checked against its manifest
        (on a store without ranges: None, the feed's download brings it).
        Raises :class:`~glancefs.IntegrityError` when Glance sent other data than verified."""
        await self._check_complete_entry()
        data = await self._read_stored(offset, end, nearby)
        if data is not None or not self.trusted or self._source.whole_only:
            return data
        return await self.fetch(offset, end)

    async def _read_stored(self, offset: int, end: int, nearby: bool) -> bytes | None:
        """From the entry, and from the blocks still on their way to it.

        A small random read reads (and checks) only the 64 KiB pieces it touches. A large one
        gets whole blocks (header and data in one disk read), and so does one near the furthest
        read so far (:class:`~glancefs.fs.read.policy.Access`), read ``cache_read_ahead`` blocks
        ahead of it in the background: one disk read per MiB.
        """
        entry, size = self.entry, self.block_size
        blocks = entry.blocks_of(offset, end - offset)
        held = (self._pending, self._read, self._reading)
        large = end - offset >= size // 2  # a whole-block read costs it no more disk time
        if not (nearby or large) and not any(index in where for where in held for index in blocks):
            return await entry.read(offset, end - offset)
        parts: list[bytes] = []
        for index in blocks:
            block = await self._whole_block(index)
            if block is None:
                return None
            low, high = max(offset, index * size), min(end, (index + 1) * size)
            parts.append(block[low - index * size : high - index * size])
        if nearby:
            self._read_ahead(blocks.stop)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def _whole_block(self, index: int) -> bytes | None:
        """Block ``index`` whole: on its way to the disk, read (or being read) ahead already,
        or read now; None when the entry lacks it."""
        if index in self._pending:
            return self._pending[index]
        if index in self._reading:
            await self._reading[index].wait()
        block = self._read.get(index)
        if block is None:
            block = await self.entry.read(index * self.block_size, self.block_size)
            if block is not None:
                self._read.put(index, block)
        return block

    def _read_ahead(self, first: int) -> None:
        entry = self.entry
        for index in range(first, min(first + self._tuning.cache_read_ahead, entry.block_count)):
            held = index in self._read or index in self._pending or index in self._reading
            if not held and not entry.missing([index]):
                self._reading[index] = trio.Event()
                self._nursery.start_soon(self._read_block_ahead, index)

    async def _read_block_ahead(self, index: int) -> None:
        """Runs in the mount's nursery: never raises."""

        async def read() -> None:
            block = await self.entry.read(index * self.block_size, self.block_size)
            if block is not None and not self._closed:
                self._read.put(index, block)

        try:
            await failure_of(read, f"image {self._image.id}: cache read ahead")
        finally:
            self._reading.pop(index).set()

    async def _check_complete_entry(self) -> None:
        """The first read of a verifying mount hashes a complete, unverified entry (once; the
        reads that come meanwhile wait for it)."""
        if self._checked.is_set():
            return
        if self._checking:
            await self._checked.wait()
            return
        self._checking = True
        try:
            entry = self.entry
            if self._verify and entry.complete and not entry.verified:
                await entry.verify()
        finally:
            self._checked.set()

    async def fetch(self, offset: int, end: int) -> bytes:
        """Fetch the whole blocks holding ``[offset, end)`` from Glance with one ranged GET,
        store them, and return the bytes asked for; start ``--cache-fill`` if it is on."""
        entry, size = self.entry, self.block_size
        blocks = entry.blocks_of(offset, end - offset)
        start = blocks.start * size
        body = await self._source.fetch(start, min(blocks.stop * size, entry.size))
        for index in blocks:
            block = body[index * size - start : (index + 1) * size - start]
            await self._check_block(index, block)
            await self.store(index, block)
        if self._fill and not self.trusted:
            self._start_fill()
        return body[offset - start : end - start]

    async def _check_block(self, index: int, block: bytes) -> None:
        """For a verified entry: the block must be the one its hash verified."""
        agrees = await trio.to_thread.run_sync(self.entry.agrees, index, block)
        if agrees is False:
            raise IntegrityError(
                f"image {self._image.id}: block {index} from Glance differs from the data its "
                f"{self._image.get('os_hash_algo')} verified in the cache: data is corrupt"
            )

    # -- storing ------------------------------------------------------------------------------

    async def store_streamed(self, stream: Stream) -> None:
        """Store every whole block the stream now holds (waits while the disk lags)."""
        size = self.block_size
        stream.stored = -(-stream.stored // size) * size  # a stream may start inside a block
        while stream.stored < self.entry.size:
            end = min(stream.stored + size, self.entry.size)
            if stream.end < end:
                return
            await self.store(stream.stored // size, stream.slice(stream.stored, end))
            stream.stored = end

    async def store(self, index: int, block: bytes) -> None:
        """Store a whole block in the background; waits while :data:`WRITES_IN_FLIGHT` are.
        Also after :meth:`aclose`: the download's last blocks may still be on their way."""
        if not self._needs_storing(index):
            return
        await self._writes.acquire()
        if not self._needs_storing(index):  # the stream and a block fetch both had it
            self._writes.release()
            return
        self._pending[index] = block
        self._nursery.start_soon(self._write, index, block, self._epoch)

    def _needs_storing(self, index: int) -> bool:
        return index not in self._pending and bool(self.entry.missing([index]))

    async def _write(self, index: int, block: bytes, epoch: int) -> None:
        """Runs in the mount's nursery: never raises (the cache's own failures are not errors,
        anything else is a bug, logged by :func:`failure_of`)."""

        async def write() -> None:
            if epoch != self._epoch:
                return  # queued before the image was found corrupt: maybe that very data
            if await self.entry.write_block(index, block) and self.entry.complete:
                self._start_verification()

        try:
            await failure_of(write, f"image {self._image.id}: cache write")
        finally:
            del self._pending[index]
            self._writes.release()

    def _start_verification(self) -> None:
        """Hash the entry once it is complete, in the background (not with ``--no-verify``)."""
        if self._verify and not self._verifying and not self.entry.verified:
            self._verifying = True
            self._nursery.start_soon(self._verify_entry)

    async def _verify_entry(self) -> None:
        async def verify() -> None:
            if await self.entry.verify():
                log.info("image %s: cache entry complete and verified", self._image.id)

        await failure_of(verify, f"image {self._image.id}: cache verification")

    def corrupt(self) -> None:
        """The feed found the image corrupt: an unverified entry may hold that data; drop it."""
        self._epoch += 1
        if not self.entry.verified:
            self._nursery.start_soon(self.entry.drop)

    # -- --cache-fill ---------------------------------------------------------------------------

    def _start_fill(self) -> None:
        if self._filling is None and not self._closed:
            self._filling = trio.CancelScope()
            self._nursery.start_soon(self._fill_in_background, self._filling)

    async def _fill_in_background(self, scope: trio.CancelScope) -> None:
        """Fetch every missing block, then hash the entry. Runs in the mount's nursery: a
        failure is logged (the reads are not affected) and never raised."""
        with scope:
            error = await failure_of(self._fill_missing, f"image {self._image.id}: cache fill")
            if error is not None:
                log.warning("image %s: cache fill stopped: %s", self._image.id, error)

    async def _fill_missing(self) -> None:
        entry, size = self.entry, self.block_size
        per_request = max(1, self._tuning.fill_request // size)
        asked: set[int] = set()  # once each: a block the cache refused (no room) stays missing
        while missing := [index for index in entry.missing() if index not in asked]:
            run = [missing[0]]
            for index in missing[1:per_request]:
                if index != run[-1] + 1:
                    break
                run.append(index)
            asked.update(run)
            start, end = run[0] * size, min((run[-1] + 1) * size, entry.size)
            body = await self._source.fetch(start, end)
            for index in run:
                await self.store(index, body[index * size - start : (index + 1) * size - start])
            if self._closed:
                return

    async def aclose(self) -> None:
        """The feed is closed: stop ``--cache-fill``, let the entry go (writes finish)."""
        self._closed = True
        if self._filling is not None:
            self._filling.cancel()
        self._read.clear()
        self.entry.release()
