"""Writes by the field's own tool: ``qemu-img convert`` and ``create`` straight into new/, which
create their output, close it, and open it again for the data. Real Glance (on its file store,
and on Ceph RBD), real mount, the real qemu-img; each test compares what Glance holds with what
the same command writes to a local file, and counts the images of that name.
"""

from __future__ import annotations

import errno
import random
import signal
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import MountFactory
from support import GlanceAPI, Mount, default_sigint, tool, unique, wait_for

from lab.faults import IMAGE_DATA, FaultProxy
from lab.servers import GlanceServer
from lab.stores import StoresLab

MiB = 1024 * 1024
#: The source disk's virtual size: what a raw output holds (RBD's memstore keeps it in memory).
VIRTUAL = 64 * MiB


@dataclass(frozen=True)
class Target:
    """The Glance a mount uploads into, and the store it keeps the data in."""

    store: str
    glance: GlanceServer
    api: GlanceAPI


@pytest.fixture(scope="module", params=["fs", "ceph"])
def target(
    request: pytest.FixtureRequest, glance: GlanceServer, api: GlanceAPI
) -> Iterator[Target]:
    """The session's Glance (file store), or one whose default store is Ceph RBD."""
    if request.param == "fs":
        yield Target("fs", glance, api)
        return
    glance_storing_in: Callable[[str], GlanceServer] = request.getfixturevalue("glance_storing_in")
    server = glance_storing_in("ceph")
    with GlanceAPI(server.url) as ceph_api:
        yield Target("ceph", server, ceph_api)


