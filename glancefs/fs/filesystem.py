"""The filesystem without FUSE: what every operation decides, in keys, inode numbers and names.

The core has three parts: :class:`~.tree.Tree` (what inode numbers and names stand for, their
attributes, directory handles), :class:`~.files.OpenFiles` (reads and uploads by file handle), and
:class:`Filesystem`, which holds both and decides every change: create, truncate, utime, rm, mv
(renames, replacements, tag moves) and extended attributes, and which metadata change waits for an
upload. Each answers plain data (:class:`~.tree.Attributes`, :class:`~.files.Opened`,
:class:`Capacity`, ``str`` names, ``bytes`` values) and declines with a
:class:`~glancefs.fs.refusals.Refusal` or lets the client's :class:`~glancefs.GlanceError`
through.

:mod:`.operations` is the thin pyfuse3 adapter around it, as mountpoint-s3's ``fuse.rs`` wraps its
``S3Filesystem`` "so that we can test our actual filesystem implementation without having actual
FUSE in the loop": the unit tests drive the core directly (tests/unit/test_filesystem.py).
Everything it uses is built by :func:`glancefs.fs.mount.build_filesystem` and passed in.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import NoReturn
from urllib.parse import urlsplit

import trio

from glancefs import Image

from .catalog import MTIME_PROPERTY, Catalog, Entry, mtime_text
from .changes import Changes, stores_of
from .config import MountConfig
from .files import Opened, OpenFiles
from .formats import formats_of_name, upload_name
from .imports import IMPORT_LOCK, Imports
from .inodes import ImageKey
from .namespace import (
    NEW,
    ROOT,
    ROOT_ENTRIES,
    SOURCE_URL_PROPERTY,
    Directory,
    DirKind,
    link_target,
    web_download_url,
)
from .naming import sanitize
from .read import Readers
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
from .tree import Attributes, Tree
from .uploader import MetadataChange, Uploads, UploadSession
from .xattrs import (
    FORMAT_FIELDS,
    STORES_FIELD,
    field_of,
    image_xattrs,
    remove_patch,
    set_patch,
    store_changes,
    tag_operation,
)

__all__ = ["Capacity", "Filesystem", "capacity_of"]

log = logging.getLogger("glancefs.fs")


@dataclass(frozen=True)
class Capacity:
    """What ``df`` shows: blocks of ``block_size`` bytes and files, in all and free."""

    block_size: int
    blocks: int
    free_blocks: int
    files: int
    free_files: int
    name_max: int = 255


#: The import method ``ln -s URL new/NAME`` asks of Glance.
WEB_DOWNLOAD = "web-download"

_BLOCK = 4096
#: What df shows when Glance sets no limit: 1 PiB, all of it free, and 2**32 files.
_NO_LIMIT_BLOCKS = (1 << 50) // _BLOCK
_NO_LIMIT_FILES = (1 << 32) - 1


def capacity_of(usage: Mapping[str, Mapping[str, int]]) -> Capacity:
    """``df`` from Glance's quota usage: ``image_size_total`` (MiB) gives the blocks,
    ``image_count_total`` the files; a quantity without a limit (absent or negative: unified limits
    off, or unlimited) shows as a large, entirely free one."""
    blocks = free_blocks = _NO_LIMIT_BLOCKS
    files = free_files = _NO_LIMIT_FILES
    size = usage.get("image_size_total") or {}
    if int(size.get("limit", -1)) >= 0:
        per_mib = (1024 * 1024) // _BLOCK
        blocks = int(size["limit"]) * per_mib
        free_blocks = blocks - min(int(size.get("usage", 0)) * per_mib, blocks)
    count = usage.get("image_count_total") or {}
    if int(count.get("limit", -1)) >= 0:
        files = int(count["limit"])
        free_files = max(files - int(count.get("usage", 0)), 0)
    return Capacity(_BLOCK, blocks, free_blocks, files, free_files)


#: Why each operation that would make or remove a node other than an image file is refused.
_FIXED_TREE = {
    "mkdir": "the directory tree is fixed",
    "rmdir": "the directory tree is fixed",
    "symlink": "images are regular files only",
    "mknod": "images are regular files only",
    "link": "images have exactly one name",
}


class Filesystem:
    """Glance's image catalog as a directory tree (see :mod:`glancefs.fs.namespace`): the tree,
    its open files, and every change made through them."""

    def __init__(
        self,
        config: MountConfig,
        catalog: Catalog,
        changes: Changes,
        uploads: Uploads,
        readers: Readers,
        tree: Tree,
        files: OpenFiles,
        imports: Imports,
    ) -> None:
        self._config = config
        self._catalog = catalog
        self._changes = changes
        self._uploads = uploads
        self._readers = readers
        #: Names, attributes and directories (lookup, getattr, forget and readdir go to it).
        self.tree = tree
        #: The open files (read, write, flush and release go to them).
        self.files = files
        self._imports = imports

    # -- files --------------------------------------------------------------------------------

    async def open(self, inode: int, *, write: bool, pid: int) -> Opened:
        """Open an image for reading, or for writing its data (``write``) by thread ``pid``."""
        image = await self._settled_image(inode, fresh=write)
        if image is None:
            raise NoEntry(f"inode {inode} is a directory")
        return await self.files.open(inode, image, write=write, pid=pid)

    async def _settled_image(self, inode: int, *, fresh: bool = False) -> Image | None:
        """The image's record once an upload whose writer left it and exited has ended: an open
        or a truncate finds the image as the writer left it (published, say, after qemu-img
        create), whether or not the watch on the writer has seen it exit yet."""
        key = self.tree.key(inode)
        settled = isinstance(key, ImageKey) and await self._uploads.settle(key.image_id)
        return await self.tree.image_of(inode, fresh=fresh or settled)

    async def create(self, parent: int, name: str, pid: int) -> tuple[Opened, Attributes]:
        """A new queued image ``name`` in new/, open for writing its data by thread ``pid``."""
        self._refuse_if_read_only(f"create {name}")
        if self.tree.directory(parent) != NEW:
            raise NotPermitted(f"create {name}: images are created in new/")
        if name != sanitize(name):
            raise InvalidArgument(f"create {name!r}: not a name Glance can store")
        # Formats from the name at once, so that the image can take data from any client; the
        # first MiB written through this file may still correct them.
        formats = formats_of_name(name) or self._config.default_formats
        image = await self._changes.create(name, formats)
        key = ImageKey(image.id)
        inode = self.tree.remember(key)
        opened = await self.files.open(inode, image, write=True, pid=pid, created=True)
        return opened, self.tree.attributes(key, image)

    # -- changing the catalog ---------------------------------------------------------------

    async def setattr(
        self, inode: int, handle: int | None, *, size: int | None, mtime_ns: int | None
    ) -> Attributes:
        """truncate or ftruncate (``size``) and utime (``mtime_ns``); chmod and chown are
        accepted and ignored, so that cp -p, rsync -a and tar x work."""
        key = self.tree.key(inode)
        image = await self._settled_image(inode)
        session = self.files.upload_of(handle, image)
        if size is not None:
            what = image.id if image else "a directory"
            self._refuse_if_read_only(f"truncate {what}")
            if session is not None:
                await session.truncate(size)
            elif image is None or image.status != "queued" or size != 0:
                raise AccessDenied(
                    f"truncate {what}: only a queued image can be truncated: one open for "
                    "writing, or an empty one (to 0)"
                )
        if mtime_ns is not None and image is not None:
            await self._record_mtime(image, mtime_ns, session)
            image = await self.tree.image_of(inode)
        return self.tree.attributes(key, image)

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

    async def unlink(self, parent: int, name: str) -> None:
        self._refuse_if_read_only(f"rm {name}")
        _, image = await self.tree.resolve(self.tree.directory(parent), name)
        if image is None:
            raise NotPermitted(f"rm {name}: is a directory")
        if not self._config.allow_delete:
            raise NotPermitted(f"rm {name}: deleting images needs --allow-delete")
        if image.protected:
            raise NotPermitted(f"rm {name}: image {image.id} is protected")
        await self._changes.delete(image.id, name)

    async def rename(
        self, old_parent: int, old: str, new_parent: int, new: str, *, replace: bool = True
    ) -> None:
        """mv: a new name, or new tags (by-tag/); ``replace``: an image already called ``new``
        may be replaced (False: RENAME_NOREPLACE)."""
        self._refuse_if_read_only(f"mv {old} {new}")
        source = self.tree.directory(old_parent)
        target = self.tree.directory(new_parent)
        what = f"mv {_path(source, old)} {_path(target, new)}"
        for directory in (source, target):
            if directory.kind in (DirKind.BY_ID, DirKind.BY_TAG):
                raise NotPermitted(f"{what}: names in {directory.kind.value}/ are fixed")
        _, image = await self.tree.resolve(source, old)
        if image is None:
            raise NotPermitted(f"{what}: directories cannot be renamed")
        if DirKind.TAG in (source.kind, target.kind):
            await self._move_tag(image, source, target, old, new, what)
            return
        if new != sanitize(new) or (target == ROOT and new in ROOT_ENTRIES):
            raise InvalidArgument(f"{what}: not a name Glance can store")
        try:
            _, replaced = await self.tree.resolve(target, new)
        except NoEntry:
            replaced = None
        if replaced is not None and replaced.id != image.id:
            await self._replace(image, replaced, old, new, replace, what)
        await self._changes.rename(image.id, old, new)

    async def _replace(
        self, image: Entry, replaced: Entry, old: str, new: str, replace: bool, what: str
    ) -> None:
        """mv over another image: that image is deleted first (with --allow-delete)."""
        refusal: Refusal | None = None
        if not replace:
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
            _, there = await self.tree.resolve(target, new)
        except NoEntry:
            there = None
        if there is not None and there.id != image.id:
            raise Exists(f"{what}: {new} there is another image ({there.id})")
        if target.kind is DirKind.TAG:
            await self._changes.tag(image.id, "add", target.tag)
        if source.kind is DirKind.TAG:
            await self._changes.tag(image.id, "remove", source.tag)
        log.info("image %s: %s", image.id, what)

    async def symlink(self, parent: int, name: str, target: str) -> Attributes:
        """``ln -s URL new/NAME``: a new image ``name`` that Glance fetches from the URL
        (``web-download``); returns at once, the image shows as a symlink to the URL until it
        is active (:mod:`.imports` follows it)."""
        self._refuse_if_read_only(f"symlink {name}")
        if self.tree.directory(parent) != NEW:
            raise NotPermitted(f"symlink {name}: {_FIXED_TREE['symlink']}; in new/, a symlink "
                               "to an http(s) URL imports the image from there")  # fmt: skip
        if name != sanitize(name):
            raise InvalidArgument(f"symlink {name!r}: not a name Glance can store")
        url = web_download_url(target)
        if url is None:
            raise InvalidArgument(f"symlink {name}: {target!r} is not an http(s) URL")
        if WEB_DOWNLOAD not in await self._catalog.import_methods():
            raise NotPermitted(f"symlink {name}: this Glance does not offer web-download")
        # The formats the URL's file name implies, else the link's name's, else the default.
        formats = (
            formats_of_name(PurePosixPath(urlsplit(url).path).name)
            or formats_of_name(name)
            or self._config.default_formats
        )
        image = await self._changes.create(name, formats, **{SOURCE_URL_PROPERTY: url})
        try:
            await self._changes.web_download(image.id, url)
        except BaseException:
            # Refused, or the request interrupted: the image it made must not stay behind.
            with trio.CancelScope(shield=True):
                await self._changes.discard(image.id, "Glance refused its web-download")
            raise
        self._imports.downloading(image, url)
        key = ImageKey(image.id)
        self.tree.remember(key)
        return self.tree.attributes(key, image)

    async def readlink(self, inode: int) -> str:
        """The URL a web-download image fetches from, while it shows as a symlink."""
        image = await self.tree.image_of(inode)
        link = None if image is None else link_target(image.status, image.get(SOURCE_URL_PROPERTY))
        if link is None:
            raise InvalidArgument(f"readlink: inode {inode} is not a symlink")
        return link

    def refuse_node(self, operation: str, name: str) -> NoReturn:
        """mkdir, rmdir, mknod and link (``operation``, of ``name``): the tree is fixed and
        every image is one file with one name (symlinks: :meth:`symlink`)."""
        self._refuse_if_read_only(operation)
        raise NotPermitted(f"{operation} {name}: {_FIXED_TREE[operation]}")

    def _refuse_if_read_only(self, what: str) -> None:
        if self._config.read_only:
            raise ReadOnly(f"{what}: the mount is read-only")

    # -- extended attributes ----------------------------------------------------------------

    async def getxattr(self, inode: int, name: str) -> bytes:
        image = await self.tree.image_of(inode)
        value = image_xattrs(image).get(name) if image else None
        if value is None:
            raise NoAttribute(name)
        return value

    async def listxattr(self, inode: int) -> list[str]:
        image = await self.tree.image_of(inode)
        return list(image_xattrs(image)) if image else []

    async def setxattr(self, inode: int, name: str, value: bytes) -> None:
        self._refuse_if_read_only(f"setfattr {name}")
        image = await self._image_for_change(inode, name)
        if field_of(name) == STORES_FIELD:
            await self._set_stores(image, name, value)
            return
        single_tag = tag_operation(name, value)
        apply: MetadataChange
        if single_tag is not None:
            operation, tag = single_tag

            async def apply(record: Image) -> None:
                await self._changes.tag(record.id, operation, tag)

        else:
            set_patch(image, name, value)  # refuse a bad change now, whenever it is applied

            async def apply(record: Image) -> Image:
                patch = set_patch(record, name, value)
                return await self._changes.patch(record.id, patch, f"setfattr {name}")

        formats = field_of(name) in FORMAT_FIELDS
        await self._change(image, f"setfattr {name}", apply, formats=formats)

    async def _set_stores(self, image: Image, name: str, value: bytes) -> None:
        """``setfattr -n user.stores``: copy the image to the stores added (``copy-image``,
        watched by :mod:`.imports`), delete it from those removed; returns once Glance accepted
        each request."""
        if image.status != "active" or IMPORT_LOCK in image:
            raise InvalidArgument(
                f"{name}: image {image.id} is {image.status}"
                f"{', importing' if IMPORT_LOCK in image else ''}; only an active image that "
                "no import holds changes stores"
            )
        added, removed = store_changes(
            stores_of(image), name, value, await self._catalog.offered_stores()
        )
        if added:
            await self._changes.copy_to_stores(image.id, added)
            self._imports.copying(image, added)
        for store in removed:
            await self._changes.delete_from_store(image.id, store)

    async def removexattr(self, inode: int, name: str) -> None:
        self._refuse_if_read_only(f"setfattr -x {name}")
        image = await self._image_for_change(inode, name)
        remove_patch(image, name)  # refuse a bad change now, whenever it is applied

        async def apply(record: Image) -> Image:
            return await self._changes.patch(
                record.id, remove_patch(record, name), f"setfattr -x {name}"
            )

        await self._change(image, f"setfattr -x {name}", apply)

    async def _image_for_change(self, inode: int, what: str) -> Image:
        image = await self.tree.image_of(inode, fresh=True)
        if image is None:
            raise Unsupported(f"setfattr {what}: directories have no attributes")
        return image

    # -- the whole mount ----------------------------------------------------------------------

    async def statfs(self) -> Capacity:
        return capacity_of(await self._catalog.usage())

    def drop_caches(self) -> None:
        """Forget cached metadata and verification failures and verdicts (SIGHUP)."""
        self._catalog.drop_all()
        self._readers.reset()


def _path(directory: Directory, name: str) -> str:
    """``name`` as the user sees it in ``directory`` (for log lines)."""
    if directory == ROOT:
        return name
    if directory.kind is DirKind.TAG:
        return f"by-tag/{directory.tag}/{name}"
    return f"{directory.kind.value}/{name}"
