"""The filesystem core without FUSE (as s3ql's t3_fs_api drives its Operations, and
mountpoint-s3 its S3Filesystem): built as the mount builds it, on a fake Glance, its operations
called with inode numbers, handles and ``str`` names; each answer is plain data or a Refusal, each
change is checked in the fake's records."""

from __future__ import annotations

import os
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
import trio
from fakes import FakeClient, record

from glancefs import IntegrityError
from glancefs.fs.config import MountConfig
from glancefs.fs.files import on_corrupt_image
from glancefs.fs.filesystem import Filesystem, capacity_of
from glancefs.fs.inodes import ImageKey, InodeTable
from glancefs.fs.mount import build_filesystem
from glancefs.fs.namespace import FIXED_INODES, NEW, ROOT
from glancefs.fs.payload import HOLD_BYTES
from glancefs.fs.refusals import (
    AccessDenied,
    Exists,
    InvalidArgument,
    NoEntry,
    NotPermitted,
    ReadOnly,
)
from glancefs.fs.tree import Attributes

MiB = 1024 * 1024
ROOT_INODE = FIXED_INODES[ROOT]
NEW_INODE = FIXED_INODES[NEW]
#: The writer of every upload: this process, which holds no descriptor of the file.
PID = os.getpid()


@dataclass
class Kernel:
    """The kernel's caches as the core tells them to forget (a files.KernelCache)."""

    pages: list[int] = field(default_factory=list)
    attributes: list[int] = field(default_factory=list)

    def drop_pages(self, inode: int) -> None:
        self.pages.append(inode)

    def drop_attributes(self, inode: int) -> None:
        self.attributes.append(inode)


@asynccontextmanager
async def filesystem(
    records: list[dict[str, Any]] | None = None, **config: Any
) -> AsyncIterator[tuple[Filesystem, FakeClient, Kernel]]:
    glance, kernel = FakeClient(records), Kernel()
    async with trio.open_nursery() as nursery:
        fs = build_filesystem(glance, MountConfig(**config), nursery, kernel)
        yield fs, glance, kernel
        nursery.cancel_scope.cancel()


async def _upload(fs: Filesystem, name: str, data: bytes) -> tuple[int, int]:
    """A new image in new/ with ``data`` written, still open: its inode and handle."""
    opened, attrs = await fs.create(NEW_INODE, name, PID)
    await fs.files.write(opened.handle, 0, data)
    return attrs.inode, opened.handle


async def _close(fs: Filesystem, handle: int) -> None:
    await fs.files.flush(handle)
    await fs.files.release(handle)


# -- names and attributes -------------------------------------------------------------------


async def test_links_count_every_path_of_an_image() -> None:
    records = [record(1, tags=["a", "b"]), record(2, status="queued")]
    async with filesystem(records) as (fs, _, _):
        tagged = await fs.tree.lookup(ROOT_INODE, "image-1")
        assert tagged.links == 4  # root, by-id/, by-tag/a/, by-tag/b/
        queued = await fs.tree.lookup(ROOT_INODE, "image-2")
        assert queued.links == 3  # root, by-id/, new/


async def test_an_inode_is_known_while_the_kernel_holds_a_reference() -> None:
    async with filesystem([record(1)]) as (fs, _, _):
        attrs = await fs.tree.lookup(ROOT_INODE, "image-1")
        assert (await fs.tree.getattr(attrs.inode)).size == 10
        fs.tree.forget([(attrs.inode, 1)])
        with pytest.raises(NoEntry):
            await fs.tree.getattr(attrs.inode)
        with pytest.raises(NoEntry):
            await fs.tree.lookup(ROOT_INODE, "image-9")


async def test_readdir_counts_only_the_entries_the_kernel_took_and_resumes_at_an_offset() -> None:
    async with filesystem([record(n) for n in (1, 2, 3)]) as (fs, _, _):
        handle = await fs.tree.opendir(ROOT_INODE)
        taken: list[tuple[str, int]] = []
        offered: dict[str, Attributes] = {}

        def reply_with_room(room: int) -> Any:
            def reply(name: str, attrs: Attributes, next_offset: int) -> bool:
                offered[name] = attrs
                if len(taken) == room:
                    return False
                taken.append((name, next_offset))
                return True

            return reply

        await fs.tree.readdir(handle, 0, reply_with_room(4))
        assert taken == [("by-id", 1), ("by-tag", 2), ("new", 3), ("image-1", 4)]
        await fs.tree.getattr(offered["image-1"].inode)
        with pytest.raises(NoEntry):  # offered, not taken: the kernel holds no reference
            await fs.tree.getattr(offered["image-2"].inode)
        await fs.tree.readdir(handle, 4, reply_with_room(10))
        assert taken[4:] == [("image-2", 5), ("image-3", 6)]
        fs.tree.releasedir(handle)


