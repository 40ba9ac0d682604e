"""What a mount is told: the root view, caching, permissions and the data path's knobs.

Pure values and their validation; the CLI fills them from options and ``-o`` strings, the
filesystem reads them. A bad value is a :class:`ConfigError` whose text is the one line the user
sees at mount time.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "DEFAULT_SPOOL_SIZE",
    "MIN_CACHE_SIZE",
    "SORT_KEYS",
    "CacheOptions",
    "ConfigError",
    "MountConfig",
    "View",
    "default_cache_dir",
    "parse_cache_options",
    "parse_filter",
    "parse_mount_options",
    "parse_size",
    "parse_sort",
]

#: ``--spool-size`` when not given: room for a few images of several GiB at once.
DEFAULT_SPOOL_SIZE = 16 * 1024**3

#: The keys Glance can sort images by.
SORT_KEYS = (
    "name", "status", "container_format", "disk_format", "size", "id", "created_at",
    "updated_at",
)  # fmt: skip
_SORT_DIRS = ("asc", "desc")


class ConfigError(ValueError):
    """A mount option has a value glancefs cannot use; the message says which and why."""


def parse_sort(spec: str) -> str:
    """Validate ``key[:asc|desc],...`` and return it in Glance's ``sort`` syntax."""
    keys: list[str] = []
    for item in spec.split(","):
        key, _, direction = item.strip().partition(":")
        direction = direction or "asc"
        if key not in SORT_KEYS:
            raise ConfigError(f"--sort: unknown key {key!r} (one of {', '.join(SORT_KEYS)})")
        if direction not in _SORT_DIRS:
            raise ConfigError(f"--sort: direction of {key} must be asc or desc, not {direction!r}")
        keys.append(f"{key}:{direction}")
    return ",".join(keys)


