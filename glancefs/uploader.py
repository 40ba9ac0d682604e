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
from collections.abc import AsyncIterator

import trio

from ._client import Client
from ._exceptions import GlanceError
from ._images import Image
from .errors import InvalidArgument
from .formats import DETECTION_BYTES, Formats, choose_formats

__all__ = ["ImageUpload", "UploadFailed"]

log = logging.getLogger("glancefs.upload")

#: Writes are coalesced into chunks of this size before they go to the socket.
CHUNK_BYTES = 1024 * 1024
#: Chunks in flight between the writer and the PUT: with CHUNK_BYTES, the memory bound per upload.
QUEUED_CHUNKS = 4
_THREAD_THRESHOLD = 256 * 1024


class UploadFailed(GlanceError):
    """Glance did not end up with the data that was written (the message says what differs)."""


class ImageUpload:
    """The upload behind one writable open file of a queued image."""

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
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._send: trio.MemorySendChannel[bytes] | None = None
        self._put_finished = trio.Event()
        self._error: GlanceError | None = None
        self._sha512 = hashlib.sha512()
        self._md5 = hashlib.md5()
        self.finished = False

    @property
    def started(self) -> bool:
        return self._send is not None

    async def write(self, offset: int, data: bytes) -> int:
        """Accept the bytes at ``offset``, which must be where the previous write ended."""
        if self._error is not None:
            raise self._error
        if self.finished:
            raise InvalidArgument(f"image {self.image.id}: write after the upload was finished")
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
            self.image = await self._client.images.get(self.image.id)
            self._check(self.image)
            return self.image
        except GlanceError as error:
            self._error = error
            raise

    async def abort(self, reason: str) -> None:
        """Stop the upload without finishing it; Glance puts the image back to queued."""
        self.finished = True
        if self._error is None:
            self._error = UploadFailed(f"image {self.image.id}: upload aborted: {reason}")
        if self._send is not None:
            await self._send.aclose()

    async def _start(self) -> None:
        head = b"".join(self._pending)[:DETECTION_BYTES]
        formats = (self.image.get("disk_format"), self.image.get("container_format"))
        if not (formats[0] and formats[1]):
            disk, container = choose_formats(self._name, head, self._default_formats)
            log.info(
                "image %s (%s): uploading as %s/%s", self.image.id, self._name, disk, container
            )
            self.image = await self._client.images.update(
                self.image.id, disk_format=disk, container_format=container
            )
        send, receive = trio.open_memory_channel[bytes](QUEUED_CHUNKS)
        self._send = send
        self._nursery.start_soon(self._put, receive)

    async def _put(self, receive: trio.MemoryReceiveChannel[bytes]) -> None:
        """Runs the PUT in the filesystem's nursery; stores its failure, never raises."""

        async def body() -> AsyncIterator[bytes]:
            async for chunk in receive:
                yield chunk

        try:
            async with receive:
                await self._client.images.upload(self.image.id, body())
        except GlanceError as error:
            self._error = error
        except Exception as error:
            log.exception("image %s: upload failed", self.image.id)
            self._error = UploadFailed(f"image {self.image.id}: internal error: {error}")
        finally:
            self._put_finished.set()

    async def _send_pending(self) -> None:
        if not self._pending:
            return
        chunk = b"".join(self._pending)
        self._pending.clear()
        self._pending_bytes = 0
        if len(chunk) >= _THREAD_THRESHOLD:
            await trio.to_thread.run_sync(self._hash, chunk)
        else:
            self._hash(chunk)
        assert self._send is not None
        try:
            await self._send.send(chunk)
        except trio.BrokenResourceError:
            # The PUT ended early: Glance refused or the connection broke.
            await self._put_finished.wait()
            raise self._error or UploadFailed(
                f"image {self.image.id}: upload ended early"
            ) from None

    def _hash(self, chunk: bytes) -> None:
        self._sha512.update(chunk)
        self._md5.update(chunk)

    def _check(self, image: Image) -> None:
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
