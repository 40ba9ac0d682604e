"""The glancefs command as a user runs it: version, errors, background mounts, Ctrl-C, -o."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import MountFactory
from support import GLANCEFS, GlanceAPI, Mount, tool

from glancefs import __version__
from lab.servers import GlanceServer, free_port


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("OS_")}


def _wait_for(condition, timeout: float = 20.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


def test_version() -> None:
    result = tool(GLANCEFS, "--version")
    assert result.returncode == 0
    assert __version__ in result.stdout


def test_unreachable_glance_is_one_line_and_no_mount(tmp_path: Path) -> None:
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    url = f"http://127.0.0.1:{free_port()}"
    result = subprocess.run(
        [GLANCEFS, "mount", "--os-image-url", url, str(mountpoint)],
        capture_output=True, text=True, timeout=60, env=_clean_env(),
    )  # fmt: skip
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("glancefs: cannot use Glance at")
    assert "Traceback" not in result.stderr
    assert not os.path.ismount(mountpoint)


def test_bad_option_is_a_usage_error(glance: GlanceServer, tmp_path: Path) -> None:
    result = tool(
        GLANCEFS, "mount", "--os-image-url", glance.url, "--sort", "colour", str(tmp_path)
    )
    assert result.returncode == 2
    assert "unknown key 'colour'" in result.stderr


def test_background_mount_and_umount(glance: GlanceServer, api: GlanceAPI, tmp_path: Path) -> None:
    image = api.create("background-check", b"hello")
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    log = tmp_path / "glancefs.log"
    argv = [
        GLANCEFS,
        "mount",
        "--os-image-url",
        glance.url,
        "--log-file",
        str(log),
        str(mountpoint),
    ]
    try:
        started = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=_clean_env())
        assert started.returncode == 0, started.stderr
        # The parent returns only once the mount is ready.
        assert os.path.ismount(mountpoint)
        assert (mountpoint / "by-id" / image["id"]).read_bytes() == b"hello"
        assert tool(GLANCEFS, "umount", str(mountpoint)).returncode == 0
        assert not os.path.ismount(mountpoint)
        assert _wait_for(lambda: "unmounted" in log.read_text())
    finally:
        if os.path.ismount(mountpoint):
            subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], check=False)


def test_ctrl_c_unmounts_and_exits_130(glance: GlanceServer, tmp_path: Path) -> None:
    mount = Mount(
        tmp_path / "mnt",
        tmp_path / "mount.log",
        [GLANCEFS, "mount", "-f", "--os-image-url", glance.url, str(tmp_path / "mnt")],
    ).start()
    try:
        assert mount.proc is not None
        mount.proc.send_signal(signal.SIGINT)
        assert mount.proc.wait(timeout=20) == 130
        assert not os.path.ismount(mount.path)
    finally:
        mount.stop()


def test_debug_logs_requests_without_the_token(
    glance: GlanceServer, mount_glancefs: MountFactory
) -> None:
    token = "gAAAAA-test-token-that-must-not-leak"
    mount = mount_glancefs(glance.url, "--debug", "--os-auth-token", token)
    os.listdir(mount.path)
    log = mount.log()
    assert "curl -g -i -X GET" in log
    assert " -> 200 in " in log
    assert "X-Auth-Token: {SHA256}" in log
    assert token not in log


def test_dash_o_options(glance: GlanceServer, api: GlanceAPI, mount_glancefs: MountFactory) -> None:
    api.create("o-option-check", b"x", tags=["o-tag"])
    mount = mount_glancefs(glance.url, "-o", "ro,tag=o-tag,_netdev,nofail,metadata_ttl=2")
    assert os.listdir(mount.path) == ["by-id", "by-tag", "new", "o-option-check"]
    with pytest.raises(OSError) as refused:
        os.open(mount.path / "new" / "x", os.O_CREAT | os.O_WRONLY)
    assert refused.value.errno == errno.EROFS


def test_systemd_notify_after_the_mount_is_ready(glance: GlanceServer, tmp_path: Path) -> None:
    import socket

    address = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind(address)
        listener.settimeout(30)
        mountpoint = tmp_path / "mnt"
        mountpoint.mkdir()
        proc = subprocess.Popen(
            [GLANCEFS, "mount", "-f", "--os-image-url", glance.url, str(mountpoint)],
            env={**_clean_env(), "NOTIFY_SOCKET": address},
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            assert listener.recv(64) == b"READY=1"
            assert os.path.ismount(mountpoint)
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=20) == 0
            assert not os.path.ismount(mountpoint)


def test_fstab_line_mounts_through_mount_fuse3(
    glance: GlanceServer, api: GlanceAPI, tmp_path: Path
) -> None:
    """An fstab line ``none MNT fuse.glancefs ro,nofail,_netdev,os_image_url=URL,...``: mount(8)
    runs ``mount.fuse3 none MNT -t glancefs -o ...``, which starts ``glancefs none MNT -o ...``
    from PATH (mount(8) itself resets PATH to the system's, e.g. /usr/local/bin: run here
    directly, with the virtualenv's glancefs on PATH)."""
    image = api.create("fstab-check", b"from fstab")
    mountpoint = tmp_path / "fstab"
    mountpoint.mkdir()
    options = f"ro,nofail,_netdev,os_image_url={glance.url},log_file={tmp_path / 'fstab.log'}"
    env = _clean_env() | {"PATH": f"{Path(GLANCEFS).parent}:{os.environ['PATH']}"}
    try:
        mounted = subprocess.run(
            ["mount.fuse3", "none", str(mountpoint), "-t", "glancefs", "-o", options],
            capture_output=True, text=True, timeout=60, env=env,
        )  # fmt: skip
        assert mounted.returncode == 0, mounted.stderr
        assert "fuse.glancefs" in tool("findmnt", "-n", "-o", "FSTYPE", str(mountpoint)).stdout
        assert (mountpoint / "by-id" / image["id"]).read_bytes() == b"from fstab"
        assert not os.access(mountpoint / "new", os.W_OK)  # ro
        assert tool("umount", str(mountpoint)).returncode == 0
    finally:
        if os.path.ismount(mountpoint):
            subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], check=False)
