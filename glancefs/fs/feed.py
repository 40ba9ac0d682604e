"""One image's data for every open file of it: one shared download, one running hash, blocks.

An :class:`ImageFeed` exists while at least one file of its image is open (the readers registry
in :mod:`glancefs.fs.reader` counts them). Its parts:

* **The stream**: at most one ranged download of the image at a time, filling a buffer that
  every open file reads from. It runs at most a window ahead of the furthest read (and of the
  hash), keeps a little data behind it for out-of-order kernel readahead, and gives its
  connection back when it has been paused for ``idle_release`` seconds or when another request
  waits for a connection slot; the next read that needs more restarts it with a ranged GET at the
  end of the buffer. A broken download resumes where it broke.
* **Blocks**: reads the stream does not reach fetch the aligned 256 KiB blocks around them with
  one ranged GET and keep a few (random readers: qemu-img, fio).
* **The verification pass**: a running hash (``os_hash_algo``, else ``checksum``) over the
  image's bytes in order, ``[0, hashed)``, fed only from the stream's buffer and only while
  the stream is contiguous with ``hashed``. Bytes a read was served from the stream at or after
  ``hashed`` are the very bytes the hash later sees (the buffer keeps what is not hashed yet; a
  buffer given up with unhashed bytes first records their checksum, below).

Bytes served from anywhere else (blocks, a stream that started ahead of ``hashed``, a stream
behind it) are recorded as a *check*: the zlib crc32 of exactly what was served. A check at or
after ``hashed`` is settled when the hash passes over it: the crc32 of the bytes hashed there must
match. A check before ``hashed`` (the hash already went by) waits for the next pass, which starts
when a stream starts at offset 0, or when a whole-image verdict is needed. So a mismatch is found
whether the fault hit the bytes served or the bytes hashed.

The verdict: once the bytes served (to every open file together; the page cache of an image that
is not verified is dropped when it is opened, so the page cache holds only bytes served here)
cover the whole image, the read that served the last bytes not served before, and every read
that reaches the image's end, wait until a pass has hashed all of it and every check is
settled, restarting the stream at ``hashed`` if nothing feeds the hash. (The read of the end
alone would not do: reads complete out of order, and the kernel answers end of file from its
cache once the end's page is there.) A
mismatch (hash or crc32) makes the feed *corrupt*: every read of it fails with
:class:`~glancefs.IntegrityError` until :meth:`ImageFeed.reset` (SIGHUP), and ``on_corrupt`` is
called once. A reader that only seeks around never covers the image and gets no verdict.
"""

from __future__ import annotations

import logging
import math
import zlib
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

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

from .background import failure_of, raise_again
from .cached import CachedImage
from .extents import Extents
from .status import STATUS

__all__ = ["ImageFeed", "PrefetchBudget", "ReadTuning"]

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
    #: Seconds a paused stream keeps its connection when nobody else waits for one.
    idle_release: float = 1.0
    #: Seconds a stream that is being read keeps its connection while other requests wait
    #: (each hand-over costs a new ranged GET, so not too often).
    slot_slice: float = 4.0
    #: Seconds without a read after which a stream may be moved to another reader's offset.
    stream_idle: float = 1.0
    #: Seconds a read fails at once with the error that just failed one: the kernel retries a
    #: failed readahead page with a read of its own, which must not wait for Glance again.
    failure_grace: float = 1.0


