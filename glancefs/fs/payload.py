"""What an upload carries to Glance: the bytes its writer wrote, held in memory until their order
is clear, then streamed in one PUT, or kept in the spool and sent whole at the end.

A :class:`Payload` is in one of three modes:

- **held** (from the start): nothing is sent. Writes are kept in memory as long as each comes at
  or past the end of the previous ones (the gap is a hole, read as zeros). Zeros written inside a
  size the writer set first (``ftruncate``, then the first block zeroed, as ``qemu-img create``
  does) are holes too. A payload that ends held is sent whole, its size known.
- **streamed**: once the first MiB came without a gap from offset 0 (``cp``, ``dd``: the disk
  format is known), or :data:`HOLD_BYTES` came in order with gaps, one PUT starts: every later
  write must come at or past the end (a hole is sent as zeros, generated, never stored), through
  a small channel (a writer that outruns Glance waits: memory stays bounded whatever the file
  size). A plain sequential writer never touches disk.
- **spooled**: a write behind the end while nothing is sent yet (an image tool going back to
  its header), a writer that comes back to a file it left with only a format's header, or
  ``--spool-dir``: every byte goes to a file of the mount's spool (:mod:`glancefs.fs.spool`),
  at the writer's offsets, within ``--spool-size``; it is sent whole at the end, its size known.

The size goes with the PUT (``x-openstack-image-size``, sent by the client's ``images.upload``)
whenever it is known before the data goes out: held or spooled payloads, and a streamed one whose
writer set the size before it wrote data; such a writer that then writes past that size, or sets
another, fails (EIO) rather than send another amount than announced.

The bytes go in one ``PUT .../file``, or, when the mount imports (:mod:`glancefs.fs.importing`:
``--import``, or Glance refusing the PUT by policy), in one ``PUT .../stage`` followed by the
``glance-direct`` import. A PUT refused with 403 before it got far (Glance checks the policy
first) is sent again, from the bytes it kept, to the stage.

Every byte sent is hashed (sha512 and md5), and :meth:`Payload.finish` succeeds only when Glance
reports the image ``active`` with the size and hashes that were sent. An import that changed the
disk format (``image_conversion``) leaves Glance's own size and hashes: then the staged size must
be the bytes sent, and the image's virtual size the one the source's header declares
(:func:`~glancefs.fs.headers.virtual_size`; not checked for a format it does not read).

Pitfalls: Glance answers a refused upload (format inspection 415, a size cap 413) only after the
whole body, so only ``finish`` knows the outcome; a quota (413 of a unified limit) is checked
before Glance reads any of the body, so a write that finds the PUT ended raises it (the writes
before it went to the channel and the socket's buffers). A broken upload puts the image back to
``queued``.
"""

from __future__ import annotations

import enum
import errno
import hashlib
import logging
from collections.abc import AsyncIterator, Iterator

import trio

from glancefs import Forbidden, GlanceError, Image

from .background import failure_of, raise_again
from .changes import Changes
from .formats import DETECTION_BYTES, Formats, choose_formats
from .headers import holds_data, virtual_size
from .importing import REPLAY_BYTES, UploadRoute, wait_for_import
from .refusals import InvalidArgument, LocalFailure, TooLarge
from .spool import SpoolFile, SpoolSpace
from .status import STATUS, Transfer

__all__ = ["CHUNK_BYTES", "HOLD_BYTES", "Ending", "Payload", "UploadFailed"]

log = logging.getLogger("glancefs.upload")

#: Writes are coalesced into chunks of this size before they go to the socket.
CHUNK_BYTES = 1024 * 1024
#: Chunks in flight between the writer and the PUT: with CHUNK_BYTES, the memory bound per upload.
QUEUED_CHUNKS = 4
#: Bytes written in order, with gaps, that a payload holds before it streams them: an image tool
#: writes its header and tables apart (vhdx: 1 MiB of tables at 2 MiB, then back to 192 KiB) and
#: goes back before then, so it is spooled instead. Without a gap from offset 0, the first
#: DETECTION_BYTES are enough.
HOLD_BYTES = 4 * CHUNK_BYTES
_THREAD_THRESHOLD = 256 * 1024
#: One chunk of zeros, shared by every hole.
_ZEROS = bytes(CHUNK_BYTES)


