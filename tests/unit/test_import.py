"""Uploads by interoperable import against a fake Glance: ``--import`` stages and imports, the
close waits for the import's end and verifies what can be (the hashes when the format stayed,
the staged size and the virtual size after a conversion); a failed import aborts; without the
option, a PUT refused by policy goes to the stage instead, its bytes sent again, once per mount."""

from __future__ import annotations

import errno
import random
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, cast

import pytest
import trio
from fakes import FakeClient

from glancefs import Client, Forbidden
from glancefs.fs.catalog import Catalog
from glancefs.fs.changes import Changes
from glancefs.fs.config import MountConfig, parse_mount_options
from glancefs.fs.mount import MountError, check_import
from glancefs.fs.payload import HOLD_BYTES
from glancefs.fs.refusals import UploadAborted
from glancefs.fs.spool import SpoolSpace
from glancefs.fs.uploader import UploadPolicy, Uploads

MiB = 1024 * 1024


@asynccontextmanager
async def uploads(tmp_path: Path, **policy: Any) -> AsyncIterator[tuple[FakeClient, Uploads]]:
    glance = FakeClient()
    async with trio.open_nursery() as nursery:
        changes = Changes(glance, Catalog(glance, MountConfig(), nursery))
        yield (
            glance,
            Uploads(changes, nursery, UploadPolicy(**policy), SpoolSpace(tmp_path, 1 << 40)),
        )
        nursery.cancel_scope.cancel()


async def _upload(glance: FakeClient, sessions: Uploads, name: str, data: bytes) -> str:
    """Create ``name``, write ``data`` in order in 1 MiB writes, close; the image id."""
    image = await glance.images.create(name=name, disk_format="raw", container_format="bare")
    session = await sessions.open(image, created=True, writer=None)
    for offset in range(0, len(data), MiB):
        await session.write(offset, data[offset : offset + MiB])
    await session.close()
    return image.id


