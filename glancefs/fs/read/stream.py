"""One download of an image's data and the buffer it fills, for every open file of the image.

A :class:`Stream` downloads from ``origin`` to the end of the image into a buffer of chunks that
the readers (and the running hash) read from. It runs at most a window ahead of its consumers:
the furthest read, and the hash where the stream feeds one (``hash_at``, set by the hash). A
*spooling* stream (reads without ranges, :mod:`glancefs.fs.spool`) ignores the readers and
runs as far ahead of the hash as the window allows, handing every chunk to the spool first.

It gives its connection back when it has been paused for ``idle_release`` seconds or when another
request waits for a connection slot; the feed then starts a new stream (a ranged GET) where the
next read needs it. A download that breaks resumes where it broke: with a ranged GET at the end
of the buffer, or, on a store that takes no ranges (``whole_only``), with a GET from 0 that skips
what the buffer already had. The attempts since the last byte arrived count against the
client's retries, so a Glance that stops answering fails the reads within ``timeout`` x
(``retries`` + 1).

Pitfall: the download runs in the mount's nursery and must never raise (the whole mount would
stop): failures are kept in :attr:`Stream.error` for the reads to raise.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable

import trio

from glancefs import GlanceError, TransportError
from glancefs.plumbing import is_retryable

from ..background import failure_of
from .policy import ReadTuning
from .source import ImageSource

__all__ = ["Stream"]

log = logging.getLogger("glancefs.reader")


class Stream:
    """One download from ``origin`` on and the buffer it fills (see the module docstring).

    ``on_chunk(stream)`` runs after each chunk was added and before the readers are woken (it
    stores whole blocks in the cache, or writes the spool); ``notify()`` wakes the readers.
    """

    def __init__(
        self,
        source: ImageSource,
        origin: int,
        *,
        window: int,
        hash_from: int | None,
        tuning: ReadTuning,
        window_cap: Callable[[], int],
        on_chunk: Callable[[Stream], Awaitable[None]] | None,
        notify: Callable[[], None],
        spooling: bool = False,
        storing: bool = False,
    ) -> None:
        self.source = source
        self.size = source.size
        self.origin = origin
        self.start = origin  # offset of the first buffered byte
        self.end = origin  # offset after the last buffered byte
        self.chunks: deque[bytes] = deque()
        self.furthest = origin  # furthest byte any read asked of it
        #: The offset from which this buffer feeds the verification pass (None: it does not),
        #: and how far that pass hashed (None once it stopped feeding on this buffer).
        self.hash_from = hash_from
        self.hash_at: int | None = hash_from
        self.window = window
        self.spooling = spooling
        self.error: GlanceError | None = None
        self.done = False  # pump finished (end of data or error)
        self.last_read = trio.current_time()
        self.readers_waiting = 0
        self.wants_more = trio.Event()  # set when a read or the hash made room in the window
        self.cancel_scope = trio.CancelScope()
        #: Whether ``on_chunk`` hands whole blocks to the cache, and the bytes before which it
        #: did: they are kept until then.
        self.storing = storing
        self.stored = origin
        self._tuning = tuning
        self._window_cap = window_cap
        self._on_chunk = on_chunk
        self._notify = notify
        self._failures = 0  # attempts that failed since the last byte arrived

    # -- the buffer -------------------------------------------------------------------------

    def pieces(self, offset: int, end: int) -> list[bytes | memoryview]:
        """Buffered bytes ``[offset, end)`` without copying; the caller checked they are here."""
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
        return parts

    def slice(self, offset: int, end: int) -> bytes:
        """Buffered bytes ``[offset, end)`` as one bytes object: a chunk that is exactly the range
        is returned as it is (this runs for every 1 MiB FUSE read), else one join."""
        parts = self.pieces(offset, end)
        if len(parts) == 1 and isinstance(parts[0], bytes):
            return parts[0]
        return b"".join(parts)

    def trim(self) -> None:
        """Drop whole chunks nobody needs any more: behind the readers' keep-behind (a spooling
        stream's readers read the spool), behind the hash, and behind what went to the cache."""
        keep_from = self.end if self.spooling else self.furthest - self._tuning.keep_behind
        if self.hash_at is not None:
            keep_from = min(keep_from, self.hash_at)
        if self.storing:
            keep_from = min(keep_from, self.stored)
        while self.chunks and self.start + len(self.chunks[0]) <= keep_from:
            self.start += len(self.chunks.popleft())

    def reaches(self, offset: int) -> bool:
        """Whether the stream has, or will soon have, the byte at ``offset``."""
        if self.error is not None:
            return False
        return self.start <= offset <= self.end + self._window_cap()

    def hashed_to(self, offset: int) -> None:
        """The hash this stream feeds consumed its bytes up to ``offset``."""
        self.hash_at = offset
        self.trim()
        self.wants_more.set()  # the download may be waiting for the hash

    def waits(self) -> bool:
        """Whether the download must pause: a window ahead of its consumers."""
        if self.end >= self.size:
            return False
        ahead_of = self.end if self.spooling else self.furthest
        if self.hash_at is not None:
            ahead_of = min(ahead_of, self.hash_at)
        return self.end - ahead_of >= self.window

    # -- reads --------------------------------------------------------------------------------

    def asked(self, end: int) -> None:
        """A read wants the bytes up to ``end``: let the download run far enough for it."""
        self.last_read = trio.current_time()
        if end > self.furthest:
            self.furthest = end
            # The more the readers consumed, the further ahead it is worth fetching.
            self.window = min(self._window_cap(), max(self.window, 2 * (end - self.origin)))
            self.wants_more.set()

    def missing_error(self) -> GlanceError:
        """Why the stream ended without the bytes a read waited for."""
        return self.error or TransportError(
            f"image {self.source.image_id}: download ended at byte {self.end} of {self.size}"
        )

    # -- the download -------------------------------------------------------------------------

    async def pump(self) -> None:
        """Fill the buffer; runs in the mount's nursery and never raises."""
        with self.cancel_scope:
            try:
                error = await failure_of(self._download, f"image {self.source.image_id}: download")
                if error is not None:
                    self.error = error
                    self.source.failed(error)  # before any read wakes: they all fail at once
            finally:
                self.done = True
                self._notify()

    async def _download(self) -> None:
        """Download from ``end`` to the end of the image, pausing with the window; resume after
        a break or after giving the connection back (see the module docstring)."""
        source = self.source
        while self.end < self.size:
            while self.waits():
                self.wants_more = trio.Event()
                await self.wants_more.wait()
            retries = None if self._failures == 0 else source.retries - self._failures
            resume_at = 0 if source.whole_only else self.end
            try:
                async with await source.open(resume_at, retries=retries) as data:
                    if await self._receive(data.chunks(), skip=self.end - resume_at):
                        continue  # gave the connection back; resume when there is room
                    if data.end <= self.end < self.size:
                        raise TransportError(
                            f"image {source.image_id}: download ended at byte {self.end} "
                            f"of {self.size}"
                        )
            except GlanceError as error:
                self._failures += 1
                if not is_retryable(error) or self._failures > source.retries:
                    raise
                log.info(
                    "image %s: download broke at byte %d (%s), resuming",
                    source.image_id,
                    self.end,
                    error,
                )

    async def _receive(self, chunks: AsyncIterator[bytes], skip: int) -> bool:
        """Buffer the response's chunks (after ``skip`` bytes already buffered); True when the
        stream stopped early to give its connection back (the feed restarts it when needed)."""
        held_since = trio.current_time()
        async for received in chunks:
            chunk = received
            if skip:
                if len(chunk) <= skip:
                    skip -= len(chunk)
                    continue
                chunk, skip = chunk[skip:], 0
            self.chunks.append(chunk)
            self.end += len(chunk)
            self.source.transfer.progress(len(chunk))
            self._failures = 0
            if self._on_chunk is not None:
                # Shielded: the readers may finish from memory and close the file (stopping
                # this stream) while the chunk's bytes wait for the disk.
                with trio.CancelScope(shield=True):
                    await self._on_chunk(self)
            self._notify()
            if self.waits():
                if not await self._room_or_give_back():
                    return True
                held_since = trio.current_time()
            elif (
                not self.source.whole_only
                and self.source.connections_waiting()
                and trio.current_time() - held_since >= self._tuning.slot_slice
            ):
                return True  # let the requests waiting for a connection go first
        return False

    async def _room_or_give_back(self) -> bool:
        """Wait for room in the window while holding the connection; False when the stream
        should give it back: paused for ``idle_release`` seconds, or another request waits
        (checked whenever the stream wakes, and at the latest after ``idle_release``). A stream
        of a store without ranges never gives it back: a new one would start over at byte 0.

        Runs for every chunk while a reader keeps the window full: no tasks, one cancel scope.
        """
        if self.source.whole_only:
            while self.waits():
                self.wants_more = trio.Event()
                await self.wants_more.wait()
            return True
        with trio.move_on_after(self._tuning.idle_release):
            while self.waits():
                if self.source.connections_waiting():
                    return False
                self.wants_more = trio.Event()
                await self.wants_more.wait()
            return True
        return False
