"""`make demo` / `make demo-stop`: a local Glance with sample images, mounted with glancefs.

    python -m lab.demo start --dir DIR --mountpoint MNT
    python -m lab.demo stop --dir DIR --mountpoint MNT

start is idempotent so that `make demo` can simply be run again: a Glance already
running in DIR is reused (lab's detached server, DIR/glance.json), only the missing
sample images are uploaded, and a glancefs mount of that Glance is left alone.
stop never fails when nothing runs, so `make clean` can always call it.
"""

import argparse
import contextlib
import functools
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from lab.__main__ import STATE_FILE, _running_url
from lab.glance_http import GlanceAPI
from lab.mounts import GLANCEFS, mount_answers, mount_fstype, unmount
from lab.servers import GlanceServer, _child_env, stop_detached

MIB = 1024 * 1024
MOUNT_TIMEOUT = 60.0
EXIT_TIMEOUT = 10.0


@functools.cache
def raw_pattern() -> bytes:
    """16 MiB of 64-byte text lines naming their own offset.

    Recognisable with `head -c 192 mnt/demo-raw` or xxd at any offset, so a wrong range
    read through the mount is obvious to the eye.
    """
    line = "glancefs demo-raw: this 64-byte line begins at byte {:#010x}.\n"
    return "".join(line.format(off) for off in range(0, 16 * MIB, 64)).encode()


def qcow2_image() -> bytes:
    """An empty 1 GiB qcow2 made by qemu-img (about 200 KiB of metadata)."""
    with tempfile.TemporaryDirectory(prefix="glancefs-demo-") as tmp:
        path = Path(tmp) / "demo.qcow2"
        subprocess.run(
            ["qemu-img", "create", "-q", "-f", "qcow2", str(path), "1G"],
            check=True,
            stdin=subprocess.DEVNULL,
        )
        return path.read_bytes()


@dataclass(frozen=True)
class Seed:
    """One sample image; data None means it stays queued (no data uploaded)."""

    name: str
    data: Callable[[], bytes] | None
    disk_format: str = "raw"
    tags: tuple[str, ...] = ()
    properties: dict[str, str] = field(default_factory=dict)

    def matches(self, image: dict[str, Any]) -> bool:
        """An existing image counts as this seed if its status and properties fit.

        Status matters so that an upload interrupted last time (image left queued)
        is redone rather than shown as an empty file for ever.
        """
        status = "queued" if self.data is None else "active"
        return image.get("status") == status and all(
            image.get(k) == v for k, v in self.properties.items()
        )


SEEDS = (
    Seed("demo-raw", raw_pattern, tags=("demo",)),
    Seed(
        "demo-qcow2",
        qcow2_image,
        disk_format="qcow2",
        tags=("demo", "linux"),
        properties={"os_distro": "cirros", "os_version": "0.6.3"},
    ),
    # the duplicate pair: glancefs shows both as ubuntu-demo~<first 8 hex of the id>
    Seed(
        "ubuntu-demo",
        lambda: b"ubuntu-demo 22.04 (not a real disk)\n" * 4096,
        tags=("demo", "linux"),
        properties={"os_distro": "ubuntu", "os_version": "22.04"},
    ),
    Seed(
        "ubuntu-demo",
        lambda: b"ubuntu-demo 24.04 (not a real disk)\n" * 4096,
        tags=("demo", "linux"),
        properties={"os_distro": "ubuntu", "os_version": "24.04"},
    ),
    Seed("empty-queued", None),
)


class DemoError(Exception):
    """A problem the user can fix; printed as one line, exit 1."""


def seed_images(url: str) -> list[str]:
    """Create the missing SEEDS, delete leftovers with their names; return what changed.

    Per name, each seed claims one matching image; images of that name left unclaimed
    (a third ubuntu-demo, a half-uploaded demo-raw) are deleted, so running it again
    always ends with exactly the seeded set.
    """
    with GlanceAPI(url, timeout=120) as api:
        return _seed(api)


