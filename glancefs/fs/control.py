"""The control socket: how ``glancefs status`` asks a mount process what it is doing.

Each mount listens on a unix stream socket named after its mountpoint (:func:`socket_path`) in a
directory only its user can enter: ``/run/glancefs/`` for root, else
``$XDG_RUNTIME_DIR/glancefs/`` (``/run/user/UID/glancefs/``), else ``/tmp/glancefs-UID/``. The
directory is mode 0700 and the socket 0600, so other users can neither connect nor see the
names; the socket lives outside the mount, so it is never an image. The protocol is one JSON
document: connect, read :meth:`~glancefs.fs.status.MountStatus.snapshot` until EOF.

Which glancefs mounts exist comes from ``/proc/self/mountinfo`` (fstype ``fuse.glancefs``), so a
mount whose process died (``kill -9``: the kernel then answers ENOTCONN and the socket file
stays behind, refusing connections) is found and reported as dead.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import socket
import stat
import tempfile
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from .status import MountStatus, render

__all__ = [
    "FSTYPE",
    "MountEntry",
    "Probe",
    "glancefs_mounts",
    "parse_mountinfo",
    "probe",
    "probe_mounts",
    "remove_stale_socket",
    "serve_control",
    "socket_path",
]

log = logging.getLogger("glancefs.control")

FSTYPE = "fuse.glancefs"
#: Seconds ``glancefs status`` waits for a mount's answer (or for stat of its mountpoint).
QUERY_TIMEOUT = 5.0


def _candidate_dirs(uid: int) -> list[Path]:
    """Where this user's sockets may be, the one the mount uses first.

    The status command tries them all: its environment (``XDG_RUNTIME_DIR``) may differ from
    the mount's (fstab, systemd).
    """
    if uid == 0:
        return [Path("/run/glancefs")]
    dirs = []
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        dirs.append(Path(runtime) / "glancefs")
    if Path(f"/run/user/{uid}").is_dir():
        dirs.append(Path(f"/run/user/{uid}/glancefs"))
    dirs.append(Path(tempfile.gettempdir()) / f"glancefs-{uid}")
    return list(dict.fromkeys(dirs))


def socket_path(mountpoint: str, directory: Path | None = None) -> Path:
    """The control socket of the mount at ``mountpoint`` (an absolute, resolved path)."""
    digest = hashlib.sha256(os.fsencode(mountpoint)).hexdigest()[:20]
    return (directory or _candidate_dirs(os.getuid())[0]) / f"{digest}.sock"


def _private_dir(directory: Path) -> None:
    """Create ``directory`` 0700, or check that an existing one is ours and private.

    A shared /tmp fallback could have been created by someone else: never use it then.
    """
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = os.lstat(directory)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
        raise OSError(errno.EPERM, f"{directory} is not a directory of uid {os.getuid()}")
    if info.st_mode & 0o077:
        os.chmod(directory, 0o700)


async def serve_control(
    registry: MountStatus,
    mountpoint: str,
    *,
    task_status: trio.TaskStatus[Path | None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Answer status queries for the mount at ``mountpoint`` until cancelled.

    Never raises: without a socket (unwritable runtime directory) the mount still works, and
    one warning says that ``glancefs status`` cannot reach it. Removes the socket when done.
    """
    path = socket_path(mountpoint)
    listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        _private_dir(path.parent)
        path.unlink(missing_ok=True)  # left by a mount that was killed
        await listener.bind(str(path))
        os.chmod(path, 0o600)
        listener.listen(8)
    except OSError as error:
        listener.close()
        log.warning("no control socket for glancefs status: %s: %s", path, error.strerror)
        task_status.started(None)
        return
    task_status.started(path)

    async def answer(stream: trio.SocketStream) -> None:
        async with stream:
            with contextlib.suppress(trio.BrokenResourceError):  # the asker went away
                await stream.send_all(json.dumps(registry.snapshot()).encode())

    try:
        await trio.serve_listeners(answer, [trio.SocketListener(listener)])
    finally:
        path.unlink(missing_ok=True)


# -- the status command's side ------------------------------------------------------------------


@dataclass(frozen=True)
class MountEntry:
    """One glancefs mount in the mount table."""

    mountpoint: str
    source: str
    uid: int | None
    read_only: bool


