"""Tests for glancefs.fs.naming: every mapping rule, its edges, and the invariants as properties."""

import random
import time
import uuid
from collections.abc import Callable, Collection

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from glancefs.fs.naming import NAME_MAX, NameStream, assign_names, id_suffix, sanitize

ID_A = "6f0c4e0d-1111-4222-8333-444455556666"
ID_B = "0a1b2c3d-aaaa-4bbb-8ccc-dddddddddddd"
ID_C = "fedcba98-7654-4321-8fed-cba987654321"
# Three ids sharing their first 8 hex digits with ID_A.
ID_A2 = "6f0c4e0d-9999-4999-8999-999999999999"
ID_A3 = "6F0C4E0D-0000-4000-8000-000000000000"
ROOT_RESERVED = ("by-id", "by-tag", "new")


def nbytes(name: str) -> int:
    return len(name.encode())


def is_valid(name: str) -> bool:
    if name in ("", ".", "..") or "/" in name or "\0" in name:
        return False
    try:
        return nbytes(name) <= NAME_MAX
    except UnicodeEncodeError:
        return False


def longest_prefix(name: str, budget: int) -> str:
    """The longest prefix of whole code points fitting in ``budget`` bytes, done the slow way."""
    out = ""
    for ch in name:
        if nbytes(out + ch) > budget:
            break
        out += ch
    return out


# --- id_suffix ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("image_id", "expected"),
    [
        (ID_A, "~6f0c4e0d"),
        (ID_A3, "~6f0c4e0d"),  # lower case
        ("6f0c-4e0d-1111", "~6f0c4e0d"),  # dashes dropped before taking 8
        ("6f0c4e0d1111422283334444555566660", "~6f0c4e0d"),  # no dashes at all
    ],
)
def test_id_suffix(image_id: str, expected: str) -> None:
    assert id_suffix(image_id) == expected


# --- sanitize ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        (None, ""),
        ("", ""),
        (".", ""),
        ("..", ""),
        ("...", "..."),
        (".hidden", ".hidden"),
        ("ubuntu-24.04", "ubuntu-24.04"),
        ("a/b", "a\u2215b"),
        ("/", "\u2215"),
        ("//", "\u2215\u2215"),
        ("a\0b", "a\u2400b"),
        ("\0", "\u2400"),
        ("\0\0", "\u2400\u2400"),
        ("\ud800", "\ufffd"),
        ("x\udfffy", "x\ufffdy"),
        ("\ud83d\ude00", "\ufffd\ufffd"),  # a surrogate pair left unjoined is two lone surrogates
        ("\U0001f600", "\U0001f600"),  # a real astral code point is kept
        ("é€😀", "é€😀"),
        (" ", " "),
        ("a" * 300, "a" * 300),  # not shortened: that needs the id
        ("./..", ".\u2215.."),
    ],
)
def test_sanitize(name: str | None, expected: str) -> None:
    assert sanitize(name) == expected


# --- assign_names: the plain rules --------------------------------------------------------------


def test_empty_directory() -> None:
    assert assign_names([]) == {}


def test_unique_valid_names_are_kept() -> None:
    images = [(ID_A, "ubuntu"), (ID_B, "debian"), (ID_C, "ubuntu\u2215backup")]
    assert assign_names(images) == {ID_A: "ubuntu", ID_B: "debian", ID_C: "ubuntu\u2215backup"}


def test_accepts_any_iterable() -> None:
    assert assign_names(iter([(ID_A, "x")])) == {ID_A: "x"}


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("a/b", "a\u2215b"),
        ("a\0b", "a\u2400b"),
        ("\0", "\u2400"),  # only NUL: still a real name after sanitising
        ("/", "\u2215"),
        ("\ud800", "\ufffd"),
        ("bad\udcffname", "bad\ufffdname"),
        ("...", "..."),
    ],
)
def test_sanitised_name_is_used(name: str, expected: str) -> None:
    assert assign_names([(ID_A, name)]) == {ID_A: expected}


@pytest.mark.parametrize("name", [None, "", ".", ".."])
def test_unusable_name_becomes_id(name: str | None) -> None:
    assert assign_names([(ID_A, name), (ID_B, "other")]) == {ID_A: ID_A, ID_B: "other"}


def test_several_unusable_names_become_their_ids() -> None:
    images = [(ID_A, None), (ID_B, ""), (ID_C, "."), (ID_A2, "..")]
    assert assign_names(images) == {i: i for i, _ in images}


