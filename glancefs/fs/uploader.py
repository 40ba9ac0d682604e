"""Uploading a queued image from writes: one streamed PUT, bounded memory, verified; and the
session that owns an upload's whole lifecycle, cleanup included.

Two data paths (:class:`ImageUpload`, :class:`SpooledUpload`) turn writes into the bytes of one
``PUT .../file``. The first writes are held (up to :data:`~glancefs.fs.formats.DETECTION_BYTES`)
until the disk format can be told from the content; then the formats are set and one chunked PUT
starts, fed through a small channel: a writer that outruns Glance waits (backpressure), so memory
stays bounded whatever the file size. A write past the current end leaves a hole, which is sent as
zeros (generated, never stored), as is an ``ftruncate`` that extends the file: sparse raw images,
qcow2 files from ``qemu-img`` and ``cp --sparse=always`` upload byte for byte. Every byte is hashed
(sha512 and md5) on the way, and the upload succeeds only when Glance reports the image ``active``
with the size and hashes that were written.

:class:`UploadSession` is what the filesystem holds per open file. It decides, in one place, what
happens to the image: finalized by a deliberate close, aborted (and the image this mount created
deleted, unless ``--keep-failed``) on any failure or when the writer dies; metadata changes that
arrive while the data is being sent wait in the session and are applied once the data is in.
:class:`Uploads` is the mount's set of sessions, by image.

Pitfalls: Glance answers a refused upload (format inspection 415, quota 413) only after the whole
body, so only ``finish`` knows the outcome. A broken upload puts the image back to ``queued``.
Glance saves the image record it loaded when the PUT began once the data is in: a property patched
meanwhile is lost, which is why changes wait in the session.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import trio

from glancefs import GlanceError, Image, OverLimit

from .background import failure_of, raise_again
from .changes import Changes
from .formats import DETECTION_BYTES, Formats, choose_formats, formats_of_name
from .refusals import Busy, InvalidArgument, LocalFailure, OutOfSpace, Refusal
from .status import STATUS
from .writers import Writer

__all__ = ["ImageUpload", "SpooledUpload", "UploadFailed", "UploadSession", "Uploads"]

log = logging.getLogger("glancefs.upload")

#: Writes are coalesced into chunks of this size before they go to the socket.
CHUNK_BYTES = 1024 * 1024
#: Chunks in flight between the writer and the PUT: with CHUNK_BYTES, the memory bound per upload.
QUEUED_CHUNKS = 4
_THREAD_THRESHOLD = 256 * 1024
#: One chunk of zeros, shared by every hole.
_ZEROS = bytes(CHUNK_BYTES)
#: How long cleanup (deleting the image) may take once the task doing it is cancelled.
_CLEANUP_SECONDS = 30.0

T = TypeVar("T")


class UploadFailed(GlanceError):
    """Glance did not end up with the data that was written (the message says what differs)."""


class _DataPath:
    """What both data paths share: the image, the hashes of what was written, the verdict.

    ``choose_formats``: the formats may be chosen (or corrected) from the content even if the
    image has some, because this mount set them from the name at creation.
    """

    def __init__(
        self,
        changes: Changes,
        image: Image,
        nursery: trio.Nursery,
        default_formats: Formats,
        *,
        choose_formats: bool,
    ) -> None:
        self._changes = changes
        self.image = image
        self._nursery = nursery
        self._default_formats = default_formats
        #: The formats may be chosen from the content even though the image has some (this
        #: mount set them from the name); False once the user set them.
        self.choose_formats = choose_formats
        self.written = 0
        self._error: GlanceError | None = None
        self._sha512 = hashlib.sha512()
        self._md5 = hashlib.md5()
        self.finished = False
        #: What `glancefs status` shows of this upload (from its first byte sent on).
        self.transfer = STATUS.started_transfer(image.id, image.name or image.id, "upload")

    @property
    def _name(self) -> str:
        return self.image.name or self.image.id

    async def abort(self, reason: str) -> None:
        """Stop the upload without finishing it; Glance puts the image back to queued."""
        self.finished = True
        self.transfer.finished("aborted")
        if self._error is None:
            self._error = UploadFailed(f"image {self.image.id}: upload aborted: {reason}")

    def _refuse_if_done(self) -> None:
        if self._error is not None:
            raise_again(self._error)
        if self.finished:
            raise InvalidArgument(f"image {self.image.id}: write after the upload was finished")

    async def _set_formats(self, head: bytes) -> None:
        """Declare the disk and container formats (those the image has are kept, unless this
        mount set them from the name: then the content may correct them)."""
        current = (self.image.get("disk_format"), self.image.get("container_format"))
        if all(current) and not self.choose_formats:
            return
        disk, container = choose_formats(self._name, head, self._default_formats)
        if current == (disk, container):
            return
        log.info("image %s (%s): uploading as %s/%s", self.image.id, self._name, disk, container)
        self.image = await self._changes.set_formats(self.image.id, disk, container)

    async def _hash(self, chunk: bytes) -> None:
        if len(chunk) >= _THREAD_THRESHOLD:
            await trio.to_thread.run_sync(self._hash_now, chunk)
        else:
            self._hash_now(chunk)

    def _hash_now(self, chunk: bytes) -> None:
        self._sha512.update(chunk)
        self._md5.update(chunk)

    async def _verify(self) -> Image:
        """Glance's record of the finished upload, checked against what was written."""
        image = await self._changes.fresh(self.image.id)
        problems = []
        if image.status != "active":
            problems.append(f"status is {image.status}")
        if image.size != self.written:
            problems.append(f"size is {image.size}, {self.written} bytes were written")
        if image.get("os_hash_algo") == "sha512" and (
            image.get("os_hash_value") != self._sha512.hexdigest()
        ):
            problems.append("its sha512 differs from the data written")
        if image.get("checksum") and image.get("checksum") != self._md5.hexdigest():
            problems.append("its md5 checksum differs from the data written")
        if problems:
            raise UploadFailed(f"image {image.id}: upload not accepted: " + "; ".join(problems))
        self.image = image
        self.transfer.finished("uploaded")
        return image


