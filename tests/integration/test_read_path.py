"""The read path end to end: a real Glance, a real mount, the tools a user would run."""

from __future__ import annotations

import errno
import hashlib
import mmap
import os
import random
import signal
import stat
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import MountFactory
from support import GlanceAPI, Mount, metrics, tool

import glancefs
from lab.servers import GlanceServer, free_port

MiB = 1024 * 1024


@pytest.fixture(scope="module")
def big_image(api: GlanceAPI, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    """A 64 MiB image of random bytes, and a local copy of its data."""
    data = random.Random(64).randbytes(64 * MiB)
    source = tmp_path_factory.mktemp("data") / "big.raw"
    source.write_bytes(data)
    return api.create(f"big-{uuid.uuid4().hex[:6]}", data), source


def test_ls_l_agrees_with_glance(api: GlanceAPI, mounted: Mount) -> None:
    tag = uuid.uuid4().hex[:8]
    plain = api.create(f"plain-{tag}", b"x" * 1000)
    twins = [api.create(f"twin-{tag}", b"y" * 10) for _ in range(2)]
    slashed = api.create(f"a/b-{tag}", b"z")
    empty = api.create("", b"e" * 7)
    queued = api.create(f"queued-{tag}")
    deactivated = api.create(f"off-{tag}", b"d")
    api.http.post(f"/v2/images/{deactivated['id']}/actions/deactivate").raise_for_status()

    entries = {}
    for line in mounted.run("ls", "-l", "--time-style=+%s").splitlines()[1:]:
        mode, _links, _user, _group, size, mtime, name = line.split(None, 6)
        entries[name] = (mode, int(size), int(mtime))

    expected = {
        f"plain-{tag}": (plain, "-r--r--r--", 1000),
        f"twin-{tag}~{twins[0]['id'][:8]}": (twins[0], "-r--r--r--", 10),
        f"twin-{tag}~{twins[1]['id'][:8]}": (twins[1], "-r--r--r--", 10),
        f"a\u2215b-{tag}": (slashed, "-r--r--r--", 1),
        empty["id"]: (empty, "-r--r--r--", 7),
        f"queued-{tag}": (queued, "-rw-r--r--", 0),
        f"off-{tag}": (deactivated, "----------", 1),
    }
    for name, (image, expected_mode, expected_size) in expected.items():
        assert entries[name][:2] == (expected_mode, expected_size), name
        updated = api.get(image["id"])["updated_at"]
        assert abs(entries[name][2] - _epoch(updated)) <= 1
    assert f"twin-{tag}" not in entries
    # Every image Glance lists is there, and nothing else but the three directories.
    glance_count = len(api.list())
    assert len(entries) == glance_count + 3
    assert {n for n, e in entries.items() if e[0].startswith("d")} == {"by-id", "by-tag", "new"}
    assert (mounted.path / "by-id" / plain["id"]).stat().st_size == 1000
    assert mounted.run("ls", "by-tag").split() == sorted({t for i in api.list() for t in i["tags"]})


def _epoch(timestamp: str) -> int:
    from datetime import datetime

    return int(datetime.fromisoformat(timestamp.replace("Z", "+00:00")).timestamp())


def test_inode_is_stable_per_image(api: GlanceAPI, mounted: Mount) -> None:
    image = api.create(f"ino-{uuid.uuid4().hex[:6]}", b"abc", tags=["ino"])
    by_name = (mounted.path / image["name"]).stat()
    by_id = (mounted.path / "by-id" / image["id"]).stat()
    by_tag = (mounted.path / "by-tag" / "ino" / image["name"]).stat()
    assert by_name.st_ino == by_id.st_ino == by_tag.st_ino
    assert stat.S_ISREG(by_name.st_mode)
    assert by_name.st_uid == os.getuid()


def test_sequential_reads_are_byte_identical(big_image: tuple[dict, Path], mounted: Mount) -> None:
    image, source = big_image
    path = mounted.path / "by-id" / image["id"]
    expected = hashlib.sha256(source.read_bytes()).hexdigest()
    assert tool("sh", "-c", f"cat '{path}' | sha256sum").stdout.split()[0] == expected
    dd = tool("sh", "-c", f"dd if='{path}' bs=1M status=none | sha256sum")
    assert dd.stdout.split()[0] == expected


async def test_api_reads_large_data_around_h11(glance: GlanceServer, api: GlanceAPI) -> None:
    # From 4 MiB on, a body is read straight from the connection, which is closed after it: the
    # data must be exact whatever the range, and the client must go on working after it.
    payload = random.Random(9).randbytes(9 * MiB + 123)
    image = api.create(f"direct-{uuid.uuid4().hex[:6]}", payload)

    async def read(offset: int = 0, length: int | None = None, verify: bool = True) -> bytes:
        chunks = client.images.data(image["id"], offset=offset, length=length, verify=verify)
        return b"".join([chunk async for chunk in chunks])

    async with glancefs.Client(endpoint=glance.url) as client:
        for _ in range(2):
            assert await read() == payload
        assert await read(offset=MiB + 5) == payload[MiB + 5 :]
        assert await read(offset=7, length=5 * MiB) == payload[7 : 7 + 5 * MiB]
        assert await read(offset=7, length=100) == payload[7:107]
        assert (await client.images.get(image["id"])).size == len(payload)

        stored = glance.store_dir / image["id"]
        stored.write_bytes(payload[:-1] + bytes([payload[-1] ^ 1]))
        with pytest.raises(glancefs.IntegrityError, match=image["id"]):
            await read()
        assert await read(verify=False) == stored.read_bytes()


def test_random_reads_equal_the_source(big_image: tuple[dict, Path], mounted: Mount) -> None:
    image, source = big_image
    data = source.read_bytes()
    path = mounted.path / "by-id" / image["id"]
    rng = random.Random(7)
    fd = os.open(path, os.O_RDONLY)
    try:
        for _ in range(60):
            offset = rng.randrange(0, len(data))
            size = rng.choice([1, 512, 4096, 65536, 3 * MiB])
            assert os.pread(fd, size, offset) == data[offset : offset + size], (offset, size)
        assert os.pread(fd, 4096, len(data)) == b""
        assert os.pread(fd, 4096, len(data) + 10 * MiB) == b""
        assert os.pread(fd, 100, len(data) - 10) == data[-10:]
    finally:
        os.close(fd)
    out = tool("sh", "-c", f"dd if='{path}' bs=1M skip=40 count=3 status=none | sha256sum")
    assert out.stdout.split()[0] == hashlib.sha256(data[40 * MiB : 43 * MiB]).hexdigest()


def test_qemu_img_info_reports_virtual_size(api: GlanceAPI, mounted: Mount, tmp_path: Path) -> None:
    qcow2 = tmp_path / "disk.qcow2"
    assert tool("qemu-img", "create", "-q", "-f", "qcow2", str(qcow2), "1G").returncode == 0
    image = api.create(f"disk-{uuid.uuid4().hex[:6]}", qcow2.read_bytes(), disk_format="qcow2")
    info = tool("qemu-img", "info", "--output=human", str(mounted.path / image["name"]))
    assert info.returncode == 0, info.stderr
    assert "virtual size: 1 GiB (1073741824 bytes)" in info.stdout
    assert "file format: qcow2" in info.stdout


def test_empty_and_queued_images_read_as_empty(api: GlanceAPI, mounted: Mount) -> None:
    queued = api.create(f"q-{uuid.uuid4().hex[:6]}")
    assert (mounted.path / "by-id" / queued["id"]).read_bytes() == b""
    assert queued["name"] in os.listdir(mounted.path / "new")


def test_unknown_names_are_enoent(mounted: Mount) -> None:
    for path in ("no-such-image", f"by-id/{uuid.uuid4()}", "by-tag/no-such-tag", "by-id/x/y"):
        with pytest.raises(FileNotFoundError):
            os.stat(mounted.path / path)


def test_xattrs_show_the_record(api: GlanceAPI, mounted: Mount) -> None:
    image = api.create(
        f"attrs-{uuid.uuid4().hex[:6]}", b"data", tags=["alpha", "beta"], os_distro="cirros"
    )
    dump = mounted.run("getfattr", "-d", image["name"])
    for field in ("id", "status", "checksum", "os_hash_value", "disk_format"):
        assert f'user.{field}="{image[field]}"' in dump
    assert 'user.tags="alpha,beta"' in dump
    assert 'user.os_distro="cirros"' in dump
    assert os.getxattr(mounted.path / image["name"], "user.os_distro") == b"cirros"
    with pytest.raises(OSError) as missing:
        os.getxattr(mounted.path / image["name"], "user.no_such_property")
    assert missing.value.errno == errno.ENODATA
    with pytest.raises(OSError) as other_namespace:
        os.getxattr(mounted.path / image["name"], "security.selinux")
    assert other_namespace.value.errno == errno.ENOTSUP


def test_corrupt_data_fails_the_full_read(
    api: GlanceAPI, glance: GlanceServer, mounted: Mount
) -> None:
    image = api.create(f"corrupt-{uuid.uuid4().hex[:6]}", random.randbytes(3 * MiB))
    stored = glance.store_dir / image["id"]
    with open(stored, "r+b") as f:
        f.seek(MiB + 5)
        byte = f.read(1)
        f.seek(MiB + 5)
        f.write(bytes([byte[0] ^ 0xFF]))
    result = tool("cat", str(mounted.path / "by-id" / image["id"]))
    assert result.returncode != 0
    assert "Input/output error" in result.stderr
    lines = [line for line in mounted.log().splitlines() if image["id"] in line and "EIO" in line]
    assert lines
    assert "sha512" in lines[0]
    assert "corrupt" in lines[0]
    assert "Traceback" not in mounted.log()


def test_direct_io_serves_every_read_past_the_page_cache(
    api: GlanceAPI, glance: GlanceServer, big_image: tuple[dict, Path], mount_glancefs: MountFactory
) -> None:
    """--direct-io: cat and dd get the image's bytes and every read of them reaches the mount
    (nothing is left in the page cache to serve a second read); a corrupt image still fails its
    full read; mmap works privately, and MAP_SHARED is refused with ENODEV."""
    image, source = big_image
    port = free_port()
    mount = mount_glancefs(glance.url, "--direct-io", "--metrics-addr", f"127.0.0.1:{port}")
    path = mount.path / "by-id" / image["id"]
    expected = hashlib.sha256(source.read_bytes()).hexdigest()
    before = metrics(port)["glancefs_served_bytes_total"]
    for command in (f"cat '{path}' | sha256sum", f"dd if='{path}' bs=4M status=none | sha256sum"):
        assert tool("sh", "-c", command).stdout.split()[0] == expected
    assert metrics(port)["glancefs_served_bytes_total"] - before == 2 * image["size"]
    with open(path, "rb") as f:
        with pytest.raises(OSError) as refused:
            mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        assert refused.value.errno == errno.ENODEV
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) as mapped:
            assert mapped[MiB : MiB + 4096] == source.read_bytes()[MiB : MiB + 4096]
    corrupt = api.create(f"corrupt-dio-{uuid.uuid4().hex[:6]}", random.randbytes(3 * MiB))
    stored = glance.store_dir / corrupt["id"]
    data = bytearray(stored.read_bytes())
    data[2 * MiB] ^= 0xFF
    stored.write_bytes(data)
    result = tool("dd", f"if={mount.path / 'by-id' / corrupt['id']}", "of=/dev/null", "bs=1M")
    assert result.returncode != 0
    assert "Input/output error" in result.stderr


