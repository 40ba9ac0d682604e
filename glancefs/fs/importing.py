"""How uploads reach Glance: one ``PUT .../file``, or the interoperable import (``PUT .../stage``,
then ``POST .../import`` with ``glance-direct``) and the wait for its end.

The import runs with ``--import``, and without it where Glance refuses the PUT by policy
(``"upload_image": "!"``, while staging stays allowed) and offers ``glance-direct``: a PUT
refused with 403 goes to the stage instead, and once the stage took one (the policy refuses PUT,
not this user the image) the mount imports for good (one log line). Glance checks that policy
before it reads the body and answers at once (gunicorn then closes the connection), so the bytes
of a refused PUT that were already sent are few; until a PUT has succeeded on this mount, each
one keeps its first :data:`REPLAY_BYTES` to send again to the stage
(:mod:`glancefs.fs.payload`).

An import ends with the image ``active`` (the import plugins, such as ``image_conversion``, may
have changed its format, size and hash), or back in ``queued`` with the store that failed in
``os_glance_failed_import`` and the import task's message: :func:`wait_for_import` raises
:class:`ImportFailed` with that reason.
"""

from __future__ import annotations

import logging

import trio

from glancefs import Forbidden, GlanceError, Image

from .changes import Changes

__all__ = ["REPLAY_BYTES", "ImportFailed", "UploadRoute", "wait_for_import"]

log = logging.getLogger("glancefs.upload")

#: The bytes a PUT keeps to send again to the stage after a 403 (memory per upload, only until
#: a PUT succeeded on this mount). Glance reads none of the body before it refuses, so what can
#: have left is the payload's channel (4 MiB) and a socket's send buffer (Linux's tcp_wmem
#: allows 4 MiB), beside the few KiB the server's receive window takes.
REPLAY_BYTES = 8 * 1024 * 1024
#: Polling an import: the first delay, and the longest.
_FIRST_POLL = 0.2
_LONGEST_POLL = 2.0
#: Statuses a ``glance-direct`` import goes through before it ends.
_IMPORTING = ("uploading", "importing")


class ImportFailed(GlanceError):
    """Glance's import of the staged data ended without an active image (the message says
    Glance's reason)."""


class UploadRoute:
    """The mount's way of sending upload data: PUT, or stage and import (see the module
    docstring)."""

    def __init__(self, changes: Changes, *, always_import: bool) -> None:
        self._changes = changes
        #: Uploads are staged and imported (``--import``, or a PUT refused by policy).
        self.imports = always_import
        #: A PUT has succeeded on this mount: later PUTs keep nothing to replay.
        self.put_works = False
        #: Whether Glance offers ``glance-direct`` (None: not asked yet).
        self._offers_import: bool | None = None
        self._asking = trio.Lock()

    @property
    def replays(self) -> bool:
        """Whether a PUT keeps its first bytes to send again to the stage after a 403."""
        return not self.imports and not self.put_works

    def put_succeeded(self) -> None:
        self.put_works = True

    async def may_stage(self) -> bool:
        """After a PUT refused with 403: whether its data may go to the stage instead, as
        Glance offers ``glance-direct`` (asked once; a failure to ask is a no)."""
        async with self._asking:
            if self._offers_import is None:
                try:
                    self._offers_import = "glance-direct" in await self._changes.import_methods()
                except GlanceError:
                    return False  # asked again at the next refusal
            return self._offers_import

    def staged_after_refusal(self, refusal: Forbidden) -> None:
        """The stage took what a PUT was refused (a policy, not this image's owner, refused
        it): uploads import from now on, said once in the log."""
        if self.imports:
            return
        self.imports = True
        log.warning(
            "Glance refuses uploads by PUT (%s) but takes them staged: this mount imports its "
            "uploads from now on (as with --import)", refusal,
        )  # fmt: skip


async def wait_for_import(changes: Changes, image_id: str) -> Image:
    """Start the import of the staged data and wait for its end: the active image, or
    :class:`ImportFailed` with Glance's reason."""
    await changes.import_staged(image_id)
    delay = _FIRST_POLL
    while True:
        image = await changes.fresh(image_id)
        failed_stores = image.get("os_glance_failed_import")
        if image.status == "active" and not failed_stores:
            return image
        if image.status not in _IMPORTING or failed_stores:
            reason = await changes.import_failure(image)
            raise ImportFailed(f"image {image_id}: import failed: {reason}")
        await trio.sleep(delay)
        delay = min(delay * 1.5, _LONGEST_POLL)
