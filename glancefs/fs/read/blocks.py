"""The last few whole blocks of an image kept in memory, for readers that come back to them."""

from __future__ import annotations

from collections import OrderedDict

__all__ = ["BlockLRU"]


class BlockLRU:
    """Blocks by index, at most ``capacity``; the one stored (or stored again) longest ago is
    dropped first. :meth:`get` does not refresh: a reader moving forward re-reads none of what
    it read, and read-ahead blocks not read yet must outlive them."""

    def __init__(self, capacity: int, block_size: int) -> None:
        self.capacity = capacity
        self.block_size = block_size
        self._blocks: OrderedDict[int, bytes] = OrderedDict()

    def __contains__(self, index: int) -> bool:
        return index in self._blocks

    def get(self, index: int) -> bytes | None:
        return self._blocks.get(index)

    def put(self, index: int, block: bytes) -> None:
        self._blocks[index] = block
        self._blocks.move_to_end(index)
        while len(self._blocks) > self.capacity:
            self._blocks.popitem(last=False)

    def clear(self) -> None:
        self._blocks.clear()
