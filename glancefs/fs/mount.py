"""Running a mount: check Glance, mount, serve FUSE requests, unmount on a signal.

The process that mounts is the one that serves: ``pyfuse3.init`` mounts, ``pyfuse3.main`` serves
on the trio loop, and ``pyfuse3.close`` unmounts. :func:`serve` reports readiness through a
callback, so that the CLI can daemonize only once the mount works and report why it could not.

Signals: SIGINT and SIGTERM unmount cleanly (the CLI exits 130 after Ctrl-C); SIGHUP drops every
cache. While mounted, the control socket answers ``glancefs status`` and, with ``metrics_addr``,
an HTTP server answers Prometheus (:mod:`.control`, :mod:`.metrics`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable
from pathlib import Path

import pyfuse3
import trio

from glancefs import Client, GlanceError, NotFound, SessionAuth

from .cache import DataCache
from .catalog import Catalog
from .changes import Changes
from .config import MountConfig
from .control import serve_control
from .files import KernelCache, OpenFiles, on_corrupt_image
from .filesystem import Filesystem
from .glance import Glance
from .imports import Imports
from .inodes import InodeTable
from .metrics import MetricsServer
from .namespace import FIXED_INODES
from .operations import GlanceFS, KernelInvalidation
from .read import Readers
from .spool import SpoolSpace, default_spool_dir
from .status import STATUS, ErrorLog, options_of
from .tree import Tree
from .uploader import UploadPolicy, Uploads

__all__ = [
    "MountError",
    "build_filesystem",
    "check_import",
    "check_mountpoint",
    "check_reachable",
    "check_store",
    "fuse_options",
    "limit_to_credentials",
    "notify_systemd",
    "serve",
    "tune_kernel",
]

log = logging.getLogger("glancefs.mount")
#: Seconds between copies of the data cache's counters into the status registry.
CACHE_FIGURES_EVERY = 0.5
#: How long a worker thread that wants the GIL back (after hashing a 1 MiB piece with it
#: released) waits for the trio thread to yield it. Python's default, 5 ms, costs the hash
#: most of its speed while the loop is busy: a verified read hashes about 1,000 pieces per GiB
#: and its hash thread waits for the GIL about 700 times (its voluntary context switches).
#: Measured in alternating pairs (BENCHMARKS.md): 1 ms 505 MB/s, 0.1 ms 534 MB/s.
GIL_SWITCH_INTERVAL = 0.0001


class MountError(Exception):
    """The mount could not be made; the message is the one line the user sees."""


# The kernel sends FUSE reads no larger than the readahead window (128 KiB by default); each read
# is a Python call, so a larger window is the single biggest win for sequential reads. The
# background limits let several readahead requests be in flight at once, as gcsfuse does.
KERNEL_TUNING = {
    "bdi/read_ahead_kb": "1024",
    "fuse/max_background": "64",
    "fuse/congestion_threshold": "48",
}


def tune_kernel(mountpoint: str) -> None:
    """Raise the mount's readahead and FUSE queue limits through sysfs (root only; best effort)."""
    try:
        device = os.stat(mountpoint).st_dev
    except OSError as error:  # unmounted already (a SIGTERM right after the mount)
        log.debug("not tuning %s: %s", mountpoint, error.strerror)
        return
    if os.major(device) != 0:  # FUSE devices are anonymous (0:N): this is the directory below
        return
    minor = os.minor(device)
    paths = {
        "bdi": Path(f"/sys/class/bdi/{os.major(device)}:{minor}"),
        "fuse": Path(f"/sys/fs/fuse/connections/{minor}"),
    }
    for name, value in KERNEL_TUNING.items():
        group, _, leaf = name.partition("/")
        try:
            (paths[group] / leaf).write_text(value)
        except OSError as error:
            log.debug("could not set %s to %s: %s", name, value, error.strerror)