class UploadFailed(GlanceError):
    """Glance did not end up with the data that was written (the message says what differs)."""


class Ending(enum.Enum):
    """What a payload would make of the image if it ended now."""

    #: Not a byte, no size (``touch``).
    EMPTY = "nothing"
    #: A size set, and at most zeros written inside it (``truncate -s``, ``qemu-img create -f
    #: raw``).
    SIZE = "only a size"
    #: A disk format's header and tables that map no data (``qemu-img create -f qcow2``).
    HEADER = "only a format's header"
    DATA = "data"


def _zeros_only(data: bytes) -> bool:
    return not data[:1] or (data[0] == 0 and data == bytes(len(data)))


class _Put:
    """One ``PUT .../file`` (or ``.../stage``: ``staged``), fed chunk by chunk, every byte hashed
    on the way; runs in the nursery and never raises there (its failure is kept for :meth:`send`
    and :meth:`end`). ``replay``: keep the first :data:`REPLAY_BYTES` sent in :attr:`kept`."""

    def __init__(
        self,
        changes: Changes,
        image_id: str,
        nursery: trio.Nursery,
        transfer: Transfer,
        size: int | None,
        *,
        staged: bool,
        replay: bool,
    ) -> None:
        self._image_id = image_id
        self.size = size
        self.staged = staged
        #: Every chunk sent so far, while they fit in REPLAY_BYTES; None: not kept.
        self.kept: list[bytes] | None = [] if replay else None
        self.sent = 0
        self.error: GlanceError | None = None
        self.sha512 = hashlib.sha512()
        self.md5 = hashlib.md5()
        self._transfer = transfer
        send, receive = trio.open_memory_channel[bytes](QUEUED_CHUNKS)
        self._send = send
        self._done = trio.Event()
        #: Cancelling the PUT breaks its connection before the body's end: Glance puts the image
        #: back to queued. (Closing the channel would end the body early but cleanly: Glance
        #: would take the truncated data as the whole image.)
        self._scope = trio.CancelScope()
        nursery.start_soon(self._run, changes, receive)

    async def _run(self, changes: Changes, receive: trio.MemoryReceiveChannel[bytes]) -> None:
        async def body() -> AsyncIterator[bytes]:
            async for chunk in receive:
                self._transfer.progress(len(chunk))
                yield chunk

        async def upload() -> None:
            async with receive:
                send = changes.stage if self.staged else changes.upload
                await send(self._image_id, body(), self.size)

        try:
            with self._scope:
                error = await failure_of(upload, f"image {self._image_id}: upload", UploadFailed)
                if error is not None:
                    self.error = error
        finally:
            self._done.set()

    async def send(self, chunk: bytes) -> None:
        if len(chunk) >= _THREAD_THRESHOLD:
            await trio.to_thread.run_sync(self._hash, chunk)
        else:
            self._hash(chunk)
        try:
            await self._send.send(chunk)
        except trio.ClosedResourceError:
            # Aborted meanwhile (the writer died during a long hole): say why, not how.
            raise self.error or UploadFailed(f"image {self._image_id}: upload aborted") from None
        except trio.BrokenResourceError:
            # The PUT ended early: Glance refused or the connection broke.
            await self._done.wait()
            raise self.error or UploadFailed(
                f"image {self._image_id}: upload ended early"
            ) from None
        self.sent += len(chunk)
        if self.kept is not None and self.sent <= REPLAY_BYTES:
            self.kept.append(chunk)
        else:
            self.kept = None

    def _hash(self, chunk: bytes) -> None:
        self.sha512.update(chunk)
        self.md5.update(chunk)

    async def end(self) -> None:
        """The body is complete: wait for Glance's answer (raises why it failed)."""
        await self._send.aclose()
        await self._done.wait()
        if self.error is not None:
            raise_again(self.error)

    async def cancel(self) -> None:
        self._scope.cancel()
        await self._done.wait()


