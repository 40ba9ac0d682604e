"""Upload sessions against a fake Glance: what each close does (publish, wait for the writer,
abort), the stages across a writer's closes and opens (create-then-reopen writers), where the
bytes go (held, streamed, spooled), the size announced first, metadata changes during the
upload, and the cleanup of every failure whatever the exception."""

from __future__ import annotations

import errno
import hashlib
import random
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from fakes import FakeClient

from glancefs import Forbidden, Image, OverLimit, QuotaExceeded, ServerError
from glancefs.fs import payload
from glancefs.fs.catalog import Catalog
from glancefs.fs.changes import Changes
from glancefs.fs.config import MountConfig
from glancefs.fs.payload import CHUNK_BYTES, HOLD_BYTES
from glancefs.fs.refusals import Busy, LocalFailure, UploadAborted
from glancefs.fs.spool import SpoolSpace
from glancefs.fs.uploader import Stage, UploadPolicy, Uploads, UploadSession
from glancefs.fs.writers import Writer

MiB = 1024 * 1024


@dataclass(frozen=True)
class FakeWriter(Writer):
    """A writer whose fate the test decides: dying, holding another descriptor, or exited."""

    dying: str | None = None
    holding: bool = False
    gone: trio.Event = field(default_factory=trio.Event)

    def interruption(self) -> str | None:
        return self.dying

    def still_writing(self) -> bool:
        return self.holding

    def running(self) -> bool:
        return not self.gone.is_set()

    async def exited(self) -> None:
        await self.gone.wait()


def _writer(pid: int = 1, **fate: Any) -> FakeWriter:
    return FakeWriter(pid, "0", 5, **fate)


@dataclass
class Setup:
    glance: FakeClient
    uploads: Uploads
    changes: Changes
    spool: SpoolSpace

    async def session(self, name: str = "disk.raw", writer: Writer | None = None) -> UploadSession:
        image = await self.changes.create(name, ("raw", "bare"))
        return await self.uploads.open(image, created=True, writer=writer)

    async def reopen(self, session: UploadSession, writer: Writer | None) -> UploadSession:
        image = Image(dict(self.glance.record(session.image_id)))
        return await self.uploads.open(image, created=False, writer=writer)


@asynccontextmanager
async def setup(tmp_path: Path, spool_size: int = 1 << 40, **policy: Any) -> AsyncIterator[Setup]:
    glance = FakeClient()
    spool = SpoolSpace(tmp_path / "spool", spool_size)
    async with trio.open_nursery() as nursery:
        catalog = Catalog(glance, MountConfig(), nursery)
        changes = Changes(glance, catalog)
        uploads = Uploads(changes, nursery, UploadPolicy(**policy), spool)
        yield Setup(glance, uploads, changes, spool)
        nursery.cancel_scope.cancel()


def _hashes(data: bytes) -> tuple[str, str]:
    return hashlib.sha512(data).hexdigest(), hashlib.md5(data).hexdigest()


def _qemu_img(*args: str | Path) -> None:
    subprocess.run(["qemu-img", *map(str, args)], check=True, capture_output=True)


def _created_and_converted(fmt: str, tmp_path: Path) -> tuple[bytes, bytes]:
    """What qemu-img create writes of a 32 MiB ``fmt`` image, and what qemu-img convert writes
    of a 32 MiB disk with 2 MiB of data in it."""
    source, created, converted = (tmp_path / n for n in ("src.raw", "created", "converted"))
    with open(source, "wb") as f:
        f.truncate(32 * MiB)
        f.seek(20 * MiB)
        f.write(random.randbytes(2 * MiB))
    _qemu_img("create", "-q", "-f", fmt, created, "32M")
    _qemu_img("convert", "-O", fmt, source, converted)
    return created.read_bytes(), converted.read_bytes()


def _stage(session: UploadSession) -> Stage:
    """The session's stage now (a call: mypy does not carry what an earlier assert said)."""
    return session.stage


async def _write_all(session: UploadSession, data: bytes, pieces: list[int]) -> None:
    """Write ``data`` in pieces of 64 KiB, in the order of their numbers in ``pieces``,
    skipping those of zeros but the last (as qemu-img does: the file is sparse)."""
    for index in pieces:
        chunk = data[index * 65536 : (index + 1) * 65536]
        if chunk.strip(b"\0") or (index + 1) * 65536 >= len(data):
            await session.write(index * 65536, chunk)