def notify_systemd() -> None:
    """Tell systemd the mount is ready (``Type=notify`` units); a no-op outside systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):  # an abstract socket
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.connect(address)
        sock.sendall(b"READY=1")


def fuse_options(*, allow_other: bool = False) -> set[str]:
    """The FUSE mount options of every glancefs mount (``fuse.glancefs`` in mount(8)'s list)."""
    options = set(pyfuse3.default_options) | {"fsname=glancefs", "subtype=glancefs"}
    if allow_other:
        options.add("allow_other")
    return options


def check_mountpoint(mountpoint: str) -> None:
    """Refuse a mountpoint that is not a directory, or already a mount point (MountError)."""
    if not os.path.isdir(mountpoint):
        raise MountError(f"{mountpoint} is not a directory")
    if os.path.ismount(mountpoint):
        raise MountError(f"{mountpoint} is already a mount point")


async def check_reachable(client: Client) -> None:
    """Fail early and clearly when Glance cannot be reached or refuses our credentials."""
    async for _ in client.images.list(limit=1):
        break


async def check_store(client: Client, store: str | None) -> None:
    """Refuse a ``--store`` that Glance does not offer (MountError, listing the stores)."""
    if store is None:
        return
    try:
        offered = [str(s["id"]) for s in await client.info.stores()]
    except NotFound:
        raise MountError(f"--store {store}: this Glance offers no choice of stores") from None
    if store not in offered:
        raise MountError(f"--store {store}: not one of this Glance's stores: {', '.join(offered)}")


async def check_import(client: Client, config: MountConfig) -> None:
    """``--import`` needs Glance's ``glance-direct`` import: without it, fail the mount in one
    line (MountError) rather than every upload."""
    if not config.import_uploads or config.read_only:
        return
    methods = await client.info.import_methods()
    if "glance-direct" not in methods:
        offered = ", ".join(methods) or "none"
        raise MountError(f"--import: this Glance offers no glance-direct import (it offers: "
                         f"{offered})")  # fmt: skip


#: Roles that Glance's default (secure RBAC) policy lets change images; ``_member_`` is the
#: legacy name of ``member``. Keystone puts implied roles in the token (admin implies member).
WRITE_ROLES = frozenset({"admin", "member", "_member_"})


async def limit_to_credentials(client: Client, config: MountConfig) -> MountConfig:
    """``config``, read-only when the token's roles cannot change anything in Glance.

    Modes then show what the credentials allow, to every user of an ``--allow-other`` mount, and
    a change fails with EROFS at once rather than with Glance's 403. Unknown roles (a bare
    token) leave the config as it is.
    """
    if config.read_only:
        return config
    roles = await client.auth.roles()
    if roles is None or roles & WRITE_ROLES:
        return config
    log.info("credentials have only the reader role: mounting read-only")
    return dataclasses.replace(config, read_only=True)


def build_filesystem(
    client: Glance,
    config: MountConfig,
    nursery: trio.Nursery,
    kernel: KernelCache,
    cache: DataCache | None = None,
) -> Filesystem:
    """Every part of the filesystem core, built here and handed to the parts that use it (as
    s3ql's mount builds its Operations' parts); background work runs in ``nursery``."""
    catalog = Catalog(client, config, nursery)
    changes = Changes(client, catalog, config.store)
    # One spool for the reads of stores without ranges and the uploads written out of order.
    spool = SpoolSpace(config.spool_dir or default_spool_dir(), config.spool_size)
    policy = UploadPolicy(
        config.default_formats, config.spool_dir is not None, config.keep_failed,
        always_import=config.import_uploads,
    )  # fmt: skip
    uploads = Uploads(changes, nursery, policy, spool)
    inodes = InodeTable(FIXED_INODES)
    readers = Readers(
        client,
        nursery,
        on_corrupt_image(inodes, kernel),
        verify=config.verify,
        prefetch_memory=config.prefetch_memory,
        cache=cache,
        cache_fill=config.cache is not None and config.cache.fill,
        spool=spool,
    )
    tree = Tree(config, catalog, inodes, uploads)
    files = OpenFiles(config, readers, uploads, kernel)
    imports = Imports(changes, nursery, keep_failed=config.keep_failed)
    return Filesystem(config, catalog, changes, uploads, readers, tree, files, imports)


async def serve(
    client: Client,
    config: MountConfig,
    mountpoint: str,
    fuse_options: set[str],
    ready: Callable[[], None] = lambda: None,
    cache: DataCache | None = None,
    metrics_addr: tuple[str, int] | None = None,
) -> bool:
    """Mount at ``mountpoint`` and serve until unmounted or signalled; reads go through
    ``cache`` (``--cache-dir``, opened by the caller) when given.

    Returns True when a SIGINT ended it (the CLI then exits 130). ``metrics_addr``: where to
    serve Prometheus metrics; a port that cannot be bound fails before the mount is made.
    """
    sys.setswitchinterval(GIL_SWITCH_INTERVAL)
    if config.read_only:
        # The kernel then refuses every change with EROFS for every user, root included, before
        # it reaches glancefs, and mount(8)/findmnt show the mount as ro.
        fuse_options = fuse_options | {"ro"}
    # Resolved before the mount: once mounted, stat of the mountpoint waits for this very loop.
    resolved = os.path.realpath(mountpoint)  # noqa: ASYNC240 (before the mount: nothing waits)
    await _describe(client, config, resolved, fuse_options, metrics_addr)
    metrics = _start_metrics(metrics_addr)
    refused: str | None = None
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_keep_status, metrics, cache)
        filesystem = build_filesystem(client, config, nursery, KernelInvalidation(nursery), cache)
        signals = _Signals(filesystem)
        try:
            pyfuse3.init(GlanceFS(filesystem), mountpoint, fuse_options)
        except RuntimeError as error:  # /dev/fuse, permissions, options
            # Raised after the nursery: from inside it, it would reach the CLI wrapped in an
            # ExceptionGroup.
            refused = str(error)
            nursery.cancel_scope.cancel()
        else:
            await _serve_mounted(nursery, signals, mountpoint, resolved, ready)
    if refused is not None:
        raise MountError(f"cannot mount {mountpoint}: {refused}")
    return signals.interrupted