def _unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash as octal escapes (``\\040``)."""
    out, index = [], 0
    while index < len(field):
        if field[index] == "\\" and field[index + 1 : index + 4].isdigit():
            out.append(chr(int(field[index + 1 : index + 4], 8)))
            index += 4
        else:
            out.append(field[index])
            index += 1
    return "".join(out)


def parse_mountinfo(text: str) -> list[MountEntry]:
    """The glancefs mounts of a ``/proc/PID/mountinfo`` text (see proc(5))."""
    entries = []
    for line in text.splitlines():
        fields = line.split(" ")
        if "-" not in fields:
            continue
        separator = fields.index("-")
        fstype, source, super_options = fields[separator + 1 : separator + 4]
        if fstype != FSTYPE:
            continue
        options = dict(option.partition("=")[::2] for option in super_options.split(",") if option)
        uid = options.get("user_id")
        entries.append(
            MountEntry(
                mountpoint=_unescape(fields[4]),
                source=_unescape(source),
                uid=int(uid) if uid is not None and uid.isdigit() else None,
                read_only="ro" in fields[5].split(","),
            )
        )
    return entries


def glancefs_mounts(uid: int | None = None) -> list[MountEntry]:
    """The glancefs mounts of this process's mount namespace; of user ``uid`` when given."""
    entries = parse_mountinfo(Path("/proc/self/mountinfo").read_text())
    return [e for e in entries if uid is None or e.uid == uid]


@dataclass(frozen=True)
class Probe:
    """What asking one mount gave: ``state`` is ok, unhealthy, dead or unreachable."""

    mountpoint: str
    state: str
    detail: str | None
    snapshot: dict[str, Any] | None

    @property
    def ok(self) -> bool:
        return self.state == "ok"

    def text(self, *, bars: bool) -> str:
        state = f"{self.state}: {self.detail}" if self.detail else self.state
        return render(self.mountpoint, state, self.snapshot, bars=bars)

    def as_dict(self) -> dict[str, Any]:
        return {
            "mountpoint": self.mountpoint,
            "state": self.state,
            "detail": self.detail,
            "status": self.snapshot,
        }


def _query(path: Path) -> dict[str, Any]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(QUERY_TIMEOUT)
        sock.connect(str(path))
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    answer: dict[str, Any] = json.loads(b"".join(chunks))
    return answer


def mountpoint_errno(mountpoint: str) -> int | None:
    """The errno of ``statvfs(mountpoint)`` (None: it answers), in a thread: a hung mount would
    block the caller for good; after QUERY_TIMEOUT it counts as ETIMEDOUT.

    Not ``stat``: the kernel answers that from the attributes it caches (for the mount's
    ``--metadata-ttl``) even after the mount process died; statfs always asks the process.
    """
    result: list[int | None] = []

    def check() -> None:
        try:
            os.statvfs(mountpoint)
            result.append(None)
        except OSError as error:
            result.append(error.errno)

    thread = threading.Thread(target=check, daemon=True)
    thread.start()
    thread.join(QUERY_TIMEOUT)
    return result[0] if result else errno.ETIMEDOUT


def _sockets_of(mountpoint: str) -> Iterable[Path]:
    for directory in _candidate_dirs(os.getuid()):
        path = socket_path(mountpoint, directory)
        if path.exists():
            yield path


def probe(mountpoint: str) -> Probe:
    """Ask the mount at ``mountpoint`` (as mountinfo spells it) how it is."""
    failure: str | None = None
    for path in _sockets_of(mountpoint):
        try:
            snapshot = _query(path)
        except (OSError, ValueError) as error:
            failure = f"control socket {path}: {getattr(error, 'strerror', None) or error}"
            continue
        if snapshot.get("healthy", False):
            return Probe(mountpoint, "ok", None, snapshot)
        return Probe(mountpoint, "unhealthy", "; ".join(snapshot.get("problems", [])), snapshot)
    code = mountpoint_errno(mountpoint)
    if code == errno.ENOTCONN:
        return Probe(
            mountpoint,
            "dead",
            "transport endpoint is not connected: the mount process is gone "
            f"(clean up with: glancefs umount {mountpoint})",
            None,
        )
    if code is not None:
        return Probe(mountpoint, "dead", f"statfs: {os.strerror(code)}", None)
    return Probe(
        mountpoint,
        "unreachable",
        failure
        or "answers, but has no control socket (mounted by another user or an older glancefs?)",
        None,
    )


def probe_mounts(mountpoints: Iterable[str]) -> list[Probe]:
    """Probes of the named mountpoints, or of every glancefs mount of this user."""
    known = {entry.mountpoint for entry in glancefs_mounts()}
    targets = [os.path.realpath(m) for m in mountpoints] or [
        entry.mountpoint for entry in glancefs_mounts(os.getuid())
    ]
    return [
        probe(m) if m in known else Probe(m, "not mounted", "not a glancefs mount", None)
        for m in targets
    ]


def remove_stale_socket(mountpoint: str) -> None:
    """Remove the socket a killed mount left behind (only when nothing answers on it)."""
    for path in _sockets_of(mountpoint):
        try:
            _query(path)
        except (OSError, ValueError):
            path.unlink(missing_ok=True)
