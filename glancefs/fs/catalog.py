"""What the mount knows about the catalog: image records and directory listings, briefly cached.

Listings and records come from Glance and are reused for a short time (the mount's TTLs), so
that ``ls -l`` costs one paged listing instead of one request per file, and a burst of ``stat``
calls costs nothing.
Every change glancefs makes itself calls :meth:`Catalog.invalidate`, and SIGHUP :meth:`drop_all`.
Concurrent callers wanting the same stale listing share one fetch.

A :class:`Listing` only grows while its pages arrive and never changes once complete, so a
directory handle that holds one sees a stable sequence of entries (stable readdir offsets) while
newer listings replace it; readdir hands out names as soon as they are final.

Memory: a listing keeps one compact :class:`Entry` per image (what readdir, lookup and stat need),
not Glance's whole record; 100,000 images cost tens of MB, not hundreds. Full records are fetched
one at a time (``GET /v2/images/{id}``) for what needs them (xattrs, open, changes) and kept in a
bounded cache.
"""

from __future__ import annotations

import calendar
import logging
import sys
from collections import OrderedDict
from collections.abc import Callable
from datetime import UTC, datetime

import trio

from glancefs import GlanceError, Image, NotFound
from glancefs.plumbing import parse_time

from .background import failure_of, raise_again
from .config import MountConfig
from .glance import Glance
from .namespace import (
    HIDDEN_STATUSES,
    ROOT_ENTRIES,
    SOURCE_URL_PROPERTY,
    Directory,
    DirKind,
    link_target,
    query_for,
)
from .naming import NameStream, assign_names

__all__ = ["MTIME_PROPERTY", "Catalog", "Entry", "Listing", "file_mtime_ns", "mtime_text"]

log = logging.getLogger("glancefs.catalog")

#: The image property that holds the modification time a tool set (``utime``: rsync, cp -p,
#: tar), as RFC 3339 text in UTC; ``st_mtime`` shows it instead of ``updated_at``. Glance takes any
#: property name up to 255 characters outside its reserved ``os_glance_`` prefix.
MTIME_PROPERTY = "glancefs_mtime"

_NEGATIVE_ENTRIES = 4096
#: Full image records kept (xattrs, open); listings never fill this cache.
_RECORDS = 4096


def mtime_text(ns: int) -> str:
    """``ns`` (since the epoch) as the text of :data:`MTIME_PROPERTY`: RFC 3339 in UTC with all
    nine digits of nanoseconds (rsync compares them), as rclone stores times on object stores."""
    seconds, fraction = divmod(ns, 1_000_000_000)
    stamp = datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{stamp}.{fraction:09d}Z"


def _recorded_mtime(text: str) -> int | None:
    whole, dot, fraction = text.removesuffix("Z").partition(".")
    if not text.endswith("Z") or not (dot and fraction.isdigit() and len(fraction) == 9):
        return None
    try:
        moment = datetime.strptime(whole, "%Y-%m-%dT%H:%M:%S").replace(tzinfo=UTC)
    except ValueError:
        return None
    return calendar.timegm(moment.timetuple()) * 1_000_000_000 + int(fraction)


def file_mtime_ns(record: Image) -> int:
    """``st_mtime`` of an image: the time a tool recorded (:data:`MTIME_PROPERTY`), else
    ``updated_at``. A recorded value that is not :func:`mtime_text`'s form counts as absent."""
    recorded = record.get(MTIME_PROPERTY)
    ns = _recorded_mtime(recorded) if isinstance(recorded, str) else None
    return ns if ns is not None else parse_time(record.get("updated_at"))


class Entry:
    """What the mount keeps of one image for listings and attributes: a few fields, no dict.

    ``seen`` is when Glance said so (the clock of the catalog); attributes older than the metadata
    TTL are fetched again. ``updated_ns`` is the file's mtime (see :func:`file_mtime_ns`).
    """

    __slots__ = (
        "id", "link", "name", "protected", "seen", "size", "status", "tags", "updated_ns"
    )  # fmt: skip

    def __init__(
        self,
        id: str,
        name: str | None,
        status: str,
        size: int | None,
        updated_ns: int,
        tags: tuple[str, ...] = (),
        protected: bool = False,
        seen: float = 0.0,
        link: str | None = None,
    ) -> None:
        self.id = id
        self.name = name
        self.status = status
        self.size = size
        self.updated_ns = updated_ns
        self.tags = tags
        self.protected = protected
        self.seen = seen
        #: The symlink target it shows (a web-download in progress), else None.
        self.link = link

    @classmethod
    def of(cls, image: Image, seen: float = 0.0) -> Entry:
        get = image.get
        tags = get("tags")
        return cls(
            image.id,
            get("name"),
            sys.intern(str(get("status", ""))),
            get("size"),
            file_mtime_ns(image),
            tuple(tags) if tags else (),
            bool(get("protected")),
            seen,
            link_target(image.status, get(SOURCE_URL_PROPERTY)),
        )

    def __repr__(self) -> str:
        return f"Entry(id={self.id!r}, name={self.name!r}, status={self.status!r})"


