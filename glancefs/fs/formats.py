"""Choosing an upload's ``disk_format`` and ``container_format``.

Glance inspects uploaded data and refuses (415) content that does not match the declared
``disk_format``, so the format must be right before the first byte is sent. The choice, first
match wins:

1. the content of the first bytes, when recognisable, by the inspector Glance itself runs
   (oslo.utils ``format_inspector``): a real qcow2 named ``disk.img`` is stored as qcow2;
2. the file name's extension (:data:`EXTENSIONS`); rsync's temporary names ``.NAME.XXXXXX``
   count as NAME. An extension of a format Glance inspects (``.qcow2``, ``.iso``, ...) on data
   that is plainly not that format gives ``raw``: Glance would refuse the upload otherwise;
3. the mount's ``--disk-format``/``--container-format``;
4. ``raw``/``bare``.

"""

from __future__ import annotations

import io
import re

from oslo_utils.imageutils import format_inspector

__all__ = [
    "EXTENSIONS",
    "Formats",
    "choose_formats",
    "detect_disk_format",
    "formats_of_name",
    "upload_name",
]

#: ``(disk_format, container_format)``
Formats = tuple[str, str]

#: File name extensions and the formats they imply.
EXTENSIONS: dict[str, Formats] = {
    ".qcow2": ("qcow2", "bare"),
    ".raw": ("raw", "bare"),
    ".img": ("raw", "bare"),
    ".iso": ("iso", "bare"),
    ".vmdk": ("vmdk", "bare"),
    ".vhd": ("vhd", "bare"),
    ".vhdx": ("vhdx", "bare"),
    ".vdi": ("vdi", "bare"),
    ".ami": ("ami", "ami"),
    ".aki": ("aki", "aki"),
    ".ari": ("ari", "ari"),
    ".ova": ("vmdk", "ova"),
}

#: Formats Glance's inspector recognises and enforces: data declared as one of these must be it.
#: Other inspector results (gpt, luks, qed) are no Glance formats; the name or default decides.
INSPECTED_FORMATS = frozenset({"qcow2", "iso", "vmdk", "vhd", "vhdx", "vdi"})

#: How many leading bytes detection looks at: enough for every header the inspector knows (an
#: ISO's volume descriptor sits at 32 KiB, a VHDX's region table at 192 KiB).
DETECTION_BYTES = 1024 * 1024

_RSYNC_TEMP = re.compile(r"^\.(?P<name>.+)\.[A-Za-z0-9]{6}$")


def upload_name(name: str) -> str:
    """The name whose extension counts: rsync's temporary ``.NAME.XXXXXX`` is NAME."""
    match = _RSYNC_TEMP.match(name)
    return match.group("name") if match else name


def detect_disk_format(head: bytes) -> str | None:
    """The inspector's name for the format of the leading bytes (``raw`` when none matches)."""
    wrapper = format_inspector.InspectWrapper(io.BytesIO(head))
    try:
        while wrapper.read(64 * 1024):
            pass
    finally:
        wrapper.close()
    try:
        inspector = wrapper.format
    except format_inspector.ImageFormatError:
        return None  # several inspectors matched: ambiguous, let the name decide
    return inspector.NAME if inspector is not None else None


def formats_of_name(name: str) -> Formats | None:
    """The formats ``name``'s extension implies (rsync's temporary names count as the final
    one), None when it implies none."""
    return EXTENSIONS.get(_extension(upload_name(name)))


def choose_formats(name: str, head: bytes, default: Formats = ("raw", "bare")) -> Formats:
    """The formats for an upload named ``name`` whose data starts with ``head``."""
    by_name = formats_of_name(name)
    detected = detect_disk_format(head)
    if detected in INSPECTED_FORMATS:
        container = by_name[1] if by_name and by_name[0] == detected else "bare"
        return detected, container
    contradicted = by_name is not None and by_name[1] == "bare" and by_name[0] in INSPECTED_FORMATS
    if contradicted and detected == "raw":
        # The name promises a format the data is not: Glance would refuse the upload (415)
        # after receiving all of it. Store what the data is.
        return "raw", "bare"
    return by_name or default


def _extension(name: str) -> str:
    dot = name.rfind(".")
    return name[dot:].lower() if dot > 0 else ""
