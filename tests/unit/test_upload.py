"""The upload session's state machine against a fake Glance: holes, truncation, the verdict at
close, aborts and their cleanup whatever the exception, metadata changes during the upload."""

from __future__ import annotations

import errno
import hashlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from fakes import FakeClient

from glancefs import Forbidden, Image, ServerError
from glancefs.fs import uploader
from glancefs.fs.catalog import Catalog
from glancefs.fs.changes import Changes
from glancefs.fs.config import MountConfig
from glancefs.fs.refusals import Busy, InvalidArgument, LocalFailure
from glancefs.fs.uploader import CHUNK_BYTES, UploadFailed, UploadPolicy, Uploads, UploadSession
from glancefs.fs.writers import Writer

MiB = 1024 * 1024


@dataclass(frozen=True)
class FakeWriter(Writer):
    """A writer whose fate the test decides."""

    dying: str | None = None
    holding: bool = False

    def interruption(self) -> str | None:
        return self.dying

    def still_writing(self) -> bool:
        return self.holding


@dataclass
class Setup:
    glance: FakeClient
    uploads: Uploads
    changes: Changes

    async def session(self, name: str = "disk.raw", writer: Writer | None = None) -> UploadSession:
        image = await self.changes.create(name, ("raw", "bare"))
        return self.uploads.open(image, created=True, writer=writer)


@asynccontextmanager
async def setup(**policy: Any) -> AsyncIterator[Setup]:
    glance = FakeClient()
    async with trio.open_nursery() as nursery:
        catalog = Catalog(glance, MountConfig(), nursery)
        changes = Changes(glance, catalog)
        yield Setup(glance, Uploads(changes, nursery, UploadPolicy(**policy)), changes)
        nursery.cancel_scope.cancel()


def _hashes(data: bytes) -> tuple[str, str]:
    return hashlib.sha512(data).hexdigest(), hashlib.md5(data).hexdigest()


async def test_holes_and_ftruncate_become_zeros_and_the_result_is_verified() -> None:
    async with setup() as s:
        session = await s.session()
        await session.write(0, b"a" * 100)
        await session.write(3 * CHUNK_BYTES, b"b" * 100)  # a hole of almost 3 MiB
        await session.truncate(session.written)  # the current size: nothing
        await session.truncate(5 * CHUNK_BYTES)  # a hole at the end
        image = await session.close()
        expected = (
            b"a" * 100 + bytes(3 * CHUNK_BYTES - 100) + b"b" * 100
            + bytes(2 * CHUNK_BYTES - 100)
        )  # fmt: skip
        assert image is not None
        assert image.status == "active"
        assert s.glance.data[image.id] == expected
        record = s.glance.record(image.id)
        assert (record["os_hash_value"], record["checksum"]) == _hashes(expected)


async def test_a_write_behind_the_end_aborts_and_deletes_the_created_image() -> None:
    async with setup() as s:
        session = await s.session()
        await session.write(0, b"x" * 10)
        with pytest.raises(InvalidArgument, match="behind the end"):
            await session.write(5, b"y")
        assert s.glance.named("disk.raw") == []
        with pytest.raises(InvalidArgument):  # close reports it too
            await session.close()
        await s.uploads.release(session)
        assert ("delete", session.image_id) in s.glance.calls
        assert [c for c in s.glance.calls if c[0] == "delete"] == [("delete", session.image_id)]


@pytest.mark.parametrize("keep_failed", [False, True])
async def test_a_dying_writer_never_finalizes(keep_failed: bool) -> None:
    async with setup(keep_failed=keep_failed) as s:
        writer = FakeWriter(1, "0", 5, dying="its writer (pid 1) was killed by SIGINT")
        session = await s.session(writer=writer)
        await session.write(0, b"x" * (2 * MiB))
        assert await session.close() is None
        await s.uploads.release(session)
        images = s.glance.named("disk.raw")
        if keep_failed:
            assert [r["status"] for r in images] == ["saving"]  # Glance re-queues it itself
        else:
            assert images == []
        assert session.image_id not in s.glance.data


async def test_a_flush_while_the_writer_holds_the_file_is_not_final() -> None:
    async with setup() as s:
        writer = FakeWriter(1, "0", 5, holding=True)
        session = await s.session(writer=writer)
        await session.write(0, b"x" * 10)
        assert await session.close() is None  # a forked child's close-on-exec, say
        await session.write(10, b"y" * 10)
        object.__setattr__(writer, "holding", False)
        image = await session.close()
        assert image is not None
        assert s.glance.data[image.id] == b"x" * 10 + b"y" * 10


