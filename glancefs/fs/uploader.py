"""Uploading a queued image from sequential writes: one streamed PUT, bounded memory, verified.

The first writes are held (up to :data:`~glancefs.formats.DETECTION_BYTES`) until the disk format
can be told from the content; then the formats are set and one chunked ``PUT .../file`` starts,
fed through a small channel: a writer that outruns Glance waits (backpressure), so memory stays
bounded whatever the file size. Every byte is hashed (sha512 and md5) on the way, and
:meth:`ImageUpload.finish` succeeds only when Glance reports the image ``active`` with the size and
hashes that were written.

Pitfalls: Glance answers a refused upload (format inspection 415, quota 413) only after the whole
body, so only ``finish`` knows the outcome. A broken upload puts the image back to ``queued``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import trio

from glancefs import Client, GlanceError, Image

from .background import failure_of
from .formats import DETECTION_BYTES, Formats, choose_formats
from .refusals import InvalidArgument
from .status import STATUS

__all__ = ["ImageUpload", "SpooledUpload", "Upload", "UploadFailed"]

log = logging.getLogger("glancefs.upload")

#: Writes are coalesced into chunks of this size before they go to the socket.
CHUNK_BYTES = 1024 * 1024
#: Chunks in flight between the writer and the PUT: with CHUNK_BYTES, the memory bound per upload.
QUEUED_CHUNKS = 4
_THREAD_THRESHOLD = 256 * 1024


class UploadFailed(GlanceError):
    """Glance did not end up with the data that was written (the message says what differs)."""


class _Upload:
    """What every upload shares: the image, the hashes of what was written, the verdict."""

    def __init__(
        self,
        client: Client,
        image: Image,
        name: str,
        nursery: trio.Nursery,
        default_formats: Formats,
    ) -> None:
        self._client = client
        self.image = image
        self._name = name
        self._nursery = nursery
        self._default_formats = default_formats
        self.written = 0
        self._error: GlanceError | None = None
        self._sha512 = hashlib.sha512()
        self._md5 = hashlib.md5()
        self.finished = False
        self.transfer = STATUS.started_transfer(image.id, name, "upload")

    async def abort(self, reason: str) -> None:
        """Stop the upload without finishing it; Glance puts the image back to queued."""
        self.finished = True
        self.transfer.finished("aborted")
        if self._error is None:
            self._error = UploadFailed(f"image {self.image.id}: upload aborted: {reason}")

    def _refuse_if_done(self) -> None:
        if self._error is not None:
            raise self._error
        if self.finished:
            raise InvalidArgument(f"image {self.image.id}: write after the upload was finished")

    async def _set_formats(self, head: bytes) -> None:
        """Declare the disk and container formats, unless the image has them already."""
        if self.image.get("disk_format") and self.image.get("container_format"):
            return
        disk, container = choose_formats(self._name, head, self._default_formats)
        log.info("image %s (%s): uploading as %s/%s", self.image.id, self._name, disk, container)
        self.image = await self._client.images.update(
            self.image.id, disk_format=disk, container_format=container
        )

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
        image = await self._client.images.get(self.image.id)
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


class ImageUpload(_Upload):
    """Streams sequential writes to Glance as they come (the default)."""

    def __init__(
        self,
        client: Client,
        image: Image,
        name: str,
        nursery: trio.Nursery,
        default_formats: Formats,
    ) -> None:
        super().__init__(client, image, name, nursery, default_formats)
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._send: trio.MemorySendChannel[bytes] | None = None
        self._put_finished = trio.Event()

    @property
    def started(self) -> bool:
        return self._send is not None

    async def write(self, offset: int, data: bytes) -> int:
        """Accept the bytes at ``offset``, which must be where the previous write ended."""
        self._refuse_if_done()
        if offset != self.written:
            raise InvalidArgument(
                f"image {self.image.id}: write at offset {offset}, but uploads must be "
                f"sequential (next offset {self.written}); use --spool-dir for random writes"
            )
        self._pending.append(data)
        self._pending_bytes += len(data)
        self.written += len(data)
        if not self.started and self._pending_bytes >= DETECTION_BYTES:
            await self._start()
        if self.started and self._pending_bytes >= CHUNK_BYTES:
            await self._send_pending()
        return len(data)

    async def finish(self) -> Image:
        """Send what is left, wait for Glance and check the result; returns the active image.

        Without any data written (``touch``) the image stays queued and is returned unchanged.
        """
        if self.written == 0:
            # Nothing to send yet: a close of a dup'ed descriptor (dd does that) or a touch.
            return self.image
        if self.finished:
            if self._error is not None:
                raise self._error
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
                raise self._error
            return await self._verify()
        except GlanceError as error:
            self._error = error
            self.transfer.finished("failed")
            raise

    async def abort(self, reason: str) -> None:
        await super().abort(reason)
        if self._send is not None:
            await self._send.aclose()

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
                await self._client.images.upload(self.image.id, body())

        try:
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
        except trio.BrokenResourceError:
            # The PUT ended early: Glance refused or the connection broke.
            await self._put_finished.wait()
            raise self._error or UploadFailed(
                f"image {self.image.id}: upload ended early"
            ) from None


class SpooledUpload(_Upload):
    """Writes at any offset go to a local spool file, uploaded whole on close (``--spool-dir``).

    For tools that do not write sequentially (editors, ``qemu-img convert``, torrent-like
    writers). Costs local disk the size of the image, and the upload starts only at close.
    """

    def __init__(
        self,
        client: Client,
        image: Image,
        name: str,
        nursery: trio.Nursery,
        default_formats: Formats,
        spool_dir: Path,
    ) -> None:
        super().__init__(client, image, name, nursery, default_formats)
        # Unlinked at once: the spool vanishes with the process, whatever happens.
        self._spool = tempfile.TemporaryFile(dir=spool_dir, prefix="glancefs-")  # noqa: SIM115

    async def write(self, offset: int, data: bytes) -> int:
        self._refuse_if_done()
        written = await trio.to_thread.run_sync(os.pwrite, self._spool.fileno(), data, offset)
        self.written = max(self.written, offset + written)
        return written

    async def finish(self) -> Image:
        if self.written == 0 or self.finished:
            if self._error is not None:
                raise self._error
            return self.image
        self.finished = True
        try:
            head = await trio.to_thread.run_sync(os.pread, self._spool.fileno(), DETECTION_BYTES, 0)
            await self._set_formats(head)
            await self._client.images.upload(self.image.id, self._chunks(), size=self.written)
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
            await self._hash(chunk)
            self.transfer.progress(len(chunk))
            yield chunk


#: Either kind of upload, as the filesystem holds it.
Upload = ImageUpload | SpooledUpload
