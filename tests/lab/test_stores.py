"""The stores production clouds run, in the lab (lab.ceph, lab.swift, lab.stores): they start, they
stop with nothing left running (also when the code using them fails), and one Glance puts each
upload into the store it names, where ranged GETs are refused (400) but on the file store (206).
"""

from __future__ import annotations

import hashlib
import os
import random
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from support import GlanceAPI

from lab.ceph import CephCluster
from lab.stores import StoresLab
from lab.swift import SwiftCluster

MiB = 1024 * 1024


class Failed(Exception):
    """What the code using a cluster raises in the tests of the stop path."""


def processes_of(workdir: Path) -> dict[int, str]:
    """The running processes (zombies have no command line) whose command line names a path in
    ``workdir``: every daemon names its config there."""
    found = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue  # gone meanwhile
        command = " ".join(arg.decode(errors="replace") for arg in argv if arg)
        if str(workdir) in command:
            found[int(pid)] = command
    return found


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def fail_while_running(cluster: CephCluster | SwiftCluster, check: Callable[[], None]) -> None:
    """Start the cluster, ``check`` it, then fail as a test does: its with-block must stop it."""
    with cluster:
        check()
        raise Failed


def test_ceph_stops_with_nothing_left_when_the_code_using_it_fails(tmp_path: Path) -> None:
    cluster = CephCluster(tmp_path / "ceph")

    def check() -> None:
        daemons = processes_of(cluster.workdir)
        assert sorted(command.split()[0] for command in daemons.values()) == [
            "ceph-mon",
            "ceph-osd",
        ]
        assert cluster.ceph("osd", "pool", "ls").split() == ["images"]
        print(f"\nceph RSS (MiB): {[round(rss_mib(pid)) for pid in daemons]}")

    with pytest.raises(Failed):
        fail_while_running(cluster, check)
    assert processes_of(cluster.workdir) == {}
    assert not cluster.running


def test_swift_stops_with_nothing_left_when_the_code_using_it_fails(tmp_path: Path) -> None:
    # No Keystone: the servers start and answer their health checks without one.
    swift = SwiftCluster(tmp_path / "swift", "http://127.0.0.1:9/v3")

    def check() -> None:
        commands = processes_of(swift.workdir).values()
        servers = sorted(Path(command.split()[1]).name for command in commands)
        assert servers == [f"swift-{kind}-server" for kind in ("account", "container", "object",
                                                               "proxy")]  # fmt: skip

    with pytest.raises(Failed):
        fail_while_running(swift, check)
    assert processes_of(swift.workdir) == {}
    assert not swift.running


@pytest.mark.parametrize("store", ["fs", "ceph", "swift"])
def test_an_upload_lands_in_the_store_it_names(
    store: str, stores: StoresLab, stores_api: GlanceAPI
) -> None:
    data = random.Random(store).randbytes(3 * MiB + 17)
    image = stores_api.create(f"in-{store}-{uuid.uuid4().hex[:6]}", data, store=store)
    assert image["status"] == "active"
    assert image["stores"] == store
    assert image["size"] == len(data)
    assert image["checksum"] == hashlib.md5(data).hexdigest()
    assert image["os_hash_value"] == hashlib.sha512(data).hexdigest()
    if store == "ceph":
        assert stores.ceph.image_data(image["id"]) == data
    elif store == "fs":
        assert (stores.glance.store_dir / image["id"]).read_bytes() == data

    path = f"/v2/images/{image['id']}/file"
    whole = stores_api.http.get(path)
    assert (whole.status_code, whole.content) == (200, data)
    ranged = stores_api.http.get(path, headers={"Range": f"bytes={MiB}-{MiB + 4095}"})
    if store == "fs":
        assert (ranged.status_code, ranged.content) == (206, data[MiB : MiB + 4096])
    else:
        # What a client of Ceph or Swift must live with: no random access at all.
        assert ranged.status_code == 400
        assert "Getting images randomly from this store is not supported" in ranged.text