class ImageUpload(_DataPath):
    """Streams writes to Glance as they come (the default): each must start at or after the
    end of the previous ones (a gap is a hole, sent as zeros)."""

    def __init__(
        self,
        changes: Changes,
        image: Image,
        nursery: trio.Nursery,
        default_formats: Formats,
        *,
        choose_formats: bool,
    ) -> None:
        super().__init__(changes, image, nursery, default_formats, choose_formats=choose_formats)
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._send: trio.MemorySendChannel[bytes] | None = None
        self._put_finished = trio.Event()
        #: Cancelling the PUT breaks its connection before the body's end: Glance puts the image
        #: back to queued. (Closing the channel would end the body early but cleanly: Glance
        #: would take the truncated data as the whole image.)
        self._put_scope = trio.CancelScope()

    @property
    def started(self) -> bool:
        """The PUT has begun: Glance holds the record it will save at the end."""
        return self._send is not None

    async def write(self, offset: int, data: bytes) -> int:
        """Accept the bytes at ``offset``: at the end, or past it (the gap is a hole)."""
        self._refuse_if_done()
        if offset < self.written:
            raise InvalidArgument(
                f"image {self.image.id}: write at offset {offset}, behind the end of what was "
                f"sent ({self.written}); uploads are streamed: use --spool-dir for such writers"
            )
        await self._zeros(offset - self.written)
        await self._accept(data)
        return len(data)

    async def extend(self, size: int) -> None:
        """``ftruncate`` to ``size``: the same size changes nothing, a larger one adds a hole."""
        self._refuse_if_done()
        if size < self.written:
            raise InvalidArgument(
                f"image {self.image.id}: truncate to {size}, but {self.written} bytes are "
                "sent already; use --spool-dir for such writers"
            )
        await self._zeros(size - self.written)

    async def _zeros(self, count: int) -> None:
        while count > 0:
            piece = min(count, CHUNK_BYTES)
            await self._accept(_ZEROS if piece == CHUNK_BYTES else _ZEROS[:piece])
            count -= piece

    async def _accept(self, data: bytes) -> None:
        self._pending.append(data)
        self._pending_bytes += len(data)
        self.written += len(data)
        if not self.started and self._pending_bytes >= DETECTION_BYTES:
            await self._start()
        if self.started and self._pending_bytes >= CHUNK_BYTES:
            await self._send_pending()

    async def finish(self) -> Image:
        """Send what is left, wait for Glance and check the result; returns the active image.

        Without any data written (``touch``) the image stays queued and is returned unchanged.
        """
        if self.written == 0:
            # Nothing to send yet: a close of a dup'ed descriptor (dd does that) or a touch.
            return self.image
        if self.finished:
            if self._error is not None:
                raise_again(self._error)
            return self.image
        self.finished = True
        try:
            if not self.started:
                await self._start()
            await self._send_pending()
            assert self._send is not None
            await self._send.aclose()
            await self._put_finished.wait()
            if self._error is not None:
                raise_again(self._error)
            return await self._verify()
        except GlanceError as error:
            self._error = error
            self.transfer.finished("failed")
            raise

    async def abort(self, reason: str) -> None:
        await super().abort(reason)
        self._put_scope.cancel()
        if self._send is not None:
            await self._put_finished.wait()

    async def _start(self) -> None:
        await self._set_formats(b"".join(self._pending)[:DETECTION_BYTES])
        send, receive = trio.open_memory_channel[bytes](QUEUED_CHUNKS)
        self._send = send
        self._nursery.start_soon(self._put, receive)

    async def _put(self, receive: trio.MemoryReceiveChannel[bytes]) -> None:
        """Runs the PUT in the filesystem's nursery; stores its failure, never raises."""

        async def body() -> AsyncIterator[bytes]:
            async for chunk in receive:
                self.transfer.progress(len(chunk))
                yield chunk

        async def upload() -> None:
            async with receive:
                await self._changes.upload(self.image.id, body(), None)

        try:
            with self._put_scope:
                error = await failure_of(upload, f"image {self.image.id}: upload", UploadFailed)
                if error is not None:
                    self._error = error
        finally:
            self._put_finished.set()

    async def _send_pending(self) -> None:
        if not self._pending:
            return
        chunk = b"".join(self._pending)
        self._pending.clear()
        self._pending_bytes = 0
        await self._hash(chunk)
        assert self._send is not None
        try:
            await self._send.send(chunk)
        except trio.ClosedResourceError:
            # Aborted meanwhile (the writer died during a long hole): say why, not how.
            raise self._error or UploadFailed(f"image {self.image.id}: upload aborted") from None
        except trio.BrokenResourceError:
            # The PUT ended early: Glance refused or the connection broke.
            await self._put_finished.wait()
            raise self._error or UploadFailed(
                f"image {self.image.id}: upload ended early"
            ) from None


