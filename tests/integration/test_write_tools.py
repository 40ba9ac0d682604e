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
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import MountFactory
from support import (
    GlanceAPI,
    Mount,
    assert_uploaded,
    interrupt_writer,
    status_of,
    tool,
    transferred,
    unique,
    wait_for,
)

from glancefs.fs.namespace import has_readable_size
from lab.servers import GlanceServer

MiB = 1024 * 1024


@pytest.fixture
def writable(glance: GlanceServer, mount_glancefs: MountFactory) -> Mount:
    return mount_glancefs(glance.url)


def _sparse_raw(path: Path, size: int, extents: int = 4) -> Path:
    """A sparse file of ``size`` with a few random extents of data, ending in a hole."""
    with open(path, "wb") as f:
        f.truncate(size)
        rng = random.Random(size)
        for index in range(extents):
            f.seek(index * size // extents + 4096 * index)
            f.write(rng.randbytes(MiB))
    return path


# -- 1. sparse and seeking writers ----------------------------------------------------------------


def test_cp_of_a_sparse_raw_is_byte_exact(api: GlanceAPI, writable: Mount, tmp_path: Path) -> None:
    source = _sparse_raw(tmp_path / "disk.raw", 256 * MiB)
    assert source.stat().st_blocks * 512 < 8 * MiB  # really sparse
    name = unique("sparse") + ".raw"
    result = tool("cp", str(source), str(writable.path / "new" / name))
    assert result.returncode == 0, result.stderr
    assert_uploaded(api, name, source, "raw")


def test_cp_sparse_always_is_byte_exact(api: GlanceAPI, writable: Mount, tmp_path: Path) -> None:
    # Runs of zeros in the data (not holes): cp --sparse=always seeks over them.
    source = tmp_path / "zeros.img"
    rng = random.Random(7)
    with open(source, "wb") as f:
        for _ in range(6):
            f.write(rng.randbytes(MiB) + bytes(3 * MiB))
    name = unique("always") + ".img"
    result = tool("cp", "--sparse=always", str(source), str(writable.path / "new" / name))
    assert result.returncode == 0, result.stderr
    assert_uploaded(api, name, source, "raw")


def test_cp_of_a_qemu_img_qcow2_is_byte_exact(
    api: GlanceAPI, writable: Mount, tmp_path: Path
) -> None:
    raw = _sparse_raw(tmp_path / "base.raw", 64 * MiB)
    qcow2 = tmp_path / "disk.qcow2"
    made = tool("qemu-img", "convert", "-O", "qcow2", str(raw), str(qcow2))
    assert made.returncode == 0, made.stderr
    name = unique("converted") + ".qcow2"
    result = tool("cp", str(qcow2), str(writable.path / "new" / name))
    assert result.returncode == 0, result.stderr
    assert_uploaded(api, name, qcow2, "qcow2")


def test_ftruncate_extends_and_rsync_inplace_works(
    api: GlanceAPI, writable: Mount, tmp_path: Path
) -> None:
    name = unique("extended")
    fd = os.open(writable.path / "new" / name, os.O_WRONLY | os.O_CREAT)
    try:
        os.write(fd, b"x" * 4096)
        os.ftruncate(fd, 4096)  # the current size: nothing changes
        os.ftruncate(fd, 3 * MiB)  # larger: zeros
    finally:
        os.close(fd)
    expected = b"x" * 4096 + bytes(3 * MiB - 4096)
    image = api.only(name)
    assert (image["status"], image["size"]) == ("active", 3 * MiB)
    assert image["os_hash_value"] == hashlib.sha512(expected).hexdigest()

    local = tmp_path / unique("inplace")
    local.write_bytes(random.randbytes(5 * MiB))
    result = tool("rsync", "--inplace", str(local), str(writable.path / "new") + "/")
    assert result.returncode == 0, result.stderr
    assert_uploaded(api, local.name, local, "raw")


def test_fsync_mid_stream_does_not_end_the_upload(api: GlanceAPI, writable: Mount) -> None:
    name = unique("synced")
    data = random.randbytes(4 * MiB)
    fd = os.open(writable.path / "new" / name, os.O_WRONLY | os.O_CREAT)
    try:
        os.write(fd, data[: 2 * MiB])
        os.fsync(fd)
        os.write(fd, data[2 * MiB :])
        os.fsync(fd)  # dd conv=fsync does this before its close
    finally:
        os.close(fd)
    image = api.only(name)
    assert (image["status"], image["size"]) == ("active", len(data))
    assert image["os_hash_value"] == hashlib.sha512(data).hexdigest()


# -- 2. interrupted writers ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tool_name", "sig"),
    [("cp", signal.SIGINT), ("cp", signal.SIGKILL), ("dd", signal.SIGTERM)],
)
def test_an_interrupted_copy_leaves_no_image(
    tool_name: str, sig: signal.Signals, api: GlanceAPI, writable: Mount, tmp_path: Path
) -> None:
    name = unique(f"killed-{tool_name}") + ".raw"
    target = writable.path / "new" / name
    fifo = tmp_path / "slow"
    if tool_name == "cp":
        command = ["cp", str(fifo), str(target)]
    else:
        command = ["dd", f"if={fifo}", f"of={target}", "bs=1M", "status=none"]
    interrupt_writer(api, name, command, fifo, sig)
    wait_for(lambda: api.list(name=name) == [], "the interrupted image to be deleted")
    assert f"killed by {sig.name}" in writable.log()
    assert "uploaded and verified" not in writable.log()


