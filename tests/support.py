"""Helpers for integration tests: a plain HTTP view of the real Glance and real mounts (both from
lab/, shared with the benchmark and the demo), and the tools the tests drive.

The tests talk to Glance directly (lab.glance_http, synchronously) to set up and check what the
mount shows, so that a bug in glancefs's own client cannot hide behind itself.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from lab.glance_http import GlanceAPI
from lab.mounts import GLANCEFS, Mount, default_sigint

__all__ = [
    "GLANCEFS",
    "GlanceAPI",
    "Mount",
    "assert_uploaded",
    "base_env",
    "default_sigint",
    "entry_dir",
    "far_qcow2",
    "interrupt_writer",
    "metrics",
    "require_tools",
    "sha512_of",
    "status_of",
    "tool",
    "transferred",
    "unique",
    "wait_for",
    "wait_verified",
]

MiB = 1024 * 1024


def tool(*command: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run a command, capture its output, never raise on a non-zero exit."""
    return subprocess.run(
        command, capture_output=True, text=True, errors="replace", timeout=timeout, check=False
    )


def require_tools(*names: str) -> None:
    missing = [n for n in names if shutil.which(n) is None]
    if missing:
        raise RuntimeError(f"missing tools {missing}: run `make deps`")


def metrics(port: int) -> dict[str, float]:
    """The series a mount's ``--metrics-addr`` serves, by name and labels."""
    result = tool("curl", "-sf", f"http://127.0.0.1:{port}/metrics")
    assert result.returncode == 0, result.stderr
    series = {}
    for line in result.stdout.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            series[key] = float(value)
    return series


def unique(stem: str) -> str:
    """``stem`` with a suffix of its own: a name no other test (or run) uses."""
    return f"{stem}-{uuid.uuid4().hex[:6]}"


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def base_env(tmp_path: Path) -> dict[str, str]:
    """The test's environment without OS_* variables, proxies or a user's clouds.yaml."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("OS_") and k.lower() not in ("http_proxy", "https_proxy", "all_proxy")
    }
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    env["XDG_CONFIG_HOME"] = str(tmp_path / "xdg")  # hides ~/.config/openstack/clouds.yaml
    return env


def sha512_of(path: Path) -> str:
    digest = hashlib.sha512()
    with open(path, "rb") as f:
        while block := f.read(4 * MiB):
            digest.update(block)
    return digest.hexdigest()


def status_of(api: GlanceAPI, name: str) -> str | None:
    """The status of the (first) image called ``name``, None when there is none."""
    images = api.list(name=name)
    return images[0]["status"] if images else None


def interrupt_writer(
    api: GlanceAPI, name: str, command: list[str], fifo: Path, sig: signal.Signals
) -> None:
    """Run ``command``, a writer of image ``name`` reading ``fifo`` (made here), in a session of
    its own with SIGINT's default disposition (as in a terminal); feed it 8 MiB, and once Glance
    is receiving the data send it ``sig``, which must end it."""
    os.mkfifo(fifo)
    process = subprocess.Popen(
        command, start_new_session=True, preexec_fn=default_sigint,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    feed = os.open(fifo, os.O_WRONLY)
    try:
        for _ in range(8):
            os.write(feed, random.randbytes(MiB))
        wait_for(lambda: status_of(api, name) == "saving", "the upload to start")
        process.send_signal(sig)
        assert process.wait(timeout=30) == -sig
    finally:
        os.close(feed)
        if process.poll() is None:
            process.kill()
            process.wait()


def entry_dir(cache_dir: Path, data: bytes) -> Path:
    """The directory of the cache entry of an image with this data (``--cache-dir``)."""
    return cache_dir / "v1" / f"sha512-{hashlib.sha512(data).hexdigest()}"


def wait_verified(cache_dir: Path, data: bytes, timeout: float = 60) -> None:
    """The mount verifies a complete entry in the background: wait for its manifest."""
    deadline = time.monotonic() + timeout
    while not (entry_dir(cache_dir, data) / "verified").exists():
        assert time.monotonic() < deadline, f"entry of {len(data)} bytes not verified"
        time.sleep(0.05)


def assert_uploaded(
    api: GlanceAPI, name: str, source: Path, disk_format: str, store: str | None = None
) -> dict:
    """The one image called ``name`` is active with ``source``'s size and sha512, of that disk
    format (bare), and in ``store`` if given; returns it."""
    image = api.only(name)
    assert image["status"] == "active"
    assert image["size"] == source.stat().st_size
    assert image["os_hash_value"] == sha512_of(source)
    assert (image["disk_format"], image["container_format"]) == (disk_format, "bare")
    if store is not None:
        assert image["stores"] == store
    return image


def transferred(rsync_output: str) -> int:
    """How many files ``rsync --stats`` sent."""
    for line in rsync_output.splitlines():
        if line.startswith("Number of regular files transferred:"):
            return int(line.split(":")[1].replace(",", ""))
    raise AssertionError(f"no transfer count in {rsync_output!r}")


def far_qcow2(path: Path) -> Path:
    """A qcow2 of 4 GiB with 2 MiB of 0x5a at 0, 2 GiB and 3 GiB: sparse, about 6 MiB of file,
    its clusters far apart."""
    writes = [f"--cmd=write -q -P 0x5a {at} 2M" for at in ("0", "2G", "3G")]
    for command in (
        ["qemu-img", "create", "-q", "-f", "qcow2", str(path), "4G"],
        ["qemu-io", *writes, str(path)],
    ):
        made = tool(*command)
        assert made.returncode == 0, made.stdout + made.stderr
    return path
