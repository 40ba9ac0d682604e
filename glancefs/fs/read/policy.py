"""The read policy: every knob of the read path, and the one rule for "sequential".

Pure: no trio, no I/O. :class:`ReadTuning`'s defaults were measured on loopback (BENCHMARKS.md
says how). :class:`AccessPattern` is the only place that decides whether a read continues a
sequential reader: the feed asks it whether the stream may move to a read, the cache whether to
read whole blocks and ahead or just the pieces asked for.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Access", "AccessPattern", "PrefetchBudget", "ReadTuning"]

MiB = 1024 * 1024


@dataclass(frozen=True)
class ReadTuning:
    """Knobs of the data path."""

    initial_window: int = 1 * MiB
    max_window: int = 32 * MiB
    #: Data kept behind the furthest read, for out-of-order kernel readahead.
    keep_behind: int = 4 * MiB
    #: The blocks of random reads on a store that takes ranges: one ranged GET per run of
    #: missing blocks, the last few kept.
    block_size: int = 256 * 1024
    cached_blocks: int = 16
    #: Reads that each start where the previous one ended before a reader counts as
    #: sequential (a read at offset 0 always does): it may then take the stream.
    sequential_trigger: int = 2
    #: How far from the furthest byte read so far a read may start and still belong to the same
    #: pass (:attr:`Access.nearby`). The kernel's readahead and tools with several reads in
    #: flight (qemu-img convert: 8 of 2 MiB) send a sequential reader's reads out of order, up
    #: to ~16 MiB apart.
    sequential_spread: int = 16 * MiB
    #: Seconds a paused stream keeps its connection when nobody else waits for one.
    idle_release: float = 1.0
    #: Seconds a stream that is being read keeps its connection while other requests wait
    #: (each hand-over costs a new ranged GET, so not too often).
    slot_slice: float = 4.0
    #: Seconds without a read after which a stream may be moved to another reader's offset.
    stream_idle: float = 1.0
    #: Seconds a read fails at once with the error that just failed one: the kernel retries a
    #: failed readahead page with a read of its own, which must not wait for Glance again.
    failure_grace: float = 1.0
    #: The data cache (``--cache-dir``): whole blocks read from disk ahead of a sequential reader
    #: (block files are read with O_DIRECT, so no kernel readahead runs for them; 4 measured
    #: against 2 and 8 on a cold 1 GiB read), whole blocks kept in memory per open image for
    #: reads that come late, blocks written while the download goes on (more and it waits for
    #: the disk), and the most one request of ``--cache-fill`` asks for.
    cache_read_ahead: int = 4
    cache_kept_blocks: int = 16
    cache_writes_in_flight: int = 4
    fill_request: int = 16 * MiB


class PrefetchBudget:
    """The memory all run-ahead windows may use together; each open stream gets an equal share."""

    def __init__(self, total_bytes: int) -> None:
        self.total_bytes = total_bytes
        self.open_streams = 0

    def window_cap(self, max_window: int) -> int:
        return max(256 * 1024, min(max_window, self.total_bytes // max(1, self.open_streams)))


@dataclass(frozen=True)
class Access:
    """What one read is, for one open file (:meth:`AccessPattern.observe`)."""

    #: It continues the reader's previous reads exactly (or starts at 0): the stream may move
    #: to it.
    sequential: bool
    #: It starts near the furthest byte read so far, before or after it: part of a pass whose
    #: reads arrive out of order. The cache reads whole blocks and ahead for it.
    nearby: bool


class AccessPattern:
    """How one open file is read: the one place that tells sequential reads from others."""

    def __init__(self, tuning: ReadTuning) -> None:
        self._tuning = tuning
        self._last_end = -1
        self._continuing_reads = 0
        self._furthest = 0

    def observe(self, offset: int, end: int) -> Access:
        """Record the read ``[offset, end)`` and say what it is."""
        continuing = offset == self._last_end
        self._continuing_reads = self._continuing_reads + 1 if continuing else 0
        self._last_end = end
        nearby = abs(offset - self._furthest) <= self._tuning.sequential_spread
        self._furthest = max(self._furthest, end) if nearby else end
        sequential = offset == 0 or self._continuing_reads >= self._tuning.sequential_trigger
        return Access(sequential=sequential, nearby=nearby)
