"""Image records as extended attributes in the ``user.`` namespace.

Every field of the record that has a value becomes ``user.<field>``: core fields (``user.id``,
``user.status``, ``user.checksum``, ``user.os_hash_value``, ``user.disk_format``, ...) and custom
properties (``user.os_distro``, ...). Values are text: booleans ``true``/``false``, numbers in
decimal, lists comma-separated (``user.tags``, sorted: Glance keeps tags as a set). Fields that
are null (the checksum of a queued image) have no attribute, so reading them gives ENODATA.

``user.stores`` lists the stores holding the image's data (Glance's ``stores``); setting it to
another list copies the image to the stores added and deletes it from those removed
(:func:`store_changes` decides, the filesystem sends them).

Changing them (``setfattr``) goes the other way: :func:`set_patch` and :func:`remove_patch` turn
one attribute change into one JSON-patch, refusing read-only fields (EPERM), bad values (EINVAL)
and other namespaces (ENOTSUP) before anything is sent.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from glancefs import Image

from .refusals import InvalidArgument, NoAttribute, NotPermitted, Unsupported

__all__ = [
    "FORMAT_FIELDS",
    "PREFIX",
    "STORES_FIELD",
    "field_of",
    "image_xattrs",
    "remove_patch",
    "set_patch",
    "store_changes",
    "tag_operation",
]

PREFIX = "user."


def _text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        items = [_text(v) for v in value]
        return ",".join(i for i in items if i is not None)
    if isinstance(value, dict):
        return None  # nested records (locations) have no flat text form
    return str(value)


def image_xattrs(record: Mapping[str, Any]) -> dict[str, bytes]:
    """``{"user.<field>": value}`` for every field of ``record`` that has a value."""
    attrs: dict[str, bytes] = {}
    for key, value in record.items():
        text = _text(sorted(value) if key == "tags" else value)
        if text is not None:
            attrs[PREFIX + key] = text.encode("utf-8", "surrogateescape")
    return attrs


#: Fields Glance computes or owns: setting or removing them is refused (EPERM).
READ_ONLY_FIELDS = Image.READ_ONLY_FIELDS
#: Formats Glance accepts (its defaults); they may change only while the image is queued.
DISK_FORMATS = frozenset(
    {"ami", "ari", "aki", "vhd", "vhdx", "vmdk", "raw", "qcow2", "vdi", "iso", "ploop"}
)
#: The fields that declare how the data is to be read: fixed once data is sent.
FORMAT_FIELDS = frozenset({"disk_format", "container_format"})
CONTAINER_FORMATS = frozenset({"ami", "ari", "aki", "bare", "ovf", "ova", "docker", "compressed"})
VISIBILITIES = frozenset({"public", "private", "shared", "community"})
#: Write-only names that add or remove a single tag: ``setfattr -n user.tags.add -v TAG``.
TAG_ADD = "tags.add"
TAG_REMOVE = "tags.remove"

Patch = list[dict[str, Any]]


def field_of(name: str) -> str:
    """The image field an xattr name stands for (``user.os_distro``: ``os_distro``).

    Refused (EINVAL) when Glance would store the field under another key than the one given
    (it strips surrounding whitespace) or could not show it back: empty, surrounding whitespace,
    control characters. ENOTSUP outside ``user.``.
    """
    if not name.startswith(PREFIX):
        raise Unsupported(f"{name}: only the user. namespace holds image fields")
    key = name[len(PREFIX) :]
    if not key:
        raise InvalidArgument(f"{name}: empty field name")
    if key != key.strip() or any(ord(c) < 0x20 or ord(c) == 0x7F for c in key):
        raise InvalidArgument(
            f"{name!r}: field names may not have surrounding spaces or control characters"
        )
    try:
        key.encode("utf-8")
    except UnicodeEncodeError:  # bytes that are not UTF-8, kept as surrogates by fsdecode
        raise InvalidArgument(f"{name!r}: field names must be UTF-8 text") from None
    return key


def _pointer(key: str) -> str:
    """The JSON-pointer path of field ``key`` (RFC 6901: ``~`` is ``~0``, ``/`` is ``~1``)."""
    return "/" + key.replace("~", "~0").replace("/", "~1")


def _text_value(name: str, value: bytes) -> str:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidArgument(f"{name}: the value is not UTF-8 text") from None


def _boolean(name: str, text: str) -> bool:
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise InvalidArgument(f"{name}: expected true or false, got {text!r}")


def _non_negative(name: str, text: str) -> int:
    if not text.isdigit():
        raise InvalidArgument(f"{name}: expected a whole number >= 0, got {text!r}")
    return int(text)


def _one_of(name: str, text: str, allowed: frozenset[str]) -> str:
    if text not in allowed:
        raise InvalidArgument(f"{name}: {text!r} is not one of {', '.join(sorted(allowed))}")
    return text


def set_patch(record: Mapping[str, Any], name: str, value: bytes) -> Patch:
    """The JSON-patch that makes xattr ``name`` read ``value``; refusals raise.

    Writable core fields are converted and checked strictly, so a bad value changes nothing.
    ``user.tags`` replaces the whole tag list; ``user.tags.add``/``user.tags.remove`` are handled
    by the caller (single-tag calls of their own).
    """
    key = field_of(name)
    text = _text_value(name, value)
    if key in READ_ONLY_FIELDS:
        raise NotPermitted(f"{name}: {key} is read-only")
    converted: Any = text
    if key == "tags":
        converted = sorted({t.strip() for t in text.split(",") if t.strip()})
    elif key in ("protected", "os_hidden"):
        converted = _boolean(name, text)
    elif key in ("min_ram", "min_disk"):
        converted = _non_negative(name, text)
    elif key == "visibility":
        converted = _one_of(name, text, VISIBILITIES)
    elif key in ("disk_format", "container_format"):
        if record.get("status") != "queued":
            raise NotPermitted(f"{name}: formats can change only while the image is queued")
        allowed = DISK_FORMATS if key == "disk_format" else CONTAINER_FORMATS
        converted = _one_of(name, text, allowed)
    elif key == "name" and not text:
        raise InvalidArgument(f"{name}: an image name cannot be empty here")
    op = "replace" if record.get(key) is not None or key in CORE_WRITABLE else "add"
    return [{"op": op, "path": _pointer(key), "value": converted}]


#: Core fields that always exist in a record, so they are replaced rather than added.
CORE_WRITABLE = Image.WRITABLE_FIELDS


def remove_patch(record: Mapping[str, Any], name: str) -> Patch:
    """The JSON-patch that removes xattr ``name`` (a custom property, or every tag)."""
    key = field_of(name)
    if key == "tags":
        return [{"op": "replace", "path": "/tags", "value": []}]
    if key == STORES_FIELD:
        raise InvalidArgument(f"{name}: an image keeps its data in at least one store")
    if key in READ_ONLY_FIELDS or key in CORE_WRITABLE:
        raise NotPermitted(f"{name}: {key} is a core field and cannot be removed")
    if key not in record:
        raise NoAttribute(name)
    return [{"op": "remove", "path": _pointer(key)}]


def tag_operation(name: str, value: bytes) -> tuple[str, str] | None:
    """``("add"|"remove", tag)`` for the single-tag names, None for any other name."""
    key = field_of(name)
    if key not in (TAG_ADD, TAG_REMOVE):
        return None
    tag = _text_value(name, value).strip()
    if not tag or "," in tag:
        raise InvalidArgument(f"{name}: expected one tag, got {tag!r}")
    return ("add" if key == TAG_ADD else "remove"), tag


#: The field listing the stores that hold the image's data: ``setfattr`` copies and deletes.
STORES_FIELD = "stores"


def store_changes(
    current: list[str], name: str, value: bytes, offered: list[str]
) -> tuple[list[str], list[str]]:
    """``(added, removed)``: the stores to copy the image to and to delete it from so that
    ``user.stores`` reads ``value`` (comma-separated ids, in any order).

    EINVAL for an empty list, an id Glance does not offer (``offered``; none without
    multi-store), and a list sharing no
    store with ``current``: the data leaves a store only while it stays in another that holds it
    already (a move is a copy, then, once the copy is done, a removal).
    """
    wanted = [s.strip() for s in _text_value(name, value).split(",") if s.strip()]
    if not wanted:
        raise InvalidArgument(f"{name}: an image keeps its data in at least one store")
    if not offered:
        raise InvalidArgument(f"{name}: this Glance offers no choice of stores")
    unknown = [s for s in wanted if s not in offered]
    if unknown:
        raise InvalidArgument(
            f"{name}: no store {', '.join(unknown)} here; the stores: {', '.join(offered)}"
        )
    if not set(wanted) & set(current):
        raise InvalidArgument(
            f"{name}: keep one of {','.join(current)} until the copy is done (add, then remove)"
        )
    added = [s for s in dict.fromkeys(wanted) if s not in current]
    removed = [s for s in current if s not in wanted]
    return added, removed