def test_keep_failed_leaves_an_interrupted_image_queued(
    api: GlanceAPI, glance: GlanceServer, mount_glancefs: MountFactory, tmp_path: Path
) -> None:
    mount = mount_glancefs(glance.url, "--keep-failed")
    name = unique("kept") + ".raw"
    fifo = tmp_path / "slow"
    interrupt_writer(api, name, ["cp", str(fifo), str(mount.path / "new" / name)], fifo,
                     signal.SIGINT)  # fmt: skip
    wait_for(lambda: "left queued (--keep-failed)" in mount.log(), "the abort")
    # Glance notices the broken PUT and puts the image back to queued.
    wait_for(lambda: status_of(api, name) == "queued", "the image to be queued again")
    image = api.only(name)
    assert (image["status"], image["size"]) == ("queued", None)


_THREAD_WRITES = """
import os, sys, threading, time
def write():
    fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT)
    while True:
        os.write(fd, os.urandom(1 << 20))
        time.sleep(0.05)
threading.Thread(target=write, daemon=True).start()
time.sleep(600)
"""


def test_a_killed_process_whose_thread_writes_leaves_no_image(
    api: GlanceAPI, writable: Mount
) -> None:
    name = unique("threaded")
    process = subprocess.Popen(
        [sys.executable, "-c", _THREAD_WRITES, str(writable.path / "new" / name)]
    )
    try:
        wait_for(lambda: status_of(api, name) == "saving", "the upload to start")
        process.kill()
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    wait_for(lambda: api.list(name=name) == [], "the image to be deleted")
    assert "killed by SIGKILL" in writable.log()


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
    name = unique(f"exit-{status}")
    path = writable.path / "new" / name
    result = tool(sys.executable, "-c", _EXIT_WITHOUT_CLOSE, str(path), str(status))
    assert result.returncode == status, result.stderr
    if status == 0:
        image = api.only(name)
        assert (image["status"], image["size"]) == ("active", 65536)
    else:
        wait_for(lambda: api.list(name=name) == [], "the image to be deleted")
        assert "exiting with status 3" in writable.log()


# -- 3. metadata during an upload ----------------------------------------------------------------


def test_setfattr_during_an_upload_is_kept(api: GlanceAPI, writable: Mount) -> None:
    name = unique("annotated")
    path = writable.path / "new" / name
    data = random.randbytes(12 * MiB)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    try:
        os.write(fd, data[: 4 * MiB])
        wait_for(lambda: status_of(api, name) == "saving", "the upload to start")
        for command in (
            ["setfattr", "-n", "user.os_distro", "-v", "ubuntu", str(path)],
            ["setfattr", "-n", "user.tags", "-v", "a,b", str(path)],
            ["setfattr", "-n", "user.tags.add", "-v", "c", str(path)],
        ):
            result = tool(*command)
            assert result.returncode == 0, result.stderr
        with pytest.raises(OSError) as fixed:  # the data is being sent as raw
            os.setxattr(path, "user.disk_format", b"qcow2")
        assert fixed.value.errno == errno.EPERM
        # Undisturbed, and not finalized by the close-on-exec of the tools' forks above.
        os.write(fd, data[4 * MiB :])
    finally:
        os.close(fd)
    image = api.only(name)
    assert (image["status"], image["size"]) == ("active", len(data))
    assert image["os_hash_value"] == hashlib.sha512(data).hexdigest()
    assert image["os_distro"] == "ubuntu"
    assert sorted(image["tags"]) == ["a", "b", "c"]
    assert image["disk_format"] == "raw"
    assert os.getxattr(writable.path / name, "user.os_distro") == b"ubuntu"


