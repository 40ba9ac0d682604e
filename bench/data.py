"""The benchmark's data: a random file (images: lab.glance_http; rows: lab.rows)."""

from __future__ import annotations

import os
from pathlib import Path

GIB = 1024 * 1024 * 1024


def random_file(path: Path, size: int = GIB) -> Path:
    """Write ``size`` random bytes (incompressible, so nothing can shortcut them)."""
    with path.open("wb") as f:
        left = size
        while left:
            piece = os.urandom(min(left, 16 * 1024 * 1024))
            f.write(piece)
            left -= len(piece)
    return path


def sparse_file(path: Path, size: int = GIB, data: int = GIB // 4, extents: int = 16) -> Path:
    """A sparse file of ``size`` holding ``data`` random bytes in ``extents`` runs spread over
    it, the rest holes (as most raw disk images are); it ends in a hole."""
    run = data // extents
    with path.open("wb") as f:
        f.truncate(size)
        for index in range(extents):
            f.seek(index * (size // extents))
            f.write(os.urandom(run))
    return path