async def _refused_write(session: UploadSession, *, streaming: bool = False) -> None:
    """Stream past the held bytes (unless ``streaming`` already), then write behind them:
    refused (EINVAL), aborting."""
    if not streaming:
        await session.write(0, b"x" * HOLD_BYTES)
    with pytest.raises(UploadAborted, match="streamed to Glance already") as refused:
        await session.write(0, b"y")
    assert refused.value.errno == errno.EINVAL


# -- one open: sequential writers -----------------------------------------------------------


async def test_holes_and_ftruncate_become_zeros_and_the_result_is_verified(tmp_path: Path) -> None:
    async with setup(tmp_path) as s:
        session = await s.session()
        await session.write(0, b"a" * 100)
        await session.write(3 * CHUNK_BYTES, b"b" * 100)  # a hole of almost 3 MiB
        await session.truncate(session.size)  # the current size: nothing
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
        # Held to the end: the whole file was known, so was its size.
        assert s.glance.upload_sizes[image.id] == len(expected)


async def test_a_sequential_writer_streams_without_a_size_and_never_spools(
    tmp_path: Path,
) -> None:
    async with setup(tmp_path) as s:
        s.glance.hold_upload = trio.Event()
        session = await s.session()
        data = random.randbytes(HOLD_BYTES + 3 * MiB)
        await session.write(0, data[: MiB - 1])
        assert ("upload", session.image_id) not in s.glance.calls
        await session.write(MiB - 1, data[MiB - 1 : MiB])  # the first MiB: the format is known
        assert ("upload", session.image_id) in s.glance.calls  # streaming from here on
        s.glance.hold_upload.set()
        await session.write(MiB, data[MiB:])
        await session.close()
        assert s.glance.data[session.image_id] == data
        assert s.glance.upload_sizes[session.image_id] is None  # chunked: not known first
        assert not list((tmp_path / "spool").glob("*"))
        assert s.spool.used == 0


async def test_a_write_behind_before_anything_is_sent_goes_to_the_spool(tmp_path: Path) -> None:
    async with setup(tmp_path) as s:
        session = await s.session()
        await session.write(0, b"a" * 4096)
        await session.write(10 * MiB, b"b" * 4096)
        await session.write(0, b"c" * 4096)  # behind: the upload is spooled from here on
        assert await session.read(0, 8192) == b"c" * 4096 + bytes(4096)
        assert s.spool.used == 10 * MiB + 4096
        image = await session.close()
        assert image is not None
        expected = b"c" * 4096 + bytes(10 * MiB - 4096) + b"b" * 4096
        assert s.glance.data[image.id] == expected
        assert s.glance.upload_sizes[image.id] == len(expected)
        assert s.spool.used == 0  # given back


async def test_writes_apart_are_held_longer_than_a_first_mib(tmp_path: Path) -> None:
    """qemu-img's vhdx header: bytes at 0, at 64 KiB, 1 MiB of tables at 2 MiB, then back to
    192 KiB: held until then (not streamed after a MiB), so spooled."""
    async with setup(tmp_path) as s:
        session = await s.session("disk.vhdx")
        await session.write(0, b"vhdxfile")
        await session.write(65536, b"head" * 20)
        await session.write(2 * MiB, b"\2" * MiB)
        assert ("upload", session.image_id) not in s.glance.calls
        await session.write(196608, b"regi" * 10)
        assert s.spool.used == 3 * MiB
        await session.close()
        assert s.glance.data[session.image_id][196608:196612] == b"regi"


async def test_a_write_behind_what_was_streamed_aborts_and_deletes_the_created_image(
    tmp_path: Path,
) -> None:
    async with setup(tmp_path) as s:
        session = await s.session()
        await _refused_write(session)
        assert s.glance.named("disk.raw") == []
        with pytest.raises(UploadAborted) as again:  # close reports it too
            await session.close()
        assert again.value.errno == errno.EINVAL
        await s.uploads.release(session)
        assert [c for c in s.glance.calls if c[0] == "delete"] == [("delete", session.image_id)]


