"""Properties of the read path's verification bookkeeping (glancefs.fs.read.verification).

The rule: a verdict is clean only if every byte served equals the image's bytes, whether it was
served from the buffer the running hash reads (then the hash saw it) or from anywhere else (then
its crc32 was compared with the bytes the hash saw there). Hypothesis draws the image, where
the wire flipped bytes (in the hashed download, in the other responses), and which reads were
served from where and when, relative to the hash.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from glancefs import IntegrityError
from glancefs.fs.read.verification import Verification
from glancefs.plumbing import Verifier


@dataclass(frozen=True)
class Read:
    offset: int
    length: int
    #: Served from the hashed download's buffer (else from a block or another response).
    from_stream: bool
    #: How far the hash had got when the read came (a fraction of the image).
    when: float


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[bytes, set[int], set[int], list[Read]]:
    image = draw(st.binary(min_size=1, max_size=300))
    size = len(image)
    positions = st.integers(0, size - 1)
    stream_flips = draw(st.sets(positions, max_size=2))
    other_flips = draw(st.sets(positions, max_size=2))
    reads = []
    for _ in range(draw(st.integers(0, 8))):
        offset = draw(st.integers(0, size - 1))
        length = draw(st.integers(1, size - offset))
        reads.append(Read(offset, length, draw(st.booleans()), draw(st.floats(0, 1))))
    return image, stream_flips, other_flips, reads


def flipped(data: bytes, flips: set[int]) -> bytes:
    out = bytearray(data)
    for position in flips:
        out[position] ^= 0xFF
    return bytes(out)


def hash_now(verifier: Verifier, data: bytes) -> None:
    trio.run(verifier.update_many, [data])


@settings(max_examples=300, deadline=None)
@given(scenarios())
def test_a_clean_verdict_means_every_byte_served_was_right(
    scenario: tuple[bytes, set[int], set[int], list[Read]],
) -> None:
    image, stream_flips, other_flips, reads = scenario
    size = len(image)
    record = {
        "id": "i",
        "os_hash_algo": "sha512",
        "os_hash_value": hashlib.sha512(image).hexdigest(),
    }
    verification = Verification("i", size, lambda: Verifier.for_image(record))  # type: ignore[arg-type, return-value]
    current = verification.new_pass()
    hashed_buffer = flipped(image, stream_flips)  # what the one download delivered
    other = flipped(image, other_flips)  # what every other response delivered
    served: list[tuple[int, bytes]] = []
    errors: list[IntegrityError] = []

    def hash_to(position: int) -> None:
        low = current.hashed
        if position <= low or errors:
            return
        hash_now(current.verifier, hashed_buffer[low:position])
        error = verification.hashed(current, low, position, lambda a, b: [hashed_buffer[a:b]])
        if error is not None:
            errors.append(error)

    for read in sorted(reads, key=lambda r: r.when):
        hash_to(int(read.when * size))
        end = read.offset + read.length
        if read.from_stream:
            data = hashed_buffer[read.offset : end]
            verification.account(read.offset, end, data, 0)
        else:
            data = other[read.offset : end]
            verification.account(read.offset, end, data, None)
        served.append((read.offset, data))
    hash_to(size)
    if not errors:
        error = verification.finish(current)
        if error is not None:
            errors.append(error)
    clean = not errors and not verification.unverified
    if clean:
        for offset, data in served:
            assert data == image[offset : offset + len(data)]
    if not stream_flips and not (other_flips and any(not r.from_stream for r in reads)):
        assert clean or verification.unverified  # right data never fails


@given(st.binary(min_size=1, max_size=200))
def test_bytes_served_behind_the_hash_wait_for_the_next_pass(image: bytes) -> None:
    record = {
        "id": "i",
        "os_hash_algo": "sha512",
        "os_hash_value": hashlib.sha512(image).hexdigest(),
    }
    verification = Verification("i", len(image), lambda: Verifier.for_image(record))  # type: ignore[arg-type, return-value]
    current = verification.new_pass()
    hash_now(current.verifier, image)
    assert verification.hashed(current, 0, len(image), lambda a, b: [image[a:b]]) is None
    verification.account(0, len(image), image, None)  # from a block, after the hash passed
    assert verification.finish(current) is None
    assert verification.unverified  # its checks wait for the next pass
    following = verification.new_pass()
    hash_now(following.verifier, image)
    assert verification.hashed(following, 0, len(image), lambda a, b: [image[a:b]]) is None
    assert verification.finish(following) is None
    assert not verification.unverified