class SpooledUpload(_DataPath):
    """Writes at any offset go to a local spool file, uploaded whole on close (``--spool-dir``).

    For tools that do not write sequentially (editors, ``qemu-img convert``, torrent-like
    writers). Costs local disk the size of the image, and the upload starts only at close.
    """

    def __init__(
        self,
        changes: Changes,
        image: Image,
        nursery: trio.Nursery,
        default_formats: Formats,
        spool_dir: Path,
        *,
        choose_formats: bool,
    ) -> None:
        super().__init__(changes, image, nursery, default_formats, choose_formats=choose_formats)
        # Unlinked at once: the spool vanishes with the process, whatever happens.
        self._spool = tempfile.TemporaryFile(dir=spool_dir, prefix="glancefs-")  # noqa: SIM115

    @property
    def started(self) -> bool:
        return self.finished

    async def write(self, offset: int, data: bytes) -> int:
        self._refuse_if_done()
        written = await trio.to_thread.run_sync(os.pwrite, self._spool.fileno(), data, offset)
        if written != len(data):
            # The spool's filesystem is full (pwrite returns short before it fails).
            raise OSError(errno.ENOSPC, "short write to the spool")
        self.written = max(self.written, offset + written)
        return written

    async def extend(self, size: int) -> None:
        """``ftruncate``: the spool takes any size, larger (a hole) or smaller."""
        self._refuse_if_done()
        await trio.to_thread.run_sync(os.ftruncate, self._spool.fileno(), size)
        self.written = size

    async def finish(self) -> Image:
        if self.written == 0 or self.finished:
            if self._error is not None:
                raise_again(self._error)
            return self.image
        self.finished = True
        try:
            head = await trio.to_thread.run_sync(os.pread, self._spool.fileno(), DETECTION_BYTES, 0)
            await self._set_formats(head)
            await self._changes.upload(self.image.id, self._chunks(), self.written)
            return await self._verify()
        except GlanceError as error:
            self._error = error
            self.transfer.finished("failed")
            raise
        finally:
            self._spool.close()

    async def abort(self, reason: str) -> None:
        await super().abort(reason)
        self._spool.close()

    async def _chunks(self) -> AsyncIterator[bytes]:
        for offset in range(0, self.written, CHUNK_BYTES):
            size = min(CHUNK_BYTES, self.written - offset)
            chunk = await trio.to_thread.run_sync(os.pread, self._spool.fileno(), size, offset)
            if len(chunk) != size:
                raise UploadFailed(f"image {self.image.id}: the spool file is shorter than written")
            await self._hash(chunk)
            self.transfer.progress(len(chunk))
            yield chunk


