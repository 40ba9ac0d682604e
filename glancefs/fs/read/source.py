"""Where one image's bytes come from: the client's downloads, counted in one place.

Every download of image data the read path makes goes through an :class:`ImageSource`: the
stream's (:meth:`ImageSource.open`), the random reader's blocks, the cache's fetches and
``--cache-fill`` (:meth:`ImageSource.fetch`). So every byte received is counted once, in the
image's transfer (``glancefs status``) and ``glancefs_read_bytes_total``.

Stores without ranges: Glance's rbd, swift and s3 stores answer every ranged GET with 400
(:class:`~glancefs.RangesRefused`). :class:`RangeSupport` remembers, per store (the image
record's ``stores``), that it refused one, so that the feeds of its images never ask again and
read through one download from byte 0 instead (:mod:`glancefs.fs.read.spool`).
"""

from __future__ import annotations

import logging

from glancefs import Client, GlanceError, Image, ImageData

from ..status import Transfer

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

    def __init__(self, client: Client, image: Image, transfer: Transfer, *, whole_only: bool):
        self._client = client
        self.image = image
        self.image_id = image.id
        self.size = image.size or 0
        self.transfer = transfer
        #: The store sends whole images only: every download starts at byte 0.
        self.whole_only = whole_only

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
