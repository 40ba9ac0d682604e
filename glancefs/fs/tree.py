"""The directory tree as the kernel sees it, without FUSE: what each inode number stands for, which
key a name in a directory is, the attributes each shows, and directory handles.

Part of the filesystem core (:mod:`.filesystem`): inode numbers and handles are ints, names
``str``, keys those of :mod:`.inodes`; the answers are plain data (:class:`Attributes`), a refusal
is a :class:`~glancefs.fs.refusals.Refusal`.
"""

from __future__ import annotations

import itertools
import stat
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from glancefs import Image, NotFound

from .catalog import Catalog, Entry, Listing, file_mtime_ns
from .config import MountConfig
from .inodes import ImageKey, InodeTable, Key
from .namespace import (
    BY_TAG,
    NEW,
    ROOT,
    ROOT_ENTRIES,
    SOURCE_URL_PROPERTY,
    Directory,
    DirKind,
    file_mode,
    has_readable_size,
    link_target,
)
from .naming import is_id_shaped
from .refusals import NoEntry
from .uploader import Uploads

__all__ = ["Attributes", "DirectoryReply", "Tree"]


@dataclass(frozen=True)
class Attributes:
    """What ``stat`` shows of a file or directory, and how long the kernel may keep it."""

    inode: int
    mode: int
    links: int
    size: int
    blocks: int
    #: st_mtime; st_atime and st_ctime show it too.
    mtime_ns: int
    uid: int
    gid: int
    #: Seconds the kernel may keep the name's entry and these attributes.
    timeout: float
    #: st_blksize: cp and dd size their buffers by this.
    block_size: int = 1024 * 1024


#: readdir's reply: offers one entry (its name, its attributes, the offset of the entry after it);
#: False when the kernel's buffer is full (the entry was not taken).
DirectoryReply = Callable[[str, Attributes, int], bool]


