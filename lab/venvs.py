"""Cached virtualenvs for the Glance and Keystone servers used by tests and demos.

The servers pin their own oslo.*, eventlet and SQLAlchemy versions, so they live in
their own venvs (never in glancefs's environment).  Installing one takes about a
minute, so each is built once per machine under ``<repo>/.cache/lab/<name>-<digest>``
and reused; an fcntl lock keeps concurrent pytest workers and make targets from
building the same venv twice, and a marker file written last means a half-finished
install (killed, out of disk, registry hiccup) is detected and redone.  The digest is
that of the requirement list: checkouts (git worktrees) that share one cache but pin
different requirements get different venvs instead of rebuilding each other's.
"""

import contextlib
import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CACHE_ROOT = REPO_ROOT / ".cache" / "lab"

GLANCE_VERSION = "33.0.0"
KEYSTONE_VERSION = "30.0.0"
SWIFT_VERSION = "2.38.3"

#: Written into the venv only after pip succeeded; its content is the requirement list,
#: so changing the requirements below rebuilds the venv.
MARKER_NAME = ".lab-installed"


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive flock on ``path`` (created if missing) for the with-block.

    flock is released by the kernel when the holder dies, so a crashed installer
    never leaves a stale lock behind.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the last fd drops the lock


def _marker_ok(venv: Path, requirements: list[str]) -> bool:
    """True when a previous install of exactly these requirements completed."""
    try:
        return (venv / MARKER_NAME).read_text() == "\n".join(requirements) + "\n"
    except OSError:
        return False


def _install(venv: Path, requirements: list[str], log: Path) -> None:
    """Build ``venv`` from scratch; pip's output goes to ``log`` (tail raised on failure)."""
    if venv.exists():
        shutil.rmtree(venv)
    print(
        f"lab: installing {' '.join(requirements)} into {venv} (about a minute, once per machine)",
        file=sys.stderr,
        flush=True,
    )
    env = {
        k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")
    }
    started = time.monotonic()
    with log.open("w") as out:
        for cmd in (
            [sys.executable, "-m", "venv", str(venv)],
            [
                str(venv / "bin" / "python"),
                "-m",
                "pip",
                "install",
                "--disable-pip-version-check",
                *requirements,
            ],
        ):
            out.write(f"$ {' '.join(cmd)}\n")
            out.flush()
            rc = subprocess.call(
                cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
            )
            if rc != 0:
                out.close()
                tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-30:])
                raise RuntimeError(
                    f"lab: {cmd[0]} {cmd[1:3]} failed (exit {rc}); see {log}:\n{tail}"
                )
    (venv / MARKER_NAME).write_text("\n".join(requirements) + "\n")
    print(
        f"lab: {venv.name} ready in {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True
    )


def ensure_venv(name: str, requirements: list[str], cache_root: Path | None = None) -> Path:
    """Return the venv ``<cache_root>/<name>-<digest>``, building it first if not complete yet."""
    # Resolved: a venv's scripts name its path, and a worktree's .cache is often a link to a
    # shared one, which must not depend on the worktree that happened to build it.
    root = (Path(cache_root) if cache_root is not None else DEFAULT_CACHE_ROOT).resolve()
    digest = hashlib.sha256("\n".join(requirements).encode()).hexdigest()[:8]
    venv = root / f"{name}-{digest}"
    if _marker_ok(venv, requirements):  # fast path, no lock
        return venv
    with file_lock(root / f"{venv.name}.lock"):
        if not _marker_ok(venv, requirements):  # another process may have finished meanwhile
            _install(venv, requirements, root / f"{venv.name}.install.log")
    return venv


def ensure_glance_venv(cache_root: Path | None = None) -> Path:
    """Venv with glance, gunicorn (Glance 33 has no standalone server), psycopg2 (the
    production lab's PostgreSQL; SQLite needs no driver) and python-swiftclient (Glance's swift
    store).  Its rbd store loads Debian's rados/rbd bindings (lab.ceph), which PyPI lacks."""
    return ensure_venv(
        f"glance-{GLANCE_VERSION}",
        [f"glance=={GLANCE_VERSION}", "gunicorn", "psycopg2-binary", "python-swiftclient"],
        cache_root,
    )


def ensure_keystone_venv(cache_root: Path | None = None) -> Path:
    """Venv with keystone and gunicorn, for the keystone-flavor tests and Swift's tokens."""
    return ensure_venv(
        f"keystone-{KEYSTONE_VERSION}", [f"keystone=={KEYSTONE_VERSION}", "gunicorn"], cache_root
    )


def ensure_swift_venv(cache_root: Path | None = None) -> Path:
    """Venv with swift (the proxy, account, container and object servers, swift-ring-builder)
    and keystonemiddleware (the proxy's authtoken filter), for lab.swift."""
    return ensure_venv(
        f"swift-{SWIFT_VERSION}", [f"swift=={SWIFT_VERSION}", "keystonemiddleware"], cache_root
    )
