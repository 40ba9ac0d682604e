"""Open files, without FUSE: each file handle is a reader of an active image's data or the upload
session of a queued image.

Part of the filesystem core (:mod:`.filesystem`): handles and inode numbers are ints, an open
answers plain data (:class:`Opened`), a refusal is a :class:`~glancefs.fs.refusals.Refusal`. What
the kernel must forget (an image's pages after a mismatch, a file's attributes after its upload) it
is told through a :class:`KernelCache`, which :mod:`.operations` implements with pyfuse3.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from glancefs import Image, IntegrityError

from .config import MountConfig
from .inodes import ImageKey, InodeTable
from .read import ImageReader, Readers
from .refusals import AccessDenied, ReadOnly
from .uploader import Uploads, UploadSession
from .writers import Writer

__all__ = ["KernelCache", "OpenFiles", "Opened", "on_corrupt_image"]

log = logging.getLogger("glancefs.fs")


class KernelCache(Protocol):
    """What the kernel caches of the mount, told to forget an inode's part.

    Both return at once and act in the background: never from within the request that found the
    reason (the kernel would wait for the pages that very request holds locked). The kernel may
    have forgotten the inode already, which is fine.
    """

    def drop_pages(self, inode: int) -> None:
        """The inode's cached data pages are suspect."""

    def drop_attributes(self, inode: int) -> None:
        """The inode's attributes changed (its size, after an upload)."""


@dataclass(frozen=True)
class Opened:
    """An open file: its handle, and how the kernel caches its data."""

    handle: int
    #: Every read and write comes to the filesystem, past the page cache.
    direct_io: bool = False
    #: The kernel keeps the pages it cached of the file (else the open drops them); FUSE's
    #: default.
    keep_cache: bool = True


@dataclass
class _OpenFile:
    inode: int
    image: Image
    reader: ImageReader | None = None
    upload: UploadSession | None = None


def on_corrupt_image(
    inodes: InodeTable, kernel: KernelCache
) -> Callable[[str, IntegrityError], None]:
    """What :class:`~glancefs.fs.read.Readers` call when a pass finds a mismatch in an image's
    data: say so once, and drop the image's cached pages (those served before the mismatch are
    suspect too)."""

    def found(image_id: str, error: IntegrityError) -> None:
        log.error(
            "read: EIO: %s (its open files fail; the next open reads it again, and after two "
            "such passes in a row every read fails until SIGHUP or remount)",
            error,
        )
        kernel.drop_pages(inodes.inode_of(ImageKey(image_id)))

    return found


class OpenFiles:
    """The mount's open files, by handle."""

    def __init__(
        self, config: MountConfig, readers: Readers, uploads: Uploads, kernel: KernelCache
    ) -> None:
        self._config = config
        self._readers = readers
        self._uploads = uploads
        self._kernel = kernel
        self._files: dict[int, _OpenFile] = {}
        self._handles = itertools.count(1)

    async def open(
        self, inode: int, image: Image, *, write: bool, pid: int, created: bool = False
    ) -> Opened:
        """Open ``image`` (inode ``inode``) for reading, or for its upload (``write``) by the
        thread ``pid``; ``created``: this mount has just created it (a failed upload deletes
        it)."""
        if write:
            return await self._open_for_upload(inode, image, pid, created=created)
        open_file = _OpenFile(inode, image)
        keep_cache = False
        if image.status == "active":
            # Active image data never changes, so cached pages stay valid, once verified.
            keep_cache = self._readers.keeps_cache(image.id)
            open_file.reader = self._readers.open(image)
        elif image.status != "queued":
            raise AccessDenied(f"open {image.id}: image is {image.status}, its data is unreadable")
        handle = self._add(open_file)
        if self._config.direct_io:
            # Every read comes here, copied by the kernel straight into the reader's buffer: no
            # page cache to fill (on a VM, new pages cost more than the copy; see BENCHMARKS.md).
            return Opened(handle, direct_io=True, keep_cache=False)
        return Opened(handle, keep_cache=keep_cache)

    async def _open_for_upload(
        self, inode: int, image: Image, pid: int, *, created: bool
    ) -> Opened:
        if self._config.read_only:
            raise ReadOnly(f"write {image.id}: the mount is read-only")
        if image.status != "queued":
            raise AccessDenied(
                f"write {image.id}: image is {image.status}; only queued images take data"
            )
        writer = Writer.of(pid, inode)
        session = await self._uploads.open(image, created=created, writer=writer)
        return Opened(self._add(_OpenFile(inode, image, upload=session)), direct_io=True)

    def _add(self, open_file: _OpenFile) -> int:
        handle = next(self._handles)
        self._files[handle] = open_file
        return handle

    async def read(self, handle: int, offset: int, size: int) -> bytes:
        """Bytes of the image from ``offset`` (fewer at its end); raises the
        :class:`~glancefs.IntegrityError` of an image found corrupt. A queued image reads as
        what its upload holds so far (image tools read back what they wrote), else as empty."""
        open_file = self._files[handle]
        if open_file.reader is not None:
            return await open_file.reader.read(offset, size)
        session = open_file.upload or self._uploads.of(open_file.image.id)
        if session is None:
            return b""
        return await session.read(offset, size)

    async def write(self, handle: int, offset: int, data: bytes) -> int:
        open_file = self._files[handle]
        if open_file.upload is None:
            raise AccessDenied(f"write {open_file.image.id}: file is open for reading")
        return await open_file.upload.write(offset, data)

    async def flush(self, handle: int) -> None:
        """A close of the file: an upload publishes, waits for its writer, or aborts."""
        open_file = self._files.get(handle)
        if open_file is not None and open_file.upload is not None:
            try:
                await open_file.upload.close()
            finally:
                # The kernel must ask for the size again.
                self._kernel.drop_attributes(open_file.inode)

    async def release(self, handle: int) -> None:
        """The last close of the handle: its reader goes, its upload may decide (publish,
        wait or abort)."""
        open_file = self._files.pop(handle, None)
        if open_file is None:
            return
        if open_file.reader is not None:
            await self._readers.release(open_file.reader)
        if open_file.upload is not None:
            await self._uploads.release(open_file.upload)

    def upload_of(self, handle: int | None, image: Image | None) -> UploadSession | None:
        """The upload in flight that a setattr changes: the file's (ftruncate), else the
        image's."""
        open_file = self._files.get(handle) if handle is not None else None
        session = open_file.upload if open_file is not None else None
        if session is None and image is not None:
            session = self._uploads.of(image.id)
        return session if session is not None and not session.finished else None