def test_name_equal_to_own_id_is_kept() -> None:
    assert assign_names([(ID_A, ID_A)]) == {ID_A: ID_A}


def test_name_equal_to_another_images_id_is_suffixed() -> None:
    # ID_A's file must be ID_A; B's literal name ID_A counts as taken, as a reserved name would.
    result = assign_names([(ID_A, None), (ID_B, ID_A)])
    assert result == {ID_A: ID_A, ID_B: ID_A + "~0a1b2c3d"}
    # Also when the id owner has a usable name of its own.
    result = assign_names([(ID_A, "foo"), (ID_B, ID_A)])
    assert result == {ID_A: "foo", ID_B: ID_A + "~0a1b2c3d"}


# --- duplicates ------------------------------------------------------------------------------


def test_duplicate_pair_both_suffixed() -> None:
    result = assign_names([(ID_A, "cirros"), (ID_B, "cirros")])
    assert result == {ID_A: "cirros~6f0c4e0d", ID_B: "cirros~0a1b2c3d"}


def test_duplicate_triple_all_suffixed() -> None:
    result = assign_names([(ID_A, "x"), (ID_B, "x"), (ID_C, "x")])
    assert result == {ID_A: "x~6f0c4e0d", ID_B: "x~0a1b2c3d", ID_C: "x~fedcba98"}


def test_duplicates_compared_after_sanitising() -> None:
    result = assign_names([(ID_A, "a/b"), (ID_B, "a\u2215b")])
    assert result == {ID_A: "a\u2215b~6f0c4e0d", ID_B: "a\u2215b~0a1b2c3d"}


def test_different_surrogates_collide_after_sanitising() -> None:
    result = assign_names([(ID_A, "\ud800"), (ID_B, "\udfff"), (ID_C, "\ufffd")])
    assert result == {ID_A: "\ufffd~6f0c4e0d", ID_B: "\ufffd~0a1b2c3d", ID_C: "\ufffd~fedcba98"}


def test_duplicates_compared_exactly() -> None:
    # No case folding or normalisation: these are three different names.
    names = ["Ubuntu", "ubuntu", "e\u0301", "\u00e9"]
    images = [(ID_A, names[0]), (ID_B, names[1]), (ID_C, names[2]), (ID_A2, names[3])]
    assert assign_names(images) == dict(zip([i for i, _ in images], names, strict=True))


def test_duplicate_of_unusable_names_is_impossible() -> None:
    # Unusable names fall back to the (unique) ids, so they never duplicate each other.
    result = assign_names([(ID_A, ""), (ID_B, None)])
    assert result == {ID_A: ID_A, ID_B: ID_B}


def test_duplicate_plus_literal_colliding_name() -> None:
    # C's literal name is A's short-suffixed name: A falls back to the full id, B is unaffected.
    images = [(ID_A, "a"), (ID_B, "a"), (ID_C, "a~6f0c4e0d")]
    assert assign_names(images) == {
        ID_A: "a~" + ID_A,
        ID_B: "a~0a1b2c3d",
        ID_C: "a~6f0c4e0d",
    }


def test_literal_colliding_name_blocks_even_when_itself_duplicated() -> None:
    # The literal 'a~6f0c4e0d' is held by two images (so both get suffixed), yet it still is not
    # handed to A: the name must not switch images when one of the two goes away.
    images = [(ID_A, "a"), (ID_B, "a"), (ID_C, "a~6f0c4e0d"), ("77777777-aaaa", "a~6f0c4e0d")]
    assert assign_names(images) == {
        ID_A: "a~" + ID_A,
        ID_B: "a~0a1b2c3d",
        ID_C: "a~6f0c4e0d~fedcba98",
        "77777777-aaaa": "a~6f0c4e0d~77777777",
    }


def test_ids_sharing_8_hex_digits_fall_back_to_full_id() -> None:
    images = [(ID_A, "x"), (ID_A2, "x"), (ID_B, "x")]
    assert assign_names(images) == {ID_A: "x~" + ID_A, ID_A2: "x~" + ID_A2, ID_B: "x~0a1b2c3d"}


def test_upper_case_id_shares_prefix_and_full_id_keeps_its_case() -> None:
    images = [(ID_A, "x"), (ID_A3, "x")]
    assert assign_names(images) == {ID_A: "x~" + ID_A, ID_A3: "x~" + ID_A3}