@pytest.fixture
def writable(target: Target, mount_glancefs: MountFactory) -> Mount:
    return mount_glancefs(target.glance.url)


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A qcow2 of 64 MiB virtual size with 6 MiB of data: at 0, in the middle, at the end."""
    directory = tmp_path_factory.mktemp("qemu")
    raw = directory / "source.raw"
    rng = random.Random(23)
    with open(raw, "wb") as f:
        f.truncate(VIRTUAL)
        for offset in (0, VIRTUAL // 2, VIRTUAL - 2 * MiB):
            f.seek(offset)
            f.write(rng.randbytes(2 * MiB))
    qcow2 = directory / "source.qcow2"
    _ok(tool("qemu-img", "convert", "-O", "qcow2", str(raw), str(qcow2)))
    raw.unlink()
    return qcow2


def _ok(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, result.stderr
    return result


def _glance_copy(target: Target, name: str, into: Path, request: pytest.FixtureRequest) -> Path:
    """The one active image called ``name``, downloaded from Glance (not through the mount); on
    RBD also checked against the bytes in the pool."""
    image = target.api.only(name)
    assert image["status"] == "active", image
    assert image["stores"] == target.store
    into.write_bytes(target.api.request("GET", f"/v2/images/{image['id']}/file").content)
    assert image["size"] == into.stat().st_size
    if target.store == "ceph":
        stores: StoresLab = request.getfixturevalue("stores")
        assert stores.ceph.image_data(image["id"]) == into.read_bytes()
    return into


def _assert_same_image(fmt: str, local: Path, glance_copy: Path) -> None:
    """``cmp`` where qemu-img writes the same bytes every time (raw, qcow2); elsewhere (vmdk and
    vhdx carry random ids) the same size, the same disk content, and a clean check."""
    if fmt in ("raw", "qcow2"):
        _ok(tool("cmp", str(local), str(glance_copy)))
        return
    assert glance_copy.stat().st_size == local.stat().st_size
    _ok(tool("qemu-img", "compare", "-f", fmt, "-F", fmt, str(local), str(glance_copy)))
    _ok(tool("qemu-img", "check", "-f", fmt, str(glance_copy)))


# -- convert and create ---------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["raw", "qcow2", "vmdk", "vhdx"])
def test_convert_into_new_writes_what_it_writes_locally(
    fmt: str,
    target: Target,
    writable: Mount,
    source: Path,
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    name = unique("converted") + f".{fmt}"
    local = tmp_path / f"local.{fmt}"
    _ok(tool("qemu-img", "convert", "-O", fmt, str(source), str(local)))
    _ok(tool("qemu-img", "convert", "-O", fmt, str(source), str(writable.path / "new" / name)))
    if (target.store, fmt) == ("ceph", "vhdx"):
        # Glance 33's rbd store refuses every vhdx (415 "Incomplete file cannot be safety
        # checked": it reads the body with read(), after which oslo.utils' inspector never
        # finishes). The close fails with EIO, which qemu-img does not check: it exits 0, and
        # the mount's log says why there is no image.
        assert target.api.list(name=name) == []
        assert "415" in writable.log()
        return
    copy = _glance_copy(target, name, tmp_path / f"glance.{fmt}", request)
    _assert_same_image(fmt, local, copy)
    assert target.api.only(name)["disk_format"] == fmt
    # qemu-img reads it back through the mount as it does any image
    _ok(tool("qemu-img", "compare", "-f", fmt, str(local), str(writable.path / name)))


def test_create_qcow2_publishes_an_empty_disk_readable_at_once(
    target: Target, writable: Mount, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    name = unique("blank") + ".qcow2"
    local = tmp_path / "blank.qcow2"
    for path in (local, writable.path / "new" / name):
        _ok(tool("qemu-img", "create", "-q", "-f", "qcow2", str(path), "1G"))
    # The upload ends as qemu-img exits; the next open waits for that end.
    info = _ok(tool("qemu-img", "info", str(writable.path / "new" / name)))
    assert "virtual size: 1 GiB" in info.stdout
    copy = _glance_copy(target, name, tmp_path / "glance.qcow2", request)
    _assert_same_image("qcow2", local, copy)


def test_create_raw_then_convert_n_onto_it(
    target: Target, writable: Mount, source: Path, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    name = unique("sized") + ".raw"
    local = tmp_path / "local.raw"
    for path in (local, writable.path / "new" / name):
        _ok(tool("qemu-img", "create", "-q", "-f", "raw", str(path), str(VIRTUAL)))
        _ok(tool("qemu-img", "convert", "-n", "-O", "raw", str(source), str(path)))
    _assert_same_image("raw", local, _glance_copy(target, name, tmp_path / "glance.raw", request))


def test_a_size_alone_waits_queued_for_the_next_writer(
    target: Target, writable: Mount, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    name = unique("truncated") + ".raw"
    target_path = writable.path / "new" / name
    local = tmp_path / "local.raw"
    data = tmp_path / "data"
    data.write_bytes(random.randbytes(2 * MiB))
    for path in (local, target_path):
        _ok(tool("truncate", "-s", "8M", str(path)))
        if path == target_path:
            image = target.api.only(name)
            assert (image["status"], image["size"]) == ("queued", None)
            assert target_path.stat().st_size == 8 * MiB
        dd = ["dd", f"if={data}", f"of={path}", "bs=1M", "seek=3", "conv=notrunc", "status=none"]
        _ok(tool(*dd))
    _assert_same_image("raw", local, _glance_copy(target, name, tmp_path / "glance.raw", request))


# -- interrupted --------------------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["SIGKILL", "SIGINT"])
def test_an_interrupted_convert_leaves_nothing(
    sig: signal.Signals, target: Target, writable: Mount, source: Path
) -> None:
    name = unique("interrupted") + ".qcow2"
    path = writable.path / "new" / name
    convert = subprocess.Popen(
        ["qemu-img", "convert", "-r", "1M", "-O", "qcow2", str(source), str(path)],
        start_new_session=True, preexec_fn=default_sigint, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        # Mid-way: past the header, into the data (read at 1 MiB/s).
        wait_for(lambda: path.exists() and path.stat().st_size > MiB, "the data to come")
        convert.send_signal(sig)
        assert convert.wait(timeout=30) == -sig
    finally:
        if convert.poll() is None:
            convert.kill()
            convert.wait()
    wait_for(lambda: target.api.list(name=name) == [], "the interrupted image to be deleted")
    assert f"killed by {sig.name}" in writable.log()
    assert "uploaded and verified" not in writable.log()


# -- the spool ----------------------------------------------------------------------------------


def test_a_spool_too_small_gives_efbig_and_leaves_nothing(
    api: GlanceAPI, glance: GlanceServer, mount_glancefs: MountFactory, source: Path
) -> None:
    mount = mount_glancefs(glance.url, "--spool-size", "3M")
    name = unique("unspooled") + ".qcow2"
    result = tool("qemu-img", "convert", "-O", "qcow2", str(source), str(mount.path / "new" / name))
    assert result.returncode != 0
    assert "File too large" in result.stderr
    wait_for(lambda: api.list(name=name) == [], "the image to be deleted")
    assert "raise --spool-size" in mount.log()


# -- the size first -----------------------------------------------------------------------------


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
    target: Target,
    mount_glancefs: MountFactory,
    source: Path,
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    with FaultProxy(target.glance.url) as proxy:
        new = mount_glancefs(proxy.url).path / "new"
        sized, streamed, small = unique("sized") + ".raw", unique("streamed"), unique("small")
        _ok(tool("qemu-img", "convert", "-O", "raw", str(source), str(new / sized)))
        data = tmp_path / "data"
        data.write_bytes(random.randbytes(12 * MiB))
        _ok(tool("sh", "-c", f"cat '{data}' | tee '{new / streamed}' >/dev/null"))
        (tmp_path / "small").write_bytes(random.randbytes(MiB // 2))
        _ok(tool("cp", str(tmp_path / "small"), str(new / small)))  # held to its end
        headers = {
            target.api.get(r.image_id or "")["name"]: r.header("x-openstack-image-size")
            for r in proxy.requests("PUT", IMAGE_DATA)
        }
        assert headers == {sized: str(VIRTUAL), streamed: None, small: str(MiB // 2)}
        for name, local in ((sized, None), (streamed, data), (small, tmp_path / "small")):
            copy = _glance_copy(target, name, tmp_path / f"{name}.glance", request)
            if local is not None:
                _ok(tool("cmp", str(local), str(copy)))

        # A writer that writes past the size it set first: EIO, and no image.
        overflow = unique("overflow")
        result = _ok(tool("python3", "-c", _SIZE_THEN_MORE, str(new / overflow)))
        assert result.stdout.split("\n")[:2] == [f"write {errno.EIO}", f"close {errno.EIO}"]
        wait_for(lambda: target.api.list(name=overflow) == [], "the image to be deleted")