def test_setfattr_keys_read_back_under_the_name_given(api: GlanceAPI, writable: Mount) -> None:
    image = api.create(unique("keys"), b"x")
    path = writable.path / image["name"]
    for key in ("user.a/b", "user.x~y", "user.~1"):
        os.setxattr(path, key, b"v")
        assert os.getxattr(path, key) == b"v", key
    record = api.get(image["id"])
    assert (record["a/b"], record["x~y"], record["~1"]) == ("v", "v", "v")
    for bad in ("user. lead", "user.trail ", "user.tab\there"):
        with pytest.raises(OSError) as refused:
            os.setxattr(path, bad, b"v")
        assert refused.value.errno == errno.EINVAL, bad
    after = api.get(image["id"])
    assert not {"lead", " lead", "trail", "tab\there"} & set(after)


# -- 4. rsync, cp -p, tar ------------------------------------------------------------------------


def test_rsync_twice_and_after_a_remount_never_duplicates(
    api: GlanceAPI, glance: GlanceServer, mount_glancefs: MountFactory, tmp_path: Path
) -> None:
    local = tmp_path / unique("synced")
    local.write_bytes(random.randbytes(3 * MiB))
    os.utime(local, ns=(1_600_000_000_123_456_789, 1_600_000_000_123_456_789))
    mount = mount_glancefs(glance.url, name="first")

    def rsync(into: Mount) -> subprocess.CompletedProcess[str]:
        return tool("rsync", "-a", "--stats", str(local), str(into.path / "new") + "/")

    first = rsync(mount)
    assert first.returncode == 0, first.stderr
    assert transferred(first.stdout) == 1
    image = assert_uploaded(api, local.name, local, "raw")
    assert image["glancefs_mtime"] == "2020-09-13T12:26:40.123456789Z"
    assert (mount.path / local.name).stat().st_mtime_ns == 1_600_000_000_123_456_789
    second = rsync(mount)
    assert second.returncode == 0, second.stderr
    assert transferred(second.stdout) == 0
    mount.stop()

    again = mount_glancefs(glance.url, name="second")
    third = rsync(again)
    assert third.returncode == 0, third.stderr
    assert transferred(third.stdout) == 0
    # A changed file cannot replace the image (no --allow-delete): a clear failure, and the
    # temporary upload is deleted, not left hidden.
    os.utime(local, ns=(1_700_000_000_000_000_000, 1_700_000_000_000_000_000))
    changed = rsync(again)
    assert changed.returncode != 0
    assert "Operation not permitted" in changed.stderr
    assert [i["id"] for i in api.list(name=local.name)] == [image["id"]]
    temporaries = [i for i in api.list() if i["name"] and i["name"].startswith(f".{local.name}.")]
    assert temporaries == []
    assert "final rename" in again.log()


def test_cp_p_and_tar_keep_the_mtime(api: GlanceAPI, writable: Mount, tmp_path: Path) -> None:
    local = tmp_path / unique("preserved")
    local.write_bytes(b"payload" * 1000)
    os.utime(local, ns=(1_500_000_000_000_000_000, 1_500_000_000_000_000_000))
    assert tool("cp", "-p", str(local), str(writable.path / "new") + "/").returncode == 0
    image = api.only(local.name)
    assert (image["status"], image["glancefs_mtime"]) == (
        "active",
        "2017-07-14T02:40:00.000000000Z",
    )
    assert (writable.path / local.name).stat().st_mtime_ns == 1_500_000_000_000_000_000

    archive = tmp_path / "a.tar"
    member = tmp_path / "tree" / unique("untarred")
    member.parent.mkdir()
    member.write_bytes(b"tarred")
    os.utime(member, (1_400_000_000, 1_400_000_000))
    assert tool("tar", "-C", str(member.parent), "-cf", str(archive), member.name).returncode == 0
    untar = tool("tar", "-C", str(writable.path / "new"), "-xf", str(archive))
    assert untar.returncode == 0, untar.stderr
    assert api.only(member.name)["glancefs_mtime"] == "2014-05-13T16:53:20.000000000Z"


# -- 5. mv across directories --------------------------------------------------------------------


