"""The write side of the FUSE operations below FUSE (as s3ql's t3_fs_api does): GlanceFS on a
fake Glance, its handlers called directly; each answer is an errno or attributes, each change
is checked in the fake's records."""

from __future__ import annotations

import errno
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, cast

import pyfuse3
import pytest
import trio
from fakes import FakeGlance, record
from pyfuse3 import FileHandleT, InodeT

from glancefs.fs.catalog import Catalog
from glancefs.fs.config import MountConfig
from glancefs.fs.namespace import FIXED_INODES, NEW, ROOT
from glancefs.fs.operations import GlanceFS

MiB = 1024 * 1024


@dataclass
class Ctx:
    """What handlers read of pyfuse3's RequestContext (which cannot be built in Python)."""

    pid: int = os.getpid()
    uid: int = os.getuid()
    gid: int = os.getgid()
    umask: int = 0o022


@dataclass
class Fields:
    """pyfuse3.SetattrFields, whose flags are read-only in Python."""

    update_size: bool = False
    update_mtime: bool = False
    update_atime: bool = False
    update_mode: bool = False
    update_uid: bool = False
    update_gid: bool = False
    update_ctime: bool = False


def _fields(**flags: bool) -> pyfuse3.SetattrFields:
    return cast(pyfuse3.SetattrFields, Fields(**flags))


CTX = cast(pyfuse3.RequestContext, Ctx())
ROOT_INODE = InodeT(FIXED_INODES[ROOT])
NEW_INODE = InodeT(FIXED_INODES[NEW])


@asynccontextmanager
async def filesystem(
    records: list[dict[str, Any]] | None = None, **config: Any
) -> AsyncIterator[tuple[GlanceFS, FakeGlance]]:
    glance = FakeGlance(records)
    settings = MountConfig(**config)
    async with trio.open_nursery() as nursery:
        catalog = Catalog(glance, settings, nursery)  # type: ignore[arg-type]
        yield GlanceFS(glance, settings, nursery, catalog), glance  # type: ignore[arg-type]
        nursery.cancel_scope.cancel()


async def _errno_of(call: Any) -> int:
    with pytest.raises(pyfuse3.FUSEError) as refused:
        await call
    return refused.value.errno


async def _upload(fs: GlanceFS, name: str, data: bytes) -> tuple[InodeT, FileHandleT]:
    info, attrs = await fs.create(NEW_INODE, name.encode(), 0o644, os.O_WRONLY, CTX)
    await fs.write(info.fh, 0, data)
    return InodeT(attrs.st_ino), info.fh


async def test_create_write_close_makes_an_active_image_with_the_name_s_formats() -> None:
    async with filesystem() as (fs, glance):
        info, _ = await fs.create(NEW_INODE, b"disk.vmdk", 0o644, os.O_WRONLY, CTX)
        [created] = glance.named("disk.vmdk")
        assert (created["disk_format"], created["container_format"]) == ("vmdk", "bare")
        await fs.write(info.fh, 0, b"plain data")  # not a vmdk: the content corrects it
        await fs.flush(info.fh)
        await fs.release(info.fh)
        [image] = glance.named("disk.vmdk")
        assert (image["status"], image["disk_format"]) == ("active", "raw")
        assert glance.data[image["id"]] == b"plain data"


async def test_creating_outside_new_is_eperm_and_a_bug_below_is_eio() -> None:
    async with filesystem() as (fs, glance):
        assert await _errno_of(fs.create(ROOT_INODE, b"x", 0o644, os.O_WRONLY, CTX)) == errno.EPERM
        glance.fail["create"] = RuntimeError("a bug")
        assert await _errno_of(fs.create(NEW_INODE, b"x", 0o644, os.O_WRONLY, CTX)) == errno.EIO
        # Handlers without a reply are guarded too: nothing escapes to end the mount.
        await fs.release(FileHandleT(12345))
        await fs.releasedir(FileHandleT(12345))
        await fs.forget([(InodeT(999999), 1)])


async def test_ftruncate_extends_and_utime_is_recorded() -> None:
    async with filesystem() as (fs, glance):
        inode, fh = await _upload(fs, "sparse.raw", b"x" * 10)
        attrs = pyfuse3.EntryAttributes()
        attrs.st_size = 3 * MiB
        assert (await fs.setattr(inode, attrs, _fields(update_size=True), fh, CTX)).st_size == (
            3 * MiB
        )
        times = pyfuse3.EntryAttributes()
        times.st_mtime_ns = 1_600_000_000_123_456_789
        await fs.setattr(inode, times, _fields(update_mtime=True), fh, CTX)  # cp -p
        await fs.flush(fh)
        await fs.release(fh)
        [image] = glance.named("sparse.raw")
        assert glance.data[image["id"]] == b"x" * 10 + bytes(3 * MiB - 10)
        assert image["glancefs_mtime"] == "2020-09-13T12:26:40.123456789Z"
        assert (await fs.getattr(inode, CTX)).st_mtime_ns == 1_600_000_000_123_456_789


