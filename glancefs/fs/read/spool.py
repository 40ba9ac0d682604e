"""The spool: local disk that keeps an image's one download, for stores that take no ranges.

On Ceph RBD and Swift (:class:`~glancefs.RangesRefused`) the only download of an image is the
whole image from byte 0. A reader that does not read it in one sequential pass (``dd skip=``,
``tail``, ``qemu-img``, ``mmap``, two readers at different places) is served through one such
download that is written to a :class:`SpoolFile` as it arrives: a read behind the download is
read from the file, a read ahead of it waits until the download reaches it. No second request,
no range. A sequential reader from 0 alone needs no spool (the stream serves it from memory).

:class:`SpoolSpace` is the mount's spool directory (``--spool-dir``, else ``spool`` under the
user's cache directory, 0700) and its bound (``--spool-size``): an image whose size does not fit
in what is left is refused with EFBIG (:class:`~glancefs.fs.refusals.TooLarge`) for the reads
that would need the spool, never served a wrong byte. A spool file is unlinked as it is created,
so it vanishes with its last file descriptor, whatever happens to the mount; its space is given
back when the image's last open file closes. With ``--cache-dir`` the cache entry is the disk
instead (:mod:`glancefs.fs.read.cached`), as long as the cache holds the blocks.
"""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, TypeVar

import trio

from ..config import DEFAULT_SPOOL_SIZE
from ..refusals import TooLarge
from ..status import STATUS

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

    def open(self, image_id: str, size: int) -> SpoolFile:
        """A new spool file for ``size`` bytes of image ``image_id``; :class:`TooLarge` when it
        does not fit in the bound or on the spool's filesystem."""
        if self.used + size > self.max_bytes:
            refusal = TooLarge(
                f"image {image_id}: its store serves no ranges and its {size} bytes do not fit "
                f"in the spool ({self.max_bytes - self.used} of --spool-size {self.max_bytes} "
                f"left): read it sequentially from the start, or raise --spool-size"
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
        # Unlinked at once: the spool vanishes with the process, whatever happens.
        file = tempfile.TemporaryFile(dir=self.directory, prefix="glancefs-read-")  # noqa: SIM115
        self.used += size
        return SpoolFile(self, file, size)


class SpoolFile:
    """One image's bytes ``[0, written)``, appended as the download delivers them.

    Pitfall: reads and writes run in worker threads; :meth:`close` while one runs only marks
    the file, and the last of them closes it. Closing the descriptor under a thread would let
    the thread read (or write) whatever file the kernel gives that number next.
    """

    def __init__(self, space: SpoolSpace, file: IO[bytes], size: int) -> None:
        self._space = space
        self._file = file
        self.size = size
        self.written = 0
        self._in_flight = 0
        self._closing = False

    async def append(self, pieces: Sequence[bytes | memoryview]) -> None:
        """Write ``pieces`` after what was written (OSError: ENOSPC, EIO, as the disk says)."""
        offset = self.written

        def write(fd: int) -> None:
            position = offset
            for piece in pieces:
                view = memoryview(piece)
                while view:
                    done = os.pwrite(fd, view, position)
                    position += done
                    view = view[done:]

        await self._in_thread(write)
        length = sum(len(piece) for piece in pieces)
        self.written += length
        STATUS.spooled(length)

    async def read(self, offset: int, end: int) -> bytes:
        """Bytes ``[offset, end)``, which must be written already."""
        assert end <= self.written
        return await self._in_thread(lambda fd: os.pread(fd, end - offset, offset))

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