def test_mv_across_directories_never_copies(api: GlanceAPI, writable: Mount) -> None:
    tag, other, third = unique("t"), unique("u"), unique("v")
    image = api.create(unique("moved"), b"x", tags=[tag])
    api.create(unique("holder"), b"y", tags=[other, third])  # so that their by-tag/ exist
    name, root = image["name"], writable.path

    def mv(source: Path, target: Path) -> subprocess.CompletedProcess[str]:
        return tool("mv", str(source), str(target))

    def tags() -> list[str]:
        return sorted(api.get(image["id"])["tags"])

    # root <-> new/: one namespace of names (the same name is the same file)
    assert "are the same file" in mv(root / name, root / "new" / name).stderr
    assert mv(root / name, root / "new" / "renamed").returncode == 0
    assert api.get(image["id"])["name"] == "renamed"
    assert mv(root / "new" / "renamed", root / name).returncode == 0
    assert api.get(image["id"])["name"] == name
    # into, between and out of by-tag/: tags change, the name stays
    assert mv(root / name, root / "by-tag" / other / name).returncode == 0
    assert tags() == sorted([tag, other])
    assert mv(root / "by-tag" / tag / name, root / "by-tag" / third / name).returncode == 0
    assert tags() == sorted([other, third])
    # Where the image is visible already (the root shows every image), it is the same file:
    # mv says so, and the kernel itself answers a rename(2) there without asking glancefs.
    assert "are the same file" in mv(root / "by-tag" / other / name, root / name).stderr
    # refused with EPERM, never EXDEV (mv would copy)
    for source, target in (
        (root / name, root / "by-id" / name),
        (root / "by-id" / image["id"], root / "elsewhere"),
        (root / name, root / "by-tag" / other / "renamed"),
    ):
        with pytest.raises(OSError) as refused:
            os.rename(source, target)
        assert refused.value.errno == errno.EPERM, (source, target)
    assert [i["id"] for i in api.list(name=name)] == [image["id"]]
    assert api.get(image["id"])["checksum"] == image["checksum"]


# -- 6. du ---------------------------------------------------------------------------------------


def test_du_counts_each_image_once(api: GlanceAPI, writable: Mount) -> None:
    api.create(unique("du"), random.randbytes(100_000), tags=["du-a", "du-b"])
    api.create(unique("du"), random.randbytes(50_000), tags=["du-a"])
    # Every image the mount shows counts, deactivated ones (mode 0, size kept) too; images still
    # receiving data show size 0.
    expected = sum(i["size"] or 0 for i in api.list() if has_readable_size(i["status"]))
    result = tool("du", "-sb", str(writable.path))
    assert result.returncode == 0, result.stderr
    assert int(result.stdout.split()[0]) == expected
    links = tool("find", str(writable.path), "-type", "f", "-links", "4", "-name", "du-*")
    assert links.returncode == 0
    assert len(links.stdout.split()) == 3  # root, by-id, by-tag/du-a, by-tag/du-b of one image


# -- 7. failures clean up --------------------------------------------------------------------


@pytest.fixture
def tiny_spool(tmp_path: Path) -> Iterator[Path]:
    spool = tmp_path / "tiny"
    spool.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(spool)], check=True)
    try:
        yield spool
    finally:
        subprocess.run(["umount", "-l", str(spool)], check=False)


def test_a_full_spool_fails_the_upload_and_leaves_nothing(
    api: GlanceAPI, glance: GlanceServer, mount_glancefs: MountFactory, tiny_spool: Path
) -> None:
    mount = mount_glancefs(glance.url, "--spool-dir", str(tiny_spool))
    name = unique("spooled")
    result = tool("dd", "if=/dev/urandom", f"of={mount.path / 'new' / name}", "bs=1M", "count=16")
    assert result.returncode != 0
    assert "No space left on device" in result.stderr
    assert api.list(name=name) == []
    assert "the image is deleted" in mount.log()
    assert "uploaded and verified" not in mount.log()


# -- 8. touch ------------------------------------------------------------------------------------


def test_touch_sets_the_formats_from_the_extension(api: GlanceAPI, writable: Mount) -> None:
    for extension, formats in ((".vmdk", ("vmdk", "bare")), ("", ("raw", "bare"))):
        name = unique("touched") + extension
        assert tool("touch", str(writable.path / "new" / name)).returncode == 0
        image = api.only(name)
        assert image["status"] == "queued"
        assert (image["disk_format"], image["container_format"]) == formats
    # The content still corrects what the name implied while the image has no data.
    name = unique("corrected") + ".qcow2"
    assert tool("touch", str(writable.path / "new" / name)).returncode == 0
    data = random.randbytes(2 * MiB)
    (writable.path / "new" / name).write_bytes(data)
    image = api.only(name)
    assert (image["status"], image["disk_format"]) == ("active", "raw")
    assert image["os_hash_value"] == hashlib.sha512(data).hexdigest()