def _seed(api: GlanceAPI) -> list[str]:
    existing: dict[str, list[dict[str, Any]]] = {}
    for image in api.list():
        existing.setdefault(image.get("name") or "", []).append(image)
    changes: list[str] = []
    for name in dict.fromkeys(seed.name for seed in SEEDS):
        unclaimed = existing.get(name, [])
        missing: list[Seed] = []
        for seed in (s for s in SEEDS if s.name == name):
            match = next((i for i in unclaimed if seed.matches(i)), None)
            if match is None:
                missing.append(seed)
            else:
                unclaimed.remove(match)
        for image in unclaimed:
            api.delete(image["id"])
            changes.append(f"removed stray {name} ({image['status']}, {image['id']})")
        for seed in missing:
            api.create(
                name,
                None if seed.data is None else seed.data(),
                disk_format=seed.disk_format,
                tags=list(seed.tags),
                **seed.properties,
            )
            changes.append(f"created {name}")
    return changes


# -- mounts and processes ---------------------------------------------------------------


def mount_processes(mountpoint: Path) -> dict[int, str | None]:
    """pid -> Glance URL of each `glancefs mount` process serving mountpoint.

    Found by command line (we always pass the absolute mountpoint), so stop works
    without any state file and start can tell which Glance a mount shows.
    """
    target = str(mountpoint.absolute())
    found: dict[int, str | None] = {}
    for pid in (int(p) for p in os.listdir("/proc") if p.isdigit()):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if "mount" in argv and target in argv and any(Path(a).name == "glancefs" for a in argv[:2]):
            i = argv.index("--os-image-url") + 1 if "--os-image-url" in argv else 0
            found[pid] = argv[i] if 0 < i < len(argv) else None
    return found


def wait_gone(pids: list[int], timeout: float = EXIT_TIMEOUT) -> None:
    """Wait for the processes to exit (a mount process does once unmounted), then kill."""
    for sig in (signal.SIGTERM, signal.SIGKILL, None):
        deadline = time.monotonic() + timeout
        while pids and time.monotonic() < deadline:
            pids = [p for p in pids if _alive(p)]
            time.sleep(0.05)
        if not pids or sig is None:
            return
        print(f"demo: signalling {sig.name} to {pids}", file=sys.stderr)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)


