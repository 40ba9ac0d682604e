"""Kept failures of background work, raised again for each caller."""

from __future__ import annotations

import pytest

from glancefs import IntegrityError
from glancefs.fs.background import raise_again


def _depth(error: BaseException) -> int:
    depth, tb = 0, error.__traceback__
    while tb is not None:
        depth, tb = depth + 1, tb.tb_next
    return depth


def test_a_kept_failure_raised_again_does_not_keep_earlier_callers_frames() -> None:
    kept = IntegrityError("image x: sha512 mismatch")

    def read(buffer: bytearray) -> None:
        raise_again(kept)

    depths = []
    for _ in range(100):
        with pytest.raises(IntegrityError) as raised:
            read(bytearray(1 << 20))  # a local every frame kept alive would hold
        assert raised.value is kept
        depths.append(_depth(kept))
    assert max(depths) == depths[0]  # a plain `raise kept` grows by two frames each time