async def test_metadata_during_the_put_waits_and_is_applied_before_close_returns() -> None:
    async with setup() as s:
        s.glance.hold_upload = trio.Event()
        session = await s.session()
        await session.write(0, b"x" * (2 * MiB))  # past the detection bytes: the PUT runs

        async def set_distro(record: Image) -> Image:
            return await s.changes.patch(record.id, [{"op": "add", "path": "/os_distro",
                                                      "value": "ubuntu"}], "setfattr")  # fmt: skip

        assert await session.change("setfattr user.os_distro", set_distro) is True
        assert "os_distro" not in s.glance.record(session.image_id)
        with pytest.raises(Busy):
            await session.change("setfattr user.disk_format", set_distro, formats=True)
        s.glance.hold_upload.set()
        await session.close()
        assert s.glance.record(session.image_id)["os_distro"] == "ubuntu"


async def test_a_change_that_cannot_be_applied_fails_the_close_but_keeps_the_data() -> None:
    async with setup() as s:
        s.glance.hold_upload = trio.Event()
        session = await s.session()
        await session.write(0, b"x" * (2 * MiB))

        async def refused(record: Image) -> None:
            raise Forbidden(403, "policy says no")

        await session.change("setfattr user.secret", refused)
        s.glance.hold_upload.set()
        with pytest.raises(Forbidden):
            await session.close()
        assert s.glance.record(session.image_id)["status"] == "active"


async def test_a_change_before_any_data_is_applied_at_once() -> None:
    async with setup() as s:
        session = await s.session()

        async def qcow2(record: Image) -> Image:
            return await s.changes.set_formats(record.id, "qcow2", "bare")

        assert await session.change("setfattr user.disk_format", qcow2, formats=True) is False
        assert s.glance.record(session.image_id)["disk_format"] == "qcow2"


async def test_a_bug_below_aborts_and_cleans_up() -> None:
    async with setup() as s:
        s.glance.fail["upload"] = RuntimeError("a bug")
        session = await s.session()
        await session.write(0, b"x" * 10)
        with pytest.raises(UploadFailed, match="internal error"):
            await session.close()
        assert s.glance.named("disk.raw") == []


async def test_a_cancelled_write_still_cleans_up(monkeypatch: pytest.MonkeyPatch) -> None:
    # Hashed inline, not in a worker thread: once every task is blocked, the writer is the one
    # waiting for room in the held PUT's queue.
    monkeypatch.setattr(uploader, "_THREAD_THRESHOLD", 2 * MiB)
    async with setup() as s:
        s.glance.hold_upload = trio.Event()
        session = await s.session()
        written = []

        async def write_all() -> None:
            for offset in range(0, 16 * MiB, MiB):
                await session.write(offset, b"x" * MiB)  # blocks once the PUT's queue is full
                written.append(offset)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(write_all)
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()
        assert len(written) < 16
        assert s.glance.named("disk.raw") == []
        with pytest.raises(UploadFailed, match="cancelled"):
            await session.close()


async def test_a_spool_failure_aborts_with_its_errno(tmp_path: Path) -> None:
    async with setup(spool_dir=tmp_path) as s:
        session = await s.session()
        await session.write(0, b"x" * 10)
        with pytest.raises(LocalFailure) as failed:
            await session.write(1 << 62, b"y")  # past any file size: EFBIG/EINVAL
        assert failed.value.errno in (errno.EFBIG, errno.EINVAL)
        assert s.glance.named("disk.raw") == []
        with pytest.raises(LocalFailure):
            await session.close()


async def test_deleting_after_a_failure_waits_for_glance_to_settle_but_not_for_a_403(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Timing logic: the retries' back-off runs on trio's mock clock, which jumps ahead whenever
    every task waits."""
    async with setup() as s:
        s.glance.fail["delete"] = ServerError(500, "still saving")
        session = await s.session()
        await session.write(0, b"x")

        async def settle() -> None:
            await trio.sleep(0.3)  # Glance notices the broken PUT after a while
            del s.glance.fail["delete"]

        async with trio.open_nursery() as nursery:
            nursery.start_soon(settle)
            with pytest.raises(InvalidArgument):
                await session.write(0, b"y")
        assert s.glance.calls.count(("delete", session.image_id)) > 1  # refused, then retried
        assert s.glance.named("disk.raw") == []

        s.glance.fail["delete"] = Forbidden(403, "no")
        other = await s.session("other.raw")
        await other.write(0, b"x")
        with pytest.raises(InvalidArgument):
            await other.write(0, b"y")
        assert [c for c in s.glance.calls if c == ("delete", other.image_id)] == [
            ("delete", other.image_id)
        ]  # once: a 403 does not pass by waiting
        assert len(s.glance.named("other.raw")) == 1
