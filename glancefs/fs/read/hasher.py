"""The running hash of a feed: one task per verification pass, fed from the current stream.

The bookkeeping of what is verified is :mod:`.verification`'s; this is the part that runs. A
pass's task hashes the stream's buffer as it fills, in a worker thread, from where the pass is
(``hashed``) while the stream holds that byte and feeds this pass; then it decides.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import trio

from glancefs import IntegrityError

from ..background import raise_again
from .slot import StreamSlot, Wakeup
from .stream import Stream
from .verification import Pass, Verification

__all__ = ["Hasher"]

log = logging.getLogger("glancefs.reader")


class Hasher:
    """Runs the verification passes of one feed; ``on_mismatch`` gets the error that ends one,
    ``broken()`` raises the feed's mismatch while a verdict waits."""

    def __init__(
        self,
        verification: Verification,
        slot: StreamSlot,
        nursery: trio.Nursery,
        wakeup: Wakeup,
        on_mismatch: Callable[[IntegrityError], None],
        broken: Callable[[], None],
    ) -> None:
        self._verification = verification
        self._slot = slot
        self._nursery = nursery
        self._wakeup = wakeup
        self._on_mismatch = on_mismatch
        self._broken = broken
        self._scope = trio.CancelScope()

    def new_pass(self) -> Pass:
        """Start a pass from byte 0 (the previous one's task stops)."""
        self._scope.cancel()
        stream = self._slot.stream
        if stream is not None:
            stream.hash_from = stream.hash_at = None  # it fed the previous pass
        current = self._verification.new_pass()
        self._scope = trio.CancelScope()
        self._nursery.start_soon(self._run, current, self._scope)
        return current

    def stop(self) -> None:
        self._scope.cancel()

    def hash_from(self, offset: int, *, fresh: bool) -> int | None:
        """Where a stream starting at ``offset`` feeds the pass (None: it does not); a new pass
        starts with it when ``fresh``, or when it starts at 0 after a completed pass."""
        current = self._verification.current
        if current is not None and (fresh or (current.complete and offset == 0)):
            current = self.new_pass()
        if current is not None and not current.complete and offset <= current.hashed:
            return current.hashed
        return None

    def stream_stopped(self, stream: Stream) -> None:
        """Bytes read from a stopped stream's buffer that the hash has not reached are never
        hashed from it now: check them against whatever buffer the hash does see there."""
        current = self._verification.current
        if current is None or stream.hash_from is None or current.complete:
            return
        low = max(current.hashed, stream.start)
        pieces = stream.pieces(low, stream.end) if low < stream.end else []
        self._verification.buffer_dropped(current, low, pieces, stream.end)

    async def verdict(
        self, start: Callable[[int, bool], Stream], whole_only: bool, spooled: bool
    ) -> None:
        """Wait until every byte served is verified, once the verdict is due: the bytes served
        cover the image, or (``spooled``) a spool's download runs, which hashes everything
        anyway. Starts a pass, and a stream to feed it (``start(offset, spooling)``), where
        nothing does: from where the hash is, or from 0 on a store without ranges
        (``whole_only``). Raises the feed's mismatch, or the download's error."""
        verification = self._verification
        while verification.verdict_due(whole_download=spooled):
            self._broken()
            current = verification.current
            if current is None or current.complete:
                current = self.new_pass()
            failure = self._slot.failed()
            if failure is not None:
                raise_again(failure)
            stream = self._slot.stream
            if stream is None or stream.hash_from is None:
                if whole_only and current.hashed > 0:
                    current = self.new_pass()
                stream = start(current.hashed, False)
            stream.furthest = verification.size  # the hash needs all of it
            stream.wants_more.set()
            await self._wakeup.wait()

    async def _run(self, current: Pass, scope: trio.CancelScope) -> None:
        """Hash the stream's buffer as it fills, then decide.

        Each batch is everything that arrived while the previous one was hashed: one hop to the
        thread per batch, not per socket read (each hop costs GIL handoffs and a wakeup).
        Runs in the mount's nursery: never raises (a mismatch goes to ``on_mismatch``).
        """
        verification = self._verification
        with scope:
            while current.hashed < verification.size:
                stream = self._slot.stream
                if (
                    stream is None
                    or stream.hash_from is None
                    or not stream.start <= current.hashed < stream.end
                ):
                    await self._wakeup.wait()
                    continue
                low, high = current.hashed, stream.end
                await current.verifier.update_many(stream.pieces(low, high))
                if current is not verification.current:
                    return  # reset while hashing
                mismatch = verification.hashed(current, low, high, stream.pieces)
                if mismatch is not None:
                    self._on_mismatch(mismatch)
                    return
                stream.hashed_to(high)
                self._wakeup.notify()
            mismatch = verification.finish(current)
            if mismatch is not None:
                self._on_mismatch(mismatch)
                return
            if self._slot.stream is not None:
                self._slot.stream.hash_at = None
            if not verification.unverified:
                log.info(
                    "image %s: verified (%s)", verification.image_id, current.verifier.algorithm
                )
            self._wakeup.notify()
