"""How Glance images get their file names: the reference for the mapping rules.

Glance image names are free text: they need not be unique, may be empty or missing, may hold ``/``
or NUL, may be too long for a file name, and JSON can deliver lone surrogates such as ``"\\ud800"``
that no file name can hold. :func:`assign_names` maps the images of ONE directory to file names
that are unique, valid, and the same whatever order the images are listed in.

Sanitising (:func:`sanitize`), applied to each name on its own:

1. ``/`` becomes U+2215 DIVISION SLASH, NUL becomes U+2400 SYMBOL FOR NULL, and every code point
   that UTF-8 cannot encode (the surrogates U+D800..U+DFFF) becomes U+FFFD REPLACEMENT CHARACTER.
2. A missing (``None``) or empty name, or one that is ``.`` or ``..`` after step 1, is unusable:
   the image's *base name* is then its id; otherwise the base name is the sanitised name.

Choosing the file name of each image, in rounds; an image keeps the first candidate that passes:

0. **Verbatim**: the base name, if it is at most 255 bytes in UTF-8, is not reserved, is not
   another image's id, and no other image has the same base name (compared exactly, and counting
   only images whose base name passes the first three tests). So when two or more images share a
   name EVERY one of them is suffixed: a name never silently moves to another image when a
   duplicate appears, it just goes away.
1. **Short suffix**: ``<base>~<8 hex>``, where the 8 hex digits are the id without dashes, lower
   case, first 8 (:func:`id_suffix`); the base is cut at a code point boundary so the whole is at
   most 255 bytes. This is also where names too long for round 0 end up.
2. **Full id**: ``<base>~<id>``, cut the same way; for ids that share their first 8 hex digits,
   or a round-1 name that another image holds literally.
3. **The id** itself.

A candidate of round 1 or 2 passes only if no other image of the same round has the same one, and
it is none of: a reserved name, an image id, any image's base name (even one that was not used:
a literal ``a~12345678`` thus keeps its meaning), or a name taken in an earlier round.

Why this always works: ids must be unique, valid and not reserved (else :class:`ValueError`), rounds
1 and 2 never hand out an id, and round 0 hands out an id only to its own image; so round 3
cannot collide. Every rule looks only at the whole set of images, never at their order, so the
result is deterministic. Each round is a constant number of set and dict operations per image: the
whole is O(total length of the names).

*Reserved* names are those the directory holds besides images (e.g. ``by-id``, ``by-tag`` and
``new`` in the root): they count as taken.
"""

import unicodedata
import uuid
from collections import Counter
from collections.abc import Callable, Collection, Iterable

__all__ = ["NAME_MAX", "NameStream", "assign_names", "id_suffix", "is_id_shaped", "sanitize"]

#: The longest file name, in UTF-8 bytes, that Linux file systems accept.
NAME_MAX = 255

# One table for all replacements, so sanitising is a single pass over the name.
_REPLACEMENTS: dict[int, str] = {cp: "\ufffd" for cp in range(0xD800, 0xE000)}
_REPLACEMENTS[ord("/")] = "\u2215"
_REPLACEMENTS[0] = "\u2400"


def sanitize(name: str | None) -> str:
    """Return ``name`` cleaned for use as a file name, or ``''`` when it is unusable.

    Unusable means ``None``, empty, ``.`` or ``..``: the caller then names the image by its id.
    The result is not shortened: that needs the id for the suffix (see :func:`assign_names`).
    """
    if not name:
        return ""
    cleaned = name.translate(_REPLACEMENTS)
    return "" if cleaned in (".", "..") else cleaned


def id_suffix(image_id: str) -> str:
    """Return ``'~'`` and the first 8 hex digits of ``image_id`` (dashes dropped, lower case)."""
    return "~" + image_id.replace("-", "").lower()[:8]


def _is_valid(name: str) -> bool:
    """Tell whether ``name`` can be a file name in a directory."""
    if name in ("", ".", "..") or "/" in name or "\0" in name:
        return False
    try:
        return len(name.encode()) <= NAME_MAX
    except UnicodeEncodeError:  # a surrogate
        return False


def _with_suffix(base: str, suffix: str) -> str | None:
    """Return ``base`` cut to fit with ``suffix`` in NAME_MAX bytes, plus ``suffix``; or None."""
    budget = NAME_MAX - len(suffix.encode())
    if budget < 0:
        return None
    # Only the trailing code point can be cut short, and 'ignore' drops exactly its bytes.
    head = base.encode()[:budget].decode("utf-8", "ignore")
    candidate = head + suffix
    return candidate if _is_valid(candidate) else None


def assign_names(
    images: Iterable[tuple[str, str | None]], reserved: Collection[str] = ()
) -> dict[str, str]:
    """Map the ``(image_id, glance_name)`` pairs of one directory to ``{image_id: file_name}``.

    The rules are in this module's docstring. Raises :class:`ValueError` if an id is repeated,
    is not a valid file name, or is reserved, since then no set of unique names is guaranteed.
    """
    taken_by_dir = frozenset(reserved)
    bases = _base_names(images, taken_by_dir)
    ids = bases.keys()

    def verbatim(image_id: str) -> str | None:
        base = bases[image_id]
        if base in taken_by_dir or (base in ids and base != image_id):
            return None
        return base if len(base.encode()) <= NAME_MAX else None

    def short_suffix(image_id: str) -> str | None:
        return _with_suffix(bases[image_id], id_suffix(image_id))

    def full_id(image_id: str) -> str | None:
        return _with_suffix(bases[image_id], "~" + image_id)

    # Suffixed names avoid every base name, used or not, so that a literal name such as
    # 'a~12345678' is never given to a different image (see round 1 in the module docstring).
    taken: set[str] = set(taken_by_dir)
    taken.update(ids)
    taken.update(bases.values())
    names = _in_rounds(list(bases), [verbatim, short_suffix, full_id], taken)
    # Round 3 names an image by its id. Keep the caller's order, which is handy for listings and
    # costs nothing.
    return {image_id: names.get(image_id, image_id) for image_id in bases}


