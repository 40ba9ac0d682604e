"""Whether a disk image file holds any data yet, or only its format's metadata; and the virtual
size its header declares.

``qemu-img create`` (and the create step of ``qemu-img convert``) writes a format's header and
empty tables, closes the file, and opens it again to write the data. Such a file is complete as it
is (an empty disk) and also the first half of a conversion: an upload must not end at the close
that leaves it so while its writer still runs (:mod:`glancefs.fs.uploader`). This module tells
the two apart from the bytes: a table that maps no data block means no data.

Formats: qcow2 (the L1 table), vmdk sparse extents (the grain tables), vhdx (the BAT), vpc/VHD
dynamic disks (the BAT) and vdi (the block map); anything else (raw, iso, a vmdk descriptor, a
stream-optimized vmdk whose tables come at its end) is unknown. Pure: the caller passes a
``read(offset, size)`` that returns fewer bytes at the end of the file.

:func:`virtual_size` reads the disk size a qcow2, vmdk sparse extent, vhdx or vdi header
declares: what an import that converts the image must keep (:mod:`glancefs.fs.payload`). A vpc
is left out: qemu sizes some of them from their CHS geometry rather than the footer's size.
"""

from __future__ import annotations

import struct
import uuid
from collections.abc import Callable, Iterator

__all__ = ["Read", "holds_data", "virtual_size"]

#: ``read(offset, size)``: the file's bytes there (fewer at its end, zeros in its holes).
Read = Callable[[int, int], bytes]

#: Tables are scanned in pieces of this size, so a large one costs no more memory.
_PIECE = 1024 * 1024
_SECTOR = 512
#: A vmdk grain directory at the end of the file (stream-optimized): tables come last.
_VMDK_GD_AT_END = 0xFFFF_FFFF_FFFF_FFFF
#: vhdx: the region table's entry for the block allocation table, and the states of a payload
#: block that hold data.
_VHDX_BAT = uuid.UUID("2DC27766-F623-4200-9D64-115E9BFD4A08").bytes_le
_VHDX_PRESENT = (6, 7)
#: vhdx: the region table's entry for the metadata region, and its item of the disk's size.
_VHDX_METADATA = uuid.UUID("8B7CA206-4790-4B9A-B8FE-575F050F886E").bytes_le
_VHDX_DISK_SIZE = uuid.UUID("2FA54224-CD1B-4876-B211-5DBED83BF4B8").bytes_le
#: vpc BAT and vdi block map entries of blocks without data (vdi: unallocated, discarded).
_NO_BLOCK_32 = 0xFFFF_FFFF
_VDI_FIRST_NO_BLOCK = 0xFFFF_FFFE
_VDI_SIGNATURE = 0xBEDA107F


def holds_data(read: Read) -> bool | None:
    """True when the image maps data, False when its tables map none (a format's metadata
    only), None when its format is none of those this module knows (or its header is cut)."""
    head = read(0, _SECTOR)
    try:
        if head.startswith(b"QFI\xfb"):
            return _qcow2(read, head)
        if head.startswith(b"KDMV"):
            return _vmdk(read, head)
        if head.startswith(b"vhdxfile"):
            return _vhdx(read)
        if head.startswith(b"conectix"):
            return _vpc(read, head)
        if len(head) >= 68 and struct.unpack_from("<I", head, 64)[0] == _VDI_SIGNATURE:
            return _vdi(read, head)
    except (struct.error, ValueError):
        return None  # a header cut short, or values that point nowhere
    return None


def virtual_size(read: Read) -> int | None:
    """The disk size in bytes the image's header declares; None for a format this function does
    not read (raw, iso, vpc, a vmdk descriptor) or a header cut short."""
    head = read(0, _SECTOR)
    try:
        if head.startswith(b"QFI\xfb"):
            return int(struct.unpack_from(">Q", head, 24)[0])
        if head.startswith(b"KDMV"):
            return int(struct.unpack_from("<Q", head, 12)[0]) * _SECTOR
        if head.startswith(b"vhdxfile"):
            return _vhdx_size(read)
        if len(head) >= 68 and struct.unpack_from("<I", head, 64)[0] == _VDI_SIGNATURE:
            return int(struct.unpack_from("<Q", head + read(len(head), 512), 368)[0])
    except (struct.error, ValueError):
        return None
    return None


