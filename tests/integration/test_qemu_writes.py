"""Writes by the field's own tool: ``qemu-img convert`` and ``create`` straight into new/, which
create their output, close it, and open it again for the data. Real Glance, real mount, the real
qemu-img; each test compares what Glance holds with what the same command writes to a local
file, and counts the images of that name.
"""

from __future__ import annotations

import errno
import random
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import MountFactory
from support import GlanceAPI, Mount, default_sigint, tool

from lab.faults import IMAGE_DATA, FaultProxy
from lab.servers import GlanceServer

MiB = 1024 * 1024


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A qcow2 of 1 GiB virtual size with 6 MiB of data: at 0, at 300 MiB, at the end."""
    directory = tmp_path_factory.mktemp("qemu")
    raw = directory / "source.raw"
    rng = random.Random(23)
    with open(raw, "wb") as f:
        f.truncate(1024 * MiB)
        for offset in (0, 300 * MiB, 1022 * MiB):
            f.seek(offset)
            f.write(rng.randbytes(2 * MiB))
    qcow2 = directory / "source.qcow2"
    _ok(tool("qemu-img", "convert", "-O", "qcow2", str(raw), str(qcow2)))
    raw.unlink()
    return qcow2


@pytest.fixture
def writable(glance: GlanceServer, mount_glancefs: MountFactory) -> Mount:
    return mount_glancefs(glance.url)


def _ok(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, result.stderr
    return result


def _unique(stem: str) -> str:
    return f"{stem}-{uuid.uuid4().hex[:6]}"


def _wait_for(condition: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _glance_copy(api: GlanceAPI, name: str, into: Path) -> Path:
    """The one active image called ``name``, downloaded from Glance (not through the mount)."""
    image = api.only(name)
    assert image["status"] == "active", image
    into.write_bytes(api.request("GET", f"/v2/images/{image['id']}/file").content)
    assert image["size"] == into.stat().st_size
    return into


def _assert_same_image(fmt: str, local: Path, glance_copy: Path) -> None:
    """``cmp`` where qemu-img writes the same bytes every time (raw, qcow2); elsewhere (vmdk and
    vhdx carry random ids) the same disk content and a clean check."""
    if fmt in ("raw", "qcow2"):
        _ok(tool("cmp", str(local), str(glance_copy)))
        return
    assert glance_copy.stat().st_size == local.stat().st_size
    _ok(tool("qemu-img", "compare", "-f", fmt, "-F", fmt, str(local), str(glance_copy)))
    _ok(tool("qemu-img", "check", "-f", fmt, str(glance_copy)))


# -- convert and create ---------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["raw", "qcow2", "vmdk", "vhdx"])
def test_convert_into_new_writes_what_it_writes_locally(
    fmt: str, api: GlanceAPI, writable: Mount, source: Path, tmp_path: Path
) -> None:
    name = _unique("converted") + f".{fmt}"
    local = tmp_path / f"local.{fmt}"
    _ok(tool("qemu-img", "convert", "-O", fmt, str(source), str(local)))
    _ok(tool("qemu-img", "convert", "-O", fmt, str(source), str(writable.path / "new" / name)))
    copy = _glance_copy(api, name, tmp_path / f"glance.{fmt}")
    _assert_same_image(fmt, local, copy)
    assert api.only(name)["disk_format"] == fmt
    # qemu-img reads it back through the mount as it does any image
    _ok(tool("qemu-img", "compare", "-f", fmt, str(local), str(writable.path / name)))


def test_create_qcow2_publishes_an_empty_disk_readable_at_once(
    api: GlanceAPI, writable: Mount, tmp_path: Path
) -> None:
    name = _unique("blank") + ".qcow2"
    local = tmp_path / "blank.qcow2"
    _ok(tool("qemu-img", "create", "-q", "-f", "qcow2", str(local), "1G"))
    _ok(tool("qemu-img", "create", "-q", "-f", "qcow2", str(writable.path / "new" / name), "1G"))
    # The upload ends as qemu-img exits; the next open waits for that end.
    info = _ok(tool("qemu-img", "info", str(writable.path / "new" / name)))
    assert "virtual size: 1 GiB" in info.stdout
    _assert_same_image("qcow2", local, _glance_copy(api, name, tmp_path / "glance.qcow2"))


def test_create_raw_then_convert_n_onto_it(
    api: GlanceAPI, writable: Mount, source: Path, tmp_path: Path
) -> None:
    name = _unique("sized") + ".raw"
    target = writable.path / "new" / name
    local = tmp_path / "local.raw"
    for path in (local, target):
        _ok(tool("qemu-img", "create", "-q", "-f", "raw", str(path), "1G"))
        _ok(tool("qemu-img", "convert", "-n", "-O", "raw", str(source), str(path)))
    _assert_same_image("raw", local, _glance_copy(api, name, tmp_path / "glance.raw"))


def test_a_size_alone_waits_queued_for_the_next_writer(
    api: GlanceAPI, writable: Mount, tmp_path: Path
) -> None:
    name = _unique("truncated") + ".raw"
    target = writable.path / "new" / name
    local = tmp_path / "local.raw"
    data = tmp_path / "data"
    data.write_bytes(random.randbytes(2 * MiB))
    for path in (local, target):
        _ok(tool("truncate", "-s", "8M", str(path)))
        if path == target:
            image = api.only(name)
            assert (image["status"], image["size"]) == ("queued", None)
            assert target.stat().st_size == 8 * MiB
        dd = ["dd", f"if={data}", f"of={path}", "bs=1M", "seek=3", "conv=notrunc", "status=none"]
        _ok(tool(*dd))
    _assert_same_image("raw", local, _glance_copy(api, name, tmp_path / "glance.raw"))


# -- interrupted --------------------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_an_interrupted_convert_leaves_nothing(
    sig: signal.Signals, api: GlanceAPI, writable: Mount, source: Path
) -> None:
    name = _unique("interrupted") + ".qcow2"
    target = writable.path / "new" / name
    convert = subprocess.Popen(
        ["qemu-img", "convert", "-r", "1M", "-O", "qcow2", str(source), str(target)],
        start_new_session=True, preexec_fn=default_sigint, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        # Mid-way: past the header, into the data (read at 1 MiB/s).
        _wait_for(lambda: target.exists() and target.stat().st_size > MiB, "the data to come")
        convert.send_signal(sig)
        assert convert.wait(timeout=30) == -sig
    finally:
        if convert.poll() is None:
            convert.kill()
            convert.wait()
    _wait_for(lambda: api.list(name=name) == [], "the interrupted image to be deleted")
    assert f"killed by {sig.name}" in writable.log()
    assert "uploaded and verified" not in writable.log()


# -- the spool ----------------------------------------------------------------------------------


def test_a_spool_too_small_gives_efbig_and_leaves_nothing(
    api: GlanceAPI, glance: GlanceServer, mount_glancefs: MountFactory, source: Path
) -> None:
    mount = mount_glancefs(glance.url, "--spool-size", "3M")
    name = _unique("unspooled") + ".qcow2"
    result = tool("qemu-img", "convert", "-O", "qcow2", str(source), str(mount.path / "new" / name))
    assert result.returncode != 0
    assert "File too large" in result.stderr
    _wait_for(lambda: api.list(name=name) == [], "the image to be deleted")
    assert "raise --spool-size" in mount.log()


# -- the size first -----------------------------------------------------------------------------


@pytest.fixture
def proxied(
    glance: GlanceServer, mount_glancefs: MountFactory
) -> Iterator[tuple[Mount, FaultProxy]]:
    with FaultProxy(glance.url) as proxy:
        yield mount_glancefs(proxy.url), proxy


_SIZE_THEN_MORE = """
import os, sys
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT)
os.ftruncate(fd, 6 << 20)
os.write(fd, os.urandom(5 << 20))
try:
    os.pwrite(fd, b"more", 6 << 20)