class Listing:
    """One directory's entries in display order, growing while the server's pages arrive.

    ``entries`` holds the images received so far, ``names[i]`` is the file name of ``entries[i]``
    once that name is final (names may lag behind entries: see
    :class:`~glancefs.fs.naming.NameStream`). Both only ever grow, so a directory handle holding a
    listing keeps stable offsets; once :attr:`complete`, a listing never changes. ``by_name`` (for
    lookups) holds the final names; ``tags`` (for by-tag/) is filled at completion.
    """

    def __init__(self) -> None:
        self.names: list[str] = []
        self.entries: list[Entry] = []
        self.tags: tuple[str, ...] = ()
        self.by_name: dict[str, Entry] = {}
        self.complete = False
        self.error: GlanceError | None = None
        self._progress = trio.lowlevel.ParkingLot()

    async def names_beyond(self, count: int) -> bool:
        """Wait until more than ``count`` names are final (True) or the listing ended without
        more (False). Raises the error that ended the fetch, if one did."""
        while len(self.names) <= count and not self.complete:
            await self._progress.park()
        if self.error is not None:
            raise_again(self.error)
        return len(self.names) > count

    async def wait_complete(self) -> None:
        """Wait for the whole listing; raises the error that ended the fetch, if one did."""
        while not self.complete:
            await self._progress.park()
        if self.error is not None:
            raise_again(self.error)

    async def find(self, name: str) -> Entry | None:
        """The entry called ``name``: at once if that name is final already, else once the
        listing is complete (None if it has no such name)."""
        found = self.by_name.get(name)
        if found is None:
            await self.wait_complete()
            found = self.by_name.get(name)
        return found

    def add(self, entry: Entry, settled: list[str]) -> None:
        """Append the next entry, and the names that became final with it (catalog only)."""
        self.entries.append(entry)
        if settled:
            for name in settled:
                self.by_name[name] = self.entries[len(self.names)]
                self.names.append(name)
            self._progress.unpark_all()

    def finish(self, names: list[str], tags: tuple[str, ...] = ()) -> None:
        """Set every name (the reference: assign_names on the whole listing) (catalog only)."""
        settled = len(self.names)
        if self.names != names[:settled]:
            # Only if the server's collation ties names that NameStream keeps apart.
            log.warning("readdir handed out provisional names: the server sorts names unusually")
            self.by_name = dict(zip(names, self.entries, strict=True))
        else:
            for position in range(settled, len(names)):
                self.by_name[names[position]] = self.entries[position]
        self.names = names
        self.tags = tags
        self.complete = True
        self._progress.unpark_all()

    def fail(self, error: GlanceError) -> None:
        """End the listing with ``error``, raised to its readers (catalog only)."""
        self.error = error
        self.complete = True
        self._progress.unpark_all()