async def test_links_count_every_path_of_an_image() -> None:
    records = [record(1, tags=["a", "b"]), record(2, status="queued")]
    async with filesystem(records) as (fs, _):
        tagged = await fs.lookup(ROOT_INODE, b"image-1", CTX)
        assert tagged.st_nlink == 4  # root, by-id/, by-tag/a/, by-tag/b/
        queued = await fs.lookup(ROOT_INODE, b"image-2", CTX)
        assert queued.st_nlink == 3  # root, by-id/, new/


async def test_mv_into_and_between_tag_directories_changes_tags() -> None:
    async with filesystem([record(1, tags=["a"])]) as (fs, glance):
        await fs.lookup(ROOT_INODE, b"image-1", CTX)
        by_tag = await fs.lookup(ROOT_INODE, b"by-tag", CTX)
        tag_a = await fs.lookup(InodeT(by_tag.st_ino), b"a", CTX)
        by_id = await fs.lookup(ROOT_INODE, b"by-id", CTX)
        image_id = record(1)["id"]
        assert (
            await _errno_of(
                fs.rename(ROOT_INODE, b"image-1", InodeT(by_id.st_ino), b"image-1", 0, CTX)
            )
            == errno.EPERM
        )
        assert (
            await _errno_of(
                fs.rename(InodeT(tag_a.st_ino), b"image-1", ROOT_INODE, b"other", 0, CTX)
            )
            == errno.EPERM
        )  # a tag move keeps the name
        await fs.rename(InodeT(tag_a.st_ino), b"image-1", ROOT_INODE, b"image-1", 0, CTX)
        assert glance.record(image_id)["tags"] == []
        assert ("untag", image_id) in glance.calls


async def test_a_refused_final_rename_deletes_rsync_s_temporary_upload() -> None:
    async with filesystem([record(1, name="f")]) as (fs, glance):
        _, fh = await _upload(fs, ".f.AbC123", b"new content")
        await fs.flush(fh)
        await fs.release(fh)
        code = await _errno_of(fs.rename(NEW_INODE, b".f.AbC123", NEW_INODE, b"f", 0, CTX))
        assert code == errno.EPERM  # replacing f needs --allow-delete
        assert glance.named(".f.AbC123") == []
        assert [r["id"] for r in glance.named("f")] == [record(1)["id"]]


async def test_setxattr_during_an_upload_is_applied_after_the_data() -> None:
    async with filesystem() as (fs, glance):
        glance.hold_upload = trio.Event()
        inode, fh = await _upload(fs, "tagged.raw", b"x" * (2 * MiB))
        await fs.setxattr(inode, b"user.os_distro", b"ubuntu", CTX)
        await fs.setxattr(inode, b"user.tags.add", b"t", CTX)
        [image] = glance.named("tagged.raw")
        assert "os_distro" not in image
        assert image["tags"] == []
        glance.hold_upload.set()
        await fs.flush(fh)
        assert (image["os_distro"], image["tags"]) == ("ubuntu", ["t"])
        await fs.release(fh)


@pytest.mark.parametrize("key", [b"user. lead", b"user.trail ", b"user.a\nb", b"user.\xff"])
async def test_xattr_keys_glance_would_change_are_einval(key: bytes) -> None:
    async with filesystem([record(1)]) as (fs, glance):
        attrs = await fs.lookup(ROOT_INODE, b"image-1", CTX)
        code = await _errno_of(fs.setxattr(InodeT(attrs.st_ino), key, b"v", CTX))
        assert code == errno.EINVAL
        assert not [c for c in glance.calls if c[0] == "patch"]


@pytest.mark.parametrize("direct_io", [False, True])
async def test_direct_io_opens_for_reading_past_the_page_cache(direct_io: bool) -> None:
    async with filesystem(direct_io=direct_io) as (fs, _):
        inode, fh = await _upload(fs, "disk.raw", b"x" * 10)
        await fs.flush(fh)
        await fs.release(fh)
        info = await fs.open(inode, os.O_RDONLY, CTX)
        assert (info.direct_io, info.keep_cache) == (direct_io, False)
        await fs.release(info.fh)
