"""The FUSE adapter below FUSE: GlanceFS only converts (bytes names, flags, the core's attributes
to pyfuse3's) and turns what the core raises into one errno. What the filesystem decides is
tested on the core itself (test_filesystem.py)."""

from __future__ import annotations

import errno
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pyfuse3
import pytest
import trio
from fakes import FakeClient, record
from pyfuse3 import FileHandleT, InodeT

from glancefs.fs.config import MountConfig
from glancefs.fs.filesystem import Filesystem
from glancefs.fs.mount import build_filesystem
from glancefs.fs.namespace import FIXED_INODES, NEW, ROOT
from glancefs.fs.operations import GlanceFS, KernelInvalidation

ROOT_INODE = InodeT(FIXED_INODES[ROOT])
NEW_INODE = InodeT(FIXED_INODES[NEW])
CTX = pyfuse3.RequestContext()  # pid 0: no writer to judge


@asynccontextmanager
async def adapter(
    records: list[dict[str, Any]] | None = None,
) -> AsyncIterator[tuple[GlanceFS, Filesystem, FakeClient]]:
    glance = FakeClient(records)
    async with trio.open_nursery() as nursery:
        fs = build_filesystem(glance, MountConfig(), nursery, KernelInvalidation(nursery))
        yield GlanceFS(fs), fs, glance
        nursery.cancel_scope.cancel()


async def _errno_of(call: Any) -> int:
    with pytest.raises(pyfuse3.FUSEError) as refused:
        await call
    return refused.value.errno


async def test_entries_carry_the_core_s_attributes() -> None:
    async with adapter([record(1, tags=["a"])]) as (operations, fs, _):
        entry = await operations.lookup(ROOT_INODE, b"image-1", CTX)
        attrs = await fs.tree.getattr(entry.st_ino)
        assert (entry.st_ino, entry.st_mode, entry.st_nlink) == (
            attrs.inode,
            attrs.mode,
            attrs.links,
        )
        assert (entry.st_size, entry.st_blocks, entry.st_blksize) == (10, 1, 1024 * 1024)
        assert entry.st_mtime_ns == entry.st_atime_ns == entry.st_ctime_ns == attrs.mtime_ns
        assert entry.entry_timeout == entry.attr_timeout == attrs.timeout
        assert [os.fsdecode(n) for n in await operations.listxattr(entry.st_ino, CTX)] == (
            await fs.listxattr(entry.st_ino)
        )


async def test_an_upload_opens_past_the_page_cache() -> None:
    async with adapter() as (operations, _, glance):
        info, entry = await operations.create(NEW_INODE, b"disk.raw", 0o644, os.O_WRONLY, CTX)
        assert (info.direct_io, entry.st_mode & 0o777) == (True, 0o644)
        assert await operations.write(info.fh, 0, b"data") == 4
        await operations.flush(info.fh)
        await operations.release(info.fh)
        [image] = glance.named("disk.raw")
        assert glance.data[image["id"]] == b"data"


async def test_refusals_are_their_errno_and_a_bug_below_is_eio() -> None:
    async with adapter([record(1)]) as (operations, _, glance):
        create = operations.create(ROOT_INODE, b"x", 0o644, os.O_WRONLY, CTX)
        assert await _errno_of(create) == errno.EPERM
        assert await _errno_of(operations.lookup(ROOT_INODE, b"missing", CTX)) == errno.ENOENT
        assert await _errno_of(operations.mkdir(ROOT_INODE, b"d", 0o755, CTX)) == errno.EPERM
        noreplace = operations.rename(
            ROOT_INODE, b"image-1", ROOT_INODE, b"new", pyfuse3.RENAME_NOREPLACE, CTX
        )
        assert await _errno_of(noreplace) == errno.EINVAL
        assert await _errno_of(operations.getxattr(ROOT_INODE, b"security.x", CTX)) == (
            errno.ENOTSUP
        )
        glance.fail["create"] = RuntimeError("a bug")
        create = operations.create(NEW_INODE, b"x", 0o644, os.O_WRONLY, CTX)
        assert await _errno_of(create) == errno.EIO
        # Handlers without a reply are guarded too: nothing escapes to end the mount.
        await operations.release(FileHandleT(12345))
        await operations.releasedir(FileHandleT(12345))
        await operations.forget([(InodeT(999999), 1)])