def parse_filter(text: str) -> tuple[str, str]:
    """``KEY=VALUE`` as Glance's list filter (``size_min=1000``, ``os_distro=ubuntu``, ...)."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--filter: expected KEY=VALUE, got {text!r}")
    return key.strip(), value


@dataclass(frozen=True)
class View:
    """Which images the root directory shows and in which order (filtered by Glance)."""

    sort: str = "name:asc"
    filters: tuple[tuple[str, str], ...] = ()
    tags: tuple[str, ...] = ()
    limit: int | None = None


#: The least ``--cache-size`` may be: a few 1 MiB blocks.
MIN_CACHE_SIZE = 8 * 1024 * 1024
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmgt]?)(ib)?", re.IGNORECASE)
_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}


def parse_size(text: str, option: str) -> int:
    """``10G``, ``500M``, ``1.5GiB``, ``4096``: bytes; K, M, G, T are powers of 1024."""
    match = _SIZE.fullmatch(text.strip())
    if match is None or (match.group(3) and not match.group(2)):
        raise ConfigError(
            f"{option}: expected a size like 500M or 10G (K, M, G, T: powers of 1024), got {text!r}"
        )
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def default_cache_dir() -> Path:
    """Where ``--cache-dir`` without a value puts the cache.

    ``/var/cache/glancefs`` for root, else ``$XDG_CACHE_HOME/glancefs`` (``~/.cache/glancefs``
    when the variable is unset or, against the XDG spec, not absolute).
    """
    if os.geteuid() == 0:
        return Path("/var/cache/glancefs")
    base = os.environ.get("XDG_CACHE_HOME", "")
    if not os.path.isabs(base):
        base = os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "glancefs"


@dataclass(frozen=True)
class CacheOptions:
    """The persistent data cache of a mount (glancefs/fs/cache.py): where, how big, how eager."""

    #: Absolute: a background mount changes its working directory to /.
    directory: Path
    #: Bytes the cache may hold; None: a tenth of the free space of its filesystem, taken when
    #: the mount starts (see :data:`glancefs.fs.cache.DEFAULT_FREE_SPACE_FRACTION`).
    max_bytes: int | None = None
    #: Fetch an image read at random completely in the background, then verify it.
    fill: bool = False


def parse_cache_options(directory: str | None, size: str | None, fill: bool) -> CacheOptions | None:
    """``--cache-dir [DIR]`` (``""``: given without a value), ``--cache-size``, ``--cache-fill``.

    None when the cache is off (no ``--cache-dir``); the other two options need it.
    """
    if directory is None:
        if size is not None or fill:
            given = "--cache-size" if size is not None else "--cache-fill"
            raise ConfigError(f"{given}: the cache is off; turn it on with --cache-dir [DIR]")
        return None
    max_bytes = None if size is None else parse_size(size, "--cache-size")
    if max_bytes is not None and max_bytes < MIN_CACHE_SIZE:
        raise ConfigError(f"--cache-size: at least {MIN_CACHE_SIZE // 1024**2}M, not {size!r}")
    path = Path(directory).expanduser() if directory else default_cache_dir()
    return CacheOptions(path.absolute(), max_bytes, fill)


@dataclass(frozen=True)
class MountConfig:
    """Everything the filesystem needs to know besides the client it talks through."""

    view: View = field(default_factory=View)
    #: Seconds the kernel and glancefs may reuse an image's attributes.
    metadata_ttl: float = 1.0
    #: Seconds a directory listing may be reused.
    listing_ttl: float = 5.0
    uid: int = field(default_factory=os.getuid)
    gid: int = field(default_factory=os.getgid)
    verify: bool = True
    #: Serve image data without the kernel's page cache (``--direct-io``).
    direct_io: bool = False
    read_only: bool = False
    #: Allow ``rm`` (and ``mv`` over an existing image) to delete images.
    allow_delete: bool = False
    #: Keep an image whose upload failed (else glancefs deletes the image it created).
    keep_failed: bool = False
    #: The store uploads and web-downloads go to (``--store``, one of Glance's
    #: ``/v2/info/stores``); None: Glance's default store.
    store: str | None = None
    #: Stage and import uploads (``--import``: ``glance-direct``) rather than PUT them.
    import_uploads: bool = False
    #: Formats of an upload whose content and name tell none.
    default_formats: tuple[str, str] = ("raw", "bare")
    #: The spool's directory (None: the default under the user's cache directory,
    #: :func:`glancefs.fs.spool.default_spool_dir`); given, every upload is spooled from its
    #: first byte (else only those whose writer goes back).
    spool_dir: Path | None = None
    #: The bytes the spool's files may use together, reads and uploads (``--spool-size``).
    spool_size: int = DEFAULT_SPOOL_SIZE
    #: Seconds new/ keeps listing an image this mount created there.
    keep_new: float = 300.0
    #: Bytes all prefetch windows together may hold.
    prefetch_memory: int = 128 * 1024 * 1024
    #: The persistent data cache (``--cache-dir``); None: off.
    cache: CacheOptions | None = None
    #: Requests to Glance in flight at once, downloads and uploads included (the client's
    #: connection budget): 8 is one worker of a small API node with its default threads.
    max_connections: int = 8


_FLAG_OPTIONS = frozenset(
    {"ro", "rw", "allow_other", "default_permissions", "debug", "foreground", "no_verify",
     "direct_io", "insecure", "allow_delete", "keep_failed", "read_only", "cache_dir", "cache_fill",
     "import", "_netdev", "nofail", "auto",
     "noauto", "user", "nouser", "users", "exec", "noexec", "suid", "nosuid", "dev", "nodev",
     "defaults"}
)  # fmt: skip
#: mount(8) and fstab options that concern the system's mount helper, not glancefs.
IGNORED_OPTIONS = frozenset(
    {"_netdev", "nofail", "auto", "noauto", "user", "nouser", "users", "exec", "noexec", "suid",
     "nosuid", "dev", "nodev", "defaults", "rw"}
)  # fmt: skip


def parse_mount_options(text: str) -> list[tuple[str, str | None]]:
    """Split ``-o a,b=c`` into ``[("a", None), ("b", "c")]``, as mount(8) passes options.

    Options mount(8) itself handles (``_netdev``, ``nofail``, ``defaults``, ...) are dropped.
    A value may not contain a comma; repeat the option instead (``-o tag=a,tag=b``).
    """
    options: list[tuple[str, str | None]] = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        name, sep, value = item.partition("=")
        name = name.strip().replace("-", "_")
        if name in IGNORED_OPTIONS:
            continue
        if not sep and name not in _FLAG_OPTIONS:
            raise ConfigError(f"-o {name}: unknown option without a value")
        options.append((name, value if sep else None))
    return options
