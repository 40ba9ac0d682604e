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
