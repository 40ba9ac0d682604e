"""Operating glancefs: `glancefs status`, `--metrics-addr`, `glancefs umount` of a dead mount, the
man page and `make install`. Real Glance, real mounts, the installed command as a user runs it."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import re
import signal
import socket
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO, MountFactory
from support import GLANCEFS, GlanceAPI, Mount, default_sigint, metrics, tool

from glancefs.fs import control
from lab.faults import FaultProxy
from lab.servers import GlanceServer, free_port

MiB = 1024 * 1024


def _wait_for(condition: Callable[[], Any], timeout: float = 30.0) -> Any:
    """The first true value of ``condition()``; fails after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"not within {timeout} s: {condition}")


def _status(*args: str) -> subprocess.CompletedProcess[str]:
    return tool(GLANCEFS, "status", *args, timeout=60)


def _status_json(mount: Mount) -> dict[str, Any]:
    result = _status("--json", str(mount.path))
    assert result.returncode == 0, result.stdout + result.stderr
    (entry,) = json.loads(result.stdout)
    assert isinstance(entry, dict)
    return entry


def _mounted_paths() -> set[str]:
    return {line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()}


def test_status_lists_a_mount_through_a_private_socket(
    glance: GlanceServer, mounted: Mount
) -> None:
    listing = _status()
    assert f"{mounted.path}: ok (pid {mounted.proc.pid}" in listing.stdout  # type: ignore[union-attr]
    entry = _status_json(mounted)
    assert entry["state"] == "ok"
    assert entry["mountpoint"] == str(mounted.path)
    snapshot = entry["status"]
    assert snapshot["endpoint"] == glance.url
    assert snapshot["pid"] == mounted.proc.pid  # type: ignore[union-attr]
    assert snapshot["options"]["sort"] == "name:asc"
    assert snapshot["options"]["ro"] is False
    assert snapshot["healthy"]
    assert snapshot["cache"] is None
    # Only this user can reach it; it is not in the mount.
    path = control.socket_path(str(mounted.path))
    assert stat.S_ISSOCK(path.stat().st_mode)
    assert path.stat().st_mode & 0o777 == 0o600
    assert path.parent.stat().st_mode & 0o777 == 0o700
    assert not any(name.endswith(".sock") for name in os.listdir(mounted.path))
    # --watch redraws until Ctrl-C, then exits 130.
    watch = subprocess.Popen(
        [GLANCEFS, "status", "--watch", "--interval", "0.1", str(mounted.path)],
        stdout=subprocess.PIPE, text=True, preexec_fn=default_sigint,
    )  # fmt: skip
    assert watch.stdout is not None
    frames = 0
    for line in watch.stdout:
        frames += line.startswith(f"{mounted.path}: ok")
        if frames == 3:
            break
    watch.send_signal(signal.SIGINT)
    assert watch.wait(20) == 130
    mounted.stop()
    assert not path.exists()
    result = _status(str(mounted.path))
    assert result.returncode == 1
    assert "not a glancefs mount" in result.stdout