@pytest.fixture(scope="module")
def qcow2(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """A 32 MiB qcow2 with 6 MiB of data."""
    directory = tmp_path_factory.mktemp("qcow2")
    raw, converted = directory / "disk.raw", directory / "disk.qcow2"
    with open(raw, "wb") as f:
        f.truncate(32 * MiB)
        f.write(random.randbytes(6 * MiB))
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", raw, converted], check=True)
    return converted.read_bytes()


def _to_raw(virtual: int) -> Any:
    return lambda body: ("raw", b"converted", virtual)


async def test_import_stages_then_imports_and_verifies_the_hashes(tmp_path: Path) -> None:
    async with uploads(tmp_path, always_import=True) as (glance, sessions):
        data = random.randbytes(HOLD_BYTES + 3 * MiB)
        image_id = await _upload(glance, sessions, "disk.raw", data)
        assert [c for c, i in glance.calls if i == image_id] == ["create", "stage", "import"]
        assert glance.data[image_id] == data
        assert glance.record(image_id)["status"] == "active"


async def test_a_conversion_is_verified_by_the_virtual_size(qcow2: bytes, tmp_path: Path) -> None:
    async with uploads(tmp_path, always_import=True) as (glance, sessions):
        glance.conversion = _to_raw(32 * MiB)
        image_id = await _upload(glance, sessions, "disk.qcow2", qcow2)
        record = glance.record(image_id)
        assert (record["status"], record["disk_format"]) == ("active", "raw")

        glance.conversion = _to_raw(31 * MiB)  # Glance's result is not the source's disk
        with pytest.raises(UploadAborted, match="virtual size is 32505856") as failed:
            await _upload(glance, sessions, "other.qcow2", qcow2)
        assert failed.value.errno == errno.EIO
        assert glance.named("other.qcow2") == []


@pytest.mark.parametrize("keep_failed", [False, True])
async def test_a_failed_import_fails_the_close_with_glances_reason(
    keep_failed: bool, qcow2: bytes, tmp_path: Path
) -> None:
    async with uploads(tmp_path, always_import=True, keep_failed=keep_failed) as (glance, sessions):
        glance.import_failure = "Image has a backing file"
        with pytest.raises(
            UploadAborted, match="failed in store fs; Image has a backing"
        ) as failed:
            await _upload(glance, sessions, "disk.qcow2", qcow2)
        assert failed.value.errno == errno.EIO
        left = [r["status"] for r in glance.named("disk.qcow2")]
        assert left == (["queued"] if keep_failed else [])


async def test_a_put_refused_by_policy_is_imported_from_then_on(tmp_path: Path) -> None:
    async with uploads(tmp_path) as (glance, sessions):
        glance.fail["upload"] = Forbidden(403, "upload_image is not allowed")
        data = random.randbytes(HOLD_BYTES + 5 * MiB)  # streamed: the refused bytes come again
        first = await _upload(glance, sessions, "first.raw", data)
        second = await _upload(glance, sessions, "second.raw", data[:MiB])
        assert (glance.data[first], glance.data[second]) == (data, data[:MiB])
        calls = [call for call, _ in glance.calls]
        assert calls.count("upload") == 1  # the mount remembers
        assert calls.count("stage") == calls.count("import") == 2


async def test_a_put_refused_where_glance_offers_no_import_stays_refused(tmp_path: Path) -> None:
    async with uploads(tmp_path) as (glance, sessions):
        glance.fail["upload"] = Forbidden(403, "upload_image is not allowed")
        glance.info.methods = ["web-download"]
        with pytest.raises(UploadAborted) as refused:
            await _upload(glance, sessions, "disk.raw", random.randbytes(2 * MiB))
        assert refused.value.errno == errno.EPERM
        assert glance.named("disk.raw") == []


async def test_once_a_put_worked_it_keeps_nothing_to_replay(tmp_path: Path) -> None:
    async with uploads(tmp_path) as (glance, sessions):
        await _upload(glance, sessions, "first.raw", random.randbytes(2 * MiB))
        glance.fail["upload"] = Forbidden(403, "policy changed")
        with pytest.raises(UploadAborted) as refused:
            await _upload(glance, sessions, "second.raw", random.randbytes(2 * MiB))
        assert refused.value.errno == errno.EPERM


def test_import_is_a_mount_option_flag() -> None:
    assert parse_mount_options("import,keep_failed") == [("import", None), ("keep_failed", None)]


async def test_a_403_the_stage_shares_is_not_a_policy_against_put(tmp_path: Path) -> None:
    """Glance refuses both for this image (another project's): the mount keeps PUT."""
    async with uploads(tmp_path) as (glance, sessions):
        glance.fail["upload"] = glance.fail["stage"] = Forbidden(403, "not your image")
        with pytest.raises(UploadAborted) as refused:
            await _upload(glance, sessions, "theirs.raw", random.randbytes(2 * MiB))
        assert refused.value.errno == errno.EPERM
        glance.fail.clear()
        mine = await _upload(glance, sessions, "mine.raw", random.randbytes(2 * MiB))
        assert [call for call, image in glance.calls if image == mine] == ["create", "upload"]


async def test_import_needs_glance_direct_at_mount() -> None:
    """``--import`` on a Glance without ``glance-direct`` fails the mount in one line; without
    the option, or read-only, nothing is asked."""
    client = FakeClient()
    client.info.methods = ["web-download", "copy-image"]
    glance = cast(Client, client)
    with pytest.raises(MountError, match=r"^--import: .* no glance-direct .*web-download, copy"):
        await check_import(glance, MountConfig(import_uploads=True))
    await check_import(glance, MountConfig(import_uploads=True, read_only=True))
    await check_import(glance, MountConfig())
    client.info.methods = ["glance-direct"]
    await check_import(glance, MountConfig(import_uploads=True))
