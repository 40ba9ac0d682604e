"""Writes with the tools and habits of VM-image users: sparse files, qcow2 from qemu-img,
interrupted copies, metadata during uploads, rsync twice and after a remount, mv across
directories, du, a full spool, touch. Real Glance, real mount, real tools; each test checks what
Glance holds afterwards (status, size, sha512, formats, properties, number of images of that name).
"""

from __future__ import annotations

import errno
import hashlib
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import MountFactory
from support import GlanceAPI, Mount, tool

from lab.servers import GlanceServer

MiB = 1024 * 1024


@pytest.fixture
def writable(glance: GlanceServer, mount_glancefs: MountFactory) -> Mount:
    return mount_glancefs(glance.url)


def _sha512(path: Path) -> str:
    digest = hashlib.sha512()
    with open(path, "rb") as f:
        while block := f.read(4 * MiB):
            digest.update(block)
    return digest.hexdigest()


def _named(api: GlanceAPI, name: str) -> list[dict]:
    return api.list(name=name)


def _the_image(api: GlanceAPI, name: str) -> dict:
    images = _named(api, name)
    assert len(images) == 1, images
    return images[0]


def _status(api: GlanceAPI, name: str) -> str | None:
    images = _named(api, name)
    return images[0]["status"] if images else None


def _unique(stem: str) -> str:
    return f"{stem}-{uuid.uuid4().hex[:6]}"


