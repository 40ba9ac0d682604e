"""The pyfuse3 ``Operations``: a thin adapter that hands the kernel's requests to the filesystem
core (:mod:`.filesystem`) and its answers back.

This is the only module that answers FUSE. Each handler converts (bytes names to ``str``, flags
and setattr fields to arguments, the core's attributes to ``pyfuse3.EntryAttributes``) and decides
nothing. The core raises domain errors (:class:`~glancefs.fs.refusals.Refusal`,
:class:`~glancefs.GlanceError`); :func:`_boundary` turns each into one ``FUSEError`` with the right
errno and, where the user needs to know why, one log line.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, Concatenate, ParamSpec, TypeVar

import pyfuse3
import trio
from pyfuse3 import FileHandleT, InodeT

from glancefs import GlanceError, IntegrityError

from .files import Opened
from .filesystem import Capacity, Filesystem
from .refusals import Refusal, errno_of
from .status import STATUS
from .tree import Attributes

__all__ = ["GlanceFS", "KernelInvalidation"]

log = logging.getLogger("glancefs.fs")

P = ParamSpec("P")
R = TypeVar("R")

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND


def _boundary(
    method: Callable[Concatenate[GlanceFS, P], Coroutine[Any, Any, R]],
) -> Callable[Concatenate[GlanceFS, P], Coroutine[Any, Any, R]]:
    """Translate domain errors raised below into one FUSEError (and one log line)."""

    async def handler(self: GlanceFS, /, *args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await method(self, *args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except Refusal as refusal:
            if not refusal.quiet:
                log.warning("%s: %s", method.__name__, refusal)
            STATUS.refused(refusal.errno)
            raise pyfuse3.FUSEError(refusal.errno) from None
        except GlanceError as error:
            code = errno_of(error)
            if code != errno.ENOENT:
                log.error("%s: %s: %s", method.__name__, errno.errorcode[code], error)
            STATUS.refused(code)
            raise pyfuse3.FUSEError(code) from None
        except Exception:
            log.exception("%s: internal error", method.__name__)
            STATUS.refused(errno.EIO)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return handler


def _entry(attrs: Attributes) -> pyfuse3.EntryAttributes:
    entry = pyfuse3.EntryAttributes()
    entry.st_ino = InodeT(attrs.inode)
    entry.entry_timeout = entry.attr_timeout = attrs.timeout
    entry.st_uid, entry.st_gid = attrs.uid, attrs.gid
    entry.st_blksize = attrs.block_size
    entry.st_mode = attrs.mode
    entry.st_nlink = attrs.links
    entry.st_size, entry.st_blocks = attrs.size, attrs.blocks
    entry.st_atime_ns = entry.st_mtime_ns = entry.st_ctime_ns = attrs.mtime_ns
    return entry


def _file_info(opened: Opened) -> pyfuse3.FileInfo:
    return pyfuse3.FileInfo(
        fh=FileHandleT(opened.handle), direct_io=opened.direct_io, keep_cache=opened.keep_cache
    )


def _statvfs(capacity: Capacity) -> pyfuse3.StatvfsData:
    stats = pyfuse3.StatvfsData()
    stats.f_bsize = stats.f_frsize = capacity.block_size
    stats.f_namemax = capacity.name_max
    stats.f_blocks = capacity.blocks
    stats.f_bfree = stats.f_bavail = capacity.free_blocks
    stats.f_files = capacity.files
    stats.f_ffree = stats.f_favail = capacity.free_files
    return stats


class KernelInvalidation:
    """The kernel's caches of the mount, told to forget through ``pyfuse3.invalidate_inode``
    (a :class:`~glancefs.fs.files.KernelCache`), each in a task of ``nursery``."""

    def __init__(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery

    def drop_pages(self, inode: int) -> None:
        self._nursery.start_soon(self._invalidate, inode, False)

    def drop_attributes(self, inode: int) -> None:
        self._nursery.start_soon(self._invalidate, inode, True)

    async def _invalidate(self, inode: int, attributes_only: bool) -> None:
        # A task of the nursery: must not raise.
        try:
            await trio.to_thread.run_sync(pyfuse3.invalidate_inode, InodeT(inode), attributes_only)
        except OSError as error:  # the kernel forgot the inode: nothing left to drop
            what = "attributes" if attributes_only else "pages"
            log.debug("inode %d: %s not invalidated: %s", inode, what, error)


class GlanceFS(pyfuse3.Operations):
    """The kernel's requests, handed to the filesystem core (:class:`Filesystem`)."""

    def __init__(self, filesystem: Filesystem) -> None:
        super().__init__()
        self._fs = filesystem
        self._tree = filesystem.tree
        self._files = filesystem.files

    # -- names and attributes -------------------------------------------------------------

    @_boundary
    async def lookup(
        self, parent_inode: InodeT, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        return _entry(await self._tree.lookup(parent_inode, os.fsdecode(name)))

    @_boundary
    async def getattr(self, inode: InodeT, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return _entry(await self._tree.getattr(inode))

    @_boundary
    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        self._tree.forget(inode_list)

    # -- directories ------------------------------------------------------------------------

    @_boundary
    async def opendir(self, inode: InodeT, ctx: pyfuse3.RequestContext) -> FileHandleT:
        return FileHandleT(await self._tree.opendir(inode))

    @_boundary
    async def readdir(self, fh: FileHandleT, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        def reply(name: str, attrs: Attributes, next_id: int) -> bool:
            return pyfuse3.readdir_reply(token, os.fsencode(name), _entry(attrs), next_id)

        await self._tree.readdir(fh, start_id, reply)

    @_boundary
    async def releasedir(self, fh: FileHandleT) -> None:
        self._tree.releasedir(fh)

    # -- files ------------------------------------------------------------------------------

    @_boundary
    async def open(
        self, inode: InodeT, flags: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.FileInfo:
        write = bool(flags & _WRITE_FLAGS)
        return _file_info(await self._fs.open(inode, write=write, pid=ctx.pid))

    @_boundary
    async def create(
        self, parent_inode: InodeT, name: bytes, mode: int, flags: int, ctx: pyfuse3.RequestContext
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        opened, attrs = await self._fs.create(parent_inode, os.fsdecode(name), ctx.pid)
        return _file_info(opened), _entry(attrs)

    @_boundary
    async def read(self, fh: FileHandleT, off: int, size: int) -> bytes:
        try:
            return STATUS.served(await self._files.read(fh, off, size))
        except IntegrityError:
            # Logged once, when found (files.on_corrupt_image): every later read fails quietly.
            raise pyfuse3.FUSEError(errno.EIO) from None

    @_boundary
    async def write(self, fh: FileHandleT, off: int, buf: bytes) -> int:
        return await self._files.write(fh, off, buf)

    @_boundary
    async def flush(self, fh: FileHandleT) -> None:
        await self._files.flush(fh)

    @_boundary
    async def fsync(self, fh: FileHandleT, datasync: bool) -> None:
        await self.flush(fh)

    @_boundary
    async def release(self, fh: FileHandleT) -> None:
        await self._files.release(fh)

    # -- changing the catalog ---------------------------------------------------------------

    @_boundary
    async def setattr(
        self,
        inode: InodeT,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: FileHandleT | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        size = attr.st_size if fields.update_size else None
        mtime_ns = attr.st_mtime_ns if fields.update_mtime else None
        return _entry(await self._fs.setattr(inode, fh, size=size, mtime_ns=mtime_ns))

    @_boundary
    async def unlink(self, parent_inode: InodeT, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        await self._fs.unlink(parent_inode, os.fsdecode(name))

    @_boundary
    async def rename(
        self,
        parent_inode_old: InodeT,
        name_old: bytes,
        parent_inode_new: InodeT,
        name_new: bytes,
        flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> None:
        await self._fs.rename(
            parent_inode_old,
            os.fsdecode(name_old),
            parent_inode_new,
            os.fsdecode(name_new),
            replace=not flags & pyfuse3.RENAME_NOREPLACE,
        )

    @_boundary
    async def mkdir(
        self, parent_inode: InodeT, name: bytes, mode: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        self._fs.refuse_node("mkdir", os.fsdecode(name))

    @_boundary
    async def rmdir(self, parent_inode: InodeT, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self._fs.refuse_node("rmdir", os.fsdecode(name))

    @_boundary
    async def symlink(
        self, parent_inode: InodeT, name: bytes, target: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        return _entry(await self._fs.symlink(parent_inode, os.fsdecode(name), os.fsdecode(target)))

    @_boundary
    async def readlink(self, inode: InodeT, ctx: pyfuse3.RequestContext) -> bytes:
        return os.fsencode(await self._fs.readlink(inode))

    @_boundary
    async def link(
        self, inode: InodeT, new_parent_inode: InodeT, new_name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        self._fs.refuse_node("link", os.fsdecode(new_name))

    @_boundary
    async def mknod(
        self, parent_inode: InodeT, name: bytes, mode: int, rdev: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        self._fs.refuse_node("mknod", os.fsdecode(name))

    # -- extended attributes ----------------------------------------------------------------

    @_boundary
    async def getxattr(self, inode: InodeT, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        if not name.startswith(b"user."):
            # Only user. holds image fields. ENOTSUP (what the kernel answers for a namespace
            # a filesystem has no handler for) rather than ENODATA: ls -l asks every file for
            # security.selinux and system.posix_acl_access, and on ENOTSUP it stops asking for
            # the rest of the device, saving two round trips per file. Raised directly: no
            # record fetch, no Refusal, no log line.
            raise pyfuse3.FUSEError(errno.ENOTSUP)
        return await self._fs.getxattr(inode, os.fsdecode(name))

    @_boundary
    async def listxattr(self, inode: InodeT, ctx: pyfuse3.RequestContext) -> list[bytes]:
        return [os.fsencode(name) for name in await self._fs.listxattr(inode)]

    @_boundary
    async def setxattr(
        self, inode: InodeT, name: bytes, value: bytes, ctx: pyfuse3.RequestContext
    ) -> None:
        await self._fs.setxattr(inode, os.fsdecode(name), value)

    @_boundary
    async def removexattr(self, inode: InodeT, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        await self._fs.removexattr(inode, os.fsdecode(name))

    @_boundary
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        return _statvfs(await self._fs.statfs())
