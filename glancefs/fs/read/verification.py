"""What is verified of one image's served bytes: the running hash's passes and the crc32 checks.

Pure bookkeeping (no trio, no I/O; the hashing itself runs where the caller puts it): the feed
tells :class:`Verification` what it served and from where, and what the running hash consumed;
it answers which bytes are verified and when a mismatch shows. The rule it keeps, property-tested
in tests/unit/test_verification.py: **every byte served was hashed in the very buffer it was
served from, or its crc32 was recorded and compared with the bytes hashed at that place.**

* **A pass** is one running hash (``os_hash_algo``, else ``checksum``) over the image's bytes in
  order, ``[0, hashed)``, fed from one buffer (the stream's, or the spool written from it).
* **Bytes served from that buffer at or after where it started feeding the pass**
  (``hashed_from``) are the very bytes the hash sees there: nothing to record.
* **Bytes served from anywhere else** (blocks, a stream that started ahead of ``hashed``, a
  stream behind it, the cache) are recorded as a :class:`Check`, the crc32 of exactly what was
  served. A check at or after ``hashed`` is settled when the hash passes over it; one before
  ``hashed`` waits for the next pass (:meth:`Verification.new_pass` takes it over).
* **The verdict** is due once the bytes served cover the whole image; it is clean when a pass
  completed with the recorded hash and every check was settled equal.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from glancefs import IntegrityError
from glancefs.plumbing import Verifier

from ..extents import Extents

__all__ = ["Check", "Pass", "Verification"]

Piece = bytes | memoryview


def crc32_of(pieces: Iterable[Piece]) -> int:
    crc = 0
    for piece in pieces:
        crc = zlib.crc32(piece, crc)
    return crc


@dataclass(eq=False)
class Check:
    """The crc32 of bytes ``[start, end)`` as served, to compare with the bytes hashed there."""

    start: int
    end: int
    served: int
    hashed: int = 0  # running crc32 of the hashed bytes [start, checked)
    checked: int = -1

    def __post_init__(self) -> None:
        self.checked = self.start


@dataclass(eq=False)
class Pass:
    """One verification pass over the whole image, from byte 0."""

    verifier: Verifier
    checks: list[Check] = field(default_factory=list)
    hashed: int = 0
    complete: bool = False


class Verification:
    """The verification state of one image's feed (see the module docstring).

    ``new_verifier`` makes the hash object of a pass (None: the image is not verified, and
    every method is a no-op that reports everything clean).
    """

    def __init__(self, image_id: str, size: int, new_verifier: Callable[[], Verifier] | None):
        self.image_id = image_id
        self.size = size
        self._new_verifier = new_verifier
        self.served = Extents()
        self.current: Pass | None = None
        #: Checks of bytes served where the current pass had already hashed.
        self.later_checks: list[Check] = []
        #: Bytes were served that no completed pass verified yet.
        self.unverified = False

    @property
    def enabled(self) -> bool:
        return self._new_verifier is not None

    def disable(self) -> None:
        """Nothing served from now on needs verifying (a trusted cache entry serves it all);
        nothing was served before."""
        self._new_verifier = None
        self.current = None

    def new_pass(self) -> Pass:
        """Start a pass from byte 0; it takes over the checks the previous one could not settle."""
        assert self._new_verifier is not None
        current = Pass(self._new_verifier(), checks=self.later_checks)
        self.later_checks = []
        self.current = current
        return current

    def reset(self) -> None:
        """Forget what was served and checked (SIGHUP)."""
        self.served.clear()
        self.later_checks = []
        self.unverified = False
        self.current = None

    @property
    def covered(self) -> bool:
        """The bytes served cover the whole image: the verdict is due."""
        return self.served.covers(0, self.size)

    def verdict_due(self, *, whole_download: bool = False) -> bool:
        """Bytes were served that are not verified yet, and a verdict is due for them: they
        cover the whole image, or (``whole_download``) a download of it all feeds the hash."""
        return self.enabled and self.unverified and (whole_download or self.covered)

    def account(self, offset: int, end: int, data: bytes, hashed_from: int | None) -> bool:
        """Record that ``data`` = bytes ``[offset, end)`` was served; ``hashed_from``: it came
        from the buffer that feeds the current pass from that offset on (None: from elsewhere).
        True when these bytes completed the served set."""
        was_covered = self.covered
        self.served.add(offset, end)
        covered_last = not was_covered and self.covered
        current = self.current
        if current is None:
            return covered_last
        if not current.complete:
            self.unverified = True  # verified when the pass completes
        covered_from = end if hashed_from is None else min(end, max(offset, hashed_from))
        # [offset, covered_from) came from elsewhere than the hashed buffer.
        hashed = current.hashed if not current.complete else self.size
        view = memoryview(data)
        if offset < covered_from:
            self.unverified = True
        if offset < min(covered_from, hashed):
            high = min(covered_from, hashed)
            self.later_checks.append(Check(offset, high, zlib.crc32(view[: high - offset])))
        if max(offset, hashed) < covered_from:
            low = max(offset, hashed)
            crc = zlib.crc32(view[low - offset : covered_from - offset])
            current.checks.append(Check(low, covered_from, crc))
        return covered_last

    def buffer_dropped(self, current: Pass, low: int, pieces: Iterable[Piece], end: int) -> None:
        """A buffer that fed ``current`` stops; its bytes ``[low, end)`` (``pieces``) were
        served but not hashed from it: check them against whatever buffer the hash sees there."""
        if low < end:
            current.checks.append(Check(low, end, crc32_of(pieces)))

    def hashed(
        self, current: Pass, low: int, high: int, piece_of: Callable[[int, int], Iterable[Piece]]
    ) -> IntegrityError | None:
        """The hash of ``current`` consumed bytes ``[low, high)``; ``piece_of(a, b)`` gives the
        bytes it hashed there. Settles the checks over them; the mismatch, if one shows."""
        current.hashed = high
        remaining: list[Check] = []
        for check in current.checks:
            start, stop = max(check.checked, low), min(check.end, high)
            if start < stop:
                for piece in piece_of(start, stop):
                    check.hashed = zlib.crc32(piece, check.hashed)
                check.checked = stop
            if check.checked < check.end:
                remaining.append(check)
            elif check.hashed != check.served:
                return IntegrityError(
                    f"image {self.image_id}: crc32 of bytes {check.start}-{check.end} as "
                    f"served is {check.served:08x}, of the bytes hashed there "
                    f"{check.hashed:08x}: data is corrupt"
                )
        current.checks = remaining
        return None

    def finish(self, current: Pass) -> IntegrityError | None:
        """``current`` hashed the whole image: its verdict (None: the recorded hash matched)."""
        try:
            current.verifier.check()
        except IntegrityError as error:
            return error
        current.complete = True
        self.unverified = bool(self.later_checks)
        return None