def _base_names(
    images: Iterable[tuple[str, str | None]], taken_by_dir: frozenset[str]
) -> dict[str, str]:
    """``{image_id: base name}`` in the images' order; ValueError for an id that cannot be a
    file name (see :func:`assign_names`)."""
    bases: dict[str, str] = {}
    for image_id, name in images:
        if image_id in bases:
            raise ValueError(f"image id {image_id!r} is listed twice")
        if not _is_valid(image_id) or image_id in taken_by_dir:
            raise ValueError(f"image id {image_id!r} cannot be a file name here")
        bases[image_id] = sanitize(name) or image_id
    return bases


def _in_rounds(
    pending: list[str], rounds: list[Callable[[str], str | None]], taken: set[str]
) -> dict[str, str]:
    """The names that ``rounds`` (0, 1, 2) give the ``pending`` images, adding them to
    ``taken``: in each round, an image still unnamed gets its candidate when no other image of
    the round has the same one and, after round 0, nobody took it. Images no round names are
    left out."""
    names: dict[str, str] = {}
    for round_no, candidate_of in enumerate(rounds):
        candidates = {image_id: candidate_of(image_id) for image_id in pending}
        counts = Counter(c for c in candidates.values() if c is not None)
        still_pending = []
        for image_id, candidate in candidates.items():
            # verbatim() checked reserved names and ids itself; base names are in 'taken'.
            if (
                candidate is not None
                and counts[candidate] == 1
                and (round_no == 0 or candidate not in taken)
            ):
                names[image_id] = candidate
            else:
                still_pending.append(image_id)
        # Names of one round are unique among themselves, so adding them only after it is safe.
        taken.update(names[image_id] for image_id in candidates if image_id in names)
        pending = still_pending
    return names


# -- names ahead of the whole listing -------------------------------------------------------------

#: Characters :func:`sanitize` puts in; a base name holding one may share it with another raw name.
_REPLACEMENT_MARKS = frozenset("\u2215\u2400\ufffd")


def _could_tie(base: str) -> str:
    """The key under which a database collation may sort ``base`` next to other names.

    Case, accents and trailing spaces are ignored by the usual collations (MySQL's ``_ci``
    ones, PostgreSQL's ICU ones); names equal under this key form one *run*.
    """
    folded = unicodedata.normalize("NFKD", base).casefold()
    return "".join(c for c in folded if not unicodedata.combining(c)).rstrip(" ")


def _is_plain(base: str, reserved: Collection[str]) -> bool:
    """Whether only an image of the same exact name can take ``base`` away from its image.

    Not plain: names changed or produced by sanitising (another raw name may give the same
    base), names too long (they get a suffix), reserved names, and names shaped like an image
    id (another image's id takes precedence, rule 0).
    """
    if base in reserved or len(base.encode()) > NAME_MAX or not _REPLACEMENT_MARKS.isdisjoint(base):
        return False
    return not is_id_shaped(base)


def is_id_shaped(text: str) -> bool:
    """Whether ``text`` could be an image id (a UUID in any of the spellings Python parses).

    Deliberately loose: a name it accepts may still be no image's id, but one it rejects is
    certainly none, so ``by-id/`` answers ENOENT for it without asking Glance.
    """
    try:
        uuid.UUID(text)
    except ValueError:
        return False
    return True


class NameStream:
    """File names for a listing sorted by name, settled while it is still arriving.

    :func:`assign_names` needs the whole listing, because an image may share its name with one
    listed much later. In a listing sorted by name (either direction) the server puts names that
    its collation considers equal next to each other, so once a different name arrives, the
    images before it can no longer gain a duplicate. Feed the images in the server's order with
    :meth:`add`; it returns the names that became final, in order. An image of the run settles
    then if it has no name (it is named by its id, whatever comes later) or its name is plain
    (see :func:`_is_plain`) and unique within the run; any other image (a duplicate, a name
    sanitising changed) stops the stream: from there on, names wait for :func:`assign_names` on
    the whole listing, which remains the reference. Settled names always equal its result, as
    long as the server's collation ties no names that :func:`_could_tie` keeps apart.
    """

    def __init__(self, reserved: Collection[str] = ()) -> None:
        self._reserved = frozenset(reserved)
        self._run: list[tuple[str, str]] = []  # (image id, base name) of the current run
        self._run_key = ""
        self.stopped = False

    def add(self, image_id: str, name: str | None) -> list[str]:
        """Take the next image of the listing; return the names this settles, in order."""
        if self.stopped:
            return []
        base = sanitize(name)
        key = _could_tie(base)
        settled: list[str] = []
        if self._run and key != self._run_key:
            settled = self._settle_run()
        self._run.append((image_id, base))
        self._run_key = key
        return settled

    def _settle_run(self) -> list[str]:
        counts = Counter(base for _, base in self._run)
        names = []
        for image_id, base in self._run:
            if not base:
                names.append(image_id)
            elif counts[base] == 1 and _is_plain(base, self._reserved):
                names.append(base)
            else:
                self.stopped = True
                return []
        self._run.clear()
        return names
