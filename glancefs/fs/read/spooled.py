"""Reads of an image whose store takes no ranges: through one download from 0 and the spool.

A sequential reader from 0 takes the feed's stream alone (no disk). Any other read is served from
a spool file (:mod:`.spool`) that one *spooling* stream from byte 0 writes as it arrives: behind
the download from the file, ahead of it after waiting for it. The spooling stream starts a new
verification pass, so every byte in the spool is hashed in the very buffer it was written from.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable

from ..background import raise_again
from ..refusals import LocalFailure
from ..spool import SpoolFile, SpoolSpace
from .slot import StreamSlot
from .stream import Stream

__all__ = ["SpooledReads"]

log = logging.getLogger("glancefs.reader")


class SpooledReads:
    """One image's reads on a store without ranges (see the module docstring).

    ``start(offset, spooling)`` starts the feed's stream (the feed decides what it hashes).
    """

    def __init__(
        self,
        image_id: str,
        size: int,
        slot: StreamSlot,
        space: SpoolSpace,
        start: Callable[[int, bool], Stream],
    ) -> None:
        self._image_id = image_id
        self._size = size
        self._slot = slot
        self._space = space
        self._start = start
        self.spool: SpoolFile | None = None
        self._failure: LocalFailure | None = None

    async def read(self, offset: int, end: int, sequential: bool) -> tuple[bytes, int | None]:
        """The bytes, and the offset from which their buffer feeds the running hash."""
        stream = self._slot.stream
        if stream is None and offset == 0 and sequential:
            stream = self._start(0, False)
            data = await self._slot.read(stream, offset, end)
            if data is not None:
                return data, stream.hash_from
        spool, stream = self.spool, self._slot.stream
        feeding = stream is not None and stream.spooling and stream.error is None
        if spool is not None and end <= spool.written and not feeding:
            # Written by a download that is gone (a pass after it runs on another stream): the
            # bytes are right where that pass said so; this pass checks them as from elsewhere.
            return await self._read_spool(spool, offset, end, None, sequential)
        if spool is None or stream is None or not feeding:
            stream, spool = self._start_spooling()
        if end > spool.written:
            stream.asked(end)
            reached = await self._slot.wait_for(stream, end, lambda: spool.written)
            if self.spool is not spool:  # the spool failed or was reset meanwhile
                return await self.read(offset, end, sequential)
            if not reached:
                raise_again(stream.missing_error())
        return await self._read_spool(spool, offset, end, stream.hash_from, sequential)

    async def _read_spool(
        self, spool: SpoolFile, offset: int, end: int, hashed_from: int | None, sequential: bool
    ) -> tuple[bytes, int | None]:
        try:
            return await spool.read(offset, end), hashed_from
        except OSError as error:
            if self.spool is not spool:  # closed under the read
                return await self.read(offset, end, sequential)
            raise self._error(error) from None

    def _start_spooling(self) -> tuple[Stream, SpoolFile]:
        """One download from byte 0 kept in a new spool file."""
        if self._failure is not None:
            raise_again(self._failure)
        self.close()
        spool = self._space.open(self._image_id, self._size)
        self.spool = spool
        stream = self._start(0, True)
        stream.furthest = self._size
        return stream, spool

    async def write(self, stream: Stream) -> None:
        """A spooling stream's new bytes go to the spool before any reader is woken."""
        spool = self.spool
        if spool is None or not stream.spooling or self._slot.stream is not stream:
            return
        try:
            await spool.append(stream.pieces(spool.written, stream.end))
        except OSError as error:
            self._failure = self._error(error)
            log.warning("%s", self._failure)
            self.close()
            stream.cancel_scope.cancel()
            return
        if stream.hash_at is None:
            stream.trim()

    def _error(self, error: OSError) -> LocalFailure:
        return LocalFailure(
            f"image {self._image_id}: spool: {error.strerror or error}", error.errno or errno.EIO
        )

    def close(self) -> None:
        if self.spool is not None:
            self.spool.close()
            self.spool = None

    def reset(self) -> None:
        self.close()
        self._failure = None
