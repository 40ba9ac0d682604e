"""The persistent data cache (``--cache-dir``) with real mounts on the session's real Glance."""

from __future__ import annotations

import hashlib
import random
import stat
import uuid
from pathlib import Path

from conftest import MountFactory
from support import GLANCEFS, GlanceAPI, tool

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