class Catalog:
    """Cached access to image records and listings for one mount."""

    def __init__(
        self,
        client: Glance,
        config: MountConfig,
        nursery: trio.Nursery,
        clock: Callable[[], float] = trio.current_time,
    ) -> None:
        self._client = client
        self._config = config
        self._nursery = nursery
        self._clock = clock
        self._images: OrderedDict[str, tuple[float, Image]] = OrderedDict()
        #: Attributes by image id, from listings and records (each Entry knows when it was seen).
        self._attrs: dict[str, Entry] = {}
        self._missing: OrderedDict[str, float] = OrderedDict()
        #: Per directory: its listing, and when that was started (complete: when it ended).
        self._listings: dict[Directory, tuple[float, Listing]] = {}
        #: Images created in new/ by this mount, and when: new/ lists them for a while after
        #: their upload, so that tools which write a temporary name and rename it work.
        self._created: dict[str, float] = {}
        #: Images being deleted after a failed upload: never shown again.
        self._hidden: set[str] = set()
        self._usage: tuple[float, dict[str, dict[str, int]]] | None = None
        self._stores: list[str] | None = None
        self._import_methods: list[str] | None = None
        #: Counts the invalidations: a record fetched while one happened may predate the change
        #: (a GET that started before a setfattr's PATCH and ended after it), so it is returned
        #: to its caller but not kept.
        self._invalidations = 0

    async def usage(self) -> dict[str, dict[str, int]]:
        """Glance's quota usage (``/v2/info/usage``), reused for ``listing_ttl`` seconds.

        Empty when Glance enforces no unified limits (it then answers ``{"usage": {}}``) or does not
        answer at all: ``df`` must work either way.
        """
        now = self._clock()
        if self._usage is not None and now - self._usage[0] < self._config.listing_ttl:
            return self._usage[1]
        try:
            usage = await self._client.info.usage()
        except GlanceError as error:
            log.debug("no quota usage from Glance: %s", error)
            usage = {}
        self._usage = (now, usage)
        return usage

    async def offered_stores(self) -> list[str]:
        """The ids of Glance's stores (``/v2/info/stores``; empty without multi-store), asked
        once per mount: offering another store takes a restart of Glance."""
        if self._stores is None:
            try:
                self._stores = [str(store["id"]) for store in await self._client.info.stores()]
            except NotFound:
                self._stores = []
        return self._stores

    async def import_methods(self) -> list[str]:
        """Glance's enabled import methods (``/v2/info/import``), asked once per mount."""
        if self._import_methods is None:
            self._import_methods = await self._client.info.import_methods()
        return self._import_methods

    async def image(self, image_id: str, *, fresh: bool = False) -> Image:
        """The image's record; :class:`~glancefs.NotFound` when it is gone or hidden."""
        now = self._clock()
        if image_id in self._hidden:
            raise NotFound(404, f"image {image_id} is being deleted")
        if not fresh:
            cached = self._images.get(image_id)
            if cached and now - cached[0] < self._config.metadata_ttl:
                return cached[1]
            missing_since = self._missing.get(image_id)
            if missing_since is not None and now - missing_since < self._config.metadata_ttl:
                raise NotFound(404, f"no image {image_id}")
        invalidations = self._invalidations
        try:
            image = await self._client.images.get(image_id)
        except NotFound:
            self._remember_missing(image_id, now)
            self._images.pop(image_id, None)
            self._attrs.pop(image_id, None)
            raise
        if image.status in HIDDEN_STATUSES:
            self._remember_missing(image_id, now)
            raise NotFound(404, f"image {image_id} is {image.status}")
        self._missing.pop(image_id, None)
        if invalidations == self._invalidations:
            self._remember(image, now)
        return image

    async def attributes(self, image_id: str) -> Entry:
        """The image's attributes, from the last listing or record when fresh enough."""
        entry = self._attrs.get(image_id)
        if entry is not None and self._clock() - entry.seen < self._config.metadata_ttl:
            if image_id in self._hidden:
                raise NotFound(404, f"image {image_id} is being deleted")
            return entry
        image = await self.image(image_id)
        return self._attrs.get(image_id) or Entry.of(image, self._clock())

    def _remember(self, image: Image, now: float) -> None:
        self._images[image.id] = (now, image)
        self._images.move_to_end(image.id)
        while len(self._images) > _RECORDS:
            self._images.popitem(last=False)
        self._attrs[image.id] = Entry.of(image, now)

    async def listing(self, directory: Directory) -> Listing:
        """The directory's whole current listing (complete at most ``listing_ttl`` ago)."""
        listing = self.open_listing(directory)
        await listing.wait_complete()
        return listing

    def open_listing(self, directory: Directory) -> Listing:
        """The directory's current listing, possibly still arriving (see :class:`Listing`).

        A listing younger than ``listing_ttl``, or still being fetched, is shared; otherwise a
        fetch starts in the background, so that readdir can hand out names as pages arrive.
        """
        cached = self._listings.get(directory)
        if cached is not None:
            started, listing = cached
            if not listing.complete or self._clock() - started < self._config.listing_ttl:
                return listing
        listing = Listing()
        self._listings[directory] = (self._clock(), listing)
        self._nursery.start_soon(self._fill, directory, listing)
        return listing

    async def _fill(self, directory: Directory, listing: Listing) -> None:
        """Fetch ``listing`` in the background; a failure goes to its readers (never raises)."""
        error = await failure_of(
            lambda: self._fetch(directory, listing), f"listing {directory.kind.value}"
        )
        current = self._listings.get(directory, (0.0, None))[1] is listing
        if error is not None:
            if current:
                del self._listings[directory]
            listing.fail(error)
        elif current:
            # The TTL runs from the end of the fetch: a listing of 100,000 images takes longer
            # than the TTL itself, and would otherwise be stale the moment it is complete.
            self._listings[directory] = (self._clock(), listing)

    async def _fetch(self, directory: Directory, listing: Listing) -> None:
        if directory.kind is DirKind.BY_TAG:
            every = await self.listing(Directory(DirKind.BY_ID))
            listing.finish([], tuple(sorted({tag for e in every.entries for tag in e.tags})))
            return
        query = query_for(directory, self._config.view)
        reserved = ROOT_ENTRIES.keys() if directory.kind is DirKind.ROOT else ()
        # Names settle as pages arrive for by-id/ (names are ids) and for views sorted by name
        # first (see NameStream); any other order needs the whole listing before any name.
        by_name = query.sort is not None and query.sort.split(",")[0].split(":")[0] == "name"
        streamed = NameStream(reserved) if by_name and directory.kind is not DirKind.NEW else None
        listed: set[str] = set()
        attrs = self._attrs
        # Pages of limit=1000 (the most Glance gives), following ``next``. Glance pages by
        # marker on a total order (the sort keys, then created_at and id), so an image that exists
        # throughout is listed exactly once even while others are created and deleted; the id
        # check only guards against a server that would repeat one.
        async for image in self._client.images.list(
            sort=query.sort, filters=_group(query.filters), limit=query.limit
        ):
            if image.status in HIDDEN_STATUSES or image.id in self._hidden or image.id in listed:
                continue
            entry = Entry.of(image, self._clock())
            listed.add(entry.id)
            attrs[entry.id] = entry
            if directory.kind is DirKind.BY_ID:
                listing.add(entry, [entry.id])
            else:
                listing.add(entry, streamed.add(entry.id, entry.name) if streamed else [])
        del listed
        if directory.kind is DirKind.NEW:
            now = self._clock()
            seen = {entry.id for entry in listing.entries}
            for image in await self._recently_created(seen, now):
                listing.add(Entry.of(image, now), [])
        if directory.kind is DirKind.BY_ID:
            names = listing.names
        else:
            entries = listing.entries
            chosen = assign_names(((e.id, e.name) for e in entries), reserved)
            names = [chosen[entry.id] for entry in entries]
            del chosen
        self._prune_attributes()
        listing.finish(names)

    def _prune_attributes(self) -> None:
        """Forget attributes past their TTL (once per listing: the cache stays near its size)."""
        oldest = self._clock() - self._config.metadata_ttl
        stale = [image_id for image_id, entry in self._attrs.items() if entry.seen < oldest]
        for image_id in stale:
            del self._attrs[image_id]

    def created_here(self, image: Image) -> None:
        """Record an image created in new/, so new/ keeps listing it for ``keep_new`` seconds."""
        self._created[image.id] = self._clock()
        self._remember(image, self._clock())
        self.invalidate()

    def was_created_here(self, image_id: str) -> bool:
        """Whether this mount created the image in new/ less than ``keep_new`` seconds ago."""
        created = self._created.get(image_id)
        return created is not None and self._clock() - created <= self._config.keep_new

    async def named(self, name: str) -> Entry | None:
        """Any visible image called exactly ``name`` (asked of Glance), the newest if several.

        new/ lists only queued images, so after a remount an uploaded ``f`` is no longer there;
        a lookup of ``new/f`` still finds it, so that a repeated ``rsync -a`` sees what it
        uploaded before and a ``cp`` cannot silently make a second image of the same name.
        """
        found: Entry | None = None
        async for image in self._client.images.list(
            filters={"name": [name]}, sort="created_at:desc", limit=20
        ):
            if image.status in HIDDEN_STATUSES or image.id in self._hidden:
                continue
            if image.get("name") == name:
                found = Entry.of(image, self._clock())
                self._attrs[found.id] = found
                break
        return found

    async def _recently_created(self, listed: set[str], now: float) -> list[Image]:
        for image_id, created in list(self._created.items()):
            if now - created > self._config.keep_new:
                del self._created[image_id]
        images = []
        for image_id in list(self._created):
            if image_id in listed:
                continue
            try:
                images.append(await self.image(image_id))
            except NotFound:
                del self._created[image_id]
        return images

    def hide(self, image_id: str) -> None:
        """Never show this image again (it is left over from a failed upload, to be deleted)."""
        self._hidden.add(image_id)
        self._created.pop(image_id, None)
        self.invalidate(image_id)

    def invalidate(self, image_id: str | None = None) -> None:
        """Forget listings, and the record of ``image_id``, after glancefs changed something."""
        self._invalidations += 1
        self._listings.clear()
        if image_id is not None:
            self._images.pop(image_id, None)
            self._attrs.pop(image_id, None)
            self._missing.pop(image_id, None)

    def drop_all(self) -> None:
        """Forget everything (SIGHUP)."""
        self._invalidations += 1
        self._listings.clear()
        self._images.clear()
        self._attrs.clear()
        self._missing.clear()
        self._usage = None

    def _remember_missing(self, image_id: str, now: float) -> None:
        self._missing[image_id] = now
        self._missing.move_to_end(image_id)
        while len(self._missing) > _NEGATIVE_ENTRIES:
            self._missing.popitem(last=False)


def _group(filters: tuple[tuple[str, str], ...]) -> dict[str, list[str]]:
    """Filter pairs as the client takes them; a repeated key (``tag``) becomes a list."""
    grouped: dict[str, list[str]] = {}
    for key, value in filters:
        grouped.setdefault(key, []).append(value)
    return grouped
