"""The directory tree a mount shows, and which Glance query fills each directory.

::

    /                 the root view: images chosen and ordered by the mount's View
    /by-id/<id>       every image the user may see, named by id (lookup works for any id)
    /by-tag/<tag>/    one directory per tag in use, listing the images with that tag
    /new/             the drop box: queued images (waiting for data), and web-downloads
                      (``ln -s URL new/NAME``) shown as symlinks to their URL while Glance
                      fetches them

Pure: no I/O. The filesystem asks :func:`query_for` what to list and :func:`file_mode` how to
present an image.
"""

from __future__ import annotations

import stat
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from urllib.parse import urlsplit

from .config import View

__all__ = [
    "FIXED_INODES",
    "HIDDEN_STATUSES",
    "ROOT_ENTRIES",
    "SOURCE_URL_PROPERTY",
    "DirKind",
    "Directory",
    "ListQuery",
    "file_mode",
    "link_target",
    "query_for",
    "web_download_url",
]


class DirKind(Enum):
    ROOT = "root"
    BY_ID = "by-id"
    BY_TAG = "by-tag"
    TAG = "tag"
    NEW = "new"


@dataclass(frozen=True)
class Directory:
    kind: DirKind
    tag: str = ""


ROOT = Directory(DirKind.ROOT)
BY_ID = Directory(DirKind.BY_ID)
BY_TAG = Directory(DirKind.BY_TAG)
NEW = Directory(DirKind.NEW)

#: The sub-directories of the root, by name; image names never take these (see naming).
ROOT_ENTRIES = {"by-id": BY_ID, "by-tag": BY_TAG, "new": NEW}

#: Inode numbers of the fixed directories (1 is FUSE's root).
FIXED_INODES: Mapping[Directory, int] = {ROOT: 1, BY_ID: 2, BY_TAG: 3, NEW: 4}

#: Statuses of images that are gone or going; never shown.
HIDDEN_STATUSES = frozenset({"deleted", "pending_delete"})


@dataclass(frozen=True)
class ListQuery:
    """One image listing on the server: Glance's ``sort``, filters and an optional total limit."""

    sort: str | None
    filters: tuple[tuple[str, str], ...]
    limit: int | None = None


def query_for(directory: Directory, view: View) -> ListQuery:
    """The listing that fills ``directory``; the root view's filters apply to the root only."""
    if directory.kind is DirKind.ROOT:
        tags = tuple(("tag", t) for t in view.tags)
        return ListQuery(view.sort, view.filters + tags, view.limit)
    if directory.kind is DirKind.TAG:
        return ListQuery("name:asc", (("tag", directory.tag),))
    if directory.kind is DirKind.NEW:
        return ListQuery("created_at:asc", (("status", "queued"),))
    return ListQuery("created_at:asc", ())


_MODES = {
    "queued": 0o644,  # waiting for data: writable
    "active": 0o444,  # data is immutable
    "saving": 0o444,
    "uploading": 0o444,
    "importing": 0o444,
}


def file_mode(status: str, *, read_only: bool = False, link: bool = False) -> int:
    """``st_mode`` of an image file: the permission bits show where it is in its lifecycle.

    On a read-only mount nothing is writable, a ``queued`` image included. A ``link`` (a
    web-download not yet active, see :func:`link_target`) is a symlink, 0777 as every symlink.
    """
    if link:
        return stat.S_IFLNK | 0o777
    mode = _MODES.get(status, 0o000)
    if read_only:
        mode &= ~0o222
    return stat.S_IFREG | mode


def has_readable_size(status: str) -> bool:
    """Images still receiving data report size 0 until they are active."""
    return status not in ("saving", "uploading", "importing")


#: The image property holding the URL a web-download (``ln -s URL new/NAME``) fetches from.
SOURCE_URL_PROPERTY = "glancefs_source_url"
#: Schemes Glance's web-download fetches.
_WEB_SCHEMES = ("http", "https")


def link_target(status: str, source_url: object) -> str | None:
    """The symlink target an image shows: its source URL while a web-download has not made it
    active (importing, or failed and kept queued); None (a regular file) otherwise."""
    if status == "active" or not isinstance(source_url, str) or not source_url:
        return None
    return source_url


def web_download_url(target: str) -> str | None:
    """``target`` when it is a URL Glance's web-download can fetch (``http(s)://host/...``)."""
    try:
        parts = urlsplit(target)
    except ValueError:
        return None
    if parts.scheme not in _WEB_SCHEMES or not parts.hostname or any(c.isspace() for c in target):
        return None
    return target