def test_status_shows_a_paced_upload_with_its_bytes(
    glance: GlanceServer, api: GlanceAPI, mount_glancefs: MountFactory, tmp_path: Path
) -> None:
    mount = mount_glancefs(glance.url)
    name = f"paced-{uuid.uuid4().hex[:6]}.raw"
    source = tmp_path / "source.bin"
    data = random.Random(16).randbytes(16 * MiB)
    source.write_bytes(data)
    # Its own process: a child that `glancefs status` forks from this one would close (FUSE
    # flush) an inherited descriptor, and a flush finishes an upload.
    writer = subprocess.Popen(
        [sys.executable, "-c", _PACED_WRITER, str(source), str(mount.path / "new" / name)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert writer.stdin is not None
    assert writer.stdout is not None
    try:
        assert writer.stdout.readline() == "paused\n"

        def upload_shown() -> dict[str, Any] | None:
            transfers = _status_json(mount)["status"]["transfers"]
            return next((t for t in transfers if t["name"] == name and t["done"] > 0), None)

        shown = _wait_for(upload_shown)
        assert shown["direction"] == "upload"
        assert shown["total"] is None
        assert MiB <= shown["done"] <= 7 * MiB
        text = _status(str(mount.path))
        assert text.returncode == 0
        line = rf"upload +{re.escape(name)} \([0-9a-f-]{{36}}\)  \d+\.\d MiB  [\d.]+ \S+/s"
        assert re.search(line, text.stdout), text.stdout
    finally:
        writer.stdin.write("go on\n")
        writer.stdin.close()
        assert writer.wait(120) == 0
    (image,) = api.list(name=name)
    assert image["status"] == "active"
    assert image["size"] == len(data)
    assert image["os_hash_value"] == hashlib.sha512(data).hexdigest()
    snapshot = _status_json(mount)["status"]
    assert [t for t in snapshot["transfers"] if t["name"] == name] == []
    assert snapshot["counters"]["uploads"] == {"uploaded": 1}
    assert snapshot["counters"]["bytes_uploaded"] == len(data)


#: Writes argv[1] to argv[2], 1 MiB every 0.2 s; after 7 MiB it says so and waits for a line.
_PACED_WRITER = """
import sys, time
data = open(sys.argv[1], "rb").read()
with open(sys.argv[2], "wb", buffering=0) as f:
    for offset in range(0, len(data), 1 << 20):
        f.write(data[offset : offset + (1 << 20)])
        if offset == 6 << 20:
            print("paused", flush=True)
            sys.stdin.readline()
        time.sleep(0.2)
"""


def test_metrics_count_the_bytes_of_an_image_just_read(
    glance: GlanceServer, api: GlanceAPI, mount_glancefs: MountFactory
) -> None:
    port = free_port()
    mount = mount_glancefs(glance.url, "--metrics-addr", f"127.0.0.1:{port}")
    data = random.Random(3).randbytes(3 * MiB + 5)
    image = api.create(f"metrics-{uuid.uuid4().hex[:6]}", data)
    before = metrics(port)
    assert (mount.path / "by-id" / image["id"]).read_bytes() == data
    after = metrics(port)
    assert after["glancefs_read_bytes_total"] - before["glancefs_read_bytes_total"] == len(data)
    assert after["glancefs_served_bytes_total"] - before["glancefs_served_bytes_total"] == len(data)
    gets = 'glancefs_requests_total{method="GET",status="200"}'
    assert after[gets] > before[gets]  # the image's download at least
    assert after["glancefs_open_files"] == 0
    assert after["glancefs_streams"] == 0
    for series in ("glancefs_uploaded_bytes_total", "glancefs_cache_hits_total",
                   "glancefs_cache_misses_total", "glancefs_uptime_seconds"):  # fmt: skip
        assert series in after
    # A refusal is counted by errno.
    with pytest.raises(PermissionError):
        os.unlink(mount.path / "by-id" / image["id"])
    assert metrics(port)['glancefs_errors_total{errno="EPERM"}'] >= 1
    assert api.get(image["id"])["status"] == "active"
    assert _status_json(mount)["status"]["options"]["metrics"] == f"127.0.0.1:{port}"
    mount.stop()
    assert tool("curl", "-sf", f"http://127.0.0.1:{port}/metrics").returncode != 0


def test_metrics_port_taken_fails_the_mount_in_one_line(
    glance: GlanceServer, tmp_path: Path
) -> None:
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = tool(
            GLANCEFS, "mount", "-f", "--os-image-url", glance.url,
            "--metrics-addr", f"127.0.0.1:{port}", str(mountpoint),
        )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"glancefs: --metrics-addr 127.0.0.1:{port}: Address already in use"
    ]
    assert not os.path.ismount(mountpoint)
    bad = tool(GLANCEFS, "mount", "--metrics-addr", "9464", str(mountpoint))
    assert bad.returncode == 2
    assert "expected HOST:PORT" in bad.stderr


def test_status_is_unhealthy_while_glance_fails(
    glance: GlanceServer, mount_glancefs: MountFactory
) -> None:
    with FaultProxy(glance.url) as proxy:
        mount = mount_glancefs(proxy.url, "--listing-ttl", "0", "--retries", "0")
        assert _status(str(mount.path)).returncode == 0
        down = proxy.fail(503)
        with pytest.raises(OSError) as failed:
            os.listdir(mount.path)
        assert failed.value.errno == errno.EIO
        result = _status(str(mount.path))
        assert result.returncode == 1
        assert f"{mount.path}: unhealthy: Glance failing for" in result.stdout
        assert "GET /v2/images" in result.stdout
        assert "last errors" in result.stdout
        (entry,) = json.loads(_status("--json", str(mount.path)).stdout)
        assert entry["state"] == "unhealthy"
        assert not entry["status"]["healthy"]
        assert entry["status"]["counters"]["errors"] == {"EIO": 1}
        down.remove()  # Glance is back: healthy again after one success
        assert "by-id" in os.listdir(mount.path)
        assert _status(str(mount.path)).returncode == 0


def test_killed_mount_is_dead_for_status_and_umount_cleans_it_up(
    glance: GlanceServer, api: GlanceAPI, mount_glancefs: MountFactory
) -> None:
    image = api.create(f"killed-{uuid.uuid4().hex[:6]}", b"still in Glance")
    mount = mount_glancefs(glance.url)
    assert mount.proc is not None
    assert _status(str(mount.path)).returncode == 0
    mount.proc.send_signal(signal.SIGKILL)
    mount.proc.wait(timeout=20)
    assert str(mount.path) in _mounted_paths()
    result = _status(str(mount.path))
    assert result.returncode == 1
    assert "dead: transport endpoint is not connected" in result.stdout
    (entry,) = json.loads(_status("--json", str(mount.path)).stdout)
    assert entry["state"] == "dead"
    assert entry["status"] is None
    umount = tool(GLANCEFS, "umount", str(mount.path))
    assert umount.returncode == 0, umount.stderr
    assert "was dead" in umount.stderr
    assert "lazily unmounted" in umount.stderr
    assert str(mount.path) not in _mounted_paths()
    assert not control.socket_path(str(mount.path)).exists()
    assert tool(GLANCEFS, "umount", str(mount.path)).returncode == 1  # nothing left to unmount
    assert api.get(image["id"])["status"] == "active"


def _help_options(*command: str) -> set[str]:
    text = tool(GLANCEFS, *command, "--help").stdout
    return set(re.findall(r"(?<![\w-])(--?[a-z][\w-]*)", text.split("Options:", 1)[1]))


def test_man_page_has_every_option_of_help(tmp_path: Path) -> None:
    page = tmp_path / "glancefs.1"
    generated = tool(str(Path(GLANCEFS).with_name("python")), "-m", "glancefs.manpage")
    assert generated.returncode == 0, generated.stderr
    page.write_text(generated.stdout)
    checked = tool("groff", "-man", "-ww", "-z", str(page))
    assert checked.returncode == 0, checked.stderr
    assert checked.stderr == "", checked.stderr
    rendered = subprocess.run(
        ["man", "-l", str(page)], capture_output=True, text=True, check=False,
        env={**os.environ, "MANWIDTH": "200"},
    ).stdout  # fmt: skip
    rendered = re.sub(".\b", "", rendered).replace("\u2010", "-")  # no bold, no soft hyphens
    words = set(re.findall(r"--?[a-z][\w-]*", rendered))
    for command in ([], ["mount"], ["umount"], ["status"]):
        missing = _help_options(*command) - words
        assert not missing, f"glancefs {' '.join(command)}: {sorted(missing)} not in the man page"
    for section in ("LAYOUT", "FSTAB", "SYSTEMD", "ERRORS", "EXIT STATUS"):
        assert f"\n{section}\n" in rendered
    assert "fuse.glancefs" in rendered
    assert "systemctl enable --now glancefs@mycloud" in rendered


def test_make_install_into_a_prefix_and_uninstall(tmp_path: Path) -> None:
    prefix = tmp_path / "prefix"
    installed = tool("make", "-C", str(REPO), "install", f"PREFIX={prefix}", timeout=600)
    assert installed.returncode == 0, installed.stdout + installed.stderr
    binary = prefix / "bin" / "glancefs"
    assert binary.is_symlink()
    assert os.readlink(binary) == str(prefix / "lib/glancefs/bin/glancefs")
    version = tool(str(binary), "--version")
    assert version.returncode == 0
    assert "glancefs, version" in version.stdout
    page = (prefix / "share/man/man1/glancefs.1").read_text()
    assert page.startswith(".TH GLANCEFS 1")
    assert "\\-\\-metrics\\-addr" in page
    completion = (prefix / "share/bash-completion/completions/glancefs").read_text()
    assert "_glancefs_completion" in completion
    assert "complete " in completion
    shown = subprocess.run(
        ["man", "-w", "glancefs"], capture_output=True, text=True, check=False,
        env={**os.environ, "MANPATH": str(prefix / "share/man")},
    )  # fmt: skip
    assert shown.stdout.strip() == str(prefix / "share/man/man1/glancefs.1")
    removed = tool("make", "-C", str(REPO), "uninstall", f"PREFIX={prefix}")
    assert removed.returncode == 0, removed.stderr
    assert [p for p in prefix.rglob("*") if not p.is_dir()] == []
