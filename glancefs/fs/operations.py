"""The pyfuse3 ``Operations``: the kernel's requests answered from the catalog and the readers.

This is the only module that knows FUSE. Everything below it raises domain errors
(:class:`~glancefs.fs.refusals.Refusal`, :class:`~glancefs.GlanceError`); :func:`_boundary` turns
each into one ``FUSEError`` with the right errno and, where the user needs to know why, one log
line.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Concatenate, ParamSpec, TypeVar

import pyfuse3
import trio
from pyfuse3 import FileHandleT, InodeT

from glancefs import (
    BadRequest,
    Client,
    Forbidden,
    GlanceError,
    Image,
    IntegrityError,
    NotFound,
    OverLimit,
    Unauthorized,
)

from .cache import DataCache
from .catalog import MTIME_PROPERTY, Catalog, Entry, Listing, file_mtime_ns, mtime_text
from .changes import Changes
from .config import MountConfig
from .formats import formats_of_name, upload_name
from .inodes import ImageKey, InodeTable, Key
from .namespace import (
    BY_TAG,
    FIXED_INODES,
    NEW,
    ROOT,
    ROOT_ENTRIES,
    Directory,
    DirKind,
    file_mode,
    has_readable_size,
)
from .naming import is_id_shaped, sanitize
from .read import ImageReader, Readers, SpoolSpace, default_spool_dir
from .refusals import (
    AccessDenied,
    Exists,
    InvalidArgument,
    NoAttribute,
    NoEntry,
    NotPermitted,
    ReadOnly,
    Refusal,
    Unsupported,
)
from .status import STATUS
from .uploader import MetadataChange, UploadPolicy, Uploads, UploadSession
from .writers import Writer
from .xattrs import FORMAT_FIELDS, field_of, image_xattrs, remove_patch, set_patch, tag_operation

__all__ = ["GlanceFS", "statvfs_of"]

log = logging.getLogger("glancefs.fs")

P = ParamSpec("P")
R = TypeVar("R")

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND


def _errno_of(error: GlanceError) -> int:
    if isinstance(error, NotFound):
        return errno.ENOENT
    if isinstance(error, Forbidden):
        return errno.EPERM
    if isinstance(error, Unauthorized):
        return errno.EACCES
    if isinstance(error, OverLimit):
        return errno.EDQUOT
    if isinstance(error, BadRequest):
        return errno.EINVAL
    return errno.EIO


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
            code = _errno_of(error)
            if code != errno.ENOENT:
                log.error("%s: %s: %s", method.__name__, errno.errorcode[code], error)
            STATUS.refused(code)
            raise pyfuse3.FUSEError(code) from None
        except Exception:
            log.exception("%s: internal error", method.__name__)
            STATUS.refused(errno.EIO)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return handler


@dataclass
class _OpenFile:
    inode: InodeT
    image: Image
    reader: ImageReader | None = None
    upload: UploadSession | None = None


_BLOCK = 4096
#: What df shows when Glance sets no limit: 1 PiB, all of it free, and 2**32 files.
_NO_LIMIT_BLOCKS = (1 << 50) // _BLOCK
_NO_LIMIT_FILES = (1 << 32) - 1


def statvfs_of(usage: Mapping[str, Mapping[str, int]]) -> pyfuse3.StatvfsData:
    """``df`` from Glance's quota usage: ``image_size_total`` (MiB) gives the blocks,
    ``image_count_total`` the files; a quantity without a limit (absent or negative: unified limits
    off, or unlimited) shows as a large, entirely free one."""
    stats = pyfuse3.StatvfsData()
    stats.f_bsize = stats.f_frsize = _BLOCK
    stats.f_namemax = 255
    stats.f_blocks = stats.f_bfree = stats.f_bavail = _NO_LIMIT_BLOCKS
    stats.f_files = stats.f_ffree = stats.f_favail = _NO_LIMIT_FILES
    size = usage.get("image_size_total") or {}
    if int(size.get("limit", -1)) >= 0:
        per_mib = (1024 * 1024) // _BLOCK
        stats.f_blocks = int(size["limit"]) * per_mib
        used = min(int(size.get("usage", 0)) * per_mib, stats.f_blocks)
        stats.f_bfree = stats.f_bavail = stats.f_blocks - used
    count = usage.get("image_count_total") or {}
    if int(count.get("limit", -1)) >= 0:
        stats.f_files = int(count["limit"])
        stats.f_ffree = stats.f_favail = max(stats.f_files - int(count.get("usage", 0)), 0)
    return stats


class GlanceFS(pyfuse3.Operations):
    """Glance's image catalog as a directory tree (see :mod:`glancefs.fs.namespace`)."""

    def __init__(
        self,
        client: Client,
        config: MountConfig,
        nursery: trio.Nursery,
        catalog: Catalog,
        cache: DataCache | None = None,
    ) -> None:
        super().__init__()
        self._client = client
        self._config = config
        self._nursery = nursery
        self.catalog = catalog
        self._changes = Changes(client, catalog)
        self._uploads = Uploads(
            self._changes,
            nursery,
            UploadPolicy(config.default_formats, config.spool_dir, config.keep_failed),
        )
        self._inodes = InodeTable(FIXED_INODES)
        self._readers = Readers(
            client,
            nursery,
            self._image_corrupt,
            verify=config.verify,
            prefetch_memory=config.prefetch_memory,
            cache=cache,
            cache_fill=config.cache is not None and config.cache.fill,
            spool=SpoolSpace(config.spool_dir or default_spool_dir(), config.spool_size),
        )
        self._open_files: dict[int, _OpenFile] = {}
        #: Per directory handle: its fixed entries (sub-directories) and the listing it snapshots.
        self._open_dirs: dict[int, tuple[tuple[tuple[str, Key], ...], Listing]] = {}
        self._next_handle = 1
        self._mounted_ns = time.time_ns()

    # -- names and attributes -------------------------------------------------------------

    @_boundary
    async def lookup(
        self, parent_inode: InodeT, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        key, image = await self._resolve(self._directory(parent_inode), os.fsdecode(name))
        attrs = self._attributes(key, image)
        self._inodes.remember(key)
        return attrs

    async def _resolve(self, directory: Directory, name: str) -> tuple[Key, Entry | None]:
        """The key (and attributes, for files) of ``name`` in ``directory``."""
        if directory == ROOT and name in ROOT_ENTRIES:
            return ROOT_ENTRIES[name], None
        if directory.kind is DirKind.BY_ID:
            if not is_id_shaped(name):
                raise NoEntry(name)  # no request: such text is no image's id
            try:
                entry = await self.catalog.attributes(name)
            except NotFound:
                raise NoEntry(name) from None
            return ImageKey(entry.id), entry
        listing = self.catalog.open_listing(directory)
        if directory == BY_TAG:
            await listing.wait_complete()
            if name not in listing.tags:
                raise NoEntry(name)
            return Directory(DirKind.TAG, name), None
        found = await listing.find(name)
        if found is None and directory == NEW:
            found = await self.catalog.named(name)
        if found is None:
            raise NoEntry(name)
        return ImageKey(found.id), found

    def _key(self, inode: InodeT) -> Key:
        """What ``inode`` stands for; ENOENT when the kernel holds no reference to it."""
        key = self._inodes.key_of(inode)
        if key is None:
            raise NoEntry(f"inode {inode}")
        return key

    def _directory(self, inode: InodeT) -> Directory:
        key = self._key(inode)
        if not isinstance(key, Directory):
            raise NoEntry(f"inode {inode} is not a directory")
        return key

    async def _image_of(self, inode: InodeT, *, fresh: bool = False) -> Image | None:
        """The full record of an image inode (``fresh``: asked of Glance now); None for a
        directory."""
        key = self._key(inode)
        if not isinstance(key, ImageKey):
            return None
        return await self.catalog.image(key.image_id, fresh=fresh)

    @_boundary
    async def getattr(self, inode: InodeT, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        key = self._key(inode)
        entry = None
        if isinstance(key, ImageKey):
            try:
                entry = await self.catalog.attributes(key.image_id)
            except NotFound:
                raise NoEntry(key.image_id) from None
        return self._attributes(key, entry)

    def _attributes(self, key: Key, image: Entry | Image | None) -> pyfuse3.EntryAttributes:
        attrs = pyfuse3.EntryAttributes()
        attrs.st_ino = self._inodes.inode_of(key)
        attrs.entry_timeout = self._config.metadata_ttl
        attrs.attr_timeout = self._config.metadata_ttl
        attrs.st_uid = self._config.uid
        attrs.st_gid = self._config.gid
        attrs.st_blksize = 1024 * 1024  # cp and dd size their buffers by this
        if image is None:
            writable = key == NEW and not self._config.read_only
            attrs.st_mode = stat.S_IFDIR | (0o755 if writable else 0o555)
            attrs.st_nlink = 2
            attrs.st_atime_ns = attrs.st_mtime_ns = attrs.st_ctime_ns = self._mounted_ns
            return attrs
        attrs.st_mode = file_mode(image.status, read_only=self._config.read_only)
        attrs.st_nlink = self._link_count(image)
        size = (image.size or 0) if has_readable_size(image.status) else 0
        attrs.st_size = size
        attrs.st_blocks = (size + 511) // 512
        mtime = image.updated_ns if isinstance(image, Entry) else file_mtime_ns(image)
        attrs.st_atime_ns = attrs.st_mtime_ns = attrs.st_ctime_ns = mtime
        return attrs

    def _link_count(self, image: Entry | Image) -> int:
        """How many paths show the image, so that du and find -links count it once: by-id/,
        one by-tag/T/ per tag, the root unless the view's --tag leaves it out (other --filter
        and --limit views are not evaluated: the root counts), and new/ while it lists it."""
        tags = set(image.tags)
        links = 1 + len(tags)
        if tags.issuperset(self._config.view.tags):
            links += 1
        if image.status == "queued" or self._changes.created_here(image.id):
            links += 1
        return links

    @_boundary
    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        for inode, count in inode_list:
            self._inodes.forget(inode, count)

    # -- directories ------------------------------------------------------------------------

    @_boundary
    async def opendir(self, inode: InodeT, ctx: pyfuse3.RequestContext) -> int:
        directory = self._directory(inode)
        fixed: list[tuple[str, Key]] = []
        if directory == ROOT:
            fixed += list(ROOT_ENTRIES.items())
        listing = self.catalog.open_listing(directory)
        if directory == BY_TAG:
            await listing.wait_complete()
            fixed += [(tag, Directory(DirKind.TAG, tag)) for tag in listing.tags]
        else:
            # Fail here rather than in readdir when Glance does not answer the first page.
            await listing.names_beyond(0)
        handle = self._new_handle()
        # The handle keeps this listing (it only grows, then never changes): offsets stay
        # valid while newer listings replace it.
        self._open_dirs[handle] = (tuple(fixed), listing)
        return handle

    @_boundary
    async def readdir(self, fh: FileHandleT, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        # Offsets: 1..len(fixed) are the sub-directories, then one per listed image.
        fixed, listing = self._open_dirs[fh]
        index = start_id
        while index < len(fixed):
            name, key = fixed[index]
            attrs = self._attributes(key, None)
            if not pyfuse3.readdir_reply(token, os.fsencode(name), attrs, index + 1):
                return
            self._inodes.remember(key)
            index += 1
        first = len(fixed)
        position = index - first
        replied = index > start_id
        while True:
            names, entries = listing.names, listing.entries
            while position < len(names):
                entry = entries[position]
                key = ImageKey(entry.id)
                attrs = self._attributes(key, entry)
                if not pyfuse3.readdir_reply(
                    token, os.fsencode(names[position]), attrs, first + position + 1
                ):
                    return
                self._inodes.remember(key)
                position += 1
                replied = True
            # Names are handed out as soon as they are final, while later pages still arrive:
            # return what there is, and wait only when there is nothing yet (an empty answer
            # would end the directory).
            if replied or not await listing.names_beyond(position):
                return

    @_boundary
    async def releasedir(self, fh: FileHandleT) -> None:
        self._open_dirs.pop(fh, None)

    # -- reading ----------------------------------------------------------------------------

    @_boundary
    async def open(
        self, inode: InodeT, flags: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.FileInfo:
        image = await self._image_of(inode, fresh=bool(flags & _WRITE_FLAGS))
        if image is None:
            raise NoEntry(f"inode {inode} is a directory")
        if flags & _WRITE_FLAGS:
            return self._open_for_upload(inode, image, ctx, created=False)
        open_file = _OpenFile(inode, image)
        keep_cache = False
        if image.status == "active":
            # Active image data never changes, so cached pages stay valid, once verified.
            keep_cache = self._readers.keeps_cache(image.id)
            open_file.reader = self._readers.open(image)
        elif image.status != "queued":
            raise AccessDenied(f"open {image.id}: image is {image.status}, its data is unreadable")
        handle = self._new_handle()
        self._open_files[handle] = open_file
        if self._config.direct_io:
            # Every read comes here, copied by the kernel straight into the reader's buffer: no
            # page cache to fill (on a VM, new pages cost more than the copy; see BENCHMARKS.md).
            return pyfuse3.FileInfo(fh=handle, direct_io=True, keep_cache=False)
        return pyfuse3.FileInfo(fh=handle, keep_cache=keep_cache)

    def _open_for_upload(
        self, inode: InodeT, image: Image, ctx: pyfuse3.RequestContext, *, created: bool
    ) -> pyfuse3.FileInfo:
        self._refuse_if_read_only(f"write {image.id}")
        if image.status != "queued":
            raise AccessDenied(
                f"write {image.id}: image is {image.status}; only queued images take data"
            )
        session = self._uploads.open(image, created=created, writer=Writer.of(ctx.pid, inode))
        handle = self._new_handle()
        self._open_files[handle] = _OpenFile(inode, image, upload=session)
        return pyfuse3.FileInfo(fh=handle, direct_io=True)

    @_boundary
    async def create(
        self, parent_inode: InodeT, name: bytes, mode: int, flags: int, ctx: pyfuse3.RequestContext
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        text = os.fsdecode(name)
        self._refuse_if_read_only(f"create {text}")
        if self._directory(parent_inode) != NEW:
            raise NotPermitted(f"create {text}: images are created in new/")
        if text != sanitize(text):
            raise InvalidArgument(f"create {text!r}: not a name Glance can store")
        # Formats from the name at once, so that the image can take data from any client; the
        # first MiB written through this file may still correct them.
        formats = formats_of_name(text) or self._config.default_formats
        image = await self._changes.create(text, formats)
        key = ImageKey(image.id)
        inode = self._inodes.remember(key)
        return self._open_for_upload(inode, image, ctx, created=True), self._attributes(key, image)

    @_boundary
    async def read(self, fh: FileHandleT, off: int, size: int) -> bytes:
        open_file = self._open_files[fh]
        if open_file.reader is None:
            return b""
        try:
            return STATUS.served(await open_file.reader.read(off, size))
        except IntegrityError:
            # Logged once, when found (_image_corrupt): every later read fails quietly.
            raise pyfuse3.FUSEError(errno.EIO) from None

    def _image_corrupt(self, image_id: str, error: IntegrityError) -> None:
        """A mismatch was found in an image's data: say so once and drop its cached pages."""
        log.error(
            "read: EIO: %s (its open files fail; the next open reads it again, and after two "
            "such passes in a row every read fails until SIGHUP or remount)",
            error,
        )
        # Pages served before the mismatch are suspect too. Not from the read that found it:
        # the kernel would wait for the pages that very read holds locked.
        inode = InodeT(self._inodes.inode_of(ImageKey(image_id)))
        self._nursery.start_soon(self._drop_cached_pages, inode)

    async def _drop_cached_pages(self, inode: InodeT) -> None:
        try:
            await trio.to_thread.run_sync(pyfuse3.invalidate_inode, inode)
        except OSError as error:  # the kernel forgot the inode: no pages left to drop
            log.debug("invalidate inode %d: %s", inode, error)

    @_boundary
    async def write(self, fh: FileHandleT, off: int, buf: bytes) -> int:
        open_file = self._open_files[fh]
        if open_file.upload is None:
            raise AccessDenied(f"write {open_file.image.id}: file is open for reading")
        return await open_file.upload.write(off, buf)

    @_boundary
    async def flush(self, fh: FileHandleT) -> None:
        open_file = self._open_files.get(fh)
        if open_file is not None and open_file.upload is not None:
            try:
                await open_file.upload.close()
            finally:
                self._nursery.start_soon(self._drop_cached_attributes, open_file.inode)

    @_boundary
    async def fsync(self, fh: FileHandleT, datasync: bool) -> None:
        await self.flush(fh)

    async def _drop_cached_attributes(self, inode: InodeT) -> None:
        """Make the kernel ask for the size again after an upload (runs in the nursery: must
        not raise; the kernel may have forgotten the inode already, which is fine)."""
        try:
            await trio.to_thread.run_sync(pyfuse3.invalidate_inode, inode, True)
        except OSError as error:
            log.debug("inode %d: attributes not invalidated: %s", inode, error)

    @_boundary
    async def release(self, fh: FileHandleT) -> None:
        open_file = self._open_files.pop(fh, None)
        if open_file is None:
            return
        if open_file.reader is not None:
            await self._readers.release(open_file.reader)
        if open_file.upload is not None:
            await self._uploads.release(open_file.upload)

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
        key = self._key(inode)
        image = await self._image_of(inode)
        session = self._upload_of(fh, image)
        if fields.update_size:
            what = image.id if image else "a directory"
            self._refuse_if_read_only(f"truncate {what}")
            if session is not None:
                await session.truncate(attr.st_size)
            elif image is None or image.status != "queued" or attr.st_size != 0:
                raise AccessDenied(
                    f"truncate {what}: only a queued image can be truncated: one open for "
                    "writing, or an empty one (to 0)"
                )
        if fields.update_mtime and image is not None:
            await self._record_mtime(image, attr.st_mtime_ns, session)
        # chmod and chown are accepted and ignored, so cp -p, rsync -a and tar x work.
        if image is not None and fields.update_mtime:
            image = await self._image_of(inode)
        attrs = self._attributes(key, image)
        if session is not None and not session.finished:
            attrs.st_size = session.written
        return attrs

    def _upload_of(self, fh: FileHandleT | None, image: Image | None) -> UploadSession | None:
        """The upload in flight for this setattr: the file's (ftruncate), else the image's."""
        open_file = self._open_files.get(fh) if fh is not None else None
        session = open_file.upload if open_file is not None else None
        if session is None and image is not None:
            session = self._uploads.of(image.id)
        return session if session is not None and not session.finished else None

    async def _record_mtime(
        self, image: Image, mtime_ns: int, session: UploadSession | None
    ) -> None:
        """utime: the time given becomes the image's :data:`MTIME_PROPERTY` (st_mtime)."""
        name = f"user.{MTIME_PROPERTY}"
        value = mtime_text(mtime_ns).encode()
        if image.get(MTIME_PROPERTY) == value.decode():
            return

        async def apply(record: Image) -> Image:
            return await self._changes.patch(image.id, set_patch(record, name, value), "utime")

        await self._change(image, "utime", apply, session=session)

    async def _change(
        self,
        image: Image,
        what: str,
        apply: MetadataChange,
        *,
        session: UploadSession | None = None,
        formats: bool = False,
    ) -> None:
        """Apply a metadata change now, or through the upload in flight (which applies it once
        the data is in: Glance would lose a change made while it receives the data)."""
        session = session or self._uploads.of(image.id)
        if session is not None and not session.finished:
            if await session.change(what, apply, formats=formats):
                log.info("image %s: %s once its upload is in", image.id, what)
                return
        else:
            await apply(image)
        log.info("image %s: %s", image.id, what)

    @_boundary
    async def unlink(self, parent_inode: InodeT, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        text = os.fsdecode(name)
        self._refuse_if_read_only(f"rm {text}")
        _, image = await self._resolve(self._directory(parent_inode), text)
        if image is None:
            raise NotPermitted(f"rm {text}: is a directory")
        if not self._config.allow_delete:
            raise NotPermitted(f"rm {text}: deleting images needs --allow-delete")
        if image.protected:
            raise NotPermitted(f"rm {text}: image {image.id} is protected")
        await self._changes.delete(image.id, text)

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
        old, new = os.fsdecode(name_old), os.fsdecode(name_new)
        self._refuse_if_read_only(f"mv {old} {new}")
        source = self._directory(parent_inode_old)
        target = self._directory(parent_inode_new)
        what = f"mv {_path(source, old)} {_path(target, new)}"
        for directory in (source, target):
            if directory.kind in (DirKind.BY_ID, DirKind.BY_TAG):
                raise NotPermitted(f"{what}: names in {directory.kind.value}/ are fixed")
        _, image = await self._resolve(source, old)
        if image is None:
            raise NotPermitted(f"{what}: directories cannot be renamed")
        if DirKind.TAG in (source.kind, target.kind):
            await self._move_tag(image, source, target, old, new, what)
            return
        if new != sanitize(new) or (target == ROOT and new in ROOT_ENTRIES):
            raise InvalidArgument(f"{what}: not a name Glance can store")
        try:
            _, replaced = await self._resolve(target, new)
        except NoEntry:
            replaced = None
        if replaced is not None and replaced.id != image.id:
            await self._replace(image, replaced, old, new, flags, what)
        await self._changes.rename(image.id, old, new)

    async def _replace(
        self, image: Entry, replaced: Entry, old: str, new: str, flags: int, what: str
    ) -> None:
        """mv over another image: that image is deleted first (with --allow-delete)."""
        refusal: Refusal | None = None
        if flags & pyfuse3.RENAME_NOREPLACE:
            refusal = Exists(f"{what}: {new} exists")
        elif not self._config.allow_delete:
            refusal = NotPermitted(f"{what}: replacing image {replaced.id} needs --allow-delete")
        if refusal is not None:
            if upload_name(old) != old and self._changes.created_here(image.id):
                # rsync's temporary upload: its final rename is refused, so it is no one's file.
                await self._changes.discard(image.id, f"its final rename to {new} was refused")
            raise refusal
        await self._changes.delete(replaced.id, f"{new}, replaced by {image.id}")

    async def _move_tag(
        self, image: Entry, source: Directory, target: Directory, old: str, new: str, what: str
    ) -> None:
        """mv into, out of or between by-tag/T/ directories changes tags, never the name."""
        if old != new:
            raise NotPermitted(f"{what}: a move to or from by-tag/ keeps the name")
        if source == target:
            return
        try:
            _, there = await self._resolve(target, new)
        except NoEntry:
            there = None
        if there is not None and there.id != image.id:
            raise Exists(f"{what}: {new} there is another image ({there.id})")
        if target.kind is DirKind.TAG:
            await self._changes.tag(image.id, "add", target.tag)
        if source.kind is DirKind.TAG:
            await self._changes.tag(image.id, "remove", source.tag)
        log.info("image %s: %s", image.id, what)

    @_boundary
    async def mkdir(
        self, parent_inode: InodeT, name: bytes, mode: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        self._refuse_if_read_only("mkdir")
        raise NotPermitted(f"mkdir {os.fsdecode(name)}: the directory tree is fixed")

    @_boundary
    async def rmdir(self, parent_inode: InodeT, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self._refuse_if_read_only("rmdir")
        raise NotPermitted(f"rmdir {os.fsdecode(name)}: the directory tree is fixed")

    @_boundary
    async def symlink(
        self, parent_inode: InodeT, name: bytes, target: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        self._refuse_if_read_only("symlink")
        raise NotPermitted(f"symlink {os.fsdecode(name)}: images are regular files only")

    @_boundary
    async def link(
        self, inode: InodeT, new_parent_inode: InodeT, new_name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        self._refuse_if_read_only("link")
        raise NotPermitted(f"link {os.fsdecode(new_name)}: images have exactly one name")

    @_boundary
    async def mknod(
        self, parent_inode: InodeT, name: bytes, mode: int, rdev: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        self._refuse_if_read_only("mknod")
        raise NotPermitted(f"mknod {os.fsdecode(name)}: images are regular files only")

    def _refuse_if_read_only(self, what: str) -> None:
        if self._config.read_only:
            raise ReadOnly(f"{what}: the mount is read-only")

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
        image = await self._image_of(inode)
        value = image_xattrs(image).get(os.fsdecode(name)) if image else None
        if value is None:
            raise NoAttribute(os.fsdecode(name))
        return value

    @_boundary
    async def listxattr(self, inode: InodeT, ctx: pyfuse3.RequestContext) -> list[bytes]:
        image = await self._image_of(inode)
        return [os.fsencode(n) for n in image_xattrs(image)] if image else []

    @_boundary
    async def setxattr(
        self, inode: InodeT, name: bytes, value: bytes, ctx: pyfuse3.RequestContext
    ) -> None:
        text = os.fsdecode(name)
        self._refuse_if_read_only(f"setfattr {text}")
        image = await self._image_for_change(inode, text)
        single_tag = tag_operation(text, value)
        apply: MetadataChange
        if single_tag is not None:
            operation, tag = single_tag

            async def apply(record: Image) -> None:
                await self._changes.tag(record.id, operation, tag)

        else:
            set_patch(image, text, value)  # refuse a bad change now, whenever it is applied

            async def apply(record: Image) -> Image:
                patch = set_patch(record, text, value)
                return await self._changes.patch(record.id, patch, f"setfattr {text}")

        formats = field_of(text) in FORMAT_FIELDS
        await self._change(image, f"setfattr {text}", apply, formats=formats)

    @_boundary
    async def removexattr(self, inode: InodeT, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        text = os.fsdecode(name)
        self._refuse_if_read_only(f"setfattr -x {text}")
        image = await self._image_for_change(inode, text)
        remove_patch(image, text)  # refuse a bad change now, whenever it is applied

        async def apply(record: Image) -> Image:
            return await self._changes.patch(
                record.id, remove_patch(record, text), f"setfattr -x {text}"
            )

        await self._change(image, f"setfattr -x {text}", apply)

    async def _image_for_change(self, inode: InodeT, what: str) -> Image:
        image = await self._image_of(inode, fresh=True)
        if image is None:
            raise Unsupported(f"setfattr {what}: directories have no attributes")
        return image

    @_boundary
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        return statvfs_of(await self.catalog.usage())

    # -- helpers ------------------------------------------------------------------------------

    def _new_handle(self) -> int:
        handle = self._next_handle
        self._next_handle += 1
        return handle

    def drop_caches(self) -> None:
        """Forget cached metadata and verification failures and verdicts (SIGHUP)."""
        self.catalog.drop_all()
        self._readers.reset()


def _path(directory: Directory, name: str) -> str:
    """``name`` as the user sees it in ``directory`` (for log lines)."""
    if directory == ROOT:
        return name
    if directory.kind is DirKind.TAG:
        return f"by-tag/{directory.tag}/{name}"
    return f"{directory.kind.value}/{name}"