def test_full_id_collision_falls_back_to_id() -> None:
    # A's short-suffixed and full-id names are both other images' literal names.
    images = [
        (ID_A, "a"),
        (ID_B, "a"),
        (ID_C, "a~6f0c4e0d"),
        (ID_A2, "a~" + ID_A),
    ]
    assert assign_names(images) == {
        ID_A: ID_A,
        ID_B: "a~0a1b2c3d",
        ID_C: "a~6f0c4e0d",
        ID_A2: "a~" + ID_A,
    }


def test_shared_prefix_and_unusable_name_mixed() -> None:
    images = [(ID_A, "x"), (ID_A2, "x"), (ID_A3, None), (ID_B, "x~6f0c4e0d")]
    assert assign_names(images) == {
        ID_A: "x~" + ID_A,
        ID_A2: "x~" + ID_A2,
        ID_A3: ID_A3,
        ID_B: "x~6f0c4e0d",
    }


def test_adding_an_image_never_moves_a_name_to_another_image() -> None:
    before = assign_names([(ID_A, "x")])
    after = assign_names([(ID_A, "x"), (ID_B, "x")])
    assert before == {ID_A: "x"}
    assert "x" not in after.values()  # 'x' went away instead of meaning B


# --- reserved names --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ROOT_RESERVED)
def test_reserved_name_gets_suffix(name: str) -> None:
    result = assign_names([(ID_A, name), (ID_B, "ok")], reserved=ROOT_RESERVED)
    assert result == {ID_A: name + "~6f0c4e0d", ID_B: "ok"}


def test_reserved_only_where_given() -> None:
    assert assign_names([(ID_A, "new")]) == {ID_A: "new"}


def test_reserved_name_duplicated() -> None:
    result = assign_names([(ID_A, "new"), (ID_B, "new")], reserved=ROOT_RESERVED)
    assert result == {ID_A: "new~6f0c4e0d", ID_B: "new~0a1b2c3d"}


def test_reserved_suffixed_form_falls_back_to_full_id() -> None:
    result = assign_names([(ID_A, "x")], reserved=["x", "x~6f0c4e0d"])
    assert result == {ID_A: "x~" + ID_A}


def test_reserved_everything_falls_back_to_id() -> None:
    result = assign_names([(ID_A, "x")], reserved={"x", "x~6f0c4e0d", "x~" + ID_A})
    assert result == {ID_A: ID_A}


def test_reserved_accepts_any_collection() -> None:
    for reserved in (["new"], ("new",), {"new"}, frozenset({"new"}), {"new": 1}.keys()):
        assert assign_names([(ID_A, "new")], reserved=reserved) == {ID_A: "new~6f0c4e0d"}


# --- bad ids ---------------------------------------------------------------------------------


@pytest.mark.parametrize("bad_id", ["", ".", "..", "a/b", "a\0b", "\ud800", "x" * 256])
def test_invalid_id_is_rejected(bad_id: str) -> None:
    with pytest.raises(ValueError, match="cannot be a file name"):
        assign_names([(bad_id, "name")])


def test_reserved_id_is_rejected() -> None:
    with pytest.raises(ValueError, match="cannot be a file name"):
        assign_names([("new", "name")], reserved=ROOT_RESERVED)


def test_repeated_id_is_rejected() -> None:
    with pytest.raises(ValueError, match="listed twice"):
        assign_names([(ID_A, "x"), (ID_A, "x")])


# --- length limits ---------------------------------------------------------------------------

SHORT_BUDGET = NAME_MAX - len("~6f0c4e0d")  # 246 bytes of name before the short suffix
FULL_BUDGET = NAME_MAX - len("~" + ID_A)  # 218 bytes of name before the full-id suffix


@pytest.mark.parametrize(
    "name",
    [
        "a" * 255,
        "é" * 127 + "a",  # 2-byte code points, 255 bytes
        "€" * 85,  # 3-byte, 255 bytes
        "a" * 251 + "😀",  # a 4-byte code point ending exactly at 255
        "😀" * 63 + "abc",
        "\u2215" * 85,  # from 85 slashes, after sanitising
    ],
)
def test_255_bytes_is_kept(name: str) -> None:
    assert nbytes(sanitize(name)) == NAME_MAX
    assert assign_names([(ID_A, name)]) == {ID_A: sanitize(name)}