#: A change of the image's metadata, applied to its record once the data is in.
MetadataChange = Callable[[Image], Awaitable[object]]


@dataclass
class _Deferred:
    what: str
    apply: MetadataChange


@dataclass(frozen=True)
class UploadPolicy:
    """The mount's choices for every upload."""

    default_formats: Formats = ("raw", "bare")
    spool_dir: Path | None = None
    #: Leave the image of a failed upload queued (else the image this mount created is deleted).
    keep_failed: bool = False


class UploadSession:
    """One open-for-writing of a queued image, from open to the last close: the only owner of
    what happens to the image.

    Outcomes: ``close`` by a writer that is not dying finalizes (verified, then the metadata
    changes made meanwhile are applied; close fails when one cannot be). Anything else (a
    refused write, a spool that fails, a bug, a cancelled task, a writer killed by a signal)
    aborts: the image this mount created is deleted, or left queued with ``--keep-failed``, and
    is never active. Each step below turns every exception into that abort before raising it.
    """

    def __init__(
        self,
        changes: Changes,
        image: Image,
        nursery: trio.Nursery,
        policy: UploadPolicy,
        *,
        created: bool,
        writer: Writer | None,
        choose_formats: bool,
    ) -> None:
        self._changes = changes
        self.image_id = image.id
        #: Created by this mount (``create`` in new/): a failure deletes it.
        self.created = created
        self.writer = writer
        self._keep_failed = policy.keep_failed
        self._data: ImageUpload | SpooledUpload
        if policy.spool_dir is not None:
            self._data = SpooledUpload(
                changes, image, nursery, policy.default_formats, policy.spool_dir,
                choose_formats=choose_formats,
            )  # fmt: skip
        else:
            self._data = ImageUpload(
                changes, image, nursery, policy.default_formats, choose_formats=choose_formats
            )
        self._deferred: list[_Deferred] = []
        self._failure: Exception | None = None
        #: Writes and immediate metadata changes one at a time (a PATCH racing the PUT's start
        #: would be lost).
        self._lock = trio.Lock()

    @property
    def written(self) -> int:
        return self._data.written

    @property
    def finished(self) -> bool:
        """Finalized or aborted: nothing more will be sent."""
        return self._data.finished

    async def write(self, offset: int, data: bytes) -> int:
        async with self._lock:
            return await self._guarded(f"write at {offset}", self._data.write(offset, data))

    async def truncate(self, size: int) -> None:
        """``ftruncate`` on the open file (see the data paths' ``extend``)."""
        async with self._lock:
            await self._guarded(f"truncate to {size}", self._data.extend(size))

    async def change(self, what: str, apply: MetadataChange, *, formats: bool = False) -> bool:
        """Change the image's metadata: now if no data is on its way to Glance, else once the
        data is in (before the close that finalizes returns; True: it waits). ``formats``: the
        change sets the disk or container format, which cannot wait (the data is declared with
        them)."""
        async with self._lock:
            if self._failure is not None or self.finished:
                raise Busy(f"{what} on {self.image_id}: its upload has ended; retry after close")
            if not self._data.started:
                applied = await apply(await self._changes.fresh(self.image_id))
                if isinstance(applied, Image):
                    self._data.image = applied
                if formats:
                    self._data.choose_formats = False
                return False
            if formats:
                raise Busy(f"{what} on {self.image_id}: the formats are fixed once data is sent")
            self._deferred.append(_Deferred(what, apply))
            return True

    async def close(self) -> Image | None:
        """A close (FLUSH): finalize, unless the writer is dying; returns the active image (None
        when nothing was finalized: no data yet, or aborted). Raises why the upload failed."""
        if self._failure is not None:
            raise_again(self._failure)
        interruption = self.writer.interruption() if self.writer is not None else None
        if interruption is not None and (self.written or self.created) and not self.finished:
            await self._abort(
                f"{interruption} before it closed the file",
                UploadFailed(f"image {self.image_id}: upload aborted: {interruption}"),
            )
            return None
        if self.written == 0 or self.finished:
            return None
        if self.writer is not None and self.writer.still_writing():
            return None  # not the writer's last close: a dup's, or a forked child's copy
        async with self._lock:
            image = await self._guarded("close", self._data.finish())
        self._changes.uploaded(self.image_id)
        log.info("image %s: %d bytes uploaded and verified", self.image_id, self.written)
        await self._apply_deferred(image)
        return image

    async def release(self) -> None:
        """The last close is done (RELEASE): an upload that is still open is finalized only if
        its writer ended normally; otherwise it is aborted."""
        if self.finished or self._failure is not None or self.written == 0:
            # Nothing was written (touch): every flush already had its say.
            return
        await self.close()

    async def _apply_deferred(self, image: Image) -> None:
        deferred, self._deferred = self._deferred, []
        for change in deferred:
            try:
                await change.apply(await self._changes.fresh(self.image_id))
            except (GlanceError, Refusal) as error:
                log.error("image %s: uploaded, but %s failed: %s", image.id, change.what, error)
                raise
            log.info("image %s: %s applied after the upload", image.id, change.what)

    async def _guarded(self, what: str, step: Awaitable[T]) -> T:
        """Run one step; any exception aborts the session first, then is raised (as a Refusal
        or GlanceError the operations can translate), and every later close raises it too."""
        try:
            return await step
        except OverLimit as error:
            refusal = OutOfSpace(f"image {self.image_id}: {error}")
            await self._abort(str(error), refusal)
            raise refusal from None
        except (Refusal, GlanceError) as error:
            await self._abort(str(error), error)
            raise
        except OSError as error:
            code = error.errno or errno.EIO
            local = LocalFailure(f"image {self.image_id}: {what}: spool: {os.strerror(code)}", code)
            await self._abort(str(local), local)
            raise local from None
        except Exception as error:
            log.exception("image %s: %s: internal error", self.image_id, what)
            internal = UploadFailed(f"image {self.image_id}: {what}: internal error")
            await self._abort(f"{what}: internal error: {error}", internal)
            raise internal from None
        except BaseException:
            # Cancelled (the mount is ending): clean up all the same, within a bounded time.
            with trio.CancelScope(shield=True), trio.move_on_after(_CLEANUP_SECONDS):
                cancelled = UploadFailed(f"image {self.image_id}: {what} was cancelled")
                await self._abort(f"{what} was cancelled", cancelled)
            raise

    async def _abort(self, reason: str, failure: Exception) -> None:
        """Abort the upload once, keeping ``failure`` for every later close to raise; the
        image this mount created is deleted (or kept queued)."""
        if self._failure is not None:
            return
        self._failure = failure
        await self._data.abort(reason)
        self._deferred.clear()
        if self.created and not self._keep_failed:
            await self._changes.discard(self.image_id, f"upload aborted: {reason}")
            return
        kept = "left queued (--keep-failed)" if self.created else "it stays queued"
        log.warning("image %s: upload aborted: %s; %s", self.image_id, reason, kept)
        self._changes.uploaded(self.image_id)