class Payload:
    """The bytes one upload's writer wrote, and their way to Glance (see the module docstring).

    ``choose_formats``: the formats may be chosen (or corrected) from the content even if the
    image has some, because this mount set them from the name at creation; False once the user
    set them. ``spool_all``: every byte goes to the spool (``--spool-dir``).
    """

    def __init__(
        self,
        changes: Changes,
        image: Image,
        nursery: trio.Nursery,
        spool: SpoolSpace,
        default_formats: Formats,
        route: UploadRoute,
        *,
        choose_formats: bool,
        spool_all: bool = False,
    ) -> None:
        self._changes = changes
        self._route = route
        self.image = image
        self._nursery = nursery
        self._space = spool
        self._default_formats = default_formats
        self.choose_formats = choose_formats
        self._spool_all = spool_all
        #: The file's size as its writer sees it.
        self.size = 0
        #: The size the writer set before it wrote data (None: none, or no longer true).
        self._declared: int | None = None
        #: Something was written that is not a hole: data, or zeros past the size set.
        self.has_data = False
        #: Held: the writes at or past one another's end, in order.
        self._held: list[tuple[int, bytes]] = []
        self._held_bytes = 0
        #: The end of the last write (held), or of what went to the PUT and ``_pending``.
        self._end = 0
        #: Held: every write came right at the end of the one before, the first at 0.
        self._gapless = True
        #: The writer has been here before and left only a header: it will go back.
        self._rewrites = False
        self._spool: SpoolFile | None = None
        self._put: _Put | None = None
        #: Streamed: bytes written after those sent, coalesced into chunks.
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._error: GlanceError | None = None
        #: The 403 of a PUT whose data went to the stage instead.
        self._refusal: Forbidden | None = None
        #: The disk size the source's header declares (None: unknown), for an import that
        #: converts it.
        self._virtual_size: int | None = None
        #: What was verified of the finished upload (for the log).
        self.verified = ""
        self.finished = False
        #: What `glancefs status` shows of this upload (from its first byte sent on).
        self.transfer = STATUS.started_transfer(image.id, image.name or image.id, "upload")

    @property
    def _id(self) -> str:
        return self.image.id

    @property
    def started(self) -> bool:
        """The PUT has begun: Glance holds the record it will save at the end."""
        return self._put is not None

    def expect_rewrites(self) -> None:
        """Its writer comes back to a file it left with only a header: spool what comes."""
        self._rewrites = True

    # -- writes -------------------------------------------------------------------------------

    async def write(self, offset: int, data: bytes) -> int:
        """Accept the bytes at ``offset`` (see the module docstring for where they go)."""
        self._refuse_if_done()
        end = offset + len(data)
        if self._spool is None and self._put is None:
            if not self.has_data and end <= self.size and _zeros_only(data):
                return len(data)  # a hole inside the size set: nothing to keep
            if offset < self._end or self._rewrites or self._spool_all:
                await self._to_spool()
            else:
                await self._hold(offset, data)
                return len(data)
        self.has_data = True
        if self._spool is not None:
            self._reserve(max(self.size, end))
            await self._spool.write(offset, data)
            self.size = max(self.size, end)
            return len(data)
        await self._stream(offset, data)
        return len(data)

    async def _hold(self, offset: int, data: bytes) -> None:
        self._gapless = self._gapless and offset == self._end
        self._held.append((offset, bytes(data)))
        self._held_bytes += len(data)
        self._end = offset + len(data)
        self.has_data = True
        if self._declared is not None and self._end > self._declared:
            self._declared = None  # nothing was sent: the size is simply not known first
        self.size = max(self.size, self._end)
        if self._held_bytes >= HOLD_BYTES or (self._gapless and self._end >= DETECTION_BYTES):
            await self._start_streaming()

    async def _stream(self, offset: int, data: bytes) -> None:
        if offset < self._end:
            raise InvalidArgument(
                f"image {self._id}: write at offset {offset}, behind the {self._end} bytes "
                "written in order and streamed to Glance already; for a writer that goes back "
                "that far, mount with --spool-dir"
            )
        if self._declared is not None and offset + len(data) > self._declared:
            raise UploadFailed(
                f"image {self._id}: write past the size of {self._declared} bytes its writer "
                "set before writing, which the upload announced to Glance"
            )
        await self._zeros(offset - self._end)
        await self._accept(data)
        self.size = max(self.size, self._end)

    async def truncate(self, size: int) -> None:
        """``ftruncate``: held or spooled, any size (before any data: the size known first);
        streamed, the current size or larger (the rest is a hole), and only the size announced
        to Glance if there is one."""
        self._refuse_if_done()
        if self._put is not None:
            if self._declared is not None and size != self._declared:
                raise UploadFailed(
                    f"image {self._id}: truncate to {size}, but its writer set the size to "
                    f"{self._declared} before writing, which the upload announced to Glance"
                )
            if size < self._end:
                raise InvalidArgument(
                    f"image {self._id}: truncate to {size}, but {self._end} bytes are streamed "
                    "to Glance already; for such a writer, mount with --spool-dir"
                )
        elif self._spool is not None:
            self._reserve(size)
            await self._spool.truncate(size)
        elif not self.has_data:
            self._declared = size or None
        else:
            self._declared = None
            self._cut_held(size)
        self.size = size

    def _cut_held(self, size: int) -> None:
        kept = [(offset, data[: size - offset]) for offset, data in self._held if offset < size]
        self._held = [(offset, data) for offset, data in kept if data]
        self._held_bytes = sum(len(data) for _, data in self._held)
        self._end = min(self._end, size)

    def _reserve(self, size: int) -> None:
        assert self._spool is not None
        if not self._spool.reserve(size):
            raise TooLarge(
                f"image {self._id}: written out of order, the upload is spooled, and its "
                f"{size} bytes do not fit in the spool (--spool-size {self._space.max_bytes}, "
                f"{self._space.used - self._spool.size} bytes used by other files); raise "
                "--spool-size"
            )

    async def _to_spool(self) -> None:
        """Held → spooled: what is held goes to a new spool file, and every later write."""
        spool = self._space.open_upload()
        self._spool = spool
        self._reserve(self.size)
        for offset, data in self._held:
            await spool.write(offset, data)
        await spool.truncate(self.size)
        self._held, self._held_bytes = [], 0
        log.info("image %s: its writer writes out of order: the upload is spooled", self._id)

    async def _start_streaming(self) -> None:
        """Held → streamed: the formats from the first MiB, then one PUT of what is held."""
        await self._set_formats(self._held_read(0, DETECTION_BYTES))
        self._virtual_size = virtual_size(self._held_read)
        self._put = self._new_put(self._declared)
        held, self._held, self._held_bytes, self._end = self._held, [], 0, 0
        for offset, data in held:
            await self._zeros(offset - self._end)
            await self._accept(data)

    async def _zeros(self, count: int) -> None:
        while count > 0:
            piece = min(count, CHUNK_BYTES)
            await self._accept(_ZEROS if piece == CHUNK_BYTES else _ZEROS[:piece])
            count -= piece

    async def _accept(self, data: bytes) -> None:
        self._pending.append(data)
        self._pending_bytes += len(data)
        self._end += len(data)
        if self._pending_bytes >= CHUNK_BYTES:
            await self._send_pending()

    async def _send_pending(self) -> None:
        if not self._pending:
            return
        assert self._put is not None
        chunk = b"".join(self._pending)
        self._pending.clear()
        self._pending_bytes = 0
        await self._send(chunk)

    def _new_put(self, size: int | None) -> _Put:
        return _Put(
            self._changes, self._id, self._nursery, self.transfer, size,
            staged=self._route.imports, replay=self._route.replays,
        )  # fmt: skip

    async def _send(self, chunk: bytes) -> None:
        assert self._put is not None
        try:
            await self._put.send(chunk)
        except Forbidden as refusal:
            await self._stage_instead(refusal)
            await self._put.send(chunk)

    async def _stage_instead(self, refusal: Forbidden) -> None:
        """A PUT refused by policy: send what it kept to the stage instead, when it kept all it
        sent and Glance offers the import (else the refusal stands)."""
        put = self._put
        assert put is not None
        if put.staged or put.kept is None or not await self._route.may_stage():
            raise_again(refusal)
        self._refusal = refusal
        self._put = _Put(
            self._changes, self._id, self._nursery, self.transfer, put.size,
            staged=True, replay=False,
        )  # fmt: skip
        for chunk in put.kept:
            await self._put.send(chunk)

    # -- reads --------------------------------------------------------------------------------

    async def read(self, offset: int, size: int) -> bytes:
        """The file's bytes as written so far (holes read as zeros; fewer at its end). A
        streamed payload no longer has the bytes it sent: reading them is refused."""
        end = min(offset + size, self.size)
        if offset >= end:
            return b""
        if self._spool is not None:
            return await self._spool.read(offset, end)
        if self._put is None:
            return self._held_read(offset, end - offset)
        if offset < self._put.sent:
            raise LocalFailure(
                f"image {self._id}: read at offset {offset}: the first {self._put.sent} bytes "
                "are streamed to Glance already and not kept",
                errno.EIO,
            )
        pending = b"".join(self._pending)[offset - self._put.sent : end - self._put.sent]
        return pending.ljust(end - offset, b"\0")

    def _held_read(self, offset: int, size: int) -> bytes:
        end = min(offset + size, self.size)
        result = bytearray(max(end - offset, 0))
        for start, data in self._held:
            low, high = max(start, offset), min(start + len(data), end)
            if low < high:
                result[low - offset : high - offset] = data[low - start : high - start]
        return bytes(result)

    async def ending(self) -> Ending:
        """What the image would be if the upload ended now."""
        if not self.has_data:
            return Ending.SIZE if self.size else Ending.EMPTY
        if self._put is not None:
            return Ending.DATA  # its start is gone: it was written in order, it has data
        if self._spool is not None:
            mapped = await self._spool.inspect(holds_data)
        else:
            mapped = holds_data(self._held_read)
        return Ending.HEADER if mapped is False else Ending.DATA

    # -- the end ------------------------------------------------------------------------------

    async def finish(self) -> Image:
        """Send what is left, wait for Glance and check the result; returns the active image."""
        if self.finished:
            if self._error is not None:
                raise_again(self._error)
            return self.image
        self.finished = True
        try:
            if self._put is None:
                await self._set_formats(await self._whole_read(0, DETECTION_BYTES))
                self._virtual_size = await self._source_virtual_size()
                self._put = self._new_put(self.size)
                async for chunk in self._whole_chunks():
                    await self._send(chunk)
            else:
                await self._zeros(self.size - self._end)
                await self._send_pending()
            try:
                await self._put.end()
            except Forbidden as refusal:
                await self._stage_instead(refusal)
                await self._put.end()
            if self._refusal is not None:
                self._route.staged_after_refusal(self._refusal)
            if self._put.staged:
                return await self._imported(self._put)
            self._route.put_succeeded()
            return self._verify(await self._changes.fresh(self._id), self._put)
        except GlanceError as error:
            self._error = error
            self.transfer.finished("failed")
            raise
        finally:
            self._release_memory()

    async def _source_virtual_size(self) -> int | None:
        if self._spool is not None:
            return await self._spool.inspect(virtual_size)
        return virtual_size(self._held_read)

    async def _whole_read(self, offset: int, size: int) -> bytes:
        if self._spool is not None:
            return await self._spool.read(offset, min(offset + size, self.size))
        return self._held_read(offset, size)

    async def _whole_chunks(self) -> AsyncIterator[bytes]:
        """Held or spooled: the whole file, in chunks, holes as zeros."""
        if self._spool is None:
            for chunk in self._held_chunks():
                yield chunk
            return
        for offset in range(0, self.size, CHUNK_BYTES):
            chunk = await self._spool.read(offset, min(offset + CHUNK_BYTES, self.size))
            yield chunk

    def _held_chunks(self) -> Iterator[bytes]:
        position = 0
        for offset, data in [*self._held, (self.size, b"")]:
            while position < offset:
                piece = min(offset - position, CHUNK_BYTES)
                yield _ZEROS[:piece]
                position += piece
            if data:
                yield data
                position += len(data)

    async def abort(self, reason: str) -> None:
        """Stop the upload without finishing it; Glance puts the image back to queued."""
        self.finished = True
        self.transfer.finished("aborted")
        if self._error is None:
            self._error = UploadFailed(f"image {self._id}: upload aborted: {reason}")
        if self._put is not None:
            await self._put.cancel()
        self._release_memory()

    def _release_memory(self) -> None:
        self._held, self._pending = [], []
        if self._spool is not None:
            self._spool.close()

    def _refuse_if_done(self) -> None:
        if self._error is not None:
            raise_again(self._error)
        if self.finished:
            raise InvalidArgument(f"image {self._id}: write after the upload was finished")

    async def _set_formats(self, head: bytes) -> None:
        """Declare the disk and container formats (those the image has are kept, unless this
        mount set them from the name: then the content may correct them)."""
        current = (self.image.get("disk_format"), self.image.get("container_format"))
        if all(current) and not self.choose_formats:
            return
        name = self.image.name or self._id
        disk, container = choose_formats(name, head, self._default_formats)
        if current == (disk, container):
            return
        log.info("image %s (%s): uploading as %s/%s", self._id, name, disk, container)
        self.image = await self._changes.set_formats(self._id, disk, container)

    async def _imported(self, put: _Put) -> Image:
        """The staged data imported: the staged size checked, then the active image against
        what was sent (its format unchanged) or the source's virtual size (converted)."""
        staged = await self._changes.fresh(self._id)
        if staged.size != put.sent:
            raise UploadFailed(
                f"image {self._id}: upload not accepted: {staged.size} bytes staged, "
                f"{put.sent} were sent"
            )
        source_format = staged.get("disk_format")
        log.info("image %s: %d bytes staged; importing them", self._id, put.sent)
        image = await wait_for_import(self._changes, self._id)
        if image.get("disk_format") == source_format:
            return self._verify(image, put)
        expected = self._virtual_size
        if expected is not None and image.get("virtual_size") != expected:
            raise UploadFailed(
                f"image {image.id}: converted from {source_format} to "
                f"{image.get('disk_format')}, its virtual size is {image.get('virtual_size')}, "
                f"the source's header says {expected}"
            )
        self.verified = (
            f"converted from {source_format} to {image.get('disk_format')}: the staged size"
            + (" and the virtual size" if expected is not None else "")
            + " verified"
        )
        self.image = image
        self.transfer.finished("uploaded")
        return image

    def _verify(self, image: Image, put: _Put) -> Image:
        """Glance's record of the finished upload, checked against what was sent."""
        problems = []
        if image.status != "active":
            problems.append(f"status is {image.status}")
        if image.size != put.sent:
            problems.append(f"size is {image.size}, {put.sent} bytes were sent")
        if image.get("os_hash_algo") == "sha512" and (
            image.get("os_hash_value") != put.sha512.hexdigest()
        ):
            problems.append("its sha512 differs from the data written")
        if image.get("checksum") and image.get("checksum") != put.md5.hexdigest():
            problems.append("its md5 checksum differs from the data written")
        if problems:
            raise UploadFailed(f"image {image.id}: upload not accepted: " + "; ".join(problems))
        self.image = image
        self.verified = "imported and verified" if put.staged else "uploaded and verified"
        self.transfer.finished("uploaded")
        return image