def _vhdx_region(read: Read, wanted: bytes) -> tuple[int, int] | None:
    """The offset and length of a vhdx region (the region table's entry of GUID ``wanted``)."""
    table = read(192 * 1024, 64 * 1024)
    if not table.startswith(b"regi"):
        return None
    (count,) = struct.unpack_from("<I", table, 8)
    for index in range(count):
        guid, offset, length, _ = struct.unpack_from("<16sQII", table, 16 + 32 * index)
        if guid == wanted:
            return offset, length
    return None


def _vhdx_size(read: Read) -> int | None:
    region = _vhdx_region(read, _VHDX_METADATA)
    if region is None:
        return None
    offset, length = region
    table = read(offset, min(length, 64 * 1024))
    if not table.startswith(b"metadata"):
        return None
    (count,) = struct.unpack_from("<H", table, 10)
    for index in range(count):
        guid, item_offset, _ = struct.unpack_from("<16sII", table, 32 + 32 * index)
        if guid == _VHDX_DISK_SIZE:
            return int(struct.unpack_from("<Q", read(offset + item_offset, 8))[0])
    return None


def _qcow2(read: Read, head: bytes) -> bool:
    l1_entries, l1_offset = struct.unpack_from(">IQ", head, 36)
    return _any_nonzero(read, l1_offset, l1_entries * 8)


def _vmdk(read: Read, head: bytes) -> bool | None:
    capacity, grain, _, _, per_table, _, directory = struct.unpack_from("<QQQQIQQ", head, 12)
    if directory == _VMDK_GD_AT_END or not grain or not per_table:
        return None
    tables = -(-capacity // (grain * per_table))
    raw = read(directory * _SECTOR, tables * 4)
    for (table,) in struct.iter_unpack("<I", raw[: len(raw) // 4 * 4]):
        # An entry of 1 is a grain of zeros (the zeroed-grain extension), not data.
        if table and any(entry > 1 for entry in _entries(read, table * _SECTOR, per_table, "<I")):
            return True
    return False


def _vhdx(read: Read) -> bool | None:
    region = _vhdx_region(read, _VHDX_BAT)
    if region is None:
        return None
    offset, length = region
    return any(entry & 7 in _VHDX_PRESENT for entry in _entries(read, offset, length // 8, "<Q"))


def _vpc(read: Read, footer: bytes) -> bool | None:
    (header_offset,) = struct.unpack_from(">Q", footer, 16)
    if header_offset == 0xFFFF_FFFF_FFFF_FFFF:
        return None  # a fixed disk: its data is the file itself
    dynamic = read(header_offset, 1024)
    if not dynamic.startswith(b"cxsparse"):
        return None
    (table,) = struct.unpack_from(">Q", dynamic, 16)
    (entries,) = struct.unpack_from(">I", dynamic, 28)
    return any(entry != _NO_BLOCK_32 for entry in _entries(read, table, entries, ">I"))


def _vdi(read: Read, head: bytes) -> bool | None:
    header = head + read(len(head), 1024 - len(head))
    (block_map,) = struct.unpack_from("<I", header, 340)
    (blocks,) = struct.unpack_from("<I", header, 384)
    return any(entry < _VDI_FIRST_NO_BLOCK for entry in _entries(read, block_map, blocks, "<I"))


def _any_nonzero(read: Read, offset: int, size: int) -> bool:
    for start in range(offset, offset + size, _PIECE):
        piece = read(start, min(_PIECE, offset + size - start))
        if piece.count(0) != len(piece):
            return True
    return False


def _entries(read: Read, offset: int, count: int, layout: str) -> Iterator[int]:
    """``count`` integers of ``layout`` from ``offset``; those past the end of the file read as
    zeros (a hole the writer never wrote)."""
    width = struct.calcsize(layout)
    for start in range(0, count * width, _PIECE):
        size = min(_PIECE, count * width - start)
        piece = read(offset + start, size).ljust(size, b"\0")
        for (entry,) in struct.iter_unpack(layout, piece):
            yield entry
