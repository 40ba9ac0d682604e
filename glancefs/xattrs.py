"""Image records as extended attributes in the ``user.`` namespace.

Every field of the record that has a value becomes ``user.<field>``: core fields (``user.id``,
``user.status``, ``user.checksum``, ``user.os_hash_value``, ``user.disk_format``, ...) and custom
properties (``user.os_distro``, ...). Values are text: booleans ``true``/``false``, numbers in
decimal, lists comma-separated (``user.tags``, sorted: Glance keeps tags as a set). Fields that
are null (the checksum of a queued image) have no attribute, so reading them gives ENODATA.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["PREFIX", "image_xattrs"]

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