def _wait_for(condition: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _sparse_raw(path: Path, size: int, extents: int = 4) -> Path:
    """A sparse file of ``size`` with a few random extents of data, ending in a hole."""
    with open(path, "wb") as f:
        f.truncate(size)
        rng = random.Random(size)
        for index in range(extents):
            f.seek(index * size // extents + 4096 * index)
            f.write(rng.randbytes(MiB))
    return path


def _assert_uploaded(api: GlanceAPI, name: str, source: Path, disk_format: str) -> dict:
    image = _the_image(api, name)
    assert image["status"] == "active"
    assert image["size"] == source.stat().st_size
    assert image["os_hash_value"] == _sha512(source)
    assert (image["disk_format"], image["container_format"]) == (disk_format, "bare")
    return image


# -- 1. sparse and seeking writers ----------------------------------------------------------------


def test_cp_of_a_sparse_raw_is_byte_exact(api: GlanceAPI, writable: Mount, tmp_path: Path) -> None:
    source = _sparse_raw(tmp_path / "disk.raw", 256 * MiB)
    assert source.stat().st_blocks * 512 < 8 * MiB  # really sparse
    name = _unique("sparse") + ".raw"
    result = tool("cp", str(source), str(writable.path / "new" / name))
    assert result.returncode == 0, result.stderr
    _assert_uploaded(api, name, source, "raw")


def test_cp_sparse_always_is_byte_exact(api: GlanceAPI, writable: Mount, tmp_path: Path) -> None:
    # Runs of zeros in the data (not holes): cp --sparse=always seeks over them.
    source = tmp_path / "zeros.img"
    rng = random.Random(7)
    with open(source, "wb") as f:
        for _ in range(6):
            f.write(rng.randbytes(MiB) + bytes(3 * MiB))
    name = _unique("always") + ".img"
    result = tool("cp", "--sparse=always", str(source), str(writable.path / "new" / name))
    assert result.returncode == 0, result.stderr
    _assert_uploaded(api, name, source, "raw")


def test_cp_of_a_qemu_img_qcow2_is_byte_exact(
    api: GlanceAPI, writable: Mount, tmp_path: Path
) -> None:
    raw = _sparse_raw(tmp_path / "base.raw", 64 * MiB)
    qcow2 = tmp_path / "disk.qcow2"
    made = tool("qemu-img", "convert", "-O", "qcow2", str(raw), str(qcow2))
    assert made.returncode == 0, made.stderr
    name = _unique("converted") + ".qcow2"
    result = tool("cp", str(qcow2), str(writable.path / "new" / name))
    assert result.returncode == 0, result.stderr
    _assert_uploaded(api, name, qcow2, "qcow2")


def test_ftruncate_extends_and_rsync_inplace_works(
    api: GlanceAPI, writable: Mount, tmp_path: Path
) -> None:
    name = _unique("extended")
    fd = os.open(writable.path / "new" / name, os.O_WRONLY | os.O_CREAT)
    try:
        os.write(fd, b"x" * 4096)
        os.ftruncate(fd, 4096)  # the current size: nothing changes
        os.ftruncate(fd, 3 * MiB)  # larger: zeros
    finally:
        os.close(fd)
    expected = b"x" * 4096 + bytes(3 * MiB - 4096)
    image = _the_image(api, name)
    assert (image["status"], image["size"]) == ("active", 3 * MiB)
    assert image["os_hash_value"] == hashlib.sha512(expected).hexdigest()

    local = tmp_path / _unique("inplace")
    local.write_bytes(random.randbytes(5 * MiB))
    result = tool("rsync", "--inplace", str(local), str(writable.path / "new") + "/")
    assert result.returncode == 0, result.stderr
    _assert_uploaded(api, local.name, local, "raw")


# -- 2. interrupted writers ---------------------------------------------------------------------


def _slow_copy(command: list[str], fifo: Path) -> tuple[subprocess.Popen[bytes], int]:
    """Start ``command`` reading ``fifo`` in a session of its own (the default SIGINT
    disposition, as in a terminal), and feed it 8 MiB; returns the process and the fd to feed."""
    os.mkfifo(fifo)
    process = subprocess.Popen(
        command, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    feed = os.open(fifo, os.O_WRONLY)
    for _ in range(8):
        os.write(feed, random.randbytes(MiB))
    return process, feed


@pytest.mark.parametrize(
    ("tool_name", "sig"),
    [("cp", signal.SIGINT), ("cp", signal.SIGKILL), ("dd", signal.SIGTERM)],
)
def test_an_interrupted_copy_leaves_no_image(
    tool_name: str, sig: signal.Signals, api: GlanceAPI, writable: Mount, tmp_path: Path
) -> None:
    name = _unique(f"killed-{tool_name}") + ".raw"
    target = writable.path / "new" / name
    fifo = tmp_path / "slow"
    if tool_name == "cp":
        command = ["cp", str(fifo), str(target)]
    else:
        command = ["dd", f"if={fifo}", f"of={target}", "bs=1M", "status=none"]
    process, feed = _slow_copy(command, fifo)
    try:
        # Wait until Glance is receiving the data, then interrupt the writer.
        _wait_for(lambda: _status(api, name) == "saving", "the upload to start")
        process.send_signal(sig)
        assert process.wait(timeout=30) == -sig
    finally:
        os.close(feed)
        if process.poll() is None:
            process.kill()
            process.wait()
    _wait_for(lambda: _named(api, name) == [], "the interrupted image to be deleted")
    assert f"killed by {sig.name}" in writable.log()
    assert "uploaded and verified" not in writable.log()


def test_keep_failed_leaves_an_interrupted_image_queued(
    api: GlanceAPI, glance: GlanceServer, mount_glancefs: MountFactory, tmp_path: Path
) -> None:
    mount = mount_glancefs(glance.url, "--keep-failed")
    name = _unique("kept") + ".raw"
    process, feed = _slow_copy(["cp", str(tmp_path / "slow"), str(mount.path / "new" / name)],
                               tmp_path / "slow")  # fmt: skip
    try:
        _wait_for(lambda: _status(api, name) == "saving", "the upload to start")
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=30) == -signal.SIGINT
    finally:
        os.close(feed)
    _wait_for(lambda: "left queued (--keep-failed)" in mount.log(), "the abort")
    # Glance notices the broken PUT and puts the image back to queued.
    _wait_for(lambda: _status(api, name) == "queued", "the image to be queued again")
    image = _the_image(api, name)
    assert (image["status"], image["size"]) == ("queued", None)


_EXIT_WITHOUT_CLOSE = """
import os, sys
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT)
os.write(fd, b"z" * 65536)
os._exit(int(sys.argv[2]))
"""


@pytest.mark.parametrize("status", [0, 3])
def test_exit_without_close_finalizes_only_a_successful_writer(
    status: int, api: GlanceAPI, writable: Mount
) -> None:
    name = _unique(f"exit-{status}")
    path = writable.path / "new" / name
    result = tool(sys.executable, "-c", _EXIT_WITHOUT_CLOSE, str(path), str(status))
    assert result.returncode == status, result.stderr
    if status == 0:
        image = _the_image(api, name)
        assert (image["status"], image["size"]) == ("active", 65536)
    else:
        _wait_for(lambda: _named(api, name) == [], "the image to be deleted")
        assert "exiting with status 3" in writable.log()
