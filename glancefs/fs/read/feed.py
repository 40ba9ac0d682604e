"""One image's data for every open file of it: the parts of :mod:`glancefs.fs.read`, wired.

An :class:`ImageFeed` exists while at least one file of its image is open (the registry in
:mod:`glancefs.fs.read.readers` counts them). A read is served, in this order, by:

1. the persistent cache (``--cache-dir``), where the stream does not reach (:mod:`.cached`);
2. the stream (:mod:`.stream`, owned by :mod:`.slot`): the one download, when it holds or will
   soon hold the bytes, or when the reader is sequential and may take it;
3. on a store that takes ranges, the blocks around the read, with one ranged GET
   (:class:`~glancefs.fs.read.source.ImageSource`), the last few kept (:mod:`.blocks`) or
   stored in the cache;
4. on a store without ranges, the spool (:mod:`.spooled`): one download from byte 0 written to
   local disk as it arrives, read behind it, waited for ahead of it.

Every byte served is accounted to the verification (:mod:`.verification`), whose running hash
(:mod:`.hasher`) reads the stream's buffer in a worker thread. Once the bytes served cover the
whole image, the read that served the last bytes not served before, and every read that reaches
the image's end, wait for the verdict. A mismatch makes the feed *corrupt*: every read of it
fails with :class:`~glancefs.IntegrityError`, ``on_corrupt`` is called once.
"""

from __future__ import annotations

from collections.abc import Callable

import trio

from glancefs import GlanceError, IntegrityError, RangesRefused

from ..background import raise_again
from ..spool import SpoolSpace
from .blocks import BlockLRU
from .cached import CachedImage
from .hasher import Hasher
from .policy import Access, PrefetchBudget, ReadTuning
from .slot import StreamSlot, Wakeup
from .source import ImageSource, RangeSupport
from .spooled import SpooledReads
from .stream import Stream
from .verification import Verification

__all__ = ["ImageFeed"]