# -- files ----------------------------------------------------------------------------------


async def test_create_write_close_makes_an_active_image_with_the_name_s_formats() -> None:
    async with filesystem() as (fs, glance, kernel):
        inode, handle = await _upload(fs, "disk.vmdk", b"plain data")  # not a vmdk
        await _close(fs, handle)
        [image] = glance.named("disk.vmdk")
        assert (image["status"], image["disk_format"]) == ("active", "raw")  # the content's
        assert glance.data[image["id"]] == b"plain data"
        assert kernel.attributes == [inode]  # the kernel asks for the new size


async def test_a_created_image_takes_the_formats_its_name_tells_at_once() -> None:
    async with filesystem() as (fs, glance, _):
        opened, attrs = await fs.create(NEW_INODE, "disk.vmdk", PID)
        [image] = glance.named("disk.vmdk")
        assert (image["disk_format"], image["container_format"]) == ("vmdk", "bare")
        assert (opened.direct_io, attrs.mode & 0o777, attrs.links) == (True, 0o644, 3)
        await fs.files.release(opened.handle)


async def test_create_is_refused_outside_new_for_bad_names_and_on_a_read_only_mount() -> None:
    async with filesystem() as (fs, glance, _):
        with pytest.raises(NotPermitted):
            await fs.create(ROOT_INODE, "x", PID)
        with pytest.raises(InvalidArgument):
            await fs.create(NEW_INODE, "a/b", PID)
        assert not glance.calls
    async with filesystem(read_only=True) as (fs, glance, _):
        with pytest.raises(ReadOnly):
            await fs.create(NEW_INODE, "x", PID)


@pytest.mark.parametrize("direct_io", [False, True])
async def test_direct_io_opens_for_reading_past_the_page_cache(direct_io: bool) -> None:
    async with filesystem(direct_io=direct_io) as (fs, _, _):
        inode, handle = await _upload(fs, "disk.raw", b"x" * 10)
        await _close(fs, handle)
        opened = await fs.open(inode, write=False, pid=PID)
        assert (opened.direct_io, opened.keep_cache) == (direct_io, False)
        with pytest.raises(AccessDenied):  # open for reading
            await fs.files.write(opened.handle, 0, b"x")
        await fs.files.release(opened.handle)


async def test_only_a_queued_image_opens_for_writing() -> None:
    async with filesystem([record(1)]) as (fs, _, _):
        attrs = await fs.tree.lookup(ROOT_INODE, "image-1")
        with pytest.raises(AccessDenied):
            await fs.open(attrs.inode, write=True, pid=PID)
        with pytest.raises(NoEntry):
            await fs.open(ROOT_INODE, write=False, pid=PID)


def test_a_corrupt_image_has_the_kernel_drop_its_pages() -> None:
    inodes, kernel = InodeTable(FIXED_INODES), Kernel()
    image_id = record(1)["id"]
    inode = inodes.remember(ImageKey(image_id))
    on_corrupt_image(inodes, kernel)(image_id, IntegrityError("sha512 mismatch"))
    assert kernel.pages == [inode]


async def test_a_size_then_a_reopen_by_its_writer_is_one_upload() -> None:
    """qemu-img convert -O raw: the output created with a size and closed, stat, opened again
    for the data (read back, too), closed: one image, published at the last close."""
    async with filesystem() as (fs, glance, _):
        opened, attrs = await fs.create(NEW_INODE, "disk.raw", PID)
        await fs.setattr(attrs.inode, opened.handle, size=2 * MiB, mtime_ns=None)
        await _close(fs, opened.handle)  # only a size, and its writer runs: not the end
        [image] = glance.named("disk.raw")
        assert image["status"] == "queued"
        assert (await fs.tree.getattr(attrs.inode)).size == 2 * MiB

        again = await fs.open(attrs.inode, write=True, pid=PID)
        await fs.files.write(again.handle, MiB, b"d" * 4096)
        assert await fs.files.read(again.handle, MiB - 2, 4) == b"\0\0dd"
        reader = await fs.open(attrs.inode, write=False, pid=PID)  # qemu-img info, meanwhile
        assert await fs.files.read(reader.handle, MiB, 2) == b"dd"
        await fs.files.release(reader.handle)
        await _close(fs, again.handle)
        assert image["status"] == "active"
        assert glance.data[image["id"]] == bytes(MiB) + b"d" * 4096 + bytes(MiB - 4096)
        assert glance.named("disk.raw") == [image]


