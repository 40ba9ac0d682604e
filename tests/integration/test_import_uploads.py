"""Uploads by interoperable import, against a Glance set up as clouds on Ceph are: the
``image_conversion`` plugin on (output raw) and PUT uploads refused by policy (``"upload_image":
"!"``, staging allowed). ``cp`` into new/ with ``--import`` converts; a qcow2 with a backing file
fails its close and leaves no image; without the option, ``cp`` imports all the same.

One Glance for the module (the fakeauth flavor: an import task needs an owner).
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from conftest import MountFactory
from support import GlanceAPI, assert_uploaded, tool, unique

import glancefs
from lab.ceph import CephCluster
from lab.production import ProductionLab
from lab.servers import GlanceServer

MiB = 1024 * 1024


@pytest.fixture(scope="module")
def converting_glance(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GlanceServer]:
    conversion = {
        "image_import_opts": {"image_import_plugins": "['image_conversion']"},
        "image_conversion": {"output_format": "raw"},
    }
    workdir = tmp_path_factory.mktemp("converting-glance")
    with GlanceServer(
        workdir, flavor="fakeauth", conf_overrides=conversion, policy={"upload_image": "!"}
    ) as server:
        yield server


@pytest.fixture(scope="module")
def converting_api(converting_glance: GlanceServer) -> Iterator[GlanceAPI]:
    with GlanceAPI(converting_glance.url) as api:
        yield api


def _qcow2(path: Path, *qemu_img_create: str) -> Path:
    """A 64 MiB qcow2 (created with ``qemu_img_create``'s options) with 3 MiB of data."""
    made = tool("qemu-img", "create", "-q", "-f", "qcow2", *qemu_img_create, str(path), "64M")
    assert made.returncode == 0, made.stderr
    written = tool("qemu-io", "--cmd=write -q -P 0x6b 1M 2M", "--cmd=write -q 40M 1M", str(path))
    assert written.returncode == 0, written.stderr
    return path


def test_cp_of_a_qcow2_with_import_is_converted_to_raw(
    converting_glance: GlanceServer,
    converting_api: GlanceAPI,
    mount_glancefs: MountFactory,
    tmp_path: Path,
) -> None:
    source = _qcow2(tmp_path / "disk.qcow2")
    mount = mount_glancefs(converting_glance.url, "-o", "import")
    name = unique("converted") + ".qcow2"
    copied = tool("cp", str(source), str(mount.path / "new" / name))
    assert copied.returncode == 0, copied.stderr + mount.log()
    image = converting_api.only(name)
    assert (image["status"], image["disk_format"]) == ("active", "raw")
    assert image["virtual_size"] == image["size"] == 64 * MiB
    compared = tool("qemu-img", "compare", "-f", "qcow2", "-F", "raw", str(source),
                    str(mount.path / name))  # fmt: skip
    assert compared.returncode == 0, compared.stdout + compared.stderr


def test_a_qcow2_with_a_backing_file_fails_its_close_and_leaves_no_image(
    converting_glance: GlanceServer,
    converting_api: GlanceAPI,
    mount_glancefs: MountFactory,
    tmp_path: Path,
) -> None:
    base = _qcow2(tmp_path / "base.qcow2")
    overlay = _qcow2(tmp_path / "overlay.qcow2", "-b", str(base), "-F", "qcow2")
    mount = mount_glancefs(converting_glance.url, "--import")
    name = unique("backed") + ".qcow2"
    copied = tool("cp", str(overlay), str(mount.path / "new" / name))
    assert copied.returncode != 0
    assert "Input/output error" in copied.stderr
    assert converting_api.list(name=name) == []
    assert "import failed" in mount.log()


def test_cp_imports_without_the_option_where_glance_refuses_put(
    converting_glance: GlanceServer,
    converting_api: GlanceAPI,
    mount_glancefs: MountFactory,
    tmp_path: Path,
) -> None:
    source = tmp_path / "disk.raw"
    source.write_bytes(bytes(MiB) + b"\x17" * (6 * MiB + 123))  # streamed: more than is held
    mount = mount_glancefs(converting_glance.url)
    for name in (unique("first") + ".raw", unique("second") + ".raw"):
        copied = tool("cp", str(source), str(mount.path / "new" / name))
        assert copied.returncode == 0, copied.stderr + mount.log()
        assert_uploaded(converting_api, name, source, "raw")
    assert mount.log().count("this mount imports its uploads from now on") == 1


# -- the production lab: two nodes, each with its own staging area ------------------------------


@pytest.fixture(scope="module")
def import_production(
    tmp_path_factory: pytest.TempPathFactory, ceph: CephCluster
) -> Iterator[ProductionLab]:
    """Two Glance nodes behind HAProxy (lab.production) in the fakeauth flavor (an import task
    needs an owner): the session's noauth one cannot import."""
    workdir = tmp_path_factory.mktemp("import-production")
    with ProductionLab(workdir, ceph=ceph, flavor="fakeauth") as lab:
        yield lab


async def test_an_import_reaching_the_node_without_the_staged_data_is_proxied(
    import_production: ProductionLab,
) -> None:
    """Staged through node0, imported through node1: node1 hands the import to the node that
    holds the data (``os_glance_stage_host``, its ``worker_self_reference_url``)."""
    stager, importer = import_production.node(0), import_production.node(1)
    data = random.randbytes(3 * MiB)
    async with (
        glancefs.Client(endpoint=stager.url, token="owner-token") as first,
        glancefs.Client(endpoint=importer.url, token="owner-token") as second,
    ):
        image = await first.images.create(
            name=unique("crossed"), disk_format="raw", container_format="bare"
        )
        await first.images.stage(image.id, data)
        await second.images.image_import(image.id, method="glance-direct")
        while (image := await second.images.get(image.id)).status != "active":
            assert image.status in ("uploading", "importing"), image
            await trio.sleep(0.1)
        assert image.get("os_hash_value") == hashlib.sha512(data).hexdigest()
        assert image.get("stores") == "ceph"
    assert "Proxying POST request to host " + stager.url in importer.log_path.read_text()


def test_cp_with_import_through_haproxy(
    import_production: ProductionLab, mount_glancefs: MountFactory, tmp_path: Path
) -> None:
    """Through the balancer, whichever node serves the stage and the import."""
    source = _qcow2(tmp_path / "disk.qcow2")
    mount = mount_glancefs(import_production.url, "--import")
    name = unique("balanced") + ".qcow2"
    copied = tool("cp", str(source), str(mount.path / "new" / name))
    assert copied.returncode == 0, copied.stderr + mount.log()
    with GlanceAPI(import_production.url) as api:
        assert_uploaded(api, name, source, "qcow2", store="ceph")
