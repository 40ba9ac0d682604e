"""A one-node Ceph cluster on loopback, for Glance's ``rbd`` store (lab.stores, lab.production).

Most production clouds keep their images in Ceph, whose store answers every ranged GET with 400:
the lab runs the real thing from Debian's packages (``ceph-mon``, ``ceph-osd``, ``ceph-common``,
``python3-rados``, ``python3-rbd``; ``make deps`` installs them)::

    with CephCluster(workdir) as ceph:             # about 5 s
        GlanceServer(..., stores=[ceph], default_store="ceph")
        ceph.image_data(image_id)                  # what Glance wrote, read back with `rbd export`

- **Daemons**: one monitor (``mon.a``) and one OSD (``osd.0``) whose objects live in memory
  (memstore: no disk, allocated as written, lost when it stops); each its own process group
  (lab.servers.ProcessGroup, with its safety nets), logs under ``workdir/log``.
- **No cephx**: auth is ``none`` everywhere, so no keyring is handed around; the ``ceph`` and
  ``rbd`` commands and Glance's driver (user ``admin``) need only ``conf_path``.
- **Pool** ``images``, size 1, for Glance's images (``rbd_store_pool``).
- Start: ``ceph-mon --mkfs`` from a monmap of one monitor, then the OSD registered by uuid
  (``ceph osd new UUID`` and ``ceph-osd --mkfs --osd-uuid UUID``) and put into the CRUSH map by
  start() rather than by itself, then wait until it is up.  Without cephx a client's first
  command may reach the monitor before the client knows the cluster's fsid, and is refused: the
  OSD's own commands at start would make it exit ("wrong fsid", about one start in three here),
  and a ``ceph`` command so refused is sent again.
- Stop: SIGKILL. The data dies with the cluster anyway, and a stopping memstore OSD would first
  write every object it holds to its data directory.
- Glance's driver imports Debian's ``rados`` and ``rbd`` bindings (no PyPI package has them):
  :meth:`CephCluster.glance_pythonpath` links them into a directory of their own for Glance's
  virtualenv, once their build (``cpython-311``) is that virtualenv's Python; the rest of
  Debian's dist-packages stays off its path, where it would shadow the virtualenv's pins.
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import uuid
from pathlib import Path

from lab.servers import (
    ProcessGroup,
    Started,
    _child_env,
    _run,
    _tail,
    _wait_until_ready,
    free_port,
)

__all__ = ["POOL", "CephCluster", "rados_bindings"]

#: Glance's pool.
POOL = "images"
#: Where Debian's python3-rados and python3-rbd put their extension modules.
DIST_PACKAGES = Path("/usr/lib/python3/dist-packages")
#: How long a ceph command waits for the monitor before it fails (its default is forever).
CONNECT_TIMEOUT = 30
#: How often a ceph command refused for an fsid it did not know yet is sent (see CephCluster.ceph).
COMMAND_ATTEMPTS = 5

CEPH_CONF = """\
[global]
fsid = {fsid}
mon host = v1:127.0.0.1:{port}
auth cluster required = none
auth service required = none
auth client required = none
osd pool default size = 1
osd pool default min size = 1
mon allow pool size one = true
osd objectstore = memstore
# memstore allocates as objects are written: this is a bound, not a reservation
memstore device bytes = 8589934592
osd memory target = 1073741824
run dir = {dir}/run
log file = {dir}/log/$cluster-$name.log
admin socket = {dir}/run/$cluster-$name.asok
pid file = {dir}/run/$cluster-$name.pid
mon data = {dir}/mon/$cluster-$id
osd data = {dir}/osd/$cluster-$id
# The OSD would put itself into the CRUSH map on start, with a command it may send before it
# knows the cluster's fsid ("wrong fsid", the OSD exits): start() puts it there instead.
osd crush update on start = false
osd class update on start = false
"""


def rados_bindings(python_tag: str) -> list[Path]:
    """Debian's ``rados`` and ``rbd`` extension modules built for ``python_tag`` (``cpython-311``).

    Raises with what to do when they are missing or built for another Python.
    """
    found = {name: sorted(DIST_PACKAGES.glob(f"{name}.cpython-*.so")) for name in ("rados", "rbd")}
    if not all(found.values()):
        raise RuntimeError(
            "lab: the Ceph bindings are not installed: `make deps` (apt packages python3-rados, "
            "python3-rbd)"
        )
    matching = [
        path for paths in found.values() for path in paths if f".{python_tag}-" in path.name
    ]
    if len(matching) != len(found):
        built = sorted({path.name.split(".")[1] for paths in found.values() for path in paths})
        raise RuntimeError(
            f"lab: Debian's rados/rbd bindings are built for {', '.join(built)}, Glance's "
            f"virtualenv runs {python_tag}: make the lab's virtualenvs with that Python "
            "(rm -rf .cache/lab and run make with PYTHON=/usr/bin/python3)"
        )
    return matching


def _python_tag(venv: Path) -> str:
    """The implementation tag of the virtualenv's Python (``cpython-311``)."""
    out = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import sys; print(sys.implementation.cache_tag)"],
        capture_output=True, text=True, check=True, env=_child_env(), timeout=60,
    )  # fmt: skip
    return out.stdout.strip()


