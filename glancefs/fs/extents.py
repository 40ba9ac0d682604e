"""A set of byte ranges, kept merged: which bytes of an image were served."""

from __future__ import annotations

from bisect import bisect_left, bisect_right

__all__ = ["Extents"]


class Extents:
    """Disjoint, sorted ``[start, end)`` ranges; adding a range merges it with its neighbours.

    A sequential reader leaves one range; a random reader one per read at most.
    """

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._ends: list[int] = []

    def add(self, start: int, end: int) -> None:
        if start >= end:
            return
        first = bisect_left(self._ends, start)  # ranges ending at or after start touch it
        last = bisect_right(self._starts, end)  # ranges starting at or before end touch it
        if first < last:
            start = min(start, self._starts[first])
            end = max(end, self._ends[last - 1])
        self._starts[first:last] = [start]
        self._ends[first:last] = [end]

    def covers(self, start: int, end: int) -> bool:
        """Whether every byte of ``[start, end)`` is in the set (an empty range always is)."""
        if start >= end:
            return True
        index = bisect_right(self._starts, start) - 1
        return index >= 0 and self._ends[index] >= end

    def clear(self) -> None:
        self._starts.clear()
        self._ends.clear()
