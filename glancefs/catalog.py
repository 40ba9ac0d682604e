"""What the mount knows about the catalog: image records and directory listings, briefly cached.

Listings and records come from Glance and are reused for a short time (the mount's TTLs), so
that ``ls -l`` costs one paged listing instead of one request per file, and a burst of ``stat``
calls costs nothing.
Every change glancefs makes itself calls :meth:`Catalog.invalidate`, and SIGHUP :meth:`drop_all`.
Concurrent callers wanting the same stale listing share one fetch.

A :class:`Listing` is never changed once built, so a directory handle that holds one sees a
stable sequence of entries (stable readdir offsets) while newer listings replace it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from ._client import Client
from ._exceptions import NotFound
from ._images import Image
from .config import MountConfig
from .namespace import HIDDEN_STATUSES, ROOT_ENTRIES, Directory, DirKind, query_for
from .naming import assign_names

__all__ = ["Catalog", "Listing"]

_NEGATIVE_ENTRIES = 4096


@dataclass(frozen=True)
class Listing:
    """One directory's entries in display order: ``(file name, image)``; tags for by-tag/."""

    entries: tuple[tuple[str, Image], ...] = ()
    tags: tuple[str, ...] = ()
    by_name: dict[str, Image] = field(default_factory=dict)


class Catalog:
    """Cached access to image records and listings for one mount."""

    def __init__(
        self, client: Client, config: MountConfig, clock: Callable[[], float] = trio.current_time
    ) -> None:
        self._client = client
        self._config = config
        self._clock = clock
        self._images: dict[str, tuple[float, Image]] = {}
        self._missing: OrderedDict[str, float] = OrderedDict()
        self._listings: dict[Directory, tuple[float, Listing]] = {}
        self._locks: dict[Directory, trio.Lock] = {}
        #: Images created in new/ by this mount, and when: new/ lists them for a while after
        #: their upload, so that tools which write a temporary name and rename it work.
        self._created: dict[str, float] = {}
        #: Images being deleted after a failed upload: never shown again.
        self._hidden: set[str] = set()

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
        try:
            image = await self._client.images.get(image_id)
        except NotFound:
            self._remember_missing(image_id, now)
            self._images.pop(image_id, None)
            raise
        if image.status in HIDDEN_STATUSES:
            self._remember_missing(image_id, now)
            raise NotFound(404, f"image {image_id} is {image.status}")
        self._missing.pop(image_id, None)
        self._images[image_id] = (now, image)
        return image

    def cached_image(self, image_id: str) -> Image | None:
        """The last record seen, however old (for attributes of a file being released)."""
        cached = self._images.get(image_id)
        return cached[1] if cached else None

    async def listing(self, directory: Directory) -> Listing:
        """The directory's current listing (at most ``listing_ttl`` old)."""
        lock = self._locks.setdefault(directory, trio.Lock())
        async with lock:
            cached = self._listings.get(directory)
            if cached and self._clock() - cached[0] < self._config.listing_ttl:
                return cached[1]
            started = self._clock()
            listing = await self._fetch(directory)
            self._listings[directory] = (started, listing)
            return listing

    async def _fetch(self, directory: Directory) -> Listing:
        if directory.kind is DirKind.BY_TAG:
            every = await self.listing(Directory(DirKind.BY_ID))
            tags = sorted({tag for _, image in every.entries for tag in image.tags})
            return Listing(tags=tuple(tags))
        query = query_for(directory, self._config.view)
        images: list[Image] = []
        now = self._clock()
        async for image in self._client.images.list(
            sort=query.sort, filters=_group(query.filters), limit=query.limit
        ):
            if image.status in HIDDEN_STATUSES or image.id in self._hidden:
                continue
            images.append(image)
            self._images[image.id] = (now, image)
        if directory.kind is DirKind.NEW:
            images += await self._recently_created({image.id for image in images}, now)
        if directory.kind is DirKind.BY_ID:
            names = {image.id: image.id for image in images}
        else:
            reserved = ROOT_ENTRIES.keys() if directory.kind is DirKind.ROOT else ()
            names = assign_names(((i.id, i.name) for i in images), reserved)
        entries = tuple((names[image.id], image) for image in images)
        return Listing(entries=entries, by_name=dict(entries))

    def created_here(self, image: Image) -> None:
        """Record an image created in new/, so new/ keeps listing it for ``keep_new`` seconds."""
        self._created[image.id] = self._clock()
        self._images[image.id] = (self._clock(), image)
        self.invalidate()

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
        self._listings.clear()
        if image_id is not None:
            self._images.pop(image_id, None)
            self._missing.pop(image_id, None)

    def drop_all(self) -> None:
        """Forget everything (SIGHUP)."""
        self._listings.clear()
        self._images.clear()
        self._missing.clear()

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