async def test_a_header_left_by_a_writer_that_exits_is_published_before_the_next_open(
    blank_qcow2: bytes, sleeper: subprocess.Popen[bytes]
) -> None:
    """qemu-img create -f qcow2, then qemu-img info: the open finds the image active."""
    async with filesystem() as (fs, glance, _):
        opened, attrs = await fs.create(NEW_INODE, "blank.qcow2", sleeper.pid)
        await _close(fs, opened.handle)  # nothing written, and its writer runs
        again = await fs.open(attrs.inode, write=True, pid=sleeper.pid)
        await fs.files.write(again.handle, 0, blank_qcow2)
        await _close(fs, again.handle)  # only a header, after a reopen
        [image] = glance.named("blank.qcow2")
        assert image["status"] == "queued"
        sleeper.kill()
        await trio.to_thread.run_sync(sleeper.wait)
        reader = await fs.open(attrs.inode, write=False, pid=PID)  # no waiting for it
        assert image["status"] == "active"
        assert glance.data[image["id"]] == blank_qcow2
        await fs.files.release(reader.handle)


# -- truncate and utime ---------------------------------------------------------------------


async def test_ftruncate_extends_and_utime_is_recorded() -> None:
    async with filesystem() as (fs, glance, _):
        inode, handle = await _upload(fs, "sparse.raw", b"x" * 10)
        extended = await fs.setattr(inode, handle, size=3 * MiB, mtime_ns=None)
        assert extended.size == 3 * MiB
        await fs.setattr(inode, handle, size=None, mtime_ns=1_600_000_000_123_456_789)  # cp -p
        await _close(fs, handle)
        [image] = glance.named("sparse.raw")
        assert glance.data[image["id"]] == b"x" * 10 + bytes(3 * MiB - 10)
        assert image["glancefs_mtime"] == "2020-09-13T12:26:40.123456789Z"
        assert (await fs.tree.getattr(inode)).mtime_ns == 1_600_000_000_123_456_789


async def test_only_a_queued_image_truncates_without_an_upload_and_only_to_zero() -> None:
    async with filesystem([record(1), record(2, status="queued", size=None)]) as (fs, _, _):
        active = await fs.tree.lookup(ROOT_INODE, "image-1")
        queued = await fs.tree.lookup(ROOT_INODE, "image-2")
        with pytest.raises(AccessDenied):
            await fs.setattr(active.inode, None, size=0, mtime_ns=None)
        with pytest.raises(AccessDenied):
            await fs.setattr(queued.inode, None, size=5, mtime_ns=None)
        assert (await fs.setattr(queued.inode, None, size=0, mtime_ns=None)).size == 0
        with pytest.raises(AccessDenied):
            await fs.setattr(ROOT_INODE, None, size=0, mtime_ns=None)
        # chmod and chown (no size, no time) are accepted and change nothing.
        assert (await fs.setattr(active.inode, None, size=None, mtime_ns=None)) == active


# -- rm and mv ------------------------------------------------------------------------------


async def test_rm_needs_allow_delete_and_spares_protected_images() -> None:
    records = [record(1), record(2, protected=True)]
    async with filesystem(records) as (fs, glance, _):
        with pytest.raises(NotPermitted):
            await fs.unlink(ROOT_INODE, "image-1")
        with pytest.raises(NotPermitted):  # a directory
            await fs.unlink(ROOT_INODE, "new")
    async with filesystem(records, allow_delete=True) as (fs, glance, _):
        with pytest.raises(NotPermitted):
            await fs.unlink(ROOT_INODE, "image-2")
        await fs.unlink(ROOT_INODE, "image-1")
        assert [r["name"] for r in glance.images.records] == ["image-2"]


async def test_mv_into_and_between_tag_directories_changes_tags() -> None:
    async with filesystem([record(1, tags=["a"])]) as (fs, glance, _):
        by_tag = await fs.tree.lookup(ROOT_INODE, "by-tag")
        tag_a = await fs.tree.lookup(by_tag.inode, "a")
        by_id = await fs.tree.lookup(ROOT_INODE, "by-id")
        image_id = record(1)["id"]
        with pytest.raises(NotPermitted):  # names in by-id/ are fixed
            await fs.rename(ROOT_INODE, "image-1", by_id.inode, "image-1")
        with pytest.raises(NotPermitted):  # a tag move keeps the name
            await fs.rename(tag_a.inode, "image-1", ROOT_INODE, "other")
        await fs.rename(tag_a.inode, "image-1", ROOT_INODE, "image-1")
        assert glance.record(image_id)["tags"] == []
        assert ("untag", image_id) in glance.calls