@pytest.mark.parametrize(
    ("name", "head"),
    [
        ("a" * 256, "a" * SHORT_BUDGET),
        ("a" * 1000, "a" * SHORT_BUDGET),
        ("é" * 128, "é" * 123),  # 256 bytes; 246 is a boundary
        ("a" + "é" * 128, "a" + "é" * 122),  # 257 bytes; the cut at 246 splits an é
        ("€" * 86, "€" * 82),  # 258 bytes; 246 is a boundary
        ("a" * 252 + "😀", "a" * SHORT_BUDGET),  # 256 bytes, the cut falls before the emoji
        ("a" * 245 + "😀" + "b" * 10, "a" * 245),  # the cut at 246 splits the emoji's 4 bytes
        ("/" * 86, "\u2215" * 82),  # 86 bytes raw, 258 after sanitising: measured after
        ("\ud800" * 86, "\ufffd" * 82),  # surrogates too
    ],
)
def test_over_255_bytes_is_shortened_with_suffix(name: str, head: str) -> None:
    result = assign_names([(ID_A, name)])
    assert result == {ID_A: head + "~6f0c4e0d"}
    assert nbytes(result[ID_A]) <= NAME_MAX


@pytest.mark.parametrize("width_char", ["é", "€", "😀"])
@pytest.mark.parametrize("offset", range(4))
def test_cut_never_splits_a_code_point(width_char: str, offset: int) -> None:
    # Shift the run of multi-byte code points so the cut lands on every byte inside one.
    name = "a" * (SHORT_BUDGET - 2 - offset) + width_char * 40
    result = assign_names([(ID_A, name)])[ID_A]
    head = longest_prefix(name, SHORT_BUDGET)
    assert result == head + "~6f0c4e0d"
    assert SHORT_BUDGET - nbytes(width_char) < nbytes(head) <= SHORT_BUDGET
    assert nbytes(result) <= NAME_MAX


def test_long_name_that_is_not_a_duplicate_shortens_to_shared_head() -> None:
    # Two long names differing only past the cut share a head, but their suffixes differ.
    images = [(ID_A, "a" * 300 + "1"), (ID_B, "a" * 300 + "2")]
    assert assign_names(images) == {
        ID_A: "a" * SHORT_BUDGET + "~6f0c4e0d",
        ID_B: "a" * SHORT_BUDGET + "~0a1b2c3d",
    }


def test_long_names_sharing_head_and_8_hex_use_full_id() -> None:
    images = [(ID_A, "b" * 300 + "1"), (ID_A2, "b" * 300 + "2")]
    assert assign_names(images) == {
        ID_A: "b" * FULL_BUDGET + "~" + ID_A,
        ID_A2: "b" * FULL_BUDGET + "~" + ID_A2,
    }


@pytest.mark.parametrize("width_char", ["é", "€", "😀"])
def test_full_id_fallback_cut_at_code_point(width_char: str) -> None:
    name = "a" + width_char * 100
    images = [(ID_A, name), (ID_A2, name)]
    result = assign_names(images)
    head = longest_prefix(name, FULL_BUDGET)
    assert result == {ID_A: head + "~" + ID_A, ID_A2: head + "~" + ID_A2}
    assert all(nbytes(n) <= NAME_MAX for n in result.values())


@pytest.mark.parametrize("length", [250, 254, 255])
def test_duplicates_near_the_limit_are_shortened_for_the_suffix(length: int) -> None:
    images = [(ID_A, "z" * length), (ID_B, "z" * length)]
    assert assign_names(images) == {
        ID_A: "z" * min(length, SHORT_BUDGET) + "~6f0c4e0d",
        ID_B: "z" * min(length, SHORT_BUDGET) + "~0a1b2c3d",
    }


def test_long_id_without_room_for_full_id_falls_back_to_id() -> None:
    # Not a Glance id, but allowed: '~' + a 255-byte id cannot fit, so round 2 is skipped.
    long_a = "a" * 8 + "1" * 247
    long_b = "a" * 8 + "2" * 247
    assert assign_names([(long_a, "x"), (long_b, "x")]) == {long_a: long_a, long_b: long_b}


# --- order independence ----------------------------------------------------------------------


TRICKY = [
    (ID_A, "a"),
    (ID_B, "a"),
    (ID_C, "a~6f0c4e0d"),
    (ID_A2, "a"),
    (ID_A3, "a~" + ID_A),
    ("11111111-2222-4333-8444-555555555555", None),
    ("22222222-2222-4333-8444-555555555555", "11111111-2222-4333-8444-555555555555"),
    ("33333333-2222-4333-8444-555555555555", "new"),
    ("44444444-2222-4333-8444-555555555555", "/" * 90),
    ("55555555-2222-4333-8444-555555555555", "\u2215" * 90),
    ("66666666-2222-4333-8444-555555555555", "."),
    ("77777777-2222-4333-8444-555555555555", "unique"),
]