class _CephDaemon(ProcessGroup):
    """A ceph daemon in the foreground (``-f``), in its own process group."""

    #: Throwaway data: no shutdown to wait for (see the module).
    _stop_signal = signal.SIGKILL

    def __init__(self, name: str, command: list[str], workdir: Path) -> None:
        super().__init__()
        self._name = name
        self._command = command
        self.workdir = workdir

    @property
    def log_path(self) -> Path:
        """Its stdout and stderr (the daemon's own log is under log/ as ceph-<name>.log)."""
        return self.workdir / "log" / f"{self._name}.out"

    def start(self) -> None:
        """Start the daemon (its cluster waits for it)."""
        if self.running:
            return
        with self.log_path.open("ab") as log:
            self._spawn(self._command, env=_child_env(), log=log, cwd=self.workdir)


class CephCluster(Started):
    """One monitor and one memstore OSD on 127.0.0.1, no cephx, pool ``images``; see the module.

    A GlanceStore (lab.servers): ``GlanceServer(..., stores=[cluster])`` offers it as ``ceph``
    (driver ``rbd``).  start() is all or nothing; stop() ends both daemons, data and all.
    """

    store_id = "ceph"
    driver = "rbd"

    def __init__(self, workdir: Path, *, port: int | None = None) -> None:
        self.workdir = Path(workdir).resolve()
        self.port = port or free_port()
        self.fsid = str(uuid.uuid4())
        conf = ["-c", str(self.conf_path)]
        self.monitor = _CephDaemon("ceph-mon", ["ceph-mon", *conf, "-i", "a", "-f"], self.workdir)
        self.osd = _CephDaemon("ceph-osd", ["ceph-osd", *conf, "-i", "0", "-f"], self.workdir)

    @property
    def conf_path(self) -> Path:
        """ceph.conf: all any client (``ceph -c``, ``rbd -c``, Glance) needs."""
        return self.workdir / "ceph.conf"

    @property
    def log_dir(self) -> Path:
        return self.workdir / "log"

    @property
    def running(self) -> bool:
        """True while both daemons run."""
        return self.monitor.running and self.osd.running

    def start(self) -> None:
        """A fresh cluster: monitor, OSD up, pool ``images``; about 5 s."""
        if self.running:
            return
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> None:
        for sub in ("run", "log", "mon/ceph-a", "osd/ceph-0"):
            (self.workdir / sub).mkdir(parents=True, exist_ok=True)
        self.conf_path.write_text(
            CEPH_CONF.format(fsid=self.fsid, port=self.port, dir=self.workdir)
        )
        keyring, monmap = self.workdir / "mon.keyring", self.workdir / "monmap"
        self._setup(
            "ceph-authtool", "--create-keyring", str(keyring), "--gen-key", "-n", "mon.",
            "--cap", "mon", "allow *",
        )  # fmt: skip
        self._setup(
            "monmaptool", "--create", "--addv", "a", f"[v1:127.0.0.1:{self.port}]",
            "--fsid", self.fsid, str(monmap),
        )  # fmt: skip
        self._setup("ceph-mon", "-c", str(self.conf_path), "--mkfs", "-i", "a",
                    "--monmap", str(monmap), "--keyring", str(keyring))  # fmt: skip
        self.monitor.start()
        osd_uuid = str(uuid.uuid4())
        self.ceph("osd", "new", osd_uuid)  # waits for the monitor to answer
        self.ceph("osd", "crush", "add", "osd.0", "1", "root=default", "host=lab")
        self._setup("ceph-osd", "-c", str(self.conf_path), "-i", "0", "--mkfs",
                    "--osd-uuid", osd_uuid)  # fmt: skip
        self.osd.start()
        _wait_until_ready(self.osd, self._osd_up, "ceph-osd", self.log_dir / "ceph-osd.0.log")
        self.ceph("osd", "pool", "create", POOL, "8")
        self.ceph("osd", "pool", "application", "enable", POOL, "rbd")  # = rbd pool init

    def _setup(self, *command: str) -> None:
        """A setup command, its output appended to log/setup.log."""
        _run(list(command), self.log_dir / "setup.log", _child_env(), timeout=120)

    def ceph(self, *args: str) -> str:
        """``ceph ARGS`` against this cluster; its stdout (raises with its stderr on failure).

        Without cephx a client may send its first command before the monitor's map told it the
        cluster's fsid; the monitor refuses it ("problem getting command descriptions", EPERM),
        so that command is sent again (each one here may be repeated).
        """
        command = ["ceph", "-c", str(self.conf_path), "--connect-timeout", str(CONNECT_TIMEOUT)]
        for attempt in range(1, COMMAND_ATTEMPTS + 1):
            out = subprocess.run(
                [*command, *args], capture_output=True, text=True, env=_child_env(),
                timeout=CONNECT_TIMEOUT + 30, stdin=subprocess.DEVNULL, check=False,
            )  # fmt: skip
            if out.returncode == 0:
                return out.stdout
            if "problem getting command descriptions" not in out.stderr:
                break
            with (self.log_dir / "setup.log").open("a") as log:
                log.write(f"ceph {' '.join(args)}: {out.stderr.strip()} (attempt {attempt})\n")
        mon_log = self.log_dir / "ceph-mon.a.log"
        raise RuntimeError(
            f"lab: ceph {' '.join(args)} failed (exit {out.returncode}): {out.stderr.strip()}"
            f"\n{mon_log}:\n{_tail(mon_log)}"
        )

    def _osd_up(self) -> bool:
        stat = json.loads(self.ceph("osd", "stat", "--format", "json"))
        return int(stat.get("num_up_osds", 0)) == 1

    def image_data(self, name: str) -> bytes:
        """The data of RBD image ``name`` in the pool (Glance names an image's by its id)."""
        out = subprocess.run(
            ["rbd", "-c", str(self.conf_path), "export", f"{POOL}/{name}", "-"],
            capture_output=True, env=_child_env(), timeout=120, stdin=subprocess.DEVNULL,
            check=False,
        )  # fmt: skip
        if out.returncode != 0:
            raise RuntimeError(f"lab: rbd export {POOL}/{name}: {out.stderr.decode().strip()}")
        return out.stdout

    def stop(self) -> None:
        """Kill the OSD and the monitor; idempotent."""
        for daemon in (self.osd, self.monitor):
            with contextlib.suppress(Exception):
                daemon.stop()

    # -- GlanceStore ----------------------------------------------------------------------------
    def glance_options(self) -> dict[str, str]:
        return {
            "rbd_store_pool": POOL,
            "rbd_store_user": "admin",
            "rbd_store_ceph_conf": str(self.conf_path),
            "rbd_store_chunk_size": "8",  # MiB, Glance's default
        }

    def glance_pythonpath(self, venv: Path) -> list[Path]:
        """A directory with links to Debian's rados and rbd modules, for Glance's ``venv``."""
        tag = _python_tag(venv)
        directory = self.workdir / "python" / tag
        directory.mkdir(parents=True, exist_ok=True)
        for module in rados_bindings(tag):
            link = directory / module.name
            if not link.is_symlink():
                link.symlink_to(module)
        return [directory]
