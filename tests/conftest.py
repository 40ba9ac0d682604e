"""Fixtures: a real Glance per test session (and, on demand, one offering the Ceph RBD and Swift
stores, and a production-shaped one), and real glancefs mounts that always unmount."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from support import GlanceAPI, Mount  # noqa: E402

from lab.ceph import CephCluster  # noqa: E402
from lab.limits import LimitsLab  # noqa: E402
from lab.mounts import mount_argv  # noqa: E402
from lab.production import ProductionLab  # noqa: E402
from lab.servers import GlanceServer  # noqa: E402
from lab.stores import StoresLab  # noqa: E402

MountFactory = Callable[..., Mount]


@pytest.fixture(scope="session")
def glance(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GlanceServer]:
    """A real Glance (no auth) shared by the session; tests must not stop it."""
    with GlanceServer(tmp_path_factory.mktemp("glance"), flavor="noauth") as server:
        yield server


@pytest.fixture(scope="session")
def ceph(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CephCluster]:
    """A one-node Ceph cluster (lab.ceph) shared by ``stores`` and ``production``, started on first
    use (about 5 s); tests must not stop it."""
    with CephCluster(tmp_path_factory.mktemp("ceph")) as cluster:
        yield cluster


@pytest.fixture(scope="session")
def stores(tmp_path_factory: pytest.TempPathFactory, ceph: CephCluster) -> Iterator[StoresLab]:
    """Glance with its file store ``fs`` (the default), Ceph RBD ``ceph`` and Swift ``swift``
    (lab.stores), with Swift's Keystone, started on first use and shared by the session.

    A test chooses each image's store: ``stores_api.create(name, data, store="ceph")``.
    """
    with StoresLab(tmp_path_factory.mktemp("stores"), ceph=ceph) as lab:
        yield lab


@pytest.fixture(scope="session")
def stores_glance(stores: StoresLab) -> GlanceServer:
    """The Glance of ``stores``: one mount of it sees images on each store."""
    return stores.glance


@pytest.fixture(scope="session")
def stores_api(stores_glance: GlanceServer) -> Iterator[GlanceAPI]:
    client = GlanceAPI(stores_glance.url)
    yield client
    client.close()


@pytest.fixture(scope="session")
def glance_storing_in(
    stores: StoresLab, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[[str], GlanceServer]]:
    """``glance_storing_in(store)``: a Glance on the session's Ceph and Swift whose default store
    is ``store`` (``ceph`` or ``swift``), for a mount, which uploads into the default store;
    started on first use (one per store, a catalog of its own) and shared by the session."""
    servers: dict[str, GlanceServer] = {}

    def glance_for(store: str) -> GlanceServer:
        if store not in servers:
            workdir = tmp_path_factory.mktemp(f"glance-{store}")
            servers[store] = GlanceServer(workdir, stores=stores.stores, default_store=store)
            servers[store].start()
        return servers[store]

    try:
        yield glance_for
    finally:
        for server in servers.values():
            server.stop()


@pytest.fixture(scope="session")
def production(
    tmp_path_factory: pytest.TempPathFactory, ceph: CephCluster
) -> Iterator[ProductionLab]:
    """Two Glance nodes behind HAProxy on one PostgreSQL, their default store the session's Ceph
    (lab.production), started on first use (about 10 s) and shared by the session.

    Tests may kill, freeze or stop nodes; they must call ``production.heal()`` when done (a
    fixture's teardown is the place) so the next test finds every node UP.
    """
    with ProductionLab(tmp_path_factory.mktemp("production"), ceph=ceph) as lab:
        yield lab


@pytest.fixture(scope="module")
def limits(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LimitsLab]:
    """Keystone and a Glance enforcing Keystone's unified limits (lab.limits), started on first
    use (about 15 s) and shared by the module. Every project may hold 8 images, 64 MiB of image
    data and 16 MiB staged, and upload 2 images at once; a test makes a project of its own with
    its own limits (``limits.project(name, image_count_total=1)``: the OS_* variables of user
    demo in it), since usage counts per project."""
    with LimitsLab(
        tmp_path_factory.mktemp("limits"),
        image_size_total=64,
        image_stage_total=16,
        image_count_total=8,
        image_count_uploading=2,
    ) as lab:
        yield lab


@pytest.fixture(scope="session")
def api(glance: GlanceServer) -> Iterator[GlanceAPI]:
    client = GlanceAPI(glance.url)
    yield client
    client.close()


@pytest.fixture
def mount_glancefs(tmp_path: Path) -> Iterator[MountFactory]:
    """Start ``glancefs mount -f [--os-image-url URL] MNT *args``; all are stopped at teardown.

    ``url=None`` leaves the endpoint to the credentials (Keystone's catalog); ``env`` replaces the
    mount's environment; ``path`` mounts somewhere else than ``tmp_path / name``.
    """
    mounts: list[Mount] = []

    def start(
        url: str | None,
        *args: str,
        name: str = "mnt",
        env: dict[str, str] | None = None,
        path: Path | None = None,
    ) -> Mount:
        mountpoint = path or tmp_path / name
        argv = mount_argv(url, mountpoint, *args)
        mount = Mount(mountpoint, tmp_path / f"{name}.log", argv, env=env)
        mounts.append(mount)
        return mount.start()

    yield start
    for mount in mounts:
        mount.stop()


@pytest.fixture
def blank_qcow2(tmp_path: Path) -> bytes:
    """What ``qemu-img create -f qcow2`` writes of a 1 GiB image: its header and empty tables."""
    blank = tmp_path / "blank.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", blank, "1G"], check=True)
    return blank.read_bytes()


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    """A process to stand for a writer of an upload, which the test ends (or its teardown)."""
    process = subprocess.Popen(["sleep", "600"])
    try:
        yield process
    finally:
        process.kill()
        process.wait()


@pytest.fixture
def mounted(glance: GlanceServer, mount_glancefs: MountFactory) -> Mount:
    """glancefs mounted on the session's Glance with default options."""
    return mount_glancefs(glance.url)