async def test_mv_renames_and_refuses_names_glance_cannot_store() -> None:
    async with filesystem([record(1)]) as (fs, glance, _):
        with pytest.raises(InvalidArgument):
            await fs.rename(ROOT_INODE, "image-1", ROOT_INODE, "new")  # a fixed directory's
        with pytest.raises(NotPermitted):
            await fs.rename(ROOT_INODE, "new", ROOT_INODE, "other")
        await fs.rename(ROOT_INODE, "image-1", ROOT_INODE, "renamed")
        assert glance.record(record(1)["id"])["name"] == "renamed"


async def test_mv_over_another_image_replaces_it_only_when_allowed() -> None:
    records = [record(1), record(2)]
    async with filesystem(records, allow_delete=True) as (fs, glance, _):
        with pytest.raises(Exists):  # RENAME_NOREPLACE
            await fs.rename(ROOT_INODE, "image-1", ROOT_INODE, "image-2", replace=False)
        await fs.rename(ROOT_INODE, "image-1", ROOT_INODE, "image-2")
        assert [r["id"] for r in glance.named("image-2")] == [record(1)["id"]]
        assert ("delete", record(2)["id"]) in glance.calls


async def test_a_refused_final_rename_deletes_rsync_s_temporary_upload() -> None:
    async with filesystem([record(1, name="f")]) as (fs, glance, _):
        _, handle = await _upload(fs, ".f.AbC123", b"new content")
        await _close(fs, handle)
        with pytest.raises(NotPermitted):  # replacing f needs --allow-delete
            await fs.rename(NEW_INODE, ".f.AbC123", NEW_INODE, "f")
        assert glance.named(".f.AbC123") == []
        assert [r["id"] for r in glance.named("f")] == [record(1)["id"]]


@pytest.mark.parametrize("operation", ["mkdir", "rmdir", "link", "mknod"])
async def test_the_tree_is_fixed(operation: str) -> None:
    async with filesystem() as (fs, _, _):
        with pytest.raises(NotPermitted):
            fs.refuse_node(operation, "x")
    async with filesystem(read_only=True) as (fs, _, _):
        with pytest.raises(ReadOnly):
            fs.refuse_node(operation, "x")


# -- extended attributes --------------------------------------------------------------------


async def test_xattrs_show_the_record_and_change_it() -> None:
    async with filesystem([record(1)]) as (fs, glance, _):
        inode = (await fs.tree.lookup(ROOT_INODE, "image-1")).inode
        assert "user.os_distro" in await fs.listxattr(inode)
        await fs.setxattr(inode, "user.os_distro", b"ubuntu")
        assert await fs.getxattr(inode, "user.os_distro") == b"ubuntu"
        await fs.removexattr(inode, "user.os_distro")
        assert "os_distro" not in glance.record(record(1)["id"])
        assert await fs.listxattr(ROOT_INODE) == []


async def test_setxattr_during_an_upload_is_applied_after_the_data() -> None:
    async with filesystem() as (fs, glance, _):
        glance.hold_upload = trio.Event()
        inode, handle = await _upload(fs, "tagged.raw", b"x" * HOLD_BYTES)  # streaming
        await fs.setxattr(inode, "user.os_distro", b"ubuntu")
        await fs.setxattr(inode, "user.tags.add", b"t")
        [image] = glance.named("tagged.raw")
        assert "os_distro" not in image
        assert image["tags"] == []
        glance.hold_upload.set()
        await fs.files.flush(handle)
        assert (image["os_distro"], image["tags"]) == ("ubuntu", ["t"])
        await fs.files.release(handle)


@pytest.mark.parametrize("key", [b"user. lead", b"user.trail ", b"user.a\nb", b"user.\xff"])
async def test_xattr_keys_glance_would_change_are_einval(key: bytes) -> None:
    async with filesystem([record(1)]) as (fs, glance, _):
        attrs = await fs.tree.lookup(ROOT_INODE, "image-1")
        with pytest.raises(InvalidArgument):
            await fs.setxattr(attrs.inode, os.fsdecode(key), b"v")
        assert not [c for c in glance.calls if c[0] == "patch"]


# -- df ---------------------------------------------------------------------------------------


def test_df_without_limits_is_large_and_free() -> None:
    capacity = capacity_of({})
    assert capacity.block_size == 4096
    assert capacity.blocks == capacity.free_blocks > 0
    assert capacity.files == capacity.free_files > 0
    assert capacity_of({"image_size_total": {"limit": -1, "usage": 5}}) == capacity


def test_df_from_quota_usage() -> None:
    capacity = capacity_of(
        {
            "image_size_total": {"limit": 1000, "usage": 250},  # MiB
            "image_count_total": {"limit": 100, "usage": 7},
        }
    )
    assert (capacity.blocks, capacity.free_blocks) == (1000 * 256, 750 * 256)
    assert (capacity.files, capacity.free_files) == (100, 93)
    assert capacity_of({"image_size_total": {"limit": 10, "usage": 20}}).free_blocks == 0
