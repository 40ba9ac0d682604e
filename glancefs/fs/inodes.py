"""Inode numbers for images and tag directories, and the kernel's lookup counts.

An image keeps its inode number for as long as the mount runs and across remounts: the number is
derived from a hash of the image id, so ``find``, ``rsync`` and ``du`` see the same file under
``NAME``, ``by-id/ID`` and ``by-tag/T/NAME``. The kernel counts the references it holds (every
``lookup`` and every readdirplus entry adds one, ``forget`` removes them); an entry is dropped when
its count reaches zero, so the table holds only what the kernel holds.

Pitfall: two keys may hash to the same number. The later key then gets the next free number, which
it keeps only while the kernel remembers it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass

from .namespace import Directory

__all__ = ["FIRST_DYNAMIC_INODE", "ImageKey", "InodeTable", "Key"]


@dataclass(frozen=True, slots=True)
class ImageKey:
    """An image file, whichever directory it is seen in (one inode for all its paths)."""

    image_id: str


#: What an inode stands for: an image file or a directory (fixed, or one tag's).
Key = ImageKey | Directory

FIRST_DYNAMIC_INODE = 1 << 16
_INODE_MASK = (1 << 63) - 1


def _hashed_inode(key: Key) -> int:
    # The same text as before keys were typed, so inode numbers stay what they were.
    text = f"image:{key.image_id}" if isinstance(key, ImageKey) else f"{key.kind.value}:{key.tag}"
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    return max(FIRST_DYNAMIC_INODE, int.from_bytes(digest, "big") & _INODE_MASK)


class InodeTable:
    """Two-way map between keys and inode numbers, with a lookup count per inode."""

    def __init__(self, fixed: Mapping[Directory, int]) -> None:
        self._fixed = dict(fixed)
        self._by_inode: dict[int, Key] = {inode: key for key, inode in fixed.items()}
        self._by_key: dict[Key, int] = {key: inode for key, inode in fixed.items()}
        self._lookups: dict[int, int] = {}

    def inode_of(self, key: Key) -> int:
        """The inode number ``key`` has, or would get; does not count a reference."""
        inode = self._by_key.get(key)
        if inode is not None:
            return inode
        inode = _hashed_inode(key)
        while inode in self._by_inode:
            inode = inode + 1 if inode < _INODE_MASK else FIRST_DYNAMIC_INODE
        return inode

    def remember(self, key: Key) -> int:
        """Count one kernel reference to ``key`` (a lookup or a readdirplus entry)."""
        inode = self.inode_of(key)
        self._by_key[key] = inode
        self._by_inode[inode] = key
        self._lookups[inode] = self._lookups.get(inode, 0) + 1
        return inode

    def forget(self, inode: int, count: int) -> None:
        """Drop ``count`` references; the entry goes with the last one (fixed ones stay)."""
        left = self._lookups.get(inode, 0) - count
        if left > 0:
            self._lookups[inode] = left
            return
        self._lookups.pop(inode, None)
        key = self._by_inode.get(inode)
        if key is not None and key not in self._fixed:
            del self._by_inode[inode]
            del self._by_key[key]

    def key_of(self, inode: int) -> Key | None:
        """The key of a known inode, None when the kernel holds no reference to it."""
        return self._by_inode.get(inode)

    def lookup_count(self, inode: int) -> int:
        return self._lookups.get(inode, 0)

    def __len__(self) -> int:
        return len(self._by_inode) - len(self._fixed)
