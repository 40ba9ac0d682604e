"""The spool: local disk for image data that must be kept while the mount works on it, private
(0700, every file unlinked as it is created) and bounded.

Two users share it, one :class:`SpoolSpace` per mount:

- **Reads of a store without ranges.** On Ceph RBD and Swift (:class:`~glancefs.RangesRefused`)
  the only download of an image is the whole image from byte 0. A reader that does not read it in
  one sequential pass (``dd skip=``, ``tail``, ``qemu-img``, ``mmap``, two readers at different
  places) is served through one such download that is appended to a :class:`SpoolFile` as it
  arrives (:mod:`glancefs.fs.read.spooled`): a read behind the download is read from the file, a
  read ahead of it waits until the download reaches it. No second request, no range. A
  sequential reader from 0 alone needs no spool (the stream serves it from memory). With
  ``--cache-dir`` the cache entry is the disk instead (:mod:`glancefs.fs.read.cached`), as long
  as the cache holds the blocks.
- **Uploads written out of order.** An upload whose writer goes back (``qemu-img convert`` and
  ``create``, an image tool rewriting its header) is written to a spool file at the writer's
  offsets (:meth:`SpoolFile.write`, :meth:`SpoolFile.truncate`) and sent whole at its end
  (:mod:`glancefs.fs.payload`).

:class:`SpoolSpace` is the mount's spool directory (``--spool-dir``, else ``spool`` under the
user's cache directory, 0700) and its bound (``--spool-size``, for reads and uploads together):
an image that does not fit in what is left is refused with EFBIG
(:class:`~glancefs.fs.refusals.TooLarge`) for the reads that would need the spool, or for the
write that would make an upload's file larger; never a wrong byte. A spool file vanishes with its
last file descriptor, whatever happens to the mount; its space is given back when the image's
last open file closes (reads) or the upload ends.
"""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, TypeVar

import trio

from .config import DEFAULT_SPOOL_SIZE
from .refusals import TooLarge
from .status import STATUS

__all__ = ["SpoolFile", "SpoolSpace", "default_spool_dir"]

T = TypeVar("T")


def default_spool_dir() -> Path:
    """``$XDG_CACHE_HOME/glancefs/spool`` (``~/.cache/...``), ``/var/cache/glancefs/spool`` for
    root, as the data cache's default directory."""
    if os.geteuid() == 0:
        return Path("/var/cache/glancefs/spool")
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "glancefs" / "spool"


class SpoolSpace:
    """The mount's spool directory and the bytes its files may use together."""

    def __init__(self, directory: Path, max_bytes: int = DEFAULT_SPOOL_SIZE) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self.used = 0
        #: Images refused for want of room (logged once each).
        self._refused: set[str] = set()

    @property
    def left(self) -> int:
        """The bytes the bound still allows."""
        return self.max_bytes - self.used

    def open(self, image_id: str, size: int) -> SpoolFile:
        """A new spool file for ``size`` bytes of image ``image_id`` read from a store without
        ranges; :class:`TooLarge` when it does not fit in the bound or on the spool's
        filesystem."""
        if size > self.left:
            refusal = TooLarge(
                f"image {image_id}: its store serves no ranges and its {size} bytes do not fit "
                f"in the spool ({self.left} of --spool-size {self.max_bytes} left): read it "
                "sequentially from the start, or raise --spool-size"
            )
            refusal.quiet = image_id in self._refused  # one log line per image
            self._refused.add(image_id)
            raise refusal
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        disk = os.statvfs(self.directory)
        if disk.f_bavail * disk.f_frsize < size:
            raise TooLarge(
                f"image {image_id}: its store serves no ranges and its {size} bytes do not fit "
                f"on the spool's filesystem ({self.directory})"
            )
        file = self._new_file("glancefs-read-")
        file.reserve(size)
        return file

    def open_upload(self) -> SpoolFile:
        """A new, empty spool file for an upload, which :meth:`SpoolFile.reserve` grows."""
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        return self._new_file("glancefs-upload-")

    def _new_file(self, prefix: str) -> SpoolFile:
        # Unlinked at once: the spool vanishes with the process, whatever happens.
        return SpoolFile(self, tempfile.TemporaryFile(dir=self.directory, prefix=prefix))


class SpoolFile:
    """Bytes of one image: ``[0, written)``, appended as a download delivers them (reads), or
    written at any offset, holes reading as zeros (uploads). ``size`` is what the file holds
    of the spool's bound.

    Pitfall: reads and writes run in worker threads; :meth:`close` while one runs only marks
    the file, and the last of them closes it. Closing the descriptor under a thread would let
    the thread read (or write) whatever file the kernel gives that number next.
    """

    def __init__(self, space: SpoolSpace, file: IO[bytes]) -> None:
        self._space = space
        self._file = file
        self.size = 0
        self.written = 0
        self._in_flight = 0
        self._closing = False

    def reserve(self, size: int) -> bool:
        """Hold ``size`` bytes of the spool's bound for this file (never less than it holds);
        False, holding no more, when the bound does not allow it."""
        more = size - self.size
        if more <= 0:
            return True
        if more > self._space.left:
            return False
        self._space.used += more
        self.size = size
        return True

    async def append(self, pieces: Sequence[bytes | memoryview]) -> None:
        """Write ``pieces`` after what was written (OSError: ENOSPC, EIO, as the disk says)."""
        await self._write_at(self.written, pieces)

    async def write(self, offset: int, data: bytes) -> None:
        """Write ``data`` at ``offset`` (past the end: the gap is a hole)."""
        await self._write_at(offset, (data,))

    async def _write_at(self, offset: int, pieces: Sequence[bytes | memoryview]) -> None:
        def write(fd: int) -> None:
            position = offset
            for piece in pieces:
                view = memoryview(piece)
                while view:
                    done = os.pwrite(fd, view, position)
                    position += done
                    view = view[done:]

        await self._in_thread(write)
        self._written_to(max(self.written, offset + sum(len(piece) for piece in pieces)))

    async def truncate(self, size: int) -> None:
        """Make the file ``size`` bytes long: cut, or extended by a hole."""
        await self._in_thread(lambda fd: os.ftruncate(fd, size))
        self._written_to(size)

    def _written_to(self, end: int) -> None:
        STATUS.spooled(end - self.written)
        self.written = end

    async def read(self, offset: int, end: int) -> bytes:
        """Bytes ``[offset, end)``, which must be written already."""
        assert end <= self.written
        return await self._in_thread(lambda fd: os.pread(fd, end - offset, offset))

    async def inspect(self, work: Callable[[Callable[[int, int], bytes]], T]) -> T:
        """``work(read)`` in a worker thread, where ``read(offset, size)`` reads the file (fewer
        bytes at its end): for parsers that decide what to read as they go."""
        return await self._in_thread(
            lambda fd: work(lambda offset, size: os.pread(fd, size, offset))
        )

    async def _in_thread(self, work: Callable[[int], T]) -> T:
        if self._closing:
            raise OSError(errno.EBADF, "the spool file was closed")
        self._in_flight += 1
        try:
            return await trio.to_thread.run_sync(work, self._file.fileno())
        finally:
            self._in_flight -= 1
            if self._closing and not self._in_flight:
                self._file.close()

    def close(self) -> None:
        if not self._closing:
            self._closing = True
            self._space.used -= self.size
            STATUS.spooled(-self.written)
            if not self._in_flight:
                self._file.close()