class Tree:
    """Names, inode numbers and attributes of Glance's image catalog as a directory tree (see
    :mod:`glancefs.fs.namespace`)."""

    def __init__(
        self, config: MountConfig, catalog: Catalog, inodes: InodeTable, uploads: Uploads
    ) -> None:
        self._config = config
        self._catalog = catalog
        self._inodes = inodes
        self._uploads = uploads
        #: Per directory handle: its fixed entries (sub-directories) and the listing it snapshots.
        self._open_dirs: dict[int, tuple[tuple[tuple[str, Key], ...], Listing]] = {}
        self._handles = itertools.count(1)
        self._mounted_ns = time.time_ns()

    # -- names and attributes -------------------------------------------------------------

    async def lookup(self, parent: int, name: str) -> Attributes:
        """``name`` in directory ``parent``; the kernel holds one more reference to it."""
        key, image = await self.resolve(self.directory(parent), name)
        attrs = self.attributes(key, image)
        self._inodes.remember(key)
        return attrs

    async def resolve(self, directory: Directory, name: str) -> tuple[Key, Entry | None]:
        """The key (and attributes, for files) of ``name`` in ``directory``."""
        if directory == ROOT and name in ROOT_ENTRIES:
            return ROOT_ENTRIES[name], None
        if directory.kind is DirKind.BY_ID:
            if not is_id_shaped(name):
                raise NoEntry(name)  # no request: such text is no image's id
            try:
                entry = await self._catalog.attributes(name)
            except NotFound:
                raise NoEntry(name) from None
            return ImageKey(entry.id), entry
        listing = self._catalog.open_listing(directory)
        if directory == BY_TAG:
            await listing.wait_complete()
            if name not in listing.tags:
                raise NoEntry(name)
            return Directory(DirKind.TAG, name), None
        found = await listing.find(name)
        if found is None and directory == NEW:
            found = await self._catalog.named(name)
        if found is None:
            raise NoEntry(name)
        return ImageKey(found.id), found

    def key(self, inode: int) -> Key:
        """What ``inode`` stands for; ENOENT when the kernel holds no reference to it."""
        key = self._inodes.key_of(inode)
        if key is None:
            raise NoEntry(f"inode {inode}")
        return key

    def directory(self, inode: int) -> Directory:
        key = self.key(inode)
        if not isinstance(key, Directory):
            raise NoEntry(f"inode {inode} is not a directory")
        return key

    async def image_of(self, inode: int, *, fresh: bool = False) -> Image | None:
        """The full record of an image inode (``fresh``: asked of Glance now); None for a
        directory."""
        key = self.key(inode)
        if not isinstance(key, ImageKey):
            return None
        return await self._catalog.image(key.image_id, fresh=fresh)

    async def getattr(self, inode: int) -> Attributes:
        key = self.key(inode)
        entry = None
        if isinstance(key, ImageKey):
            try:
                entry = await self._catalog.attributes(key.image_id)
            except NotFound:
                raise NoEntry(key.image_id) from None
        return self.attributes(key, entry)

    def attributes(self, key: Key, image: Entry | Image | None) -> Attributes:
        """What ``key`` shows: an image's (``image``: its entry or record), or a directory's."""
        inode = self._inodes.inode_of(key)
        ttl, uid, gid = self._config.metadata_ttl, self._config.uid, self._config.gid
        if image is None:
            writable = key == NEW and not self._config.read_only
            mode = stat.S_IFDIR | (0o755 if writable else 0o555)
            return Attributes(inode, mode, 2, 0, 0, self._mounted_ns, uid, gid, ttl)
        link = (
            image.link
            if isinstance(image, Entry)
            else link_target(image.status, image.get(SOURCE_URL_PROPERTY))
        )
        mode = file_mode(image.status, read_only=self._config.read_only, link=link is not None)
        size = (image.size or 0) if has_readable_size(image.status) else 0
        if link is not None:
            size = len(link.encode())  # a symlink's size is its target's length
        elif image.status == "queued":
            # The size its writer sees, while its upload has not ended (qemu-img checks it).
            size = self._uploads.size_of(image.id) or size
        mtime = image.updated_ns if isinstance(image, Entry) else file_mtime_ns(image)
        links = self._link_count(image)
        return Attributes(inode, mode, links, size, (size + 511) // 512, mtime, uid, gid, ttl)

    def _link_count(self, image: Entry | Image) -> int:
        """How many paths show the image, so that du and find -links count it once: by-id/,
        one by-tag/T/ per tag, the root unless the view's --tag leaves it out (other --filter
        and --limit views are not evaluated: the root counts), and new/ while it lists it."""
        tags = set(image.tags)
        links = 1 + len(tags)
        if tags.issuperset(self._config.view.tags):
            links += 1
        if image.status == "queued" or self._catalog.was_created_here(image.id):
            links += 1
        return links

    def remember(self, key: Key) -> int:
        """Count one kernel reference to ``key``; its inode number."""
        return self._inodes.remember(key)

    def forget(self, references: Iterable[tuple[int, int]]) -> None:
        """The kernel dropped ``count`` references to each ``(inode, count)``."""
        for inode, count in references:
            self._inodes.forget(inode, count)

    # -- directories ------------------------------------------------------------------------

    async def opendir(self, inode: int) -> int:
        """A handle on the directory's listing as it is now."""
        directory = self.directory(inode)
        fixed: list[tuple[str, Key]] = []
        if directory == ROOT:
            fixed += list(ROOT_ENTRIES.items())
        listing = self._catalog.open_listing(directory)
        if directory == BY_TAG:
            await listing.wait_complete()
            fixed += [(tag, Directory(DirKind.TAG, tag)) for tag in listing.tags]
        else:
            # Fail here rather than in readdir when Glance does not answer the first page.
            await listing.names_beyond(0)
        handle = next(self._handles)
        # The handle keeps this listing (it only grows, then never changes): offsets stay
        # valid while newer listings replace it.
        self._open_dirs[handle] = (tuple(fixed), listing)
        return handle

    async def readdir(self, handle: int, start: int, reply: DirectoryReply) -> None:
        """Offer ``reply`` the entries from offset ``start`` on, until it takes no more; each
        entry taken counts a kernel reference to it (readdirplus)."""
        # Offsets: 1..len(fixed) are the sub-directories, then one per listed image.
        fixed, listing = self._open_dirs[handle]
        index = start
        while index < len(fixed):
            name, key = fixed[index]
            if not reply(name, self.attributes(key, None), index + 1):
                return
            self._inodes.remember(key)
            index += 1
        first = len(fixed)
        position = index - first
        replied = index > start
        while True:
            names, entries = listing.names, listing.entries
            while position < len(names):
                key = ImageKey(entries[position].id)
                attrs = self.attributes(key, entries[position])
                if not reply(names[position], attrs, first + position + 1):
                    return
                self._inodes.remember(key)
                position += 1
                replied = True
            # Names are handed out as soon as they are final, while later pages still arrive:
            # return what there is, and wait only when there is nothing yet (an empty answer
            # would end the directory).
            if replied or not await listing.names_beyond(position):
                return

    def releasedir(self, handle: int) -> None:
        self._open_dirs.pop(handle, None)