async def test_reads_give_back_what_is_held_spooled_or_not_sent_yet(tmp_path: Path) -> None:
    async with setup(tmp_path) as s:
        s.glance.hold_upload = trio.Event()
        session = await s.session()
        await session.write(0, b"h" * 100)
        await session.truncate(200)
        assert await session.read(50, 1000) == b"h" * 50 + bytes(100)
        assert await session.read(200, 10) == b""
        await session.write(100, b"x" * (HOLD_BYTES - 100))  # streaming
        await session.write(HOLD_BYTES + 10, b"p" * 10)  # pending, not sent
        assert await session.read(HOLD_BYTES, 30) == bytes(10) + b"p" * 10
        with pytest.raises(LocalFailure) as sent:
            await session.read(0, 10)
        assert sent.value.errno == errno.EIO
        s.glance.hold_upload.set()
        assert await session.close() is not None  # the refused read left the upload as it was


@pytest.mark.parametrize("keep_failed", [False, True])
async def test_a_dying_writer_never_finalizes(keep_failed: bool, tmp_path: Path) -> None:
    async with setup(tmp_path, keep_failed=keep_failed) as s:
        writer = _writer(dying="its writer (pid 1) was killed by SIGINT")
        session = await s.session(writer=writer)
        await session.write(0, b"x" * (HOLD_BYTES + MiB))
        assert await session.close() is None
        await s.uploads.release(session)
        images = s.glance.named("disk.raw")
        if keep_failed:
            assert [r["status"] for r in images] == ["saving"]  # Glance re-queues it itself
        else:
            assert images == []
        assert session.image_id not in s.glance.data


async def test_a_flush_while_the_writer_holds_the_file_is_not_final(tmp_path: Path) -> None:
    async with setup(tmp_path) as s:
        writer = _writer(holding=True)
        session = await s.session(writer=writer)
        await session.write(0, b"x" * 10)
        assert await session.close() is None  # a forked child's close-on-exec, say
        await session.write(10, b"y" * 10)
        object.__setattr__(writer, "holding", False)
        image = await session.close()
        assert image is not None
        assert s.glance.data[image.id] == b"x" * 10 + b"y" * 10


async def test_another_process_cannot_write_the_image_meanwhile(tmp_path: Path) -> None:
    async with setup(tmp_path) as s:
        session = await s.session(writer=_writer(1))
        assert await s.reopen(session, _writer(1)) is session  # its own second descriptor
        assert session.handles == 2
        with pytest.raises(Busy):
            await s.reopen(session, _writer(2))


# -- create-then-reopen writers -----------------------------------------------------------------


async def test_qemu_img_raw_a_size_then_the_data_streamed_with_its_size(tmp_path: Path) -> None:
    """qemu-img convert -O raw: ftruncate(0), ftruncate(size), 4 KiB of zeros at 0, close;
    open again, the data in order (zero runs skipped), close."""
    async with setup(tmp_path) as s:
        writer = _writer()
        size = HOLD_BYTES + 4 * MiB
        session = await s.session("disk.raw", writer)
        await session.truncate(0)
        await session.truncate(size)
        await session.write(0, bytes(4096))
        assert await session.close() is None  # only a size: not the end
        await s.uploads.release(session)
        assert session.stage is Stage.WAITING
        assert s.glance.record(session.image_id)["status"] == "queued"
        assert s.uploads.size_of(session.image_id) == size  # what stat shows

        assert await s.reopen(session, writer) is session
        data = random.randbytes(HOLD_BYTES)
        await session.write(0, data)  # streamed from here, its size announced
        await session.write(size - MiB, b"e" * MiB)
        image = await session.close()
        assert image is not None
        expected = data + bytes(size - MiB - len(data)) + b"e" * MiB
        assert s.glance.data[image.id] == expected
        assert s.glance.upload_sizes[image.id] == size