def _alive(pid: int) -> bool:
    """True unless the process is gone or a zombie (an unreaped orphan holds nothing)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2] != "Z"


def ensure_mount(mountpoint: Path, url: str, log: Path) -> str:
    """Mount glancefs on url at mountpoint unless it already is; return what was done.

    A stale glancefs mount is replaced: one whose process died, or whose Glance no
    longer answers (the demo's previous Glance, restarted since on another port).
    A mount of some other live Glance, or not glancefs at all, is refused, not touched.
    """
    fstype = mount_fstype(mountpoint)
    if fstype is not None:
        if fstype != "fuse.glancefs":
            raise DemoError(f"{mountpoint} is already a mount point ({fstype}); pick another")
        urls = set(mount_processes(mountpoint).values())
        if url in urls:
            return "already mounted"
        live = [u for u in urls if u is not None and _glance_answers(u)]
        if live:
            raise DemoError(
                f"{mountpoint} is a glancefs mount of {live[0]}, not of the demo's {url}: "
                f"unmount it first (glancefs umount {mountpoint})"
            )
        if (not urls or None in urls) and mount_answers(mountpoint):
            return "left as it was (a glancefs mount this demo did not start)"
        print(f"demo: replacing the stale mount on {mountpoint}", file=sys.stderr)
        stop_mount(mountpoint)
    mountpoint.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in _child_env().items() if not k.startswith("OS_")}
    cmd = [str(GLANCEFS), "mount", str(mountpoint.absolute()), "--os-image-url", url]
    cmd += ["--log-file", str(log.absolute())]
    try:
        result = subprocess.run(
            cmd, capture_output=True, text=True, env=env, timeout=MOUNT_TIMEOUT, check=False
        )
    except FileNotFoundError:
        raise DemoError(f"{GLANCEFS} not found: run `make venv` first") from None
    if result.returncode != 0:
        raise DemoError(f"glancefs mount failed: {result.stderr.strip()} (log: {log})")
    return "mounted"


def _glance_answers(url: str) -> bool:
    """True if something serves HTTP at url (any status): that mount is not stale."""
    try:
        with GlanceAPI(url, timeout=5) as api:
            api.http.get("/versions")
    except (httpx.HTTPError, ValueError):
        return False
    return True


def stop_mount(mountpoint: Path) -> bool:
    """Unmount if glancefs is mounted there and wait for its process; False if nothing was."""
    pids = list(mount_processes(mountpoint))
    fstype = mount_fstype(mountpoint)
    if fstype == "fuse.glancefs":
        why = unmount(mountpoint)
        if why is not None:
            print(f"demo: {why}; detached {mountpoint} lazily", file=sys.stderr)
    elif fstype is not None:
        print(f"demo: {mountpoint} is a {fstype} mount, not glancefs: left alone", file=sys.stderr)
    wait_gone(pids)
    return fstype == "fuse.glancefs" or bool(pids)


# -- commands ---------------------------------------------------------------------------


def next_steps(workdir: Path, mnt: Path, url: str, mounted: str, seconds: float) -> str:
    """The "what to try next" block, with paths as the user typed them."""
    sha256 = hashlib.sha256(raw_pattern()).hexdigest()
    tries = [
        (f"ls -l {mnt}", "one file per image; the two ubuntu-demo get ~<id> suffixes"),
        (f"ls {mnt}/by-tag/demo", 'images tagged "demo" (also by-id/, and new/ for queued)'),
        (f"getfattr -d {mnt}/demo-raw", "Glance's record as user.* extended attributes"),
        (f"qemu-img info {mnt}/demo-qcow2", "a 1 GiB qcow2, read through the mount"),
        (f"sha256sum {mnt}/demo-raw", f"16 MiB streamed from Glance: {sha256[:12]}..."),
    ]
    width = max(len(cmd) for cmd, _ in tries) + 2
    stop = "make demo-stop"
    if (str(workdir), str(mnt)) != (".demo", "mnt"):
        stop = f"python -m lab.demo stop --dir {workdir} --mountpoint {mnt}"
    return "\n".join(
        [
            "",
            f"glancefs demo ready in {seconds:.1f} s",
            f"  Glance {url} (noauth), work dir {workdir}/",
            f"  {mnt}/ {mounted}, log {workdir / 'glancefs.log'}",
            "",
            "Try:",
            *(f"  {cmd.ljust(width)}# {why}" for cmd, why in tries),
            "",
            f"Stop it all: {stop}",
        ]
    )


def start(workdir: Path, mountpoint: Path) -> int:
    """Glance up, images seeded, glancefs mounted, then tell the user what to try."""
    began = time.monotonic()
    if shutil.which("qemu-img") is None:
        raise DemoError("qemu-img not found: run `make deps` (it installs qemu-utils)")
    workdir.mkdir(parents=True, exist_ok=True)
    state_file = workdir.resolve() / STATE_FILE
    url = _running_url(state_file)
    if url is None:
        print("demo: starting Glance...", file=sys.stderr)
        server = GlanceServer(workdir, flavor="noauth", detach=True)
        server.start()
        state_file.write_text(json.dumps(server.state(), indent=2) + "\n")
        url = server.url
    for change in seed_images(url) or ["sample images already there"]:
        print(f"demo: {change}", file=sys.stderr)
    log = workdir / "glancefs.log"
    done = ensure_mount(mountpoint, url, log)
    print(next_steps(workdir, mountpoint, url, done, time.monotonic() - began))
    return 0


def stop(workdir: Path, mountpoint: Path) -> int:
    """Unmount, then stop Glance; fine when either or both are not running."""
    mounted = stop_mount(mountpoint)
    glance = stop_detached(workdir.resolve() / STATE_FILE)
    print(f"demo: {'unmounted' if mounted else 'not mounted'} {mountpoint}", file=sys.stderr)
    print(f"demo: {'stopped' if glance else 'no'} Glance in {workdir}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Parse `start|stop --dir DIR --mountpoint MNT` and run it."""
    parser = argparse.ArgumentParser(
        prog="python -m lab.demo", description="Run the glancefs demo."
    )
    parser.add_argument("command", choices=["start", "stop"])
    parser.add_argument("--dir", type=Path, default=Path(".demo"), help="Glance's work dir")
    parser.add_argument("--mountpoint", type=Path, default=Path("mnt"))
    args = parser.parse_args(argv)
    try:
        if args.command == "start":
            return start(args.dir, args.mountpoint)
        return stop(args.dir, args.mountpoint)
    except (DemoError, subprocess.CalledProcessError, OSError, RuntimeError) as error:
        print(f"demo: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