@pytest.mark.parametrize("seed", range(20))
def test_order_independent(seed: int) -> None:
    expected = assign_names(TRICKY, reserved=ROOT_RESERVED)
    shuffled = TRICKY[:]
    random.Random(seed).shuffle(shuffled)
    result = assign_names(shuffled, reserved=ROOT_RESERVED)
    assert result == expected
    assert list(result) == [i for i, _ in shuffled]  # the caller's order is kept
    assert len(set(result.values())) == len(TRICKY)
    assert expected["77777777-2222-4333-8444-555555555555"] == "unique"


# --- scale -----------------------------------------------------------------------------------


def test_100k_images_is_fast() -> None:
    # All duplicates of a handful of names: the worst case for anything quadratic.
    rng = random.Random(0)
    images = [(str(uuid.UUID(int=rng.getrandbits(128))), f"img{n % 7}") for n in range(100_000)]
    images += [(str(uuid.UUID(int=rng.getrandbits(128))), f"u{n}") for n in range(100_000)]
    start = time.perf_counter()
    result = assign_names(images, reserved=ROOT_RESERVED)
    elapsed = time.perf_counter() - start
    assert len(set(result.values())) == len(images)
    assert elapsed < 10, f"took {elapsed:.1f}s"


# --- properties ------------------------------------------------------------------------------

# A few 8-hex prefixes so that ids often share theirs.
_ids = st.one_of(
    st.uuids().map(str),
    st.tuples(st.sampled_from(["00000000", "deadbeef"]), st.uuids()).map(
        lambda t: t[0] + str(t[1])[8:]
    ),
)
# Names that collide often, plus anything at all (st.characters() includes lone surrogates).
_small_names = st.text(alphabet="ab/.~\0\ud800\ufffd\u2215é😀", max_size=4)
_tiny_names = st.sampled_from(["a", "b"])  # duplicates in most directories
_long_names = st.builds(
    lambda ch, n, tail: ch * n + tail,
    st.sampled_from(["a", "é", "€", "😀", "/", "\ud800"]),
    st.integers(60, 260),
    st.text(alphabet="xy", max_size=2),
)
_any_names = st.text(alphabet=st.characters(), max_size=300)
_reserved = st.sets(st.sampled_from(["by-id", "by-tag", "new", "a", "a~00000000", "\u2215"]))


@st.composite
def directories(draw: st.DrawFn) -> tuple[list[tuple[str, str | None]], frozenset[str]]:
    ids = draw(st.lists(_ids, min_size=0, max_size=12, unique=True))
    reserved = draw(_reserved)
    if not ids:
        return [], frozenset(reserved)
    # Names may reuse other images' ids and suffixed forms, to hit the fallback rounds.
    names = st.one_of(
        st.none(),
        _tiny_names,
        _small_names,
        _long_names,
        _any_names,
        st.sampled_from(ids),
        st.builds(lambda n, i: n + id_suffix(i), _tiny_names | _small_names, st.sampled_from(ids)),
        st.builds(lambda n, i: n + "~" + i, _tiny_names | _small_names, st.sampled_from(ids)),
    )
    images = [(image_id, draw(names)) for image_id in ids]
    # Shadows: more images whose literal names are the suffixed forms of earlier ones, so that
    # those fall back to the full id or the id itself.
    for image_id, name in draw(st.lists(st.sampled_from(images), max_size=6)):
        shadow_id = draw(_ids.filter(lambda i: i not in ids))
        suffix = draw(st.sampled_from([id_suffix(image_id), "~" + image_id]))
        ids.append(shadow_id)
        images.append((shadow_id, (sanitize(name) or image_id) + suffix))
    return images, frozenset(reserved)


def _is_expected_form(got: str, base: str, image_id: str) -> bool:
    """Tell whether ``got`` is the base, a cut base with either suffix, or the id."""
    if got in (base, image_id):
        return True
    for suffix in (id_suffix(image_id), "~" + image_id):
        if got.endswith(suffix) and base.startswith(got[: -len(suffix)]):
            return True
    return False


