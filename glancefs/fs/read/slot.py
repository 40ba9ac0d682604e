"""The feed's one stream at a time: starting, stopping and waiting on it.

A feed has at most one :class:`~glancefs.fs.read.stream.Stream`. :class:`StreamSlot` owns it:
it starts one where a read (or the hash) needs it, stops the one before, and lets reads wait for
its bytes. Everything the feed's parts wait for (bytes arriving, the hash advancing, a stream
ending, a mismatch) is announced through one :class:`Wakeup`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import trio

from glancefs import GlanceError

from ..background import raise_again
from ..status import STATUS
from .policy import PrefetchBudget, ReadTuning
from .source import ImageSource
from .stream import Stream

__all__ = ["StreamSlot", "Wakeup"]


class Wakeup:
    """Something changed in the feed: every waiter checks its condition again."""

    def __init__(self) -> None:
        self._event = trio.Event()

    def notify(self) -> None:
        self._event.set()
        self._event = trio.Event()

    async def wait(self) -> None:
        await self._event.wait()


class StreamSlot:
    """The one stream of a feed (see the module docstring).

    ``on_chunk(stream)`` runs for every chunk of every stream before the waiters wake (with
    ``storing``, it stores whole blocks in the cache: the streams keep what is not stored yet);
    ``on_stop(stream)`` when a stream is stopped (it still holds its buffer); ``broken()``
    raises when the feed can no longer serve anything (a mismatch).
    """

    def __init__(
        self,
        source: ImageSource,
        nursery: trio.Nursery,
        budget: PrefetchBudget,
        tuning: ReadTuning,
        wakeup: Wakeup,
        *,
        on_chunk: Callable[[Stream], Awaitable[None]],
        on_stop: Callable[[Stream], None],
        broken: Callable[[], None],
        storing: bool = False,
    ) -> None:
        self._source = source
        self._nursery = nursery
        self._budget = budget
        self._tuning = tuning
        self._wakeup = wakeup
        self._on_chunk = on_chunk
        self._on_stop = on_stop
        self._broken = broken
        self._storing = storing
        self.stream: Stream | None = None

    def window_cap(self) -> int:
        return self._budget.window_cap(self._tuning.max_window)

    def start(self, offset: int, hash_from: int | None, *, spooling: bool = False) -> Stream:
        """Stop the current stream and start one from ``offset``; a spooling one runs a whole
        window ahead from the start (its readers read the spool)."""
        self.stop()
        stream = Stream(
            self._source,
            offset,
            window=self.window_cap() if spooling else self._tuning.initial_window,
            hash_from=hash_from,
            tuning=self._tuning,
            window_cap=self.window_cap,
            on_chunk=self._on_chunk,
            notify=self._wakeup.notify,
            spooling=spooling,
            storing=self._storing,
        )
        self.stream = stream
        self._budget.open_streams += 1
        STATUS.stream_opened()
        self._nursery.start_soon(stream.pump)
        return stream

    def stop(self) -> None:
        stream = self.stream
        if stream is None:
            return
        self.stream = None
        self._budget.open_streams -= 1
        STATUS.stream_opened(-1)
        stream.cancel_scope.cancel()
        self._on_stop(stream)
        stream.hash_at = None
        # The chunks stay with the stream object: a hash batch in flight may still read them.

    def may_move(self) -> bool:
        """A sequential reader may take the stream unless another reader is using it."""
        stream = self.stream
        if stream is None or stream.error is not None or stream.done:
            return True
        if stream.readers_waiting:
            return False
        if stream.end >= stream.size:
            return True  # nothing left to download: its buffer is all it still has to give
        return trio.current_time() - stream.last_read >= self._tuning.stream_idle

    async def wait_for(
        self, stream: Stream, end: int, reached: Callable[[], int] | None = None
    ) -> bool:
        """Wait until ``stream`` has the bytes up to ``end`` (``reached()``: where they are
        ready, by default the stream's buffer); False when it ended without them (the stream is
        then stopped, if it still is the current one and failed)."""
        position = reached or (lambda: stream.end)
        stream.readers_waiting += 1
        try:
            while position() < end and not stream.done:
                self._broken()
                await self._wakeup.wait()
        finally:
            stream.readers_waiting -= 1
        self._broken()
        if position() >= end:
            return True
        if stream is self.stream and stream.error is not None:
            self.stop()
        return False

    async def read(self, stream: Stream, offset: int, end: int) -> bytes | None:
        """The bytes from ``stream``, waiting for them; None when it no longer holds them."""
        stream.asked(end)
        if not await self.wait_for(stream, end):
            if stream.error is None and stream is not self.stream:
                return None  # the stream was stopped (moved, or reset) under this read
            raise_again(stream.missing_error())
        if offset < stream.start:
            return None  # readahead fell behind what we kept: fetch it directly rather than fail
        data = stream.slice(offset, end)
        stream.trim()
        return data

    def failed(self) -> GlanceError | None:
        """The error of the current stream, if it feeds the hash and failed."""
        stream = self.stream
        if stream is not None and stream.hash_from is not None and stream.error is not None:
            self.stop()
            return stream.error
        return None
