"""Imports Glance runs in the background for the mount: web-downloads (``ln -s URL new/NAME``)
and copies to further stores (``setfattr -n user.stores``), watched until they end.

Glance answers an import at once (202) and holds the image's import lock (the property
``os_glance_import_task``) while its task runs. :class:`Imports` polls each image until the lock
is gone, then tells success from failure: a web-download succeeded when the image is ``active``, a
copy when the image's ``stores`` include every target. A failure is logged once, with Glance's
reason (``os_glance_failed_import`` and the task's message); a failed web-download's image is
deleted like a failed upload's (kept queued with ``--keep-failed``). ``glancefs status`` lists the
imports in flight (:meth:`~glancefs.fs.status.MountStatus.import_started`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import trio

from glancefs import Image, NotFound

from .background import failure_of
from .changes import Changes, stores_of
from .status import STATUS

__all__ = ["IMPORT_LOCK", "Imports"]

log = logging.getLogger("glancefs.fs")

#: The property Glance sets on an image while an import task holds it.
IMPORT_LOCK = "os_glance_import_task"


@dataclass(frozen=True)
class _Import:
    """One import in flight: a copy to ``stores``, or (``url``) a web-download."""

    image_id: str
    name: str | None
    stores: tuple[str, ...] = ()
    url: str | None = None

    @property
    def what(self) -> str:
        return f"web-download of {self.url}" if self.url else f"copy to {','.join(self.stores)}"

    def succeeded(self, record: Image) -> bool:
        if self.url is not None:
            return record.status == "active"
        return set(self.stores) <= set(stores_of(record))


class Imports:
    """The imports this mount started, each watched in a task of ``nursery`` until it ends."""

    def __init__(
        self, changes: Changes, nursery: trio.Nursery, *, keep_failed: bool, poll: float = 1.0
    ) -> None:
        self._changes = changes
        self._nursery = nursery
        self._keep_failed = keep_failed
        #: Seconds between two looks at an image being imported.
        self._poll = poll

    def copying(self, image: Image, stores: list[str]) -> None:
        """A ``copy-image`` of ``image`` to ``stores`` was accepted: watch it."""
        self._watch(_Import(image.id, image.name, stores=tuple(stores)))

    def downloading(self, image: Image, url: str) -> None:
        """A ``web-download`` of ``url`` into ``image`` was accepted: watch it."""
        self._watch(_Import(image.id, image.name, url=url))

    def _watch(self, started: _Import) -> None:
        STATUS.import_started(started.image_id, started.name, started.what)
        self._nursery.start_soon(self._follow, started)

    async def _follow(self, started: _Import) -> None:
        # A task of the nursery: must not raise.
        what = f"image {started.image_id}: {started.what}"
        try:
            error = await failure_of(lambda: self._conclude(started), what)
            if error is not None:
                log.error("%s: cannot follow it: %s", what, error)
        finally:
            STATUS.import_ended(started.image_id)

    async def _conclude(self, started: _Import) -> None:
        """Wait for the import's end; log it, and what its failure means."""
        record = await self._ended(started.image_id)
        if record is None:
            log.warning("image %s: %s: the image is gone", started.image_id, started.what)
        elif started.succeeded(record):
            log.info("image %s: %s done", started.image_id, started.what)
        else:
            await self._failed(started, record)

    async def _ended(self, image_id: str) -> Image | None:
        """The image's record once no import holds it; None when it was deleted."""
        while True:
            await trio.sleep(self._poll)
            try:
                record = await self._changes.fresh(image_id)
            except NotFound:
                return None
            if record.status in ("deleted", "pending_delete"):
                return None
            if IMPORT_LOCK not in record:
                self._changes.uploaded(image_id)  # what the catalog knew is stale
                return record

    async def _failed(self, started: _Import, record: Image) -> None:
        reason = await self._changes.import_failure(record)
        if started.url is not None and not self._keep_failed:
            await self._changes.discard(started.image_id, f"{started.what} failed: {reason}")
            return
        kept = " (kept queued: --keep-failed)" if started.url is not None else ""
        log.error("image %s: %s failed: %s%s", started.image_id, started.what, reason, kept)