except OSError as error:
    print("write", error.errno)
try:
    os.close(fd)
except OSError as error:
    print("close", error.errno)
"""


def test_the_size_set_first_goes_with_the_upload(
    api: GlanceAPI, proxied: tuple[Mount, FaultProxy], source: Path, tmp_path: Path
) -> None:
    mount, proxy = proxied
    new = mount.path / "new"
    sized, streamed, small = _unique("sized") + ".raw", _unique("streamed"), _unique("small")
    _ok(tool("qemu-img", "convert", "-O", "raw", str(source), str(new / sized)))
    data = tmp_path / "data"
    data.write_bytes(random.randbytes(12 * MiB))
    _ok(tool("sh", "-c", f"cat '{data}' | tee '{new / streamed}' >/dev/null"))
    (tmp_path / "small").write_bytes(random.randbytes(3 * MiB))
    _ok(tool("cp", str(tmp_path / "small"), str(new / small)))  # held to its end: size known
    headers = {
        api.get(r.image_id or "")["name"]: r.header("x-openstack-image-size")
        for r in proxy.requests("PUT", IMAGE_DATA)
    }
    assert headers == {sized: str(1024 * MiB), streamed: None, small: str(3 * MiB)}

    # A writer that writes past the size it set first: EIO, and no image.
    overflow = _unique("overflow")
    result = _ok(tool("python3", "-c", _SIZE_THEN_MORE, str(new / overflow)))
    assert result.stdout.split("\n")[:2] == [f"write {errno.EIO}", f"close {errno.EIO}"]
    _wait_for(lambda: api.list(name=overflow) == [], "the image to be deleted")