def test_no_verify_reads_corrupt_data(
    api: GlanceAPI, glance: GlanceServer, mount_glancefs: MountFactory
) -> None:
    image = api.create(f"unverified-{uuid.uuid4().hex[:6]}", b"a" * 1000)
    (glance.store_dir / image["id"]).write_bytes(b"b" * 1000)
    mount = mount_glancefs(glance.url, "--no-verify")
    assert (mount.path / "by-id" / image["id"]).read_bytes() == b"b" * 1000


@pytest.fixture
def own_glance(tmp_path: Path) -> Iterator[GlanceServer]:
    """A Glance of this test's own, which it may stop, pause and restart."""
    server = GlanceServer(tmp_path / "glance", flavor="noauth")
    server.start()
    yield server
    if server.running and server.pid is not None:
        os.killpg(server.pid, signal.SIGCONT)
    server.stop()


def test_server_down_gives_eio_then_recovers(
    own_glance: GlanceServer, mount_glancefs: MountFactory
) -> None:
    api = GlanceAPI(own_glance.url)
    data = random.randbytes(8 * MiB)
    image = api.create("survivor", data)
    mount = mount_glancefs(own_glance.url, "--timeout", "2", "--retries", "1")
    path = mount.path / "by-id" / image["id"]
    fd = os.open(path, os.O_RDONLY)
    try:
        assert os.pread(fd, 4096, 0) == data[:4096]
        own_glance.stop()
        started = time.monotonic()
        with pytest.raises(OSError) as failure:
            os.pread(fd, 4096, 6 * MiB)
        assert failure.value.errno == errno.EIO
        assert time.monotonic() - started < 10
        own_glance.start()
        assert os.pread(fd, 4096, 6 * MiB) == data[6 * MiB : 6 * MiB + 4096]
    finally:
        os.close(fd)
    assert (mount.path / "survivor").read_bytes() == data


def test_hanging_server_gives_eio_within_the_timeout(
    own_glance: GlanceServer, mount_glancefs: MountFactory
) -> None:
    api = GlanceAPI(own_glance.url)
    data = random.randbytes(4 * MiB)
    image = api.create("sleepy", data)
    mount = mount_glancefs(own_glance.url, "--timeout", "2", "--retries", "1")
    fd = os.open(mount.path / "by-id" / image["id"], os.O_RDONLY)
    assert own_glance.pid is not None
    try:
        os.killpg(own_glance.pid, signal.SIGSTOP)
        started = time.monotonic()
        with pytest.raises(OSError) as failure:
            os.pread(fd, 4096, 3 * MiB)
        elapsed = time.monotonic() - started
        assert failure.value.errno == errno.EIO
        assert 1.5 < elapsed < 10, elapsed
        os.killpg(own_glance.pid, signal.SIGCONT)
        # Reads of the image fail at once for a moment after a failure (the kernel retries
        # a failed readahead page): then they work again.
        deadline = time.monotonic() + 5
        while True:
            try:
                assert os.pread(fd, 4096, 3 * MiB) == data[3 * MiB : 3 * MiB + 4096]
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
    finally:
        os.close(fd)
