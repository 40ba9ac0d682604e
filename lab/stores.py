"""One Glance with the stores production clouds run: its file store, Ceph RBD and Swift.

Glance's rbd and swift stores refuse ranged GETs (400), where the file store answers 206: to see
a client live with both, one Glance offers all three (``enabled_backends = fs:file, ceph:rbd,
swift:swift``) and each upload chooses its store::

    with StoresLab(workdir) as lab:                   # about 20 s (Keystone's setup)
        api = GlanceAPI(lab.glance.url)
        image = api.create("disk", data, store="ceph")  # X-Image-Meta-Store on the PUT
        image["stores"]                                 # "ceph"

- ``glance``: no auth, default store ``fs`` (an upload that names no store lands there).
- ``ceph``: lab.ceph's cluster, started here unless the caller passes one it runs itself (a test
  session shares one cluster between this lab and lab.production).
- ``swift`` and ``keystone``: lab.swift's servers and the Keystone whose tokens they take, with
  the object-store endpoints registered; Glance uses Keystone only for Swift.
- :attr:`StoresLab.stores` are the GlanceStores to hand to further GlanceServers (a Glance whose
  default store is ``ceph`` or ``swift``, for clients that cannot choose one).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
from pathlib import Path

from lab.ceph import CephCluster
from lab.servers import GlanceServer, GlanceStore, KeystoneServer, Started
from lab.swift import SwiftCluster

__all__ = ["StoresLab"]


class StoresLab(Started):
    """Keystone, Swift, Ceph (unless given), a Glance offering fs, ceph and swift; see the module.

    start() is all or nothing; stop() stops what this lab started (not a ``ceph`` passed in).
    """

    def __init__(self, workdir: Path, *, ceph: CephCluster | None = None) -> None:
        self.workdir = Path(workdir).resolve()
        self._owns_ceph = ceph is None
        self.ceph = ceph or CephCluster(self.workdir / "ceph")
        self.keystone = KeystoneServer(self.workdir / "keystone")
        self.swift = SwiftCluster(self.workdir / "swift", self.keystone.url)
        self.glance = GlanceServer(self.workdir / "glance", stores=self.stores)

    @property
    def stores(self) -> tuple[GlanceStore, ...]:
        """The stores beside Glance's file store: Ceph RBD (``ceph``) and Swift (``swift``)."""
        return (self.ceph, self.swift)

    def start(self) -> None:
        """Ceph, Keystone, Swift and Glance at once (none needs another to start), then Swift's
        endpoints in Keystone's catalog."""
        starts = [self.keystone.start, self.swift.start, self.glance.start]
        if self._owns_ceph:
            starts.append(self.ceph.start)
        try:
            with concurrent.futures.ThreadPoolExecutor(len(starts)) as pool:
                for started in [pool.submit(start) for start in starts]:
                    started.result()
            self.keystone.register(self.glance.url, self.swift.url)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop Glance, Swift, Keystone and the cluster this lab started; idempotent."""
        stops = [self.glance.stop, self.swift.stop, self.keystone.stop]
        if self._owns_ceph:
            stops.append(self.ceph.stop)
        for stop in stops:
            with contextlib.suppress(Exception):
                stop()