class Uploads:
    """The mount's upload sessions, by image."""

    def __init__(self, changes: Changes, nursery: trio.Nursery, policy: UploadPolicy) -> None:
        self._changes = changes
        self._nursery = nursery
        self._policy = policy
        self._sessions: dict[str, UploadSession] = {}

    def open(self, image: Image, *, created: bool, writer: Writer | None) -> UploadSession:
        """A session for one open-for-writing (the newest is the one :meth:`of` finds: Glance
        itself refuses a second upload to an image that is receiving one).

        The content may choose the formats when the image's are those its name implies
        (``touch new/x.qcow2`` set them so; a later write of raw data corrects them), never
        when someone chose others.
        """
        implied = formats_of_name(image.name or "") or self._policy.default_formats
        current = (image.get("disk_format"), image.get("container_format"))
        session = UploadSession(
            self._changes, image, self._nursery, self._policy, created=created, writer=writer,
            choose_formats=created or current == implied,
        )  # fmt: skip
        self._sessions[image.id] = session
        return session

    def of(self, image_id: str) -> UploadSession | None:
        """The session uploading the image now, if any."""
        return self._sessions.get(image_id)

    async def release(self, session: UploadSession) -> None:
        """The session's file is closed for good: finalize or abort it, then forget it."""
        try:
            await session.release()
        finally:
            if self._sessions.get(session.image_id) is session:
                del self._sessions[session.image_id]