async def _serve_mounted(
    nursery: trio.Nursery,
    signals: _Signals,
    mountpoint: str,
    resolved: str,
    ready: Callable[[], None],
) -> None:
    """Serve the mount pyfuse3.init made until it ends, then unmount (whatever the outcome)."""
    try:
        # Before ready(): a SIGTERM sent as soon as the mount is reported ready unmounts.
        await nursery.start(signals.watch)
        nursery.start_soon(_tune_when_served, mountpoint)
        await nursery.start(serve_control, STATUS, resolved)
        ready()
        log.info("mounted %s", mountpoint)
        # Returns after terminate() or when the mount was removed from outside (umount).
        await pyfuse3.main()
        nursery.cancel_scope.cancel()
    finally:
        pyfuse3.close(unmount=True)
        log.info("unmounted %s", mountpoint)


class _Signals:
    """SIGINT and SIGTERM end the mount (``interrupted``: SIGINT did); SIGHUP drops every
    cache of ``filesystem``."""

    def __init__(self, filesystem: Filesystem) -> None:
        self._filesystem = filesystem
        self.interrupted = False

    async def watch(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
            task_status.started()
            async for signum in signals:
                if signum == signal.SIGHUP:
                    log.info("SIGHUP: dropping every cache")
                    self._filesystem.drop_caches()
                    continue
                self.interrupted = signum == signal.SIGINT
                pyfuse3.terminate()
                return


async def _tune_when_served(mountpoint: str) -> None:
    # stat() of the mountpoint is answered by this very process, so it must run off the loop.
    await trio.to_thread.run_sync(tune_kernel, mountpoint)


def _start_metrics(address: tuple[str, int] | None) -> MetricsServer | None:
    if address is None:
        return None
    try:
        return MetricsServer(address, STATUS)
    except OSError as error:
        host, port = address
        raise MountError(f"--metrics-addr {host}:{port}: {error.strerror or error}") from None


async def _describe(
    client: Client,
    config: MountConfig,
    mountpoint: str,
    fuse_options: set[str],
    metrics_addr: tuple[str, int] | None,
) -> None:
    """Tell the status registry what ``glancefs status`` shows about this mount."""
    project = None
    if isinstance(client.auth, SessionAuth):
        try:
            project = await client.auth.project()
        except GlanceError as error:
            log.debug("project of the token unknown: %s", error)
    STATUS.describe(
        mountpoint=mountpoint,
        endpoint=await client.auth.endpoint(),
        project=project,
        options=options_of(config, fuse_options, metrics_addr),
    )


async def _keep_status(metrics: MetricsServer | None, cache: DataCache | None) -> None:
    """While the mount runs: the last warnings go to the registry, metrics are served, the
    cache's counters are copied in every half second (here, in the loop that changes the
    cache: the metrics thread reads only the copy); all stop when the nursery ends."""
    errors = ErrorLog(STATUS)
    logging.getLogger("glancefs").addHandler(errors)
    try:
        if cache is None:
            await trio.sleep_forever()
        while True:
            STATUS.cache = dataclasses.asdict(cache.stats())
            await trio.sleep(CACHE_FIGURES_EVERY)
    finally:
        logging.getLogger("glancefs").removeHandler(errors)
        if metrics is not None:
            metrics.stop()
