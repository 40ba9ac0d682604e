"""The write path end to end: uploads with cp, tee, dd, rsync and Python; metadata with setfattr;
rename and delete; every refusal with its errno. Real Glance, real mount, ordinary tools."""

from __future__ import annotations

import errno
import hashlib
import os
import random
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import MountFactory
from support import GlanceAPI, Mount, tool

from lab.servers import GlanceServer

MiB = 1024 * 1024


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 32 MiB random file to upload."""
    path = tmp_path_factory.mktemp("src") / "src.bin"
    path.write_bytes(random.Random(1).randbytes(32 * MiB))
    return path


@pytest.fixture
def writable(glance: GlanceServer, mount_glancefs: MountFactory) -> Mount:
    return mount_glancefs(glance.url, "--allow-delete")


def _sha512(path: Path) -> str:
    return hashlib.sha512(path.read_bytes()).hexdigest()


def test_cp_of_256_mib_is_active_and_verified(
    api: GlanceAPI, writable: Mount, tmp_path: Path
) -> None:
    big = tmp_path / "big.bin"
    with open(big, "wb") as f:
        rng = random.Random(256)
        for _ in range(16):
            f.write(rng.randbytes(16 * MiB))
    name = f"x-{uuid.uuid4().hex[:6]}.raw"
    result = tool("cp", str(big), str(writable.path / "new" / name))
    assert result.returncode == 0, result.stderr
    image = api.only(name)
    assert image["status"] == "active"
    assert image["size"] == 256 * MiB
    assert image["os_hash_value"] == _sha512(big)
    assert (image["disk_format"], image["container_format"]) == ("raw", "bare")
    # Listed in new/ for a while after the upload, and in the root.
    assert name in os.listdir(writable.path / "new")
    assert (writable.path / name).stat().st_size == 256 * MiB


@pytest.mark.parametrize(
    "how",
    ["tee", "dd", "rsync", "shutil"],
)
def test_every_tool_produces_a_byte_exact_image(
    how: str, api: GlanceAPI, writable: Mount, source: Path, tmp_path: Path
) -> None:
    stem = f"{how}-{uuid.uuid4().hex[:6]}"
    new = writable.path / "new"
    if how == "tee":
        name = stem + ".qcow2"  # random data: stored as raw, which is what it is
        result = tool("sh", "-c", f"cat '{source}' | tee '{new / name}' >/dev/null")
    elif how == "dd":
        name = stem + ".img"
        result = tool("dd", f"if={source}", f"of={new / name}", "bs=4M", "status=none")
    elif how == "rsync":
        name = stem
        local = tmp_path / name
        shutil.copyfile(source, local)
        result = tool("rsync", "-a", str(local), str(new) + "/")
    else:
        name = stem + ".raw"
        shutil.copyfile(source, new / name)
        result = subprocess.CompletedProcess([], 0, "", "")
    assert result.returncode == 0, result.stderr
    image = api.only(name)
    assert image["status"] == "active"
    assert image["os_hash_value"] == _sha512(source)
    assert image["disk_format"] == "raw"
    assert (writable.path / name).read_bytes() == source.read_bytes()
    if how == "rsync":
        temporaries = [i["name"] for i in api.list() if i["name"].startswith(f".{name}.")]
        assert temporaries == []


def test_formats_come_from_the_content(api: GlanceAPI, writable: Mount, tmp_path: Path) -> None:
    qcow2 = tmp_path / "disk.qcow2"
    tool("qemu-img", "create", "-q", "-f", "qcow2", str(qcow2), "64M")
    name = f"real-{uuid.uuid4().hex[:6]}.img"
    assert tool("cp", str(qcow2), str(writable.path / "new" / name)).returncode == 0
    assert api.only(name)["disk_format"] == "qcow2"

    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "hello.txt").write_text("hello\n")
    iso_name = f"cd-{uuid.uuid4().hex[:6]}"
    iso = tmp_path / iso_name
    made = tool("genisoimage", "-quiet", "-o", str(iso), str(tree))
    assert made.returncode == 0, made.stderr
    assert tool("rsync", "-a", str(iso), str(writable.path / "new") + "/").returncode == 0
    image = api.only(iso_name)
    assert (image["status"], image["disk_format"]) == ("active", "iso")

    raw_name = f"plain-{uuid.uuid4().hex[:6]}.vhdx"
    (writable.path / "new" / raw_name).write_bytes(b"\0" * 4096)
    assert api.only(raw_name)["disk_format"] == "raw"


def test_touch_leaves_a_queued_image(api: GlanceAPI, writable: Mount) -> None:
    name = f"empty-{uuid.uuid4().hex[:6]}"
    assert tool("touch", str(writable.path / "new" / name)).returncode == 0
    image = api.only(name)
    assert image["status"] == "queued"
    mode = (writable.path / "new" / name).stat().st_mode
    assert mode & 0o777 == 0o644
    # Writing to it later (any path) uploads the data.
    assert tool("sh", "-c", f"echo data > '{writable.path / name}'").returncode == 0
    assert api.get(image["id"])["status"] == "active"


def test_write_behind_what_was_streamed_is_einval(api: GlanceAPI, writable: Mount) -> None:
    name = f"behind-{uuid.uuid4().hex[:6]}"
    fd = os.open(writable.path / "new" / name, os.O_WRONLY | os.O_CREAT)
    try:
        os.write(fd, b"a" * (8 * MiB))  # in order: streamed to Glance
        os.pwrite(fd, b"b" * 4096, 10 * MiB)  # past the end: a hole, accepted
        with pytest.raises(OSError) as refused:
            os.pwrite(fd, b"c" * 4096, 0)
        assert refused.value.errno == errno.EINVAL
    finally:
        with pytest.raises(OSError):
            os.close(fd)  # close reports the failure too
    assert api.list(name=name) == []  # the image it created is gone
    assert "streamed to Glance already" in writable.log()


def test_write_behind_before_anything_was_sent_is_spooled(api: GlanceAPI, writable: Mount) -> None:
    name = f"spooled-{uuid.uuid4().hex[:6]}"
    fd = os.open(writable.path / "new" / name, os.O_RDWR | os.O_CREAT)
    try:
        os.write(fd, b"a" * 4096)
        os.pwrite(fd, b"b" * 4096, 10 * MiB)
        os.pwrite(fd, b"c" * 4096, 0)  # behind: the upload goes to the spool
        assert os.pread(fd, 8192, 0) == b"c" * 4096 + bytes(4096)
    finally:
        os.close(fd)
    expected = b"c" * 4096 + bytes(10 * MiB - 4096) + b"b" * 4096
    image = api.only(name)
    assert (image["status"], image["size"]) == ("active", len(expected))
    assert image["os_hash_value"] == hashlib.sha512(expected).hexdigest()


def test_writing_an_active_image_is_eacces(api: GlanceAPI, writable: Mount) -> None:
    image = api.create(f"frozen-{uuid.uuid4().hex[:6]}", b"original")
    path = writable.path / "by-id" / image["id"]
    for flags in (os.O_WRONLY, os.O_WRONLY | os.O_TRUNC, os.O_RDWR):
        with pytest.raises(PermissionError):
            os.open(path, flags)
    with pytest.raises(PermissionError):
        os.truncate(path, 0)
    after = api.get(image["id"])
    assert (after["status"], after["size"], after["checksum"]) == (
        "active",
        8,
        image["checksum"],
    )
    assert "only queued images take data" in writable.log()


def test_rm_needs_allow_delete(
    api: GlanceAPI, glance: GlanceServer, mount_glancefs: MountFactory
) -> None:
    image = api.create(f"keep-{uuid.uuid4().hex[:6]}", b"x")
    plain = mount_glancefs(glance.url, name="plain")
    with pytest.raises(PermissionError) as refused:
        os.unlink(plain.path / image["name"])
    assert refused.value.errno == errno.EPERM
    assert api.exists(image["id"])
    deleting = mount_glancefs(glance.url, "--allow-delete", name="deleting")
    os.unlink(deleting.path / image["name"])
    assert not api.exists(image["id"])
    with pytest.raises(FileNotFoundError):
        os.stat(deleting.path / image["name"])


def test_protected_image_cannot_be_removed(api: GlanceAPI, writable: Mount) -> None:
    image = api.create(f"guarded-{uuid.uuid4().hex[:6]}", b"x", protected=True)
    with pytest.raises(PermissionError):
        os.unlink(writable.path / image["name"])
    assert api.exists(image["id"])
    api.delete(image["id"])


def test_mv_renames_within_a_directory(api: GlanceAPI, writable: Mount) -> None:
    image = api.create(f"before-{uuid.uuid4().hex[:6]}", b"x")
    after = f"after-{uuid.uuid4().hex[:6]}"
    assert (
        tool("mv", str(writable.path / image["name"]), str(writable.path / after)).returncode == 0
    )
    assert api.get(image["id"])["name"] == after


def test_fixed_tree_refusals(api: GlanceAPI, writable: Mount) -> None:
    image = api.create(f"tree-{uuid.uuid4().hex[:6]}", b"x")
    refusals: dict[str, Callable[[], object]] = {
        "mkdir": lambda: os.mkdir(writable.path / "dir"),
        # In new/, a symlink to an http(s) URL is a web-download (test_stores_import.py).
        "symlink": lambda: os.symlink("https://example.org/x.raw", writable.path / "link"),
        "link": lambda: os.link(writable.path / image["name"], writable.path / "new" / "hard"),
        "rmdir": lambda: os.rmdir(writable.path / "by-id"),
    }
    for what, call in refusals.items():
        with pytest.raises(OSError) as refused:
            call()
        assert refused.value.errno == errno.EPERM, what
    with pytest.raises(OSError) as outside:
        os.open(writable.path / "not-in-new", os.O_WRONLY | os.O_CREAT)
    assert outside.value.errno == errno.EPERM


def test_chmod_chown_utime_are_accepted(api: GlanceAPI, writable: Mount, tmp_path: Path) -> None:
    image = api.create(f"meta-{uuid.uuid4().hex[:6]}", b"x")
    path = writable.path / image["name"]
    os.chmod(path, 0o600)
    os.chown(path, 1000, 1000)
    os.utime(path, (0, 0))
    assert path.stat().st_mode & 0o777 == 0o444  # the lifecycle decides, not chmod
    local = tmp_path / f"copied-{uuid.uuid4().hex[:6]}"
    local.write_bytes(b"payload")
    assert tool("cp", "-p", str(local), str(writable.path / "new") + "/").returncode == 0
    assert api.only(local.name)["status"] == "active"


def test_read_only_mount_refuses_every_change(
    api: GlanceAPI, glance: GlanceServer, mount_glancefs: MountFactory
) -> None:
    image = api.create(f"ro-{uuid.uuid4().hex[:6]}", b"x")
    mount = mount_glancefs(glance.url, "--read-only", "--allow-delete")
    path = mount.path / image["name"]
    calls: list[Callable[[], object]] = [
        lambda: os.open(mount.path / "new" / "nope", os.O_WRONLY | os.O_CREAT),
        lambda: os.unlink(path),
        lambda: os.rename(path, mount.path / "renamed"),
        lambda: os.setxattr(path, "user.os_distro", b"x"),
        lambda: os.mkdir(mount.path / "d"),
    ]
    for call in calls:
        with pytest.raises(OSError) as refused:
            call()
        assert refused.value.errno == errno.EROFS
    assert api.get(image["id"])["name"] == image["name"]


def test_read_only_mount_shows_no_write_bit(
    api: GlanceAPI, glance: GlanceServer, mount_glancefs: MountFactory
) -> None:
    queued = api.create(f"ro-queued-{uuid.uuid4().hex[:6]}")
    mount = mount_glancefs(glance.url, "--read-only")
    for path in (mount.path / queued["name"], mount.path / "new" / queued["name"]):
        assert os.stat(path).st_mode & 0o777 == 0o444, path
    assert os.stat(mount.path / "new").st_mode & 0o777 == 0o555


def test_xattr_round_trips(api: GlanceAPI, writable: Mount) -> None:
    image = api.create(f"props-{uuid.uuid4().hex[:6]}", b"x", tags=["old"])
    path = writable.path / image["name"]
    assert tool("setfattr", "-n", "user.os_distro", "-v", "ubuntu", str(path)).returncode == 0
    assert os.getxattr(path, "user.os_distro") == b"ubuntu"
    assert api.get(image["id"])["os_distro"] == "ubuntu"
    os.setxattr(path, "user.os_distro", b"debian")
    assert api.get(image["id"])["os_distro"] == "debian"
    assert tool("setfattr", "-x", "user.os_distro", str(path)).returncode == 0
    assert "os_distro" not in api.get(image["id"])
    with pytest.raises(OSError) as missing:
        os.removexattr(path, "user.os_distro")
    assert missing.value.errno == errno.ENODATA

    os.setxattr(path, "user.tags", b"a,b")
    assert sorted(api.get(image["id"])["tags"]) == ["a", "b"]
    os.setxattr(path, "user.tags.add", b"c")
    os.setxattr(path, "user.tags.remove", b"a")
    assert sorted(api.get(image["id"])["tags"]) == ["b", "c"]
    assert os.getxattr(path, "user.tags") == b"b,c"

    os.setxattr(path, "user.min_ram", b"512")
    os.setxattr(path, "user.protected", b"true")
    record = api.get(image["id"])
    assert (record["min_ram"], record["protected"]) == (512, True)
    assert os.getxattr(path, "user.protected") == b"true"
    os.setxattr(path, "user.protected", b"false")


@pytest.mark.parametrize(
    ("name", "value", "code"),
    [
        ("user.min_ram", b"lots", errno.EINVAL),
        ("user.min_ram", b"-1", errno.EINVAL),
        ("user.protected", b"maybe", errno.EINVAL),
        ("user.visibility", b"everyone", errno.EINVAL),
        ("user.os_distro", b"\xff\xfe", errno.EINVAL),
        ("user.id", b"0000", errno.EPERM),
        ("user.status", b"active", errno.EPERM),
        ("user.size", b"1", errno.EPERM),
        ("trusted.thing", b"x", errno.ENOTSUP),
        ("security.thing", b"x", errno.ENOTSUP),
    ],
)
def test_bad_xattr_changes_are_refused(
    name: str, value: bytes, code: int, api: GlanceAPI, writable: Mount
) -> None:
    image = api.create(f"strict-{uuid.uuid4().hex[:6]}", b"x", min_ram=64)
    with pytest.raises(OSError) as refused:
        os.setxattr(writable.path / image["name"], name, value)
    assert refused.value.errno == code
    after = api.get(image["id"])
    assert (after["min_ram"], after["protected"], after["visibility"]) == (
        64,
        False,
        image["visibility"],
    )


@pytest.fixture
def own_glance(tmp_path: Path) -> Iterator[GlanceServer]:
    server = GlanceServer(
        tmp_path / "glance",
        flavor="noauth",
        conf_overrides={"DEFAULT": {"image_property_quota": "4"}},
    )
    with server:
        yield server


def test_property_quota_gives_enospc(
    own_glance: GlanceServer, mount_glancefs: MountFactory
) -> None:
    api = GlanceAPI(own_glance.url)
    image = api.create("quota", b"x", a="1", b="2")
    mount = mount_glancefs(own_glance.url)
    path = mount.path / "quota"
    os.setxattr(path, "user.c", b"3")

    def set_three_more() -> None:
        for key in ("d", "e", "f"):
            os.setxattr(path, f"user.{key}", b"x")

    with pytest.raises(OSError) as full:
        set_three_more()
    assert full.value.errno == errno.ENOSPC
    assert len([k for k in api.get(image["id"]) if len(k) == 1]) <= 4


def test_glance_killed_during_tee(
    own_glance: GlanceServer, mount_glancefs: MountFactory, source: Path
) -> None:
    api = GlanceAPI(own_glance.url)
    mount = mount_glancefs(own_glance.url, "--timeout", "5", "--retries", "1")
    target = mount.path / "new" / "interrupted.raw"
    tee = subprocess.Popen(
        ["tee", str(target)], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )  # fmt: skip
    assert tee.stdin is not None
    data = source.read_bytes()
    try:
        tee.stdin.write(data[: 4 * MiB])
        tee.stdin.flush()
        time.sleep(1)
        own_glance.kill()
        for offset in range(4 * MiB, len(data), MiB):
            tee.stdin.write(data[offset : offset + MiB])
        tee.stdin.close()
    except BrokenPipeError:
        pass
    assert tee.wait(timeout=60) != 0
    own_glance.start()
    assert [i for i in api.list() if i["status"] == "active"] == []
    again = tool("sh", "-c", f"cat '{source}' | tee '{target}' >/dev/null")
    assert again.returncode == 0, again.stderr
    active = [i for i in api.list() if i["status"] == "active"]
    assert [i["os_hash_value"] for i in active] == [_sha512(source)]


def test_spool_dir_accepts_random_writes(
    api: GlanceAPI, glance: GlanceServer, mount_glancefs: MountFactory, tmp_path: Path
) -> None:
    spool = tmp_path / "spool"
    spool.mkdir()
    mount = mount_glancefs(glance.url, "--spool-dir", str(spool))
    name = f"spooled-{uuid.uuid4().hex[:6]}"
    expected = bytearray(3 * MiB)
    fd = os.open(mount.path / "new" / name, os.O_WRONLY | os.O_CREAT)
    try:
        for offset in (2 * MiB, 0, MiB, 5):  # backwards and overlapping
            chunk = random.randbytes(MiB)
            os.pwrite(fd, chunk, offset)
            expected[offset : offset + MiB] = chunk
        assert os.listdir(spool) == []  # the spool file is unlinked from the start
    finally:
        os.close(fd)
    image = api.only(name)
    assert image["status"] == "active"
    assert image["os_hash_value"] == hashlib.sha512(expected).hexdigest()


@pytest.fixture
def capped_glance(tmp_path: Path) -> Iterator[GlanceServer]:
    with GlanceServer(
        tmp_path / "glance",
        flavor="noauth",
        conf_overrides={"DEFAULT": {"image_size_cap": "2097152"}},
    ) as server:
        yield server


def test_size_cap_gives_enospc_and_leaves_nothing(
    capped_glance: GlanceServer, mount_glancefs: MountFactory
) -> None:
    api = GlanceAPI(capped_glance.url)
    mount = mount_glancefs(capped_glance.url)
    fd = os.open(mount.path / "new" / "too-big.raw", os.O_WRONLY | os.O_CREAT)

    def write_4_mib_and_close() -> None:
        try:
            for _ in range(4):
                os.write(fd, random.randbytes(MiB))
        finally:
            os.close(fd)

    with pytest.raises(OSError) as refused:
        write_4_mib_and_close()
    assert refused.value.errno == errno.ENOSPC, refused.value
    assert api.list() == []
    assert "413" in mount.log()
