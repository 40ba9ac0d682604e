"""glancefs mounts run for the tests, the benchmark and the demo, and always taken down again.

:class:`Mount` runs ``glancefs mount -f`` as a child process (the tests and the benchmark); the
demo's background mounts (``glancefs mount`` without ``-f``) outlive the command that made them,
so it finds them again with :func:`mount_fstype` and takes them down with :func:`unmount`.

Pitfall: ``os.path.ismount`` says False for a FUSE mount whose process died (stat fails with
ENOTCONN), yet that mount still needs unmounting: /proc/self/mountinfo tells.

Pitfall: a signal ignored in a process stays ignored in the programs it runs, and a shell starts
a background job (``make test &``) with SIGINT ignored. A child that is to be interrupted with
SIGINT (a mount, ``cp``, ``glancefs status --watch``) is started with
``preexec_fn=default_sigint``, or it would not notice and the test would wait for it in vain.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

__all__ = [
    "GLANCEFS",
    "Mount",
    "default_sigint",
    "mount_answers",
    "mount_argv",
    "mount_fstype",
    "unmount",
]

#: The project venv's console script, beside the python running us (.venv/bin).
GLANCEFS = str(Path(sys.executable).with_name("glancefs"))


def default_sigint() -> None:
    """``preexec_fn`` of a child that may be interrupted: SIGINT ends it, as in a terminal, even
    if this process ignores SIGINT (a background job does)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def mount_argv(url: str | None, mountpoint: Path, *options: str) -> list[str]:
    """``glancefs mount -f [--os-image-url URL] MOUNTPOINT OPTIONS...``."""
    endpoint = ["--os-image-url", url] if url else []
    return [GLANCEFS, "mount", "-f", *endpoint, str(mountpoint), *options]


def mount_fstype(mountpoint: Path) -> str | None:
    """Filesystem type mounted on mountpoint ("fuse.glancefs"...), None if not a mount point."""
    target = os.path.realpath(mountpoint)
    fstype = None
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields, _, rest = line.partition(" - ")
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), fields.split(" ")[4])
        if point == target:
            fstype = rest.split(" ")[0]  # the last match is the top of a stack
    return fstype


def unmount(mountpoint: Path) -> str | None:
    """Unmount; a busy or dead mount is detached lazily. Returns why it had to be, else None."""
    why = "it does not answer (its process is gone)"
    if mount_answers(mountpoint):
        result = subprocess.run(
            ["fusermount3", "-u", str(mountpoint)], capture_output=True, text=True, check=False
        )
        if result.returncode == 0 or mount_fstype(mountpoint) is None:
            return None
        why = (result.stderr.strip().splitlines() or ["fusermount3 -u failed"])[-1]
    subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], check=False)
    return why


def mount_answers(mountpoint: Path) -> bool:
    """False for a FUSE mount whose process is gone (ENOTCONN)."""
    try:
        os.stat(mountpoint)
    except OSError:
        return False
    return True


class Mount:
    """``argv`` (a ``glancefs mount -f``, see :func:`mount_argv`) as a child process logging to
    ``log_path``; :meth:`start` returns once the mount serves, :meth:`stop` always takes it down.
    """

    def __init__(
        self, mountpoint: Path, log_path: Path, argv: list[str], env: dict[str, str] | None = None
    ) -> None:
        self.path = mountpoint
        self.log_path = log_path
        self.argv = argv
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None
        #: The kernel's FUSE connection number (/sys/fs/fuse/connections/N), once mounted.
        self.connection: int | None = None

    @property
    def pid(self) -> int:
        """The process serving FUSE."""
        assert self.proc is not None, "not started"
        return self.proc.pid

    def start(self, timeout: float = 30.0) -> Mount:
        self.path.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=self.env,
                preexec_fn=default_sigint,
            )  # fmt: skip
        deadline = time.monotonic() + timeout
        while not os.path.ismount(self.path):
            if self.proc.poll() is not None:
                raise RuntimeError(f"glancefs exited {self.proc.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"glancefs did not mount in {timeout} s:\n{self.log()}")
            time.sleep(0.05)
        self.connection = os.minor(os.stat(self.path).st_dev)
        return self

    def __enter__(self) -> Mount:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        """Unmount and wait for the process; if it hangs, abort its FUSE connection and kill it."""
        if mount_fstype(self.path) is not None:
            unmount(self.path)
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                abort = Path(f"/sys/fs/fuse/connections/{self.connection}/abort")
                if self.connection is not None and abort.exists():
                    abort.write_text("1")
                self.proc.kill()
                self.proc.wait(timeout=15)

    def run(self, *command: str, check: bool = True, timeout: float = 120) -> str:
        """Run an ordinary tool with the mount as working directory; return its stdout."""
        result = subprocess.run(
            command, cwd=self.path, capture_output=True, text=True, timeout=timeout, check=False
        )
        if check and result.returncode != 0:
            raise AssertionError(f"{command} exited {result.returncode}: {result.stderr}")
        return result.stdout

    def status(self, field_name: str) -> int:
        """A ``/proc/PID/status`` memory field (VmHWM, VmRSS) of the mount process, in bytes."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024
        raise KeyError(field_name)

    def kernel_settings(self) -> dict[str, str]:
        """The sysfs values the kernel uses for this mount (what glancefs's tune_kernel wrote)."""
        device = os.stat(self.path).st_dev
        bdi = Path(f"/sys/class/bdi/{os.major(device)}:{os.minor(device)}")
        conn = Path(f"/sys/fs/fuse/connections/{os.minor(device)}")
        values = {}
        for name, path in (
            ("read_ahead_kb", bdi / "read_ahead_kb"),
            ("max_background", conn / "max_background"),
            ("congestion_threshold", conn / "congestion_threshold"),
        ):
            try:
                values[name] = path.read_text().strip()
            except OSError:
                values[name] = "?"
        return values

    def wait_tuned(self, timeout: float = 10.0) -> None:
        """Wait until glancefs has raised the mount's readahead (it does right after mounting)."""
        from glancefs.fs.mount import KERNEL_TUNING

        wanted = KERNEL_TUNING["bdi/read_ahead_kb"]
        deadline = time.monotonic() + timeout
        while self.kernel_settings()["read_ahead_kb"] != wanted:
            if time.monotonic() > deadline:
                raise RuntimeError(f"glancefs did not tune {self.path}: {self.kernel_settings()}")
            time.sleep(0.02)
