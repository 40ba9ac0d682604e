"""`make demo` end to end: `python -m lab.demo start/stop` with a real Glance and a real mount.

Run as the Makefile runs it (a subprocess from the repository root), because what matters
is what a user sees: the seeded names in `ls`, a qcow2 qemu-img can read, and nothing left
running after stop.  Glance is checked with plain urllib, not with lab.demo's own helpers.
"""

import json
import os
import re
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

from support import require_tools, tool

REPO = Path(__file__).resolve().parents[2]
DUPLICATE = re.compile(r"ubuntu-demo~[0-9a-f]{8}")

_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def demo(command: str, workdir: Path, mnt: Path) -> subprocess.CompletedProcess[str]:
    """Run `python -m lab.demo COMMAND` like `make demo` does; never raises on failure."""
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "lab.demo",
            command,
            "--dir",
            str(workdir),
            "--mountpoint",
            str(mnt),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )


def glance(method: str, url: str, doc: Any = None) -> Any:
    """One JSON request to the demo's Glance."""
    body = None if doc is None else json.dumps(doc).encode()
    req = urllib.request.Request(url, data=body, method=method)
    req.add_header("Content-Type", "application/json")
    with _opener.open(req, timeout=60) as resp:
        return json.loads(resp.read() or b"null")


def mounted(mnt: Path) -> bool:
    """mnt appears in the mount table (even if its FUSE process is dead)."""
    return f" {mnt} " in Path("/proc/self/mountinfo").read_text()


def live_pids(needle: str = "", pgid: int = 0) -> list[int]:
    """Processes, zombies excepted, whose command line contains needle (and in group pgid)."""
    pids = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()  # state, ppid, pgrp, ...
        if needle.encode() in cmdline and fields[0] != "Z" and pgid in (0, int(fields[2])):
            pids.append(int(entry.name))
    return pids


def test_demo_start_twice_then_stop(tmp_path: Path) -> None:
    require_tools("qemu-img", "fusermount3")
    workdir, mnt = tmp_path / "demo", tmp_path / "mnt"
    state: dict[str, Any] = {}
    try:
        first = demo("start", workdir, mnt)
        assert first.returncode == 0, first.stderr
        assert f"qemu-img info {mnt}/demo-qcow2" in first.stdout
        state = json.loads((workdir / "glance.json").read_text())

        names = set(os.listdir(mnt))
        duplicates = {n for n in names if DUPLICATE.fullmatch(n)}
        assert len(duplicates) == 2, names
        fixed = {"by-id", "by-tag", "new", "demo-raw", "demo-qcow2", "empty-queued"}
        assert names == fixed | duplicates
        assert set(os.listdir(mnt / "by-tag" / "demo")) == {"demo-raw", "demo-qcow2"} | duplicates
        assert os.listdir(mnt / "new") == ["empty-queued"]

        info = tool("qemu-img", "info", "--output=json", str(mnt / "demo-qcow2"))
        assert info.returncode == 0, info.stderr
        assert json.loads(info.stdout)["virtual-size"] == 1 << 30
        with (mnt / "demo-raw").open("rb") as f:  # the pattern names its own offset
            f.seek(0xABCD00)
            assert (
                f.read(64) == b"glancefs demo-raw: this 64-byte line begins at byte 0x00abcd00.\n"
            )

        # Again, with a third "ubuntu-demo": Glance and the mount are reused, the stray goes.
        stray = {"name": "ubuntu-demo", "disk_format": "raw", "container_format": "bare"}
        glance("POST", f"{state['url']}/v2/images", stray)
        second = demo("start", workdir, mnt)
        assert second.returncode == 0, second.stderr
        assert "already mounted" in second.stdout
        assert json.loads((workdir / "glance.json").read_text())["pid"] == state["pid"]
        images = glance("GET", f"{state['url']}/v2/images?limit=1000")["images"]
        assert sorted(i["name"] for i in images) == [
            "demo-qcow2", "demo-raw", "empty-queued", "ubuntu-demo", "ubuntu-demo",
        ]  # fmt: skip
    finally:
        stopped = demo("stop", workdir, mnt)
    assert stopped.returncode == 0, stopped.stderr
    assert not mounted(mnt)
    assert live_pids(str(mnt)) == []  # the glancefs mount process
    assert state, "start never wrote glance.json"
    assert live_pids(pgid=state["pgid"]) == []  # gunicorn and its workers
    assert not (workdir / "glance.json").exists()

    again = demo("stop", workdir, mnt)  # nothing runs: still fine
    assert again.returncode == 0, again.stderr