def _check(images: list[tuple[str, str | None]], reserved: frozenset[str]) -> dict[str, str]:
    result = assign_names(images, reserved=reserved)
    ids = [image_id for image_id, _ in images]
    assert list(result) == ids
    values = list(result.values())
    assert len(set(values)) == len(values), "names are unique"
    for image_id, name in images:
        got = result[image_id]
        assert is_valid(got), f"{got!r} is valid"
        assert got not in reserved
        base = sanitize(name) or image_id
        assert _is_expected_form(got, base, image_id), (got, base)
    return result


@settings(max_examples=500, deadline=None)
@given(directories(), st.randoms(use_true_random=False))
def test_property_invariants(
    directory: tuple[list[tuple[str, str | None]], frozenset[str]], rnd: random.Random
) -> None:
    images, reserved = directory
    result = _check(images, reserved)

    # Deterministic and independent of order.
    assert assign_names(images, reserved=reserved) == result
    shuffled = images[:]
    rnd.shuffle(shuffled)
    assert assign_names(shuffled, reserved=reserved) == result

    # A name that is valid as given, unique among the images' names after sanitising, not
    # reserved and not another image's id, is kept verbatim.
    ids = {image_id for image_id, _ in images}
    bases = [sanitize(name) or image_id for image_id, name in images]
    for image_id, name in images:
        if (
            name is not None
            and is_valid(name)
            and sanitize(name) == name
            and bases.count(name) == 1
            and name not in reserved
            and (name == image_id or name not in ids)
        ):
            assert result[image_id] == name


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(_ids, _any_names | st.none()), unique_by=lambda t: t[0], max_size=8))
def test_property_arbitrary_unicode(images: list[tuple[str, str | None]]) -> None:
    _check(images, frozenset())


@given(_any_names | st.none())
def test_property_sanitize(name: str | None) -> None:
    clean = sanitize(name)
    if clean:
        assert "/" not in clean
        assert "\0" not in clean
        assert clean not in (".", "..")
        clean.encode()  # no lone surrogates left
        assert name is not None
        assert len(clean) == len(name)
    assert sanitize(clean) == clean  # idempotent


# -- names settled while a listing arrives ---------------------------------------------------------


def streamed(images: list[tuple[str, str | None]], reserved: Collection[str] = ()) -> list[str]:
    stream = NameStream(reserved)
    return [name for image_id, name in images for name in stream.add(image_id, name)]


def test_stream_settles_each_name_once_a_different_one_follows() -> None:
    images = [(ID_B, None), (ID_A, "alpha"), (ID_C, "beta")]
    assert streamed(images) == [ID_B, "alpha"]  # "beta" waits: a second "beta" may follow


def test_stream_waits_for_the_whole_listing_from_the_first_doubtful_name() -> None:
    # A duplicate, a reserved name, a sanitised name, an id-shaped name: each stops the stream.
    assert streamed([(ID_A, "a"), (ID_B, "dup"), (ID_C, "dup"), (ID_A2, "z")]) == ["a"]
    assert streamed([(ID_A, "new"), (ID_B, "z")], reserved=ROOT_RESERVED) == []
    assert streamed([(ID_A, "a/b"), (ID_B, "z")]) == []
    assert streamed([(ID_A, ID_C), (ID_B, "z")]) == []


def test_stream_keeps_names_a_collation_may_tie_together() -> None:
    # Case-insensitive order may put "a", "A", "a" together: "A" settles with the run, and the
    # run holds a duplicate, so the stream stops before it.
    assert streamed([(ID_A, "a"), (ID_B, "A"), (ID_C, "a"), (ID_A2, "b")]) == []
    assert streamed([(ID_A, "Café"), (ID_B, "cafe "), (ID_C, "d"), (ID_A2, "e")]) == [
        "Café",
        "cafe ",
        "d",
    ]


@settings(max_examples=500, deadline=None)
@given(
    directories(),
    st.sampled_from([str, str.casefold]),
    st.booleans(),
    st.randoms(use_true_random=False),
)
def test_property_streamed_names_are_the_final_names(
    directory: tuple[list[tuple[str, str | None]], frozenset[str]],
    collate: Callable[[str], str],
    descending: bool,
    rnd: random.Random,
) -> None:
    """Whatever the names, a listing sorted by name (exact or case-insensitive collation, ties
    in any order, either direction) settles only names that the whole listing confirms."""
    images, reserved = directory
    rnd.shuffle(images)
    ordered = sorted(images, key=lambda image: collate(image[1] or ""), reverse=descending)
    final = assign_names(ordered, reserved=reserved)
    settled = streamed(ordered, reserved)
    assert settled == [final[image_id] for image_id, _ in ordered][: len(settled)]
