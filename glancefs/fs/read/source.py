"""Where one image's bytes come from: the client's downloads, counted in one place.

Every download of image data the read path makes goes through an :class:`ImageSource`: the
stream's (:meth:`ImageSource.open`), the random reader's blocks
(:meth:`ImageSource.fetch_blocks`), the cache's fetches and ``--cache-fill``
(:meth:`ImageSource.fetch`). So every byte received is counted once, in the image's transfer
(``glancefs status``) and ``glancefs_read_bytes_total``.

Stores without ranges: Glance's rbd, swift and s3 stores answer every ranged GET with 400
(:class:`~glancefs.RangesRefused`). :class:`RangeSupport` remembers, per store (the image
record's ``stores``), that it refused one, so that the feeds of its images never ask again and
read through one download from byte 0 instead (:mod:`glancefs.fs.spool`).
"""

from __future__ import annotations

import logging

import trio

from glancefs import GlanceError, Image, ImageData
from glancefs.plumbing import is_retryable

from ..background import raise_again
from ..glance import Glance
from ..status import Transfer
from .blocks import BlockLRU

__all__ = ["ImageSource", "RangeSupport"]

log = logging.getLogger("glancefs.reader")


class RangeSupport:
    """Which stores refused a ranged download, for one mount."""

    def __init__(self) -> None:
        self._refused: set[str] = set()

    @staticmethod
    def store_of(image: Image) -> str:
        return str(image.get("stores") or "")

    def takes_ranges(self, image: Image) -> bool:
        return self.store_of(image) not in self._refused

    def refused(self, image: Image) -> None:
        store = self.store_of(image)
        if store not in self._refused:
            self._refused.add(store)
            log.warning(
                "store %s serves no ranges (image %s): its images are read through one download "
                "from the start, kept in the spool",
                store or "(unnamed)",
                image.id,
            )


class ImageSource:
    """The downloads of one image's data (see the module docstring)."""

    def __init__(
        self,
        client: Glance,
        image: Image,
        transfer: Transfer,
        *,
        whole_only: bool,
        failure_grace: float = 1.0,
    ) -> None:
        self._client = client
        self.image = image
        self.image_id = image.id
        self.size = image.size or 0
        self.transfer = transfer
        #: The store sends whole images only: every download starts at byte 0.
        self.whole_only = whole_only
        self._failure_grace = failure_grace
        #: When a download last failed because Glance did not answer or broke, and how.
        self._last_failure: tuple[float, GlanceError] | None = None

    def failed(self, error: GlanceError) -> None:
        """A download or a read failed with ``error``: if Glance did not answer or broke, the
        reads of the next ``failure_grace`` seconds fail with it at once (the kernel retries a
        failed readahead page with a read of its own, which must not wait for Glance again)."""
        if is_retryable(error):
            self._last_failure = (trio.current_time(), error)

    def raise_recent_failure(self) -> None:
        if self._last_failure is not None:
            failed_at, error = self._last_failure
            if trio.current_time() - failed_at < self._failure_grace:
                raise_again(error)
            self._last_failure = None

    @property
    def retries(self) -> int:
        return self._client.retries

    def connections_waiting(self) -> bool:
        """Another request waits for one of the client's connection slots."""
        return bool(self._client.connections.waiting)

    async def open(self, offset: int, *, retries: int | None = None) -> ImageData:
        """A download from ``offset`` to the end; the caller counts what it receives through
        :attr:`transfer`."""
        return await self._client.images.open_data(self.image_id, offset, retries=retries)

    async def fetch_blocks(self, offset: int, end: int, kept: BlockLRU) -> bytes:
        """Bytes ``[offset, end)`` from the whole blocks around them (random readers: qemu-img,
        fio): those ``kept`` has, and the missing ones with one ranged GET, kept in turn."""
        size = kept.block_size
        indexes = range(offset // size, (end - 1) // size + 1)
        blocks = {index: kept.get(index) for index in indexes}
        missing = [index for index, block in blocks.items() if block is None]
        if missing:
            start = missing[0] * size
            body = await self.fetch(start, min((missing[-1] + 1) * size, self.size))
            for index in range(missing[0], missing[-1] + 1):
                blocks[index] = body[index * size - start : (index + 1) * size - start]
        for index, block in blocks.items():
            if block is not None:
                kept.put(index, block)  # the blocks just read are kept longest
        start = offset - indexes.start * size
        return b"".join(block or b"" for block in blocks.values())[start : start + end - offset]

    async def fetch(self, start: int, end: int) -> bytes:
        """Bytes ``[start, end)`` with one ranged GET, exactly."""
        parts: list[bytes] = []
        async with await self._client.images.open_data(self.image_id, start, end - start) as data:
            async for chunk in data.chunks():
                parts.append(chunk)
                self.transfer.progress(len(chunk))
        body = b"".join(parts)
        if len(body) != end - start:
            raise GlanceError(
                f"image {self.image_id}: asked for {end - start} bytes at {start}, got {len(body)}"
            )
        return body
