"""One image's data for every open file of it: the parts of :mod:`glancefs.fs.read`, wired.

An :class:`ImageFeed` exists while at least one file of its image is open (the registry in
:mod:`glancefs.fs.read.readers` counts them). A read is served, in this order, by:

1. the persistent cache (``--cache-dir``), where the stream does not reach (:mod:`.cached`);
2. the stream (:mod:`.stream`): the one download, when it holds or will soon hold the bytes, or
   when the reader is sequential and may take it;
3. on a store that takes ranges, the blocks around the read, with one ranged GET
   (:class:`~glancefs.fs.read.source.ImageSource`), the last few kept (:mod:`.blocks`) or
   stored in the cache;
4. on a store without ranges, the spool (:mod:`.spool`): one download from byte 0 written to
   local disk as it arrives, read behind it, waited for ahead of it.

Every byte served is accounted to the verification (:mod:`.verification`), whose running hash
this feed drives from the stream's buffer in a worker thread (:meth:`ImageFeed._hash`). Once the
bytes served cover the whole image, the read that served the last bytes not served before, and
every read that reaches the image's end, wait for the verdict. A mismatch makes the feed
*corrupt*: every read of it fails with :class:`~glancefs.IntegrityError`, ``on_corrupt`` is
called once.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable

import trio

from glancefs import GlanceError, IntegrityError, RangesRefused, is_retryable

from ..background import raise_again
from ..refusals import LocalFailure, Refusal
from ..status import STATUS
from .blocks import BlockLRU
from .cached import CachedImage
from .policy import Access, PrefetchBudget, ReadTuning
from .source import ImageSource, RangeSupport
from .spool import SpoolFile, SpoolSpace
from .stream import Stream
from .verification import Pass, Verification

__all__ = ["ImageFeed"]

log = logging.getLogger("glancefs.reader")


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
        self._nursery = nursery
        self._budget = budget
        self._on_corrupt = on_corrupt
        self._verification = verification
        self._ranges = ranges
        self._spool_space = spool_space
        self._cached = cached
        self._tuning = tuning or ReadTuning()
        self.open_files = 0
        self.corrupt: IntegrityError | None = None
        self._stream: Stream | None = None
        self._spool: SpoolFile | None = None
        self._spool_failure: Refusal | None = None
        self._blocks = BlockLRU(self._tuning.cached_blocks)
        self._changed = trio.Event()
        self._hash_scope = trio.CancelScope()
        #: When a read last failed because Glance did not answer or broke, and how.
        self._last_failure: tuple[float, GlanceError] | None = None
        #: Whether the first read decided if the cache entry alone serves verified data.
        self._trust_decided = False
        if verification.enabled:
            self._new_pass()

    @property
    def clean(self) -> bool:
        """Every byte served (so every page this feed put in the page cache) was verified, or
        the image is not verified at all (``--no-verify``, no recorded hash)."""
        return self.corrupt is None and not self._verification.unverified

    # -- reads ----------------------------------------------------------------------------

    async def read(self, offset: int, end: int, access: Access) -> bytes:
        """Bytes ``[offset, end)`` (the caller clipped ``end`` to the size), a read of the
        kind ``access`` says."""
        self._raise_if_corrupt()
        if self._last_failure is not None:
            failed_at, error = self._last_failure
            if trio.current_time() - failed_at < self._tuning.failure_grace:
                raise_again(error)
            self._last_failure = None
        try:
            try:
                data, hashed_from = await self._read(offset, end, access)
            except RangesRefused:
                self._ranges.refused(self.image)
                self._source.whole_only = True
                self._stop_stream()
                data, hashed_from = await self._read(offset, end, access)
            self._raise_if_corrupt()
            if self._verification.account(offset, end, data, hashed_from):
                # No byte of the image is left that no read was served: its end of file may
                # come from the kernel's cache, so the verdict must come now.
                await self.verdict()
            return data
        except GlanceError as error:
            if is_retryable(error):
                self._last_failure = (trio.current_time(), error)
            raise

    async def _read(self, offset: int, end: int, access: Access) -> tuple[bytes, int | None]:
        """The bytes, and the offset from which their buffer feeds the running hash (None:
        they came from elsewhere)."""
        cached, stream = self._cached, self._stream
        if cached is not None and (stream is None or not stream.reaches(offset)):
            data = await self._read_cached(cached, offset, end, access.nearby)
            if data is not None:
                return data, None
        if stream is not None and stream.reaches(offset):
            data = await self._read_stream(stream, offset, end)
            if data is not None:
                return data, stream.hash_from
        elif access.sequential and not self._source.whole_only and self._may_move_stream(stream):
            stream = self._start_stream(offset)
            data = await self._read_stream(stream, offset, end)
            if data is not None:
                return data, stream.hash_from
        if self._source.whole_only:
            return await self._read_whole_only(offset, end, access.sequential)
        if cached is not None:  # whole cache blocks, stored for the next reads
            return await cached.fetch(offset, end), None
        return await self._read_blocks(offset, end), None

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
                self._hash_scope.cancel()
                self._verification.disable()
        self._raise_if_corrupt()
        return data

    async def _read_whole_only(
        self, offset: int, end: int, sequential: bool
    ) -> tuple[bytes, int | None]:
        """A store without ranges: a sequential reader from 0 takes the stream (no disk); any
        other read is served from the spool, waiting for the download where it is ahead."""
        stream = self._stream
        if stream is None and offset == 0 and sequential:
            stream = self._start_stream(0)
            data = await self._read_stream(stream, offset, end)
            if data is not None:
                return data, stream.hash_from
        spool = self._spool
        stream = self._stream
        if spool is None or stream is None or not stream.spooling or stream.error is not None:
            stream = self._start_spooling()
            spool = self._spool
        assert spool is not None
        if end > spool.written:
            stream.asked(end)
            reached = await self._wait_for(stream, end, lambda: spool.written)
            if self._spool is not spool:
                return await self._read_whole_only(offset, end, sequential)
            if not reached:
                raise_again(stream.missing_error())
        try:
            return await spool.read(offset, end), stream.hash_from
        except OSError as error:
            self._raise_if_corrupt()
            if self._spool is not spool:  # closed under the read (reset)
                return await self._read_whole_only(offset, end, sequential)
            raise self._spool_error(error) from None

    def _start_spooling(self) -> Stream:
        """One download from byte 0 kept in a new spool file (a new pass hashes it)."""
        if self._spool_failure is not None:
            raise_again(self._spool_failure)
        self._close_spool()
        self._spool = self._spool_space.open(self.image.id, self.size)
        stream = self._start_stream(0, spooling=True)
        stream.furthest = self.size
        return stream

    async def _write_spool(self, stream: Stream) -> None:
        """A spooling stream's new bytes go to the spool before any reader is woken."""
        spool = self._spool
        if spool is None or not stream.spooling or self._stream is not stream:
            return
        try:
            await spool.append(stream.pieces(spool.written, stream.end))
        except OSError as error:
            self._spool_failure = self._spool_error(error)
            log.warning("%s", self._spool_failure)
            self._close_spool()
            stream.cancel_scope.cancel()
            return
        if stream.hash_at is None:
            stream.trim()

    def _spool_error(self, error: OSError) -> LocalFailure:
        return LocalFailure(
            f"image {self.image.id}: spool: {error.strerror or error}", error.errno or errno.EIO
        )

    def _close_spool(self) -> None:
        if self._spool is not None:
            self._spool.close()
            self._spool = None

    # -- the stream -------------------------------------------------------------------------

    async def _wait_for(
        self, stream: Stream, end: int, reached: Callable[[], int] | None = None
    ) -> bool:
        """Wait until ``stream`` has the bytes up to ``end`` (``reached()``: where they are
        ready, by default the stream's buffer); False when it ended without them (the stream is
        then stopped, if it still is this feed's)."""
        position = reached or (lambda: stream.end)
        stream.readers_waiting += 1
        try:
            while position() < end and not stream.done and self.corrupt is None:
                await self._wait_changed()
        finally:
            stream.readers_waiting -= 1
        self._raise_if_corrupt()
        if position() >= end:
            return True
        if stream is self._stream and stream.error is not None:
            self._stop_stream()
        return False

    async def _read_stream(self, stream: Stream, offset: int, end: int) -> bytes | None:
        """The bytes from the stream, waiting for them; None when it no longer holds them."""
        stream.asked(end)
        if not await self._wait_for(stream, end):
            if stream.error is None and stream is not self._stream:
                return None  # the stream was stopped (moved, or reset) under this read
            raise_again(stream.missing_error())
        if offset < stream.start:
            return None  # readahead fell behind what we kept: fetch it directly rather than fail
        data = stream.slice(offset, end)
        stream.trim()
        return data

    def _may_move_stream(self, stream: Stream | None) -> bool:
        """A sequential reader may take the stream unless another reader is using it."""
        if stream is None or stream.error is not None or stream.done:
            return True
        if stream.readers_waiting:
            return False
        if stream.end >= self.size:
            return True  # nothing left to download: its buffer is all it still has to give
        return trio.current_time() - stream.last_read >= self._tuning.stream_idle

    def _start_stream(self, offset: int, *, spooling: bool = False) -> Stream:
        self._stop_stream()
        current = self._verification.current
        if current is not None and (spooling or (current.complete and offset == 0)):
            current = self._new_pass()  # from the start: verify again along with it
        hash_from = None
        if current is not None and not current.complete and offset <= current.hashed:
            hash_from = current.hashed
        cap = self._budget.window_cap(self._tuning.max_window)
        stream = Stream(
            self._source,
            offset,
            window=cap if spooling else self._tuning.initial_window,
            hash_from=hash_from,
            tuning=self._tuning,
            window_cap=lambda: self._budget.window_cap(self._tuning.max_window),
            on_chunk=self._on_chunk,
            notify=self._notify,
            spooling=spooling,
        )
        self._stream = stream
        self._budget.open_streams += 1
        STATUS.stream_opened()
        self._nursery.start_soon(stream.pump)
        return stream

    def _stop_stream(self) -> None:
        stream = self._stream
        if stream is None:
            return
        self._stream = None
        self._budget.open_streams -= 1
        STATUS.stream_opened(-1)
        stream.cancel_scope.cancel()
        current = self._verification.current
        if current is not None and stream.hash_from is not None and not current.complete:
            # Bytes read from this buffer that the hash has not reached are never hashed from
            # it now: check them against whatever buffer the hash does see there.
            low = max(current.hashed, stream.start)
            pieces = stream.pieces(low, stream.end) if low < stream.end else []
            self._verification.buffer_dropped(current, low, pieces, stream.end)
        stream.hash_at = None
        # The chunks stay with the stream object: a hash batch in flight may still read them.

    async def _on_chunk(self, stream: Stream) -> None:
        await self._write_spool(stream)
        if self._cached is not None:
            await self._cached.store_streamed(stream)

    # -- verification -------------------------------------------------------------------------

    def _new_pass(self) -> Pass:
        self._hash_scope.cancel()
        if self._stream is not None:
            self._stream.hash_from = self._stream.hash_at = None  # it fed the previous pass
        current = self._verification.new_pass()
        self._hash_scope = trio.CancelScope()
        self._nursery.start_soon(self._hash, current, self._hash_scope)
        return current

    async def _hash(self, current: Pass, scope: trio.CancelScope) -> None:
        """Hash the stream's buffer as it fills, in a worker thread, then decide.

        Each batch is everything that arrived while the previous one was hashed: one hop to the
        thread per batch, not per socket read (each hop costs GIL handoffs and a wakeup).
        Runs in the mount's nursery: never raises (a mismatch goes to :meth:`_fail`).
        """
        verification = self._verification
        with scope:
            while current.hashed < self.size:
                stream = self._stream
                if (
                    stream is None
                    or stream.hash_from is None
                    or not stream.start <= current.hashed < stream.end
                ):
                    await self._wait_changed()
                    continue
                low, high = current.hashed, stream.end
                await current.verifier.update_many(stream.pieces(low, high))
                if current is not verification.current:
                    return  # reset while hashing
                mismatch = verification.hashed(current, low, high, stream.pieces)
                if mismatch is not None:
                    self._fail(mismatch)
                    return
                stream.hashed_to(high)
                self._notify()
            mismatch = verification.finish(current)
            if mismatch is not None:
                self._fail(mismatch)
                return
            if self._stream is not None:
                self._stream.hash_at = None
            if not verification.unverified:
                log.info("image %s: verified (%s)", self.image.id, current.verifier.algorithm)
            self._notify()

    async def verdict(self) -> None:
        """For the read that reaches the end: once the bytes served cover the whole image, wait
        until they are all verified; raise :class:`~glancefs.IntegrityError` on a mismatch, or
        the download's error."""
        verification = self._verification
        while self._verdict_due():
            self._raise_if_corrupt()
            current = verification.current
            if current is None or current.complete:
                current = self._new_pass()
            stream = self._stream
            if stream is not None and stream.hash_from is not None and stream.error is not None:
                self._stop_stream()
                raise_again(stream.error)
            if stream is None or stream.hash_from is None:
                # From where the hash is; a store without ranges starts over at byte 0.
                if self._source.whole_only and current.hashed > 0:
                    current = self._new_pass()
                stream = self._start_stream(current.hashed)
            stream.furthest = self.size  # the hash needs all of it
            stream.wants_more.set()
            await self._wait_changed()
        self._raise_if_corrupt()

    def _verdict_due(self) -> bool:
        """The served bytes cover the image and are not all verified yet; or, on a store without
        ranges, the spool's download (which hashes everything anyway) has not been verified."""
        verification = self._verification
        if verification.pending:
            return True
        spooled = self._spool is not None and verification.enabled
        return spooled and verification.unverified and self.corrupt is None

    def _fail(self, error: IntegrityError) -> None:
        """The image is corrupt in this feed: every read of it fails."""
        if self.corrupt is not None:
            return
        self.corrupt = error
        self._stop_stream()
        self._blocks.clear()
        self._close_spool()
        if self._cached is not None:
            self._cached.corrupt()
        self._on_corrupt(error)
        self._notify()

    def reset(self) -> None:
        """Forget everything this feed knew (SIGHUP): the next reads start afresh."""
        self._stop_stream()
        self._blocks.clear()
        self._close_spool()
        self._spool_failure = None
        self.corrupt = None
        self._hash_scope.cancel()
        self._verification.reset()
        if self._verification.enabled:
            self._new_pass()
        self._notify()

    async def aclose(self) -> None:
        self._stop_stream()
        self._source.transfer.finished("closed")
        self._blocks.clear()
        self._close_spool()
        self._hash_scope.cancel()
        if self._cached is not None:
            await self._cached.aclose()
        self._notify()

    def _raise_if_corrupt(self) -> None:
        if self.corrupt is not None:
            raise_again(self.corrupt)

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def _wait_changed(self) -> None:
        await self._changed.wait()

    # -- the random path ------------------------------------------------------------------------

    async def _read_blocks(self, offset: int, end: int) -> bytes:
        """The whole blocks around the read, the missing ones with one ranged GET."""
        size = self._tuning.block_size
        indexes = range(offset // size, (end - 1) // size + 1)
        blocks = {index: self._blocks.get(index) for index in indexes}
        missing = [index for index, block in blocks.items() if block is None]
        if missing:
            start = missing[0] * size
            body = await self._source.fetch(start, min((missing[-1] + 1) * size, self.size))
            for index in range(missing[0], missing[-1] + 1):
                blocks[index] = body[index * size - start : (index + 1) * size - start]
        for index, block in blocks.items():
            if block is not None:
                self._blocks.put(index, block)  # the blocks just read are kept longest
        self._raise_if_corrupt()
        start = offset - indexes.start * size
        return b"".join(block or b"" for block in blocks.values())[start : start + end - offset]
