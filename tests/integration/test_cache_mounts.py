"""The persistent data cache (``--cache-dir``) with real mounts on the session's real Glance."""

from __future__ import annotations

import contextlib
import hashlib
import json
import mmap
import os
import random
import signal
import stat
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import MountFactory
from support import GLANCEFS, GlanceAPI, entry_dir, tool, wait_verified

from lab.faults import FaultProxy
from lab.servers import GlanceServer

MiB = 1024 * 1024


def test_one_mount_per_cache_directory(
    glance: GlanceServer, api: GlanceAPI, mount_glancefs: MountFactory, tmp_path: Path
) -> None:
    """A second mount on a cache directory in use fails with one line; the first is untouched."""
    data = random.Random(15).randbytes(3 * MiB + 5)
    image = api.create(f"cache-lock-{uuid.uuid4().hex[:6]}", data)
    cache_dir = tmp_path / "cache"
    first = mount_glancefs(glance.url, "--cache-dir", str(cache_dir))
    assert stat.S_IMODE(cache_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE((cache_dir / "lock").stat().st_mode) == 0o600

    second = tmp_path / "second"
    second.mkdir()
    refused = tool(
        GLANCEFS, "mount", "--os-image-url", glance.url, str(second), "--cache-dir", str(cache_dir)
    )
    assert refused.returncode == 1
    assert refused.stderr.strip().splitlines() == [
        f"glancefs: cache directory {cache_dir} is in use by another glancefs mount "
        f"(pid {first.proc.pid if first.proc else '?'}); give each mount its own --cache-dir"
    ]
    assert not second.is_mount()
    assert (first.path / "by-id" / image["id"]).read_bytes() == data
    assert api.get(image["id"])["os_hash_value"] == hashlib.sha512(data).hexdigest()

    first.stop()
    mount_glancefs(glance.url, "--cache-dir", str(cache_dir), name="second")


def test_a_cache_directory_open_to_others_is_refused(glance: GlanceServer, tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o755)
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    refused = tool(
        GLANCEFS, "mount", "--os-image-url", glance.url, str(mountpoint), "--cache-dir", str(shared)
    )
    assert refused.returncode == 1
    assert refused.stderr.strip().splitlines() == [
        f"glancefs: cache directory {shared} is open to other users (mode 755): chmod 700 it, "
        "or name a new directory"
    ]
    assert not mountpoint.is_mount()
    assert list(shared.iterdir()) == []


@pytest.fixture
def proxy(glance: GlanceServer) -> Iterator[FaultProxy]:
    """The session's Glance behind a proxy that counts image-data requests."""
    with FaultProxy(glance.url, max_wait=10) as counting:
        yield counting


def make_image(api: GlanceAPI, seed: int, size: int = 24 * MiB + 12345) -> tuple[dict, bytes]:
    data = random.Random(seed).randbytes(size)
    return api.create(f"cache-{seed}-{uuid.uuid4().hex[:6]}", data), data


def read_file(path: Path) -> bytes:
    with path.open("rb") as file:
        return file.read()


def _status_cache(mountpoint: Path) -> dict[str, int]:
    result = tool(GLANCEFS, "status", "--json", str(mountpoint), timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    (entry,) = json.loads(result.stdout)
    cache: dict[str, int] = entry["status"]["cache"]
    return cache


def test_a_remount_reads_from_the_cache_alone(
    proxy: FaultProxy, api: GlanceAPI, mount_glancefs: MountFactory, tmp_path: Path
) -> None:
    """Read, remount, read again: identical bytes and not one image-data request; a second
    image with the same data (another id) costs none either."""
    image, data = make_image(api, 1)
    twin = api.create(f"twin-{uuid.uuid4().hex[:6]}", data)
    cache_dir = tmp_path / "cache"
    first = mount_glancefs(proxy.url, "--cache-dir", str(cache_dir))
    assert read_file(first.path / "by-id" / image["id"]) == data
    assert len(proxy.data_gets(image["id"])) >= 1
    wait_verified(cache_dir, data)
    first.stop()

    proxy.reset_counts()
    second = mount_glancefs(proxy.url, "--cache-dir", str(cache_dir), name="second")
    assert read_file(second.path / "by-id" / image["id"]) == data
    assert read_file(second.path / "by-id" / twin["id"]) == data
    assert proxy.data_gets() == []
    # `glancefs status` shows it (the mount copies the cache's figures in every half second)
    deadline = time.monotonic() + 10
    while (cache := _status_cache(second.path))["hit_bytes"] < 2 * len(data):
        assert time.monotonic() < deadline, cache
        time.sleep(0.1)
    assert cache["misses"] == 0
    assert cache["entries"] == cache["verified_entries"] == 1  # one entry serves both
    for each in (image, twin):
        record = api.get(each["id"])
        assert record["status"] == "active"
        assert record["size"] == len(data)
        assert record["os_hash_value"] == hashlib.sha512(data).hexdigest()


def test_random_reads_fill_the_cache_by_blocks(
    proxy: FaultProxy, api: GlanceAPI, mount_glancefs: MountFactory, tmp_path: Path
) -> None:
    """Random 4 KiB reads fetch the aligned 1 MiB blocks around them; read again after a
    remount they cost nothing."""
    image, data = make_image(api, 2)
    cache_dir = tmp_path / "cache"
    offsets = [random.Random(3).randrange(len(data) // 4096) * 4096 for _ in range(20)]

    def read_at_random(path: Path) -> None:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        try:
            buffer = mmap.mmap(-1, 4096)
            for offset in offsets:
                assert os.preadv(fd, [buffer], offset) == 4096
                assert bytes(buffer) == data[offset : offset + 4096]
        finally:
            os.close(fd)

    first = mount_glancefs(proxy.url, "--cache-dir", str(cache_dir))
    read_at_random(first.path / "by-id" / image["id"])
    gets = proxy.data_gets(image["id"])
    assert 1 <= len(gets) <= len(offsets)
    first.stop()
    proxy.reset_counts()
    second = mount_glancefs(proxy.url, "--cache-dir", str(cache_dir), name="second")
    read_at_random(second.path / "by-id" / image["id"])
    assert proxy.data_gets() == []


@pytest.mark.parametrize("which", ["blocks", "every file"])
def test_every_cache_file_damaged_reads_stay_exact(
    proxy: FaultProxy, api: GlanceAPI, mount_glancefs: MountFactory, tmp_path: Path, which: str
) -> None:
    """One bit flipped in every block file (its header or its data), or in every file of the
    entry (its metadata and manifest too): reads stay exact, then the cache is whole again."""
    image, data = make_image(api, 4)
    cache_dir = tmp_path / "cache"
    first = mount_glancefs(proxy.url, "--cache-dir", str(cache_dir))
    assert read_file(first.path / "by-id" / image["id"]) == data
    wait_verified(cache_dir, data)
    first.stop()
    files = sorted(entry_dir(cache_dir, data).iterdir())
    blocks = [path for path in files if path.suffix == ".blk"]
    assert len(blocks) == 25
    assert len(files) == 27
    for number, path in enumerate(blocks if which == "blocks" else files):
        raw = bytearray(path.read_bytes())
        raw[(number * 7919) % len(raw)] ^= 0x20
        path.write_bytes(raw)
    proxy.reset_counts()
    second = mount_glancefs(proxy.url, "--cache-dir", str(cache_dir), name="second")
    assert read_file(second.path / "by-id" / image["id"]) == data
    if which == "blocks":  # each damaged block is fetched again, alone
        gets = proxy.data_gets(image["id"])
        assert len(gets) == len(blocks)
        assert second.log().count("is damaged") == len(blocks)
    wait_verified(cache_dir, data)
    second.stop()
    proxy.reset_counts()
    third = mount_glancefs(proxy.url, "--cache-dir", str(cache_dir), name="third")
    assert read_file(third.path / "by-id" / image["id"]) == data
    assert proxy.data_gets() == []
    assert api.get(image["id"])["os_hash_value"] == hashlib.sha512(data).hexdigest()


def test_the_size_bound_holds_while_four_images_pass(
    proxy: FaultProxy, api: GlanceAPI, mount_glancefs: MountFactory, tmp_path: Path
) -> None:
    images = [make_image(api, 10 + n, 100 * MiB + n) for n in range(4)]
    cache_dir = tmp_path / "cache"
    mount = mount_glancefs(proxy.url, "--cache-dir", str(cache_dir), "--cache-size", "300M")
    worst = 0
    stop = threading.Event()

    def watch() -> None:
        nonlocal worst
        while not stop.is_set():
            worst = max(worst, disk_usage(cache_dir))
            time.sleep(0.01)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        for image, data in images:
            assert read_file(mount.path / "by-id" / image["id"]) == data
        for image, data in images[::-1]:
            assert read_file(mount.path / "by-id" / image["id"]) == data
    finally:
        stop.set()
        watcher.join()
    assert worst <= 300 * MiB
    assert 200 * MiB < disk_usage(cache_dir) <= 300 * MiB


def disk_usage(cache_dir: Path) -> int:
    total = 0
    for parent, _, names in os.walk(cache_dir):
        for name in names:
            with contextlib.suppress(FileNotFoundError):
                total += os.stat(os.path.join(parent, name)).st_size
    return total


def test_a_mount_killed_during_a_cached_read(
    proxy: FaultProxy, api: GlanceAPI, mount_glancefs: MountFactory, tmp_path: Path
) -> None:
    image, data = make_image(api, 5, 64 * MiB + 3)
    cache_dir = tmp_path / "cache"
    first = mount_glancefs(proxy.url, "--cache-dir", str(cache_dir))
    path = first.path / "by-id" / image["id"]
    reader = subprocess.Popen(["dd", f"if={path}", "of=/dev/null", "bs=1M"])
    deadline = time.monotonic() + 30
    while len(list(entry_dir(cache_dir, data).glob("*.blk"))) < 8:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert first.proc is not None
    first.proc.send_signal(signal.SIGKILL)
    first.proc.wait()
    reader.wait(timeout=30)
    assert reader.returncode != 0  # the read failed with the mount (ENOTCONN), not wrongly
    # The dead mount's connection: os.path.ismount cannot see it any more, so Mount.stop would
    # leave it behind.
    subprocess.run(["fusermount3", "-u", "-z", str(first.path)], check=True)
    proxy.reset_counts()
    second = mount_glancefs(proxy.url, "--cache-dir", str(cache_dir), name="second")
    assert read_file(second.path / "by-id" / image["id"]) == data
    wait_verified(cache_dir, data)
    assert api.get(image["id"])["status"] == "active"