class ImageFeed:
    """The shared data of one image (see the module docstring); ``aclose()`` when the last file
    of it is released."""

    def __init__(
        self,
        source: ImageSource,
        nursery: trio.Nursery,
        budget: PrefetchBudget,
        on_corrupt: Callable[[IntegrityError], None],
        *,
        verification: Verification,
        ranges: RangeSupport,
        spool_space: SpoolSpace,
        cached: CachedImage | None = None,
        tuning: ReadTuning | None = None,
    ) -> None:
        self._source = source
        self.image = source.image
        self.size = source.size
        self._on_corrupt = on_corrupt
        self._verification = verification
        self._ranges = ranges
        self._cached = cached
        self._tuning = tuning or ReadTuning()
        self.open_files = 0
        self.corrupt: IntegrityError | None = None
        self._wakeup = Wakeup()
        self._slot = StreamSlot(
            source,
            nursery,
            budget,
            self._tuning,
            self._wakeup,
            on_chunk=self._on_chunk,
            on_stop=lambda stream: self._hasher.stream_stopped(stream),
            broken=self._raise_if_corrupt,
            storing=cached is not None,
        )
        self._hasher = Hasher(
            verification, self._slot, nursery, self._wakeup, self._fail, self._raise_if_corrupt
        )
        self._spooled = SpooledReads(
            self.image.id, self.size, self._slot, spool_space, self._start_stream
        )
        self._blocks = BlockLRU(self._tuning.cached_blocks, self._tuning.block_size)
        #: Whether the first read decided if the cache entry alone serves verified data.
        self._trust_decided = False
        if verification.enabled:
            self._hasher.new_pass()

    @property
    def clean(self) -> bool:
        """Every byte served (so every page this feed put in the page cache) was verified, or
        the image is not verified at all (``--no-verify``, no recorded hash)."""
        return self.corrupt is None and not self._verification.unverified

    async def read(self, offset: int, end: int, access: Access) -> bytes:
        """Bytes ``[offset, end)`` (the caller clipped ``end`` to the size), a read of the
        kind ``access`` says."""
        self._raise_if_corrupt()
        self._source.raise_recent_failure()
        try:
            try:
                data, hashed_from = await self._read(offset, end, access)
            except RangesRefused:
                self._ranges.refused(self.image)
                self._source.whole_only = True
                self._slot.stop()
                data, hashed_from = await self._read(offset, end, access)
            self._raise_if_corrupt()
            if self._verification.account(offset, end, data, hashed_from):
                # No byte of the image is left that no read was served: its end of file may
                # come from the kernel's cache, so the verdict must come now.
                await self.verdict()
            return data
        except GlanceError as error:
            self._source.failed(error)
            raise

    async def _read(self, offset: int, end: int, access: Access) -> tuple[bytes, int | None]:
        """The bytes, and the offset from which their buffer feeds the running hash (None:
        they came from elsewhere)."""
        cached, stream = self._cached, self._slot.stream
        # A spool holds what its download hashed where it was served: it serves before the
        # cache, whose bytes behind the hash would need another pass to be verified.
        spooling = self._spooled.spool is not None
        if cached is not None and not spooling and (stream is None or not stream.reaches(offset)):
            data = await self._read_cached(cached, offset, end, access.nearby)
            if data is not None:
                return data, None
        if stream is not None and stream.reaches(offset):
            data = await self._slot.read(stream, offset, end)
            if data is not None:
                return data, stream.hash_from
        elif access.sequential and not self._source.whole_only and self._slot.may_move():
            stream = self._start_stream(offset, False)
            data = await self._slot.read(stream, offset, end)
            if data is not None:
                return data, stream.hash_from
        if self._source.whole_only:
            return await self._spooled.read(offset, end, access.sequential)
        if cached is not None:  # whole cache blocks, stored for the next reads
            return await cached.fetch(offset, end), None
        data = await self._source.fetch_blocks(offset, end, self._blocks)
        self._raise_if_corrupt()
        return data, None

    async def _read_cached(
        self, cached: CachedImage, offset: int, end: int, nearby: bool
    ) -> bytes | None:
        """The bytes from the persistent cache, or None. The first read decides: an entry that
        alone serves verified data (see :mod:`.cached`) turns this feed's own hash off; nothing
        was served before, so nothing is left unverified."""
        try:
            data = await cached.read(offset, end, nearby=nearby)
        except IntegrityError as error:
            self._fail(error)
            raise
        if not self._trust_decided:
            self._trust_decided = True
            if cached.trusted and self._verification.enabled:
                self._hasher.stop()
                self._verification.disable()
        self._raise_if_corrupt()
        return data

    def _start_stream(self, offset: int, spooling: bool) -> Stream:
        """A stream from ``offset``; a spooling one starts a new pass from 0 with it."""
        self._slot.stop()
        return self._slot.start(
            offset, self._hasher.hash_from(offset, fresh=spooling), spooling=spooling
        )

    async def _on_chunk(self, stream: Stream) -> None:
        await self._spooled.write(stream)
        if self._cached is not None:
            await self._cached.store_streamed(stream)

    async def verdict(self) -> None:
        """For the read that reaches the end: once the bytes served cover the whole image (or a
        spool's download runs), wait until they are all verified; raise
        :class:`~glancefs.IntegrityError` on a mismatch, or the download's error."""
        spooled = self._spooled.spool is not None
        await self._hasher.verdict(self._start_stream, self._source.whole_only, spooled)
        self._raise_if_corrupt()

    def _fail(self, error: IntegrityError) -> None:
        """The image is corrupt in this feed: every read of it fails."""
        if self.corrupt is not None:
            return
        self.corrupt = error
        self._drop_data()
        if self._cached is not None:
            self._cached.corrupt()
        self._on_corrupt(error)
        self._wakeup.notify()

    def reset(self) -> None:
        """Forget everything this feed knew (SIGHUP): the next reads start afresh."""
        self._drop_data()
        self._spooled.reset()
        self.corrupt = None
        self._verification.reset()
        if self._verification.enabled:
            self._hasher.new_pass()
        self._wakeup.notify()

    async def aclose(self) -> None:
        self._drop_data()
        self._source.transfer.finished("closed")
        if self._cached is not None:
            await self._cached.aclose()
        self._wakeup.notify()

    def _drop_data(self) -> None:
        """Stop the download and the hash, forget the blocks, free the spool."""
        self._slot.stop()
        self._hasher.stop()
        self._blocks.clear()
        self._spooled.close()

    def _raise_if_corrupt(self) -> None:
        if self.corrupt is not None:
            raise_again(self.corrupt)
