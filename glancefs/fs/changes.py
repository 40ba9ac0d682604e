"""The one owner of every change the filesystem makes to Glance, and of the cache invalidation
that goes with it (as mountpoint-s3's superblock owns its inode changes).

The filesystem core and upload sessions never call a mutating client method themselves: they ask
:class:`Changes`, which calls Glance and then tells the :class:`~glancefs.fs.catalog.Catalog` what
changed, in one place, so no caller can forget an invalidation or do it twice. Why a module of its
own rather than more methods on the catalog: the catalog is the read cache (listings, records, their
TTLs); this is the write side built on top of it, and keeping the two apart keeps each small.

Every method raises the client's :class:`~glancefs.GlanceError` (or a
:class:`~glancefs.fs.refusals.Refusal`); the operations module translates them.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterable, Iterator
from contextlib import contextmanager
from typing import Any

import trio

from glancefs import Conflict, GlanceError, Image, NotFound, OverLimit, ServerError

from .catalog import Catalog
from .glance import Glance
from .refusals import OutOfSpace
from .xattrs import Patch

__all__ = ["Changes", "stores_of"]

log = logging.getLogger("glancefs.fs")

#: How long a failed upload's image may take to become deletable (Glance noticing the broken PUT).
_SETTLE_SECONDS = 20.0


def stores_of(record: Image, field: str = "stores") -> list[str]:
    """The store ids of a comma-separated field of the record (``stores`` by default;
    ``os_glance_failed_import``: those an import failed to reach)."""
    return [s.strip() for s in str(record.get(field) or "").split(",") if s.strip()]


class Changes:
    """Creates, renames, deletes, patches and uploads images, keeping the catalog in step."""

    def __init__(self, client: Glance, catalog: Catalog, store: str | None = None) -> None:
        self._client = client
        self.catalog = catalog
        #: The store uploads go to (``--store``); None: Glance's default.
        self._store = store

    async def create(self, name: str, formats: tuple[str, str] | None, **properties: str) -> Image:
        """A queued image named ``name`` in new/ (with ``formats``, when the name tells them,
        and custom ``properties``)."""
        fields: dict[str, Any] = {"name": name, **properties}
        if formats is not None:
            fields["disk_format"], fields["container_format"] = formats
        image = await self._client.images.create(**fields)
        self.catalog.created_here(image)
        log.info("created image %s (%s) in new/", image.id, name)
        return image

    def created_here(self, image_id: str) -> bool:
        """Whether this mount created the image (recently enough for new/ to still list it)."""
        return self.catalog.was_created_here(image_id)

    @contextmanager
    def _changing(self, image_id: str, what: str) -> Iterator[None]:
        """Around every change of an image: its cached state goes, whatever the outcome (a
        failed request may have changed it all the same), and a full quota is ENOSPC."""
        try:
            yield
        except OverLimit as error:
            raise OutOfSpace(f"{what} on {image_id}: {error}") from None
        finally:
            self.catalog.invalidate(image_id)

    async def rename(self, image_id: str, old: str, new: str) -> None:
        with self._changing(image_id, f"mv {old} {new}"):
            await self._client.images.update(image_id, name=new)
        log.info("renamed image %s: %s -> %s", image_id, old, new)

    async def delete(self, image_id: str, why: str) -> None:
        """Delete the image; ``why`` completes the log line ("deleted image ID (why)")."""
        with self._changing(image_id, "rm"):
            await self._client.images.delete(image_id)
        log.info("deleted image %s (%s)", image_id, why)

    async def discard(self, image_id: str, reason: str) -> None:
        """Delete an image this mount created whose upload failed; never raises.

        It is hidden at once (never shown again, even if the delete fails). Right after an
        aborted PUT, Glance may still be receiving it and answers 409 or 500 until it notices:
        such answers are retried for :data:`_SETTLE_SECONDS`, nothing else is (a 403 will not
        pass by waiting). If Glance still refuses, the image stays queued (it has no data, so it
        never boots) and the log says so; nothing retries in the background.
        """
        self.catalog.hide(image_id)
        delay = 0.1
        with trio.move_on_after(_SETTLE_SECONDS) as settling:
            while True:
                try:
                    await self._client.images.delete(image_id)
                    break
                except NotFound:
                    break
                except (Conflict, ServerError):
                    await trio.sleep(delay)
                    delay = min(delay * 2, 2.0)
                except GlanceError as error:
                    log.error("image %s: %s; left queued, it cannot be deleted: %s", image_id,
                              reason, error)  # fmt: skip
                    return
        if settling.cancelled_caught:
            log.error("image %s: %s; left queued: Glance kept refusing to delete it", image_id,
                      reason)  # fmt: skip
            return
        log.warning("image %s: %s; the image is deleted", image_id, reason)

    async def patch(self, image_id: str, patch: Patch, what: str) -> Image:
        """Apply one JSON-patch; ``what`` names it in errors."""
        with self._changing(image_id, what):
            return await self._client.images.patch(image_id, patch)

    async def tag(self, image_id: str, operation: str, tag: str) -> None:
        """Add (``operation`` "add") or remove one tag."""
        with self._changing(image_id, f"tag {tag}"):
            if operation == "add":
                await self._client.image_tags.update(image_id, tag)
            else:
                await self._client.image_tags.delete(image_id, tag)

    async def set_formats(self, image_id: str, disk: str, container: str) -> Image:
        with self._changing(image_id, "set formats"):
            return await self._client.images.update(
                image_id, disk_format=disk, container_format=container
            )

    async def upload(self, image_id: str, body: AsyncIterable[bytes], size: int | None) -> None:
        """Send the image's data (one PUT); the caller verifies the result with :meth:`fresh`.
        A quota or size cap (413) stays :class:`~glancefs.OverLimit`: the upload session
        decides what it means."""
        try:
            await self._client.images.upload(image_id, body, size=size, backend=self._store)
        finally:
            self.catalog.invalidate(image_id)

    async def web_download(self, image_id: str, uri: str) -> None:
        """Start Glance's ``web-download`` of ``uri`` into the image (and ``--store``); Glance
        answers at once (202) and fetches in the background."""
        stores = None if self._store is None else [self._store]
        with self._changing(image_id, "web-download"):
            await self._client.images.image_import(image_id, "web-download", uri, stores=stores)

    async def copy_to_stores(self, image_id: str, stores: list[str]) -> None:
        """Start a ``copy-image`` import of the image's data into ``stores`` (202, copied in
        the background)."""
        with self._changing(image_id, f"copy to {','.join(stores)}"):
            await self._client.images.image_import(image_id, "copy-image", stores=stores)
        log.info("image %s: copying to %s", image_id, ",".join(stores))

    async def delete_from_store(self, image_id: str, store: str) -> None:
        """Delete the image's data from ``store`` only (it stays in its other stores)."""
        with self._changing(image_id, f"delete from store {store}"):
            await self._client.images.delete_from_store(store, image_id)
        log.info("image %s: deleted from store %s", image_id, store)

    async def stage(self, image_id: str, body: AsyncIterable[bytes], size: int | None) -> None:
        """Send the image's data to Glance's staging area (``PUT .../stage``), for
        :meth:`import_staged`."""
        try:
            await self._client.images.stage(image_id, body, size=size)
        finally:
            self.catalog.invalidate(image_id)

    async def import_staged(self, image_id: str) -> None:
        """Start the ``glance-direct`` import of the staged data (into ``--store``); Glance
        imports in the background."""
        stores = None if self._store is None else [self._store]
        with self._changing(image_id, "import"):
            await self._client.images.image_import(image_id, "glance-direct", stores=stores)

    async def import_methods(self) -> list[str]:
        """The interoperable import methods this Glance offers (``GET /v2/info/import``)."""
        return await self._client.info.import_methods()

    async def import_failure(self, image: Image) -> str:
        """Why the image's import failed, in Glance's words: the stores of
        ``os_glance_failed_import`` and the message of its latest failed import task (when
        Glance lets this user read its tasks)."""
        failed = stores_of(image, "os_glance_failed_import")
        reasons = [f"failed in store {','.join(failed)}"] if failed else []
        try:
            tasks = await self._client.images.get_associated_image_tasks(image.id)
        except GlanceError as error:
            reasons.append(f"its tasks cannot be read: {error}")
        else:
            failures = [task for task in tasks if task.status == "failure" and task.message]
            if failures:
                latest = max(failures, key=lambda task: str(task.get("created_at")))
                reasons.append(latest.message)
        return "; ".join(reasons) or f"the image is {image.status}"

    async def fresh(self, image_id: str) -> Image:
        """Glance's record now (not the cache's)."""
        return await self._client.images.get(image_id)

    def uploaded(self, image_id: str) -> None:
        """An upload ended (either way): whatever the cache knew of the image is stale."""
        self.catalog.invalidate(image_id)
