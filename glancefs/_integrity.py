"""Checking downloaded image data against the checksum Glance recorded when it was uploaded.

Glance stores a "multihash" (``os_hash_algo``, sha512 by default, and ``os_hash_value``) and the
legacy MD5 ``checksum``. The multihash is preferred; images uploaded before Glance had it only have
the MD5. Pitfall: the ``Content-MD5`` header of a download is the whole image's MD5 even on a 206
answer, so it can never check a range.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

import trio

from ._exceptions import IntegrityError

__all__ = ["Verifier"]

# hashlib releases the GIL for buffers above 2 KiB; below this size a worker thread costs more
# than the hashing it would move off the event loop.
_THREAD_THRESHOLD = 256 * 1024


class Verifier:
    """Hashes a whole image's data as it streams by and compares it at the end."""

    def __init__(self, image_id: str, algorithm: str, expected: str) -> None:
        self.image_id = image_id
        self.algorithm = algorithm
        self.expected = expected.lower()
        self._hash = hashlib.new(algorithm)
        self.length = 0

    @classmethod
    def for_image(cls, image: Mapping[str, Any]) -> Verifier | None:
        """The verifier for ``image``'s recorded hash, or None when it records none we know."""
        algo, value = image.get("os_hash_algo"), image.get("os_hash_value")
        if algo and value and algo in hashlib.algorithms_available:
            return cls(str(image["id"]), str(algo), str(value))
        if image.get("checksum"):
            return cls(str(image["id"]), "md5", str(image["checksum"]))
        return None

    async def update(self, chunk: bytes) -> None:
        """Hash the next chunk, in a worker thread when it is large enough to be worth it."""
        self.length += len(chunk)
        if len(chunk) >= _THREAD_THRESHOLD:
            await trio.to_thread.run_sync(self._hash.update, chunk)
        else:
            self._hash.update(chunk)

    async def update_many(self, chunks: Sequence[bytes | memoryview]) -> None:
        """Hash several chunks with one hop to a worker thread (fewer GIL handoffs and wakeups)."""
        self.length += sum(len(chunk) for chunk in chunks)
        if len(chunks) == 1 and len(chunks[0]) < _THREAD_THRESHOLD:
            self._hash.update(chunks[0])
            return

        def update_all() -> None:
            for chunk in chunks:
                self._hash.update(chunk)

        await trio.to_thread.run_sync(update_all)

    def check(self) -> None:
        """Raise :class:`IntegrityError` unless the data seen so far has the expected hash."""
        actual = self._hash.hexdigest()
        if actual != self.expected:
            raise IntegrityError(
                f"image {self.image_id}: {self.algorithm} of the {self.length} bytes read is "
                f"{actual[:16]}..., Glance recorded {self.expected[:16]}...: data is corrupt"
            )
