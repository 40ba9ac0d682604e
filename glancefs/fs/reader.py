"""Reading image data for one open file: a prefetching stream for sequential readers, ranged
blocks with a small cache for random ones.

Every request costs Glance about 10 ms, so a sequential reader (cat, dd, cp, sha256sum) must not
pay one request per FUSE read: it is served from one long-lived ranged download that runs ahead of
it into a buffer. The run-ahead window starts small (a tool that reads a header and seeks away
wastes little) and doubles as the reader keeps up, up to a cap that a global budget divides among
the open streams. The kernel's readahead sends several reads of one file at once and they may
arrive out of order, so the buffer keeps some data behind the furthest read and a read that lands
a little ahead of the stream simply waits for it.

A read far from the stream (qemu-img, fio) fetches the aligned block(s) around it with one ranged
GET and keeps a few blocks; two reads in a row that continue where the previous one ended start a
new stream there ("a far seek restarts the stream").

Integrity: a stream that starts at offset 0 hashes what it receives, in a worker thread beside
the download, and the read that reaches the end of the image waits for the verdict and fails with
:class:`~glancefs.IntegrityError` on a mismatch. A file read by seeking around is never verified
(Glance records only whole-image hashes).
"""

from __future__ import annotations

import logging
import math
import sys
from collections import OrderedDict, deque
from dataclasses import dataclass

import trio

from glancefs import (
    Client,
    GlanceError,
    Image,
    IntegrityError,
    TransportError,
    Verifier,
    is_retryable,
)

from .background import failure_of
from .status import STATUS

__all__ = ["ImageReader", "PrefetchBudget", "ReadTuning"]

log = logging.getLogger("glancefs.reader")


@dataclass(frozen=True)
class ReadTuning:
    """Knobs of the data path; the defaults were measured on loopback (see BENCHMARKS.md)."""

    initial_window: int = 1024 * 1024
    max_window: int = 32 * 1024 * 1024
    #: Data kept behind the furthest read, for out-of-order kernel readahead.
    keep_behind: int = 4 * 1024 * 1024
    block_size: int = 256 * 1024
    cached_blocks: int = 16
    #: Reads continuing the previous one before a random reader gets a stream.
    sequential_trigger: int = 2
    #: Stream restarts after a broken download before the read fails.
    stream_retries: int = 3