@pytest.mark.parametrize("fmt", ["qcow2", "vmdk", "vhdx"])
async def test_qemu_img_a_header_then_the_data_out_of_order(fmt: str, tmp_path: Path) -> None:
    """qemu-img convert -O qcow2 (vmdk, vhdx): the header and empty tables, written out of
    order, close; open again, data and tables all over, close: the image is what was written."""
    header, final = _created_and_converted(fmt, tmp_path)
    async with setup(tmp_path) as s:
        writer = _writer()
        session = await s.session(f"disk.{fmt}", writer)
        await session.truncate(0)
        assert await session.close() is None  # the file created, nothing written
        await s.uploads.release(session)
        await s.reopen(session, writer)
        pieces = list(range(-(-len(header) // 65536)))
        await _write_all(session, header, pieces[1:] + pieces[:1])  # the first piece last
        assert await session.close() is None  # only a header: not the end
        await s.uploads.release(session)
        assert session.stage is Stage.WAITING

        await s.reopen(session, writer)
        assert await session.read(0, len(header)) == header  # qemu-img reads it back
        pieces = list(range(-(-len(final) // 65536)))
        await _write_all(session, final, pieces[::-1])
        await session.truncate(len(final))
        image = await session.close()
        assert image is not None
        assert s.glance.data[image.id] == final
        assert s.glance.record(image.id)["disk_format"] == fmt
        assert s.glance.upload_sizes[image.id] == len(final)


async def test_a_header_in_one_open_is_published_at_its_close(
    blank_qcow2: bytes, tmp_path: Path
) -> None:
    """cp of an empty qcow2: a writer that did not close the file before is done."""
    async with setup(tmp_path) as s:
        session = await s.session("blank.qcow2", _writer())
        await session.write(0, blank_qcow2)
        assert await session.close() is not None
        assert s.glance.data[session.image_id] == blank_qcow2


async def _header_after_a_reopen(s: Setup, header: bytes, writer: Writer) -> UploadSession:
    """qemu-img create: the file created (ftruncate to 0, close), then the header in a second
    open, closed: the session waits for its writer."""
    session = await s.session("blank.qcow2", writer)
    await session.truncate(0)
    await session.close()
    await s.uploads.release(session)
    await s.reopen(session, writer)
    await session.write(0, header)
    assert await session.close() is None
    await s.uploads.release(session)
    assert _stage(session) is Stage.WAITING
    return session


@pytest.mark.parametrize("seen_by", ["the watch", "the next open"])
async def test_a_header_left_by_a_writer_that_exits_is_published(
    seen_by: str, blank_qcow2: bytes, tmp_path: Path
) -> None:
    """qemu-img create -f qcow2: the header is the whole image, once the writer is gone; the
    watch on the writer sees it exit, or an open of the image before the watch does."""
    async with setup(tmp_path) as s:
        writer = _writer()
        session = await _header_after_a_reopen(s, blank_qcow2, writer)
        if seen_by == "the watch":
            writer.gone.set()
            await trio.testing.wait_all_tasks_blocked()
        else:
            object.__setattr__(writer, "gone", trio.Event())  # the watch never wakes
            writer.gone.set()
            assert await s.uploads.settle(session.image_id) is True
        assert s.glance.record(session.image_id)["status"] == "active"
        assert s.glance.data[session.image_id] == blank_qcow2
        assert s.uploads.of(session.image_id) is None


async def test_a_size_left_by_a_writer_that_exits_waits_for_the_next_writer(
    tmp_path: Path,
) -> None:
    """truncate -s, then dd conv=notrunc (another process): one image, of the size set."""
    async with setup(tmp_path) as s:
        truncate = _writer(1)
        session = await s.session("sized.raw", truncate)
        await session.truncate(3 * MiB)
        await session.close()
        await s.uploads.release(session)
        truncate.gone.set()
        await trio.testing.wait_all_tasks_blocked()
        assert session.stage is Stage.SIZED
        assert s.glance.record(session.image_id)["status"] == "queued"
        assert s.uploads.size_of(session.image_id) == 3 * MiB

        dd = _writer(2)
        assert await s.reopen(session, dd) is session
        await session.write(0, b"d" * MiB)
        image = await session.close()
        assert image is not None
        assert s.glance.data[image.id] == b"d" * MiB + bytes(2 * MiB)


async def test_nothing_left_by_a_writer_that_exits_stays_queued(tmp_path: Path) -> None:
    async with setup(tmp_path) as s:
        touch = _writer()
        session = await s.session("touched", touch)
        assert await session.close() is None
        await s.uploads.release(session)
        assert session.stage is Stage.WAITING
        touch.gone.set()
        await trio.testing.wait_all_tasks_blocked()
        assert _stage(session) is Stage.ENDED
        assert s.glance.record(session.image_id)["status"] == "queued"
        assert ("delete", session.image_id) not in s.glance.calls


async def test_a_writer_that_writes_past_the_size_it_announced_fails(tmp_path: Path) -> None:
    async with setup(tmp_path) as s:
        session = await s.session()
        await session.truncate(HOLD_BYTES + MiB)  # the size first
        await session.write(0, b"x" * HOLD_BYTES)  # streamed, that size announced
        with pytest.raises(UploadAborted, match="announced") as refused:
            await session.write(HOLD_BYTES + MiB, b"more")
        assert refused.value.errno == errno.EIO
        with pytest.raises(UploadAborted):
            await session.close()
        assert s.glance.named("disk.raw") == []


async def test_a_spool_too_small_for_an_out_of_order_writer_gives_efbig(tmp_path: Path) -> None:
    async with setup(tmp_path, spool_size=2 * MiB) as s:
        session = await s.session("disk.qcow2")
        await session.write(MiB, b"b" * 4096)
        await session.write(0, b"a" * 4096)  # spooled: 1 MiB + 4 KiB
        with pytest.raises(UploadAborted, match="--spool-size") as refused:
            await session.write(3 * MiB, b"c" * 4096)
        assert refused.value.errno == errno.EFBIG
        assert s.glance.named("disk.qcow2") == []
        assert s.spool.used == 0


async def test_the_mount_ending_while_a_writer_is_away_deletes_the_created_image(
    tmp_path: Path,
) -> None:
    async with setup(tmp_path) as s:
        session = await s.session("disk.raw", _writer())
        await session.write(0, b"a" * 100)
        await session.write(0, b"b" * 100)  # spooled
        await session.write(1 << 20, b"not a header")
        await session.truncate(1 << 20)  # an image with data, but...
        await session.truncate(100)  # ...cut back: "b" * 100, no known format: data
        assert await session.close() is not None  # data: published at once

        other = await s.session("other.raw", _writer())
        await other.truncate(MiB)
        await other.close()
        assert other.stage is Stage.WAITING
    assert s.glance.named("other.raw") == []  # deleted as the mount ended
    assert s.glance.record(session.image_id)["status"] == "active"


# -- metadata during the upload ---------------------------------------------------------------


async def test_metadata_during_the_put_waits_and_is_applied_before_close_returns(
    tmp_path: Path,
) -> None:
    async with setup(tmp_path) as s:
        s.glance.hold_upload = trio.Event()
        session = await s.session()
        await session.write(0, b"x" * HOLD_BYTES)  # past the held bytes: the PUT runs

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


async def test_a_change_that_cannot_be_applied_fails_the_close_but_keeps_the_data(
    tmp_path: Path,
) -> None:
    async with setup(tmp_path) as s:
        s.glance.hold_upload = trio.Event()
        session = await s.session()
        await session.write(0, b"x" * HOLD_BYTES)

        async def refused(record: Image) -> None:
            raise Forbidden(403, "policy says no")

        await session.change("setfattr user.secret", refused)
        s.glance.hold_upload.set()
        with pytest.raises(Forbidden):
            await session.close()
        assert s.glance.record(session.image_id)["status"] == "active"


async def test_a_change_before_any_data_is_applied_at_once(tmp_path: Path) -> None:
    async with setup(tmp_path) as s:
        session = await s.session()

        async def qcow2(record: Image) -> Image:
            return await s.changes.set_formats(record.id, "qcow2", "bare")

        assert await session.change("setfattr user.disk_format", qcow2, formats=True) is False
        assert s.glance.record(session.image_id)["disk_format"] == "qcow2"


# -- failures clean up --------------------------------------------------------------------------


async def test_a_bug_below_aborts_and_cleans_up(tmp_path: Path) -> None:
    async with setup(tmp_path) as s:
        s.glance.fail["upload"] = RuntimeError("a bug")
        session = await s.session()
        await session.write(0, b"x" * 10)
        with pytest.raises(UploadAborted, match="internal error") as failed:
            await session.close()
        assert failed.value.errno == errno.EIO
        assert s.glance.named("disk.raw") == []


@pytest.mark.parametrize("keep_failed", [False, True])
async def test_a_quota_refusing_the_put_at_close_is_edquot(
    keep_failed: bool, tmp_path: Path
) -> None:
    async with setup(tmp_path, keep_failed=keep_failed) as s:
        s.glance.fail["upload"] = QuotaExceeded(413, "image_size_total", 64, 70, 0)
        session = await s.session()
        await session.write(0, b"x" * 10)  # held: sent whole at close
        with pytest.raises(UploadAborted, match="quota image_size_total exceeded") as refused:
            await session.close()
        assert refused.value.errno == errno.EDQUOT
        left = [r["status"] for r in s.glance.named("disk.raw")]
        assert left == (["queued"] if keep_failed else [])


async def test_a_quota_refusing_a_streamed_put_fails_the_write_that_meets_it(
    tmp_path: Path,
) -> None:
    async with setup(tmp_path) as s:
        # Glance checks image_count_uploading as the PUT starts, before reading its body.
        s.glance.fail["upload"] = QuotaExceeded(413, "image_count_uploading", 1, 2, 0)
        session = await s.session()

        async def write_64_mib() -> None:
            for offset in range(0, 64 * MiB, MiB):
                await session.write(offset, b"x" * MiB)

        with pytest.raises(UploadAborted, match="image_count_uploading") as refused:
            await write_64_mib()
        assert refused.value.errno == errno.EDQUOT
        assert s.glance.named("disk.raw") == []
        with pytest.raises(UploadAborted) as again:
            await session.close()
        assert again.value.errno == errno.EDQUOT


async def test_a_size_cap_is_enospc_not_a_quota(tmp_path: Path) -> None:
    async with setup(tmp_path) as s:
        s.glance.fail["upload"] = OverLimit(413, "The incoming image is too large")
        session = await s.session()
        await session.write(0, b"x" * 10)
        with pytest.raises(UploadAborted) as refused:
            await session.close()
        assert refused.value.errno == errno.ENOSPC


async def test_a_cancelled_write_still_cleans_up(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Hashed inline, not in a worker thread: once every task is blocked, the writer is the one
    # waiting for room in the held PUT's queue.
    monkeypatch.setattr(payload, "_THREAD_THRESHOLD", 2 * MiB)
    async with setup(tmp_path) as s:
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
        with pytest.raises(UploadAborted, match="cancelled"):
            await session.close()


async def test_a_spool_failure_aborts_with_its_errno(tmp_path: Path) -> None:
    async with setup(tmp_path, spool_size=1 << 63, spool_all=True) as s:
        session = await s.session()
        await session.write(0, b"x" * 10)
        with pytest.raises(UploadAborted, match="spool") as failed:
            await session.write(1 << 62, b"y")  # past any file size: EFBIG/EINVAL
        assert failed.value.errno in (errno.EFBIG, errno.EINVAL)
        assert s.glance.named("disk.raw") == []
        with pytest.raises(UploadAborted):
            await session.close()


async def test_deleting_after_a_failure_waits_for_glance_to_settle_but_not_for_a_403(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    """Timing logic: the retries' back-off runs on trio's mock clock, which jumps ahead whenever
    every task waits."""
    async with setup(tmp_path) as s:
        s.glance.fail["delete"] = ServerError(500, "still saving")
        session = await s.session()
        await session.write(0, b"x" * HOLD_BYTES)  # hashed in a thread: the clock jumps

        async def settle() -> None:
            await trio.sleep(0.3)  # Glance notices the broken PUT after a while
            del s.glance.fail["delete"]

        async with trio.open_nursery() as nursery:
            nursery.start_soon(settle)
            await _refused_write(session, streaming=True)
        assert s.glance.calls.count(("delete", session.image_id)) > 1  # refused, then retried
        assert s.glance.named("disk.raw") == []

        s.glance.fail["delete"] = Forbidden(403, "no")
        other = await s.session("other.raw")
        await _refused_write(other)
        assert [c for c in s.glance.calls if c == ("delete", other.image_id)] == [
            ("delete", other.image_id)
        ]  # once: a 403 does not pass by waiting
        assert len(s.glance.named("other.raw")) == 1