class PrefetchBudget:
    """The memory all run-ahead windows may use together; each open stream gets an equal share."""

    def __init__(self, total_bytes: int) -> None:
        self.total_bytes = total_bytes
        self.open_streams = 0

    def window_cap(self, max_window: int) -> int:
        return max(256 * 1024, min(max_window, self.total_bytes // max(1, self.open_streams)))


class _Stream:
    """One ranged download from ``origin`` on and the buffer it fills."""

    def __init__(self, origin: int, window: int, hash_from: int | None) -> None:
        self.origin = origin
        self.start = origin  # offset of the first buffered byte
        self.end = origin  # offset after the last buffered byte
        self.chunks: deque[bytes] = deque()
        self.furthest = origin  # furthest byte any read asked of it
        #: The offset from which this buffer feeds the verification pass (None: it does not).
        self.hash_from = hash_from
        self.window = window
        self.error: GlanceError | None = None
        self.done = False  # pump finished (end of data or error)
        self.last_read = trio.current_time()
        self.readers_waiting = 0
        self.wants_more = trio.Event()  # set when a read or the hash made room in the window
        self.cancel_scope = trio.CancelScope()
        #: Bytes before this were handed to the cache, in whole blocks.
        self.stored = origin

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

    def trim(self, keep_from: int) -> None:
        """Drop whole chunks that end before ``keep_from``."""
        while self.chunks and self.start + len(self.chunks[0]) <= keep_from:
            self.start += len(self.chunks.popleft())


@dataclass(eq=False)
class _Check:
    """The crc32 of bytes ``[start, end)`` as served, to compare with the bytes hashed there."""

    start: int
    end: int
    served: int
    hashed: int = 0  # running crc32 of the hashed bytes [start, checked)
    checked: int = -1

    def __post_init__(self) -> None:
        self.checked = self.start


@dataclass(eq=False)
class _Pass:
    """One verification pass over the whole image, from byte 0."""

    verifier: Verifier
    checks: list[_Check] = field(default_factory=list)
    hashed: int = 0
    complete: bool = False
    cancel_scope: trio.CancelScope = field(default_factory=trio.CancelScope)


class ImageFeed:
    """The shared data of one image (see the module docstring); ``aclose()`` when the last file
    of it is released."""

    def __init__(
        self,
        client: Client,
        image: Image,
        nursery: trio.Nursery,
        budget: PrefetchBudget,
        on_corrupt: Callable[[IntegrityError], None],
        *,
        verify: bool = True,
        verified_cache: bool = False,
        cached: CachedImage | None = None,
        tuning: ReadTuning | None = None,
    ) -> None:
        self._client = client
        self.image = image
        self.size = image.size or 0
        self._nursery = nursery
        self._budget = budget
        self._on_corrupt = on_corrupt
        self._verify = verify and Verifier.for_image(image) is not None
        self._tuning = tuning or ReadTuning()
        self.open_files = 0
        self.corrupt: IntegrityError | None = None
        self._stream: _Stream | None = None
        self._blocks: OrderedDict[int, bytes] = OrderedDict()
        self._changed = trio.Event()
        self._served = Extents()
        self._pass: _Pass | None = None
        #: Checks of bytes served where the current pass had already hashed.
        self._later_checks: list[_Check] = []
        #: Bytes were served that no completed pass verified yet.
        self._unverified = False
        #: When a read last failed because Glance did not answer or broke, and how.
        self._last_failure: tuple[float, GlanceError] | None = None
        #: The persistent cache's entry of the image (None: not cached), and whether the first
        #: read decided if the entry alone can serve verified data.
        self._cached = cached
        self._trust_decided = False
        #: What `glancefs status` shows of this image's downloads (from the first byte on).
        self._transfer = STATUS.started_transfer(image.id, image.name, "read", self.size)
        self._start_verification(verified_cache)

    def _start_verification(self, verified_cache: bool) -> None:
        if not self._verify:
            return
        if verified_cache:
            # The kernel keeps the pages an earlier feed verified: they count as served, so the
            # end of a whole read waits for a pass over what this feed serves on top.
            self._served.add(0, self.size)
        self._new_pass()

    @property
    def clean(self) -> bool:
        """Every byte served (so every page this feed put in the page cache) was verified, or
        the image is not verified at all (``--no-verify``, no recorded hash)."""
        return self.corrupt is None and not self._unverified

    # -- reads ----------------------------------------------------------------------------

    async def read(self, offset: int, end: int, *, sequential: bool) -> bytes:
        """Bytes ``[offset, end)`` (the caller clipped ``end`` to the size). ``sequential``: the
        reader continues where it was, so it may move the stream here."""
        self._raise_if_corrupt()
        if self._last_failure is not None:
            failed_at, error = self._last_failure
            if trio.current_time() - failed_at < self._tuning.failure_grace:
                raise_again(error)
            self._last_failure = None
        try:
            data, covered_last = await self._read(offset, end, sequential)
            if covered_last:
                # No byte of the image is left that no read was served: this is the last read
                # any reader of the whole image needs from here. Its end of file may come from
                # the kernel (the end's pages may be cached by an earlier read, of this file or
                # another one, which returned before the image was covered), so the verdict
                # must come now.
                await self.verdict()
            return data
        except GlanceError as error:
            if is_retryable(error):
                self._last_failure = (trio.current_time(), error)
            raise

    async def _read(self, offset: int, end: int, sequential: bool) -> tuple[bytes, bool]:
        """The bytes, and whether they were the last of the image no read had been served."""
        cached = self._cached
        stream = self._stream
        # A stream that has the bytes serves them, from memory and hashed where they are; the
        # cache serves the rest (and everything, once trusted: then no stream runs).
        if cached is not None and (stream is None or not self._reaches(stream, offset)):
            data = await self._read_cached(cached, offset, end)
            if data is not None:
                return data, self._account(offset, end, data, None)
        data = None
        if stream is not None and self._reaches(stream, offset):
            data = await self._read_stream(stream, offset, end)
        elif sequential and self._may_move_stream(stream):
            stream = self._start_stream(offset)
            data = await self._read_stream(stream, offset, end)
        if data is None:
            stream = None
            if cached is not None:  # whole cache blocks, stored for the next reads
                data = await cached.fetch(offset, end)
            else:
                data = await self._read_blocks(offset, end)
        self._raise_if_corrupt()
        return data, self._account(offset, end, data, stream)

    async def _read_cached(self, cached: CachedImage, offset: int, end: int) -> bytes | None:
        """The bytes from the persistent cache, or None. The first read decides: an entry that
        alone serves verified data (see :mod:`glancefs.fs.cached`) turns this feed's own hash
        off; nothing was served before, so nothing is left unverified."""
        try:
            data = await cached.read(offset, end)
        except IntegrityError as error:
            self._fail(error)
            raise
        if not self._trust_decided:
            self._trust_decided = True
            if cached.trusted and self._verify:
                self._verify = False
                if self._pass is not None:
                    self._pass.cancel_scope.cancel()
                    self._pass = None
        self._raise_if_corrupt()
        return data

    async def verdict(self) -> None:
        """For the read that reaches the end: once the bytes served cover the whole image, wait
        until they are all verified; raise :class:`~glancefs.IntegrityError` on a mismatch, or
        the download's error."""
        if not self._verify or not self._served.covers(0, self.size):
            return
        while True:
            self._raise_if_corrupt()
            if not self._unverified:
                return
            current = self._pass
            if current is None or current.complete:
                current = self._new_pass()
            stream = self._stream
            if stream is not None and stream.hash_from is not None and stream.error is not None:
                self._stop_stream()
                raise_again(stream.error)
            if stream is None or stream.hash_from is None:
                stream = self._start_stream(current.hashed)
            stream.furthest = self.size  # the hash needs all of it
            stream.wants_more.set()
            await self._wait_changed()

    def _raise_if_corrupt(self) -> None:
        if self.corrupt is not None:
            raise_again(self.corrupt)

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def _wait_changed(self) -> None:
        await self._changed.wait()

    def _account(self, offset: int, end: int, data: bytes, stream: _Stream | None) -> bool:
        """Record what was served: which bytes, and a check for those the hash will not see
        (or did not see) in this very buffer. True when these bytes completed the served set."""
        was_covered = self._served.covers(0, self.size)
        self._served.add(offset, end)
        covered_last = not was_covered and self._served.covers(0, self.size)
        current = self._pass
        if current is None:
            return covered_last
        if not current.complete:
            self._unverified = True  # verified when the pass completes
        covered_from = end
        if stream is not None and stream.hash_from is not None:
            covered_from = min(end, max(offset, stream.hash_from))
        # [offset, covered_from) came from elsewhere than the hashed buffer.
        hashed = current.hashed if not current.complete else self.size
        view = memoryview(data)
        if offset < covered_from:
            self._unverified = True
        if offset < min(covered_from, hashed):
            high = min(covered_from, hashed)
            crc = zlib.crc32(view[: high - offset])
            self._later_checks.append(_Check(offset, high, crc))
        if max(offset, hashed) < covered_from:
            low = max(offset, hashed)
            crc = zlib.crc32(view[low - offset : covered_from - offset])
            current.checks.append(_Check(low, covered_from, crc))
        return covered_last

    # -- the stream -------------------------------------------------------------------------

    def _window_cap(self) -> int:
        return self._budget.window_cap(self._tuning.max_window)

    def _reaches(self, stream: _Stream, offset: int) -> bool:
        """Whether the stream has, or will soon have, the byte at ``offset``."""
        if stream.error is not None:
            return False
        return stream.start <= offset <= stream.end + self._window_cap()

    def _may_move_stream(self, stream: _Stream | None) -> bool:
        """A sequential reader may take the stream unless another reader is using it."""
        if stream is None or stream.error is not None or stream.done:
            return True
        if stream.readers_waiting:
            return False
        if stream.end >= self.size:
            return True  # nothing left to download: its buffer is all it still has to give
        return trio.current_time() - stream.last_read >= self._tuning.stream_idle

    def _new_pass(self) -> _Pass:
        verifier = Verifier.for_image(self.image)
        assert verifier is not None
        if self._pass is not None:
            self._pass.cancel_scope.cancel()
        if self._stream is not None:
            self._stream.hash_from = None  # it fed the previous pass, not this one
        current = _Pass(verifier, checks=self._later_checks)
        self._later_checks = []
        self._pass = current
        self._nursery.start_soon(self._hash, current)
        return current

    def _start_stream(self, offset: int) -> _Stream:
        self._stop_stream()
        current = self._pass
        if current is not None and current.complete and offset == 0:
            current = self._new_pass()  # a read from the start: verify again along with it
        hash_from = None
        if current is not None and not current.complete and offset <= current.hashed:
            hash_from = current.hashed
        stream = _Stream(offset, self._tuning.initial_window, hash_from)
        self._stream = stream
        self._budget.open_streams += 1
        STATUS.stream_opened()
        self._nursery.start_soon(self._pump, stream)
        return stream

    def _stop_stream(self) -> None:
        stream = self._stream
        if stream is None:
            return
        self._stream = None
        self._budget.open_streams -= 1
        STATUS.stream_opened(-1)
        stream.cancel_scope.cancel()
        current = self._pass
        if current is not None and stream.hash_from is not None and not current.complete:
            # Bytes read from this buffer that the hash has not reached are never hashed from
            # it now: check them against whatever buffer the hash does see there.
            low = max(current.hashed, stream.start)
            if low < stream.end:
                crc = 0
                for piece in stream.pieces(low, stream.end):
                    crc = zlib.crc32(piece, crc)
                current.checks.append(_Check(low, stream.end, crc))
        # The chunks stay with the stream object: a hash batch in flight may still read them.

    def _stream_waits(self, stream: _Stream) -> bool:
        """Whether the download must pause: a window ahead of the readers (and of the hash)."""
        if stream.end >= self.size:
            return False
        ahead_of = stream.furthest
        current = self._pass
        if stream.hash_from is not None and current is not None and not current.complete:
            ahead_of = min(ahead_of, current.hashed)
        return stream.end - ahead_of >= stream.window

    async def _read_stream(self, stream: _Stream, offset: int, end: int) -> bytes | None:
        """The bytes from the stream, waiting for them; None when it no longer holds them."""
        stream.last_read = trio.current_time()
        if end > stream.furthest:
            stream.furthest = end
            # The more the readers consumed, the further ahead it is worth fetching.
            stream.window = min(self._window_cap(), max(stream.window, 2 * (end - stream.origin)))
            stream.wants_more.set()
        stream.readers_waiting += 1
        try:
            while stream.end < end and not stream.done and self.corrupt is None:
                await self._wait_changed()
        finally:
            stream.readers_waiting -= 1
        self._raise_if_corrupt()
        if stream.end < end:
            if stream.error is None and stream is not self._stream:
                return None  # the stream was stopped (moved, or reset) under this read
            if stream is self._stream:
                self._stop_stream()
            raise_again(
                stream.error
                or TransportError(
                    f"image {self.image.id}: download ended at byte {stream.end} of {self.size}"
                )
            )
        if offset < stream.start:
            return None  # readahead fell behind what we kept: fetch it directly rather than fail
        data = stream.slice(offset, end)
        keep_from = stream.furthest - self._tuning.keep_behind
        current = self._pass
        if stream.hash_from is not None and current is not None and not current.complete:
            keep_from = min(keep_from, current.hashed)
        stream.trim(keep_from)
        return data

    async def _pump(self, stream: _Stream) -> None:
        """Fill the stream's buffer. Runs in the mount's nursery: it must never raise, or the
        whole mount would stop. Failures are kept in ``stream.error`` for the reads to raise."""
        with stream.cancel_scope:
            try:
                error = await failure_of(
                    lambda: self._download(stream), f"image {self.image.id}: download"
                )
                if error is not None:
                    stream.error = error
                    if is_retryable(error):  # before any read wakes: they all fail at once
                        self._last_failure = (trio.current_time(), error)
            finally:
                stream.done = True
                self._notify()

    async def _download(self, stream: _Stream) -> None:
        """Download from ``stream.end`` to the end of the image, pausing with the window.

        A download that breaks after delivering data resumes where it broke. The attempts
        since the last byte arrived count against the client's retries, so a Glance that stops
        answering fails the reads within ``timeout`` x (``retries`` + 1).
        """
        failures = 0  # attempts that failed since the last byte arrived
        connections = self._client.connections
        while stream.end < self.size:
            while self._stream_waits(stream):
                stream.wants_more = trio.Event()
                await stream.wants_more.wait()
            retries = None if failures == 0 else self._client.retries - failures
            # Failing to open has used its own retries: that error is final.
            data = await self._client.images.open_data(self.image.id, stream.end, retries=retries)
            try:
                async with data:
                    held_since = trio.current_time()
                    async for chunk in data.chunks():
                        stream.chunks.append(chunk)
                        stream.end += len(chunk)
                        self._transfer.progress(len(chunk))
                        if self._cached is not None:
                            # Shielded: the readers may finish from memory and close the file
                            # (stopping this stream) while whole blocks wait for the disk.
                            with trio.CancelScope(shield=True):
                                await self._store_streamed(self._cached, stream)
                        failures = 0
                        self._notify()
                        if self._stream_waits(stream):
                            if not await self._room_or_give_back(stream):
                                break
                            held_since = trio.current_time()
                        elif (
                            connections.waiting
                            and trio.current_time() - held_since >= self._tuning.slot_slice
                        ):
                            break  # let the requests waiting for a connection go first
                    else:
                        if data.end <= stream.end < self.size:
                            raise TransportError(
                                f"image {self.image.id}: download ended at byte {stream.end} "
                                f"of {self.size}"
                            )
            except GlanceError as error:
                failures += 1
                if not is_retryable(error) or failures > self._client.retries:
                    raise
                log.info(
                    "image %s: download broke at byte %d (%s), resuming",
                    self.image.id,
                    stream.end,
                    error,
                )

    async def _store_streamed(self, cached: CachedImage, stream: _Stream) -> None:
        """Hand the cache every whole block the stream now holds (waits while the disk lags)."""
        size = cached.block_size
        stream.stored = -(-stream.stored // size) * size  # a stream may start inside a block
        while stream.stored < self.size:
            end = min(stream.stored + size, self.size)
            if stream.end < end:
                return
            if stream.start <= stream.stored:  # else readers trimmed it already: not stored
                await cached.store(stream.stored // size, stream.slice(stream.stored, end))
            stream.stored = end

    async def _room_or_give_back(self, stream: _Stream) -> bool:
        """Wait for room in the window while holding the connection; False when the stream
        should give it back: paused for ``idle_release`` seconds, or another request waits
        (checked whenever the stream wakes, and at the latest after ``idle_release``).

        Runs for every chunk while a reader keeps the window full: no tasks, one cancel scope.
        """
        connections = self._client.connections
        with trio.move_on_after(self._tuning.idle_release):
            while self._stream_waits(stream):
                if connections.waiting:
                    return False
                stream.wants_more = trio.Event()
                await stream.wants_more.wait()
            return True
        return False

    # -- the hash -----------------------------------------------------------------------------

    async def _hash(self, current: _Pass) -> None:
        """Hash the stream's buffer as it fills, in a worker thread, then decide.

        Each batch is everything that arrived while the previous one was hashed: one hop to the
        thread per batch, not per socket read (each hop costs GIL handoffs and a wakeup).
        Runs in the mount's nursery: never raises (a mismatch goes to :meth:`_fail`).
        """
        with current.cancel_scope:
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
                pieces = stream.pieces(low, high)
                await current.verifier.update_many(pieces)
                if current is not self._pass:
                    return  # reset while hashing
                current.hashed = high
                if not self._settle_checks(current, stream, low, high):
                    return
                stream.wants_more.set()  # the download may be waiting for the hash
                self._notify()
            try:
                current.verifier.check()
            except IntegrityError as error:
                self._fail(error)
                return
            current.complete = True
            self._unverified = bool(self._later_checks)
            if not self._unverified:
                log.info("image %s: verified (%s)", self.image.id, current.verifier.algorithm)
            self._notify()

    def _settle_checks(self, current: _Pass, stream: _Stream, low: int, high: int) -> bool:
        """Advance the checks over the bytes just hashed, ``[low, high)`` of ``stream``; False
        after a mismatch."""
        remaining: list[_Check] = []
        for check in current.checks:
            start, end = max(check.checked, low), min(check.end, high)
            if start < end:
                for piece in stream.pieces(start, end):
                    check.hashed = zlib.crc32(piece, check.hashed)
                check.checked = end
            if check.checked < check.end:
                remaining.append(check)
            elif check.hashed != check.served:
                self._fail(
                    IntegrityError(
                        f"image {self.image.id}: crc32 of bytes {check.start}-{check.end} as "
                        f"served is {check.served:08x}, of the bytes hashed there "
                        f"{check.hashed:08x}: data is corrupt"
                    )
                )
                return False
        current.checks = remaining
        return True

    def _fail(self, error: IntegrityError) -> None:
        """The image is corrupt in this mount: every read fails until :meth:`reset`."""
        if self.corrupt is not None:
            return
        self.corrupt = error
        self._stop_stream()
        self._blocks.clear()
        if self._cached is not None:
            self._cached.corrupt()
        self._on_corrupt(error)
        self._notify()

    def reset(self) -> None:
        """Forget everything this feed knew (SIGHUP): the next reads start afresh."""
        self._stop_stream()
        self._blocks.clear()
        self._served.clear()
        self._later_checks = []
        self._unverified = False
        self.corrupt = None
        if self._pass is not None:
            self._pass.cancel_scope.cancel()
            self._pass = None
        self._start_verification(False)
        self._notify()

    async def aclose(self) -> None:
        self._stop_stream()
        self._transfer.finished("closed")
        self._blocks.clear()
        if self._pass is not None:
            self._pass.cancel_scope.cancel()
        if self._cached is not None:
            await self._cached.aclose()
        self._notify()

    # -- the random path ------------------------------------------------------------------------

    async def _read_blocks(self, offset: int, end: int) -> bytes:
        block_size = self._tuning.block_size
        first = offset // block_size
        last = (end - 1) // block_size
        missing = [b for b in range(first, last + 1) if b not in self._blocks]
        if missing:
            await self._fetch_blocks(missing[0], missing[-1])
        self._raise_if_corrupt()
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
        length = min((last + 1) * block_size, self.size) - start
        parts: list[bytes] = []
        async with await self._client.images.open_data(self.image.id, start, length) as data:
            async for chunk in data.chunks():
                parts.append(chunk)
                self._transfer.progress(len(chunk))
        body = b"".join(parts)
        if len(body) != length:
            raise GlanceError(
                f"image {self.image.id}: asked for {length} bytes at {start}, got {len(body)}"
            )
        for index in range(math.ceil(length / block_size)):
            self._blocks[first + index] = body[index * block_size : (index + 1) * block_size]