class PrefetchBudget:
    """The memory all run-ahead windows may use together; each open stream gets an equal share."""

    def __init__(self, total_bytes: int) -> None:
        self.total_bytes = total_bytes
        self.open_streams = 0

    def window_cap(self, max_window: int) -> int:
        return max(256 * 1024, min(max_window, self.total_bytes // max(1, self.open_streams)))


class _Stream:
    """One ranged download from ``origin`` on and the buffer it fills."""

    def __init__(self, origin: int, window: int) -> None:
        self.origin = origin
        self.start = origin  # offset of the first buffered byte
        self.end = origin  # offset after the last buffered byte
        self.chunks: deque[bytes] = deque()
        self.wanted = origin  # furthest byte any read asked for
        #: Bytes up to here are hashed; the buffer keeps what is not, and the download runs at
        #: most a window ahead of it, so a hash that lags behind bounds memory like a slow reader.
        self.hashed = sys.maxsize
        self.window = window
        self.error: GlanceError | None = None
        self.done = False  # pump finished (end of data or error)
        self.changed = trio.Event()  # set when data, an error or the end arrives
        self.wants_more = trio.Event()  # set when a read moved `wanted`
        self.cancel_scope = trio.CancelScope()

    def notify(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    def slice(self, offset: int, end: int) -> bytes:
        """Buffered bytes ``[offset, end)``; the caller checked they are all here.

        Copies each byte once (memoryview slices, then one join), or not at all when the range is
        exactly one chunk: this runs for every 1 MiB FUSE read.
        """
        parts: list[bytes | memoryview] = []
        position = self.start
        for chunk in self.chunks:
            chunk_end = position + len(chunk)
            if chunk_end > offset and position < end:
                low, high = max(0, offset - position), min(len(chunk), end - position)
                parts.append(chunk if high - low == len(chunk) else memoryview(chunk)[low:high])
            if chunk_end >= end:
                break
            position = chunk_end
        if len(parts) == 1 and isinstance(parts[0], bytes):
            return parts[0]
        return b"".join(parts)

    def unhashed(self) -> list[bytes]:
        """The buffered chunks from ``hashed`` on (chunks are hashed whole)."""
        pending: list[bytes] = []
        position = self.start
        for chunk in self.chunks:
            if position >= self.hashed:
                pending.append(chunk)
            position += len(chunk)
        return pending

    def trim(self, keep_from: int) -> None:
        """Drop whole chunks that end before ``keep_from`` (never chunks not hashed yet)."""
        keep_from = min(keep_from, self.hashed)
        while self.chunks and self.start + len(self.chunks[0]) <= keep_from:
            self.start += len(self.chunks.popleft())


class ImageReader:
    """Serves ``read(offset, size)`` for one open image file; ``aclose()`` when released."""

    def __init__(
        self,
        client: Client,
        image: Image,
        nursery: trio.Nursery,
        budget: PrefetchBudget,
        *,
        verify: bool = True,
        tuning: ReadTuning | None = None,
    ) -> None:
        self._client = client
        self._image = image
        self._size = image.size or 0
        self._nursery = nursery
        self._budget = budget
        self._verify = verify
        self._tuning = tuning or ReadTuning()
        self._stream: _Stream | None = None
        self._blocks: OrderedDict[int, bytes] = OrderedDict()
        self._last_end = -1
        self._continuing_reads = 0
        self.verified = False
        self._transfer = STATUS.started_transfer(image.id, image.name, "read", self._size)

    async def read(self, offset: int, size: int) -> bytes:
        """Bytes ``[offset, offset + size)`` of the image, fewer at its end, none past it."""
        end = min(offset + size, self._size)
        if offset >= end:
            return b""
        continuing = offset == self._last_end
        self._continuing_reads = self._continuing_reads + 1 if continuing else 0
        self._last_end = end
        stream = self._stream
        if stream is not None and self._reaches(stream, offset):
            return await self._read_stream(stream, offset, end)
        if offset == 0 or self._continuing_reads >= self._tuning.sequential_trigger:
            return await self._read_stream(self._start_stream(offset), offset, end)
        return await self._read_blocks(offset, end)

    async def aclose(self) -> None:
        self._stop_stream()
        self._blocks.clear()
        self._transfer.finished("closed")

    # -- the sequential path ------------------------------------------------------------------

    def _reaches(self, stream: _Stream, offset: int) -> bool:
        """Whether the stream has, or will soon have, the byte at ``offset``."""
        if stream.error is not None:
            return False
        return (
            stream.start <= offset <= stream.end + self._budget.window_cap(self._tuning.max_window)
        )

    def _start_stream(self, offset: int) -> _Stream:
        self._stop_stream()
        stream = _Stream(offset, self._tuning.initial_window)
        self._stream = stream
        self._budget.open_streams += 1
        STATUS.stream_opened()
        verifier = None
        if self._verify and offset == 0:
            verifier = Verifier.for_image(self._image)
            if verifier is not None:
                stream.hashed = offset
        self._nursery.start_soon(self._pump, stream, verifier)
        return stream

    def _stop_stream(self) -> None:
        if self._stream is not None:
            self._stream.cancel_scope.cancel()
            self._stream.chunks.clear()
            self._stream = None
            self._budget.open_streams -= 1
            STATUS.stream_opened(-1)

    async def _read_stream(self, stream: _Stream, offset: int, end: int) -> bytes:
        if end > stream.wanted:
            stream.wanted = end
            # The more the reader has consumed, the further ahead it is worth fetching.
            cap = self._budget.window_cap(self._tuning.max_window)
            stream.window = min(cap, max(stream.window, 2 * (end - stream.origin)))
            stream.wants_more.set()
        while stream.end < end and not stream.done:
            await stream.changed.wait()
        if stream.error is not None and stream.end < end:
            raise stream.error
        if offset < stream.start:
            # Readahead fell behind what we kept: fetch it directly rather than fail.
            return await self._read_blocks(offset, end)
        data = stream.slice(offset, end)
        stream.trim(stream.wanted - self._tuning.keep_behind)
        if end == self._size and stream.origin == 0 and self._verify:
            while not (stream.done or self.verified):
                await stream.changed.wait()
            if stream.error is not None:
                raise stream.error
        return data

    async def _pump(self, stream: _Stream, verifier: Verifier | None) -> None:
        """Fill the stream's buffer, staying at most a window ahead of the furthest read.

        Runs in the filesystem's nursery: it must never raise, or the whole mount would stop.
        Failures are stored in ``stream.error`` for the reads to raise.
        """

        async def download() -> None:
            if verifier is None:
                await self._download(stream)
            else:
                await self._download_and_hash(stream, verifier)

        with stream.cancel_scope:
            try:
                error = await failure_of(download, f"image {self._image.id}: download")
                if error is not None:
                    stream.error = error
            finally:
                stream.done = True
                stream.notify()

    async def _download_and_hash(self, stream: _Stream, verifier: Verifier) -> None:
        """Download and hash side by side: hashing costs as much CPU as receiving."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._hash, verifier, stream, nursery.cancel_scope)
            try:
                await self._download(stream)
            except GlanceError as error:
                stream.error = error
                nursery.cancel_scope.cancel()

    async def _download(self, stream: _Stream) -> None:
        failures = 0
        while stream.end < self._size:
            try:
                async with await self._client.images.open_data(self._image.id, stream.end) as data:
                    async for chunk in data.chunks():
                        stream.chunks.append(chunk)
                        stream.end += len(chunk)
                        self._transfer.progress(len(chunk))
                        failures = 0
                        stream.notify()
                        while stream.end - min(stream.wanted, stream.hashed) >= stream.window:
                            stream.wants_more = trio.Event()
                            await stream.wants_more.wait()
                    if data.end <= stream.end and stream.end < self._size:
                        raise TransportError(
                            f"image {self._image.id}: download ended at byte {stream.end} of "
                            f"{self._size}"
                        )
            except GlanceError as error:
                failures += 1
                if not is_retryable(error) or failures > self._tuning.stream_retries:
                    raise
                log.info(
                    "image %s: download broke at byte %d (%s), resuming",
                    self._image.id,
                    stream.end,
                    error,
                )
                await trio.sleep(0.25 * failures)

    async def _hash(self, verifier: Verifier, stream: _Stream, download: trio.CancelScope) -> None:
        """Hash the stream's buffer as it fills, in a worker thread.

        Each batch is everything that arrived while the previous one was hashed: one hop to the
        thread per batch, not per socket read (each hop costs GIL handoffs and a wakeup).
        """
        while stream.hashed < self._size:
            batch = stream.unhashed()
            if not batch:
                await stream.changed.wait()
                continue
            await verifier.update_many(batch)
            stream.hashed += sum(len(chunk) for chunk in batch)
            stream.wants_more.set()  # the download may be waiting for the hash to catch up
        try:
            verifier.check()
        except IntegrityError as error:
            stream.error = error
            download.cancel()
        else:
            self.verified = True
        stream.notify()

    # -- the random path ------------------------------------------------------------------------

    async def _read_blocks(self, offset: int, end: int) -> bytes:
        block_size = self._tuning.block_size
        first = offset // block_size
        last = (end - 1) // block_size
        missing = [b for b in range(first, last + 1) if b not in self._blocks]
        if missing:
            await self._fetch_blocks(missing[0], missing[-1])
        data = b"".join(self._blocks[b] for b in range(first, last + 1))
        for b in range(first, last + 1):
            self._blocks.move_to_end(b)
        while len(self._blocks) > self._tuning.cached_blocks:
            self._blocks.popitem(last=False)
        start = offset - first * block_size
        return data[start : start + (end - offset)]

    async def _fetch_blocks(self, first: int, last: int) -> None:
        block_size = self._tuning.block_size
        start = first * block_size
        length = min((last + 1) * block_size, self._size) - start
        parts: list[bytes] = []
        async with await self._client.images.open_data(self._image.id, start, length) as data:
            async for chunk in data.chunks():
                parts.append(chunk)
                self._transfer.progress(len(chunk))
        body = b"".join(parts)
        if len(body) != length:
            raise GlanceError(
                f"image {self._image.id}: asked for {length} bytes at {start}, got {len(body)}"
            )
        for index in range(math.ceil(length / block_size)):
            self._blocks[first + index] = body[index * block_size : (index + 1) * block_size]
