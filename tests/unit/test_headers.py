"""Which image files hold data (glancefs.fs.headers), on files the real qemu-img writes: what
``qemu-img create`` leaves (metadata only) against the same format with data converted in."""

from __future__ import annotations

import json
import os
import random
import subprocess
from pathlib import Path

import pytest

from glancefs.fs.headers import Read, holds_data, virtual_size

MiB = 1024 * 1024
FORMATS = ["qcow2", "vmdk", "vhdx", "vpc", "vdi"]


def _reader(path: Path) -> Read:
    data = path.read_bytes()
    return lambda offset, size: data[offset : offset + size]


def _qemu_img(*args: str | Path) -> None:
    subprocess.run(["qemu-img", *map(str, args)], check=True, capture_output=True)


@pytest.fixture(scope="module")
def data_raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A sparse 64 MiB raw disk with 1 MiB of data far in."""
    path = tmp_path_factory.mktemp("headers") / "data.raw"
    with open(path, "wb") as f:
        f.truncate(64 * MiB)
        f.seek(40 * MiB)
        f.write(random.Random(3).randbytes(MiB))
    return path


@pytest.mark.parametrize("fmt", FORMATS)
def test_created_holds_no_data_converted_does(fmt: str, data_raw: Path, tmp_path: Path) -> None:
    created, converted = tmp_path / f"created.{fmt}", tmp_path / f"converted.{fmt}"
    _qemu_img("create", "-q", "-f", fmt, created, "1G")
    _qemu_img("convert", "-O", fmt, data_raw, converted)
    assert holds_data(_reader(created)) is False
    assert holds_data(_reader(converted)) is True


def test_a_header_alone_maps_nothing(tmp_path: Path) -> None:
    # What a writer has written before the tables: the first bytes of the header (the rest of
    # the file reads as the zeros of a hole).
    created = tmp_path / "created.qcow2"
    _qemu_img("create", "-q", "-f", "qcow2", created, "1G")
    assert holds_data(_reader(created)) is False
    head = created.read_bytes()[:104]
    assert holds_data(lambda offset, size: head[offset : offset + size]) is False


@pytest.mark.parametrize(
    "content",
    [b"", bytes(4096), os.urandom(4096), b"QFI\xfb\0\0", b"KDMV" + bytes(60), b"conectix"],
    ids=["empty", "zeros", "random", "cut-qcow2", "cut-vmdk", "cut-vpc"],
)
def test_other_content_is_unknown(content: bytes) -> None:
    assert holds_data(lambda offset, size: content[offset : offset + size]) is None


@pytest.mark.parametrize("fmt", ["qcow2", "vmdk", "vhdx", "vdi"])
def test_virtual_size_is_the_disk_size_qemu_img_reports(fmt: str, tmp_path: Path) -> None:
    path = tmp_path / f"disk.{fmt}"
    _qemu_img("create", "-q", "-f", fmt, path, "192M")
    info = subprocess.run(
        ["qemu-img", "info", "--output=json", path], check=True, capture_output=True, text=True
    )
    assert virtual_size(_reader(path)) == json.loads(info.stdout)["virtual-size"] == 192 * MiB


@pytest.mark.parametrize("content", [b"", b"QFI\xfb\0", bytes(4096), b"conectix" + bytes(600)])
def test_virtual_size_of_other_content_is_unknown(content: bytes) -> None:
    assert virtual_size(lambda offset, size: content[offset : offset + size]) is None
