"""Upload sessions: what happens to a queued image from the first open for writing to the close
that publishes it (or the failure that aborts it), across the closes and opens of its writer.

A session is the one owner of an upload (its bytes are a :class:`~glancefs.fs.payload.Payload`).
Its stages (:class:`Stage`)::

    OPEN ──close: data, or the writer exiting──────────────────────────▶ publish (ENDED)
      │  ──close: nothing / a size / a header after a reopen,
      │    writer still running──────────────────────────────────────▶ WAITING
      │  ──writer dying, a refused write, a failure───────────────────▶ abort (ENDED)
    WAITING ──an open for writing (its writer, or another process)────▶ OPEN
      │     ──its writer exits: nothing──▶ ENDED (the image stays queued, as after touch)
      │                        a size────▶ SIZED
      │                        a header──▶ publish (ENDED)
    SIZED ──an open for writing──▶ OPEN (the next writer continues from that size)

Which close publishes: a close by the writer (the process that opened the file) that holds no
other descriptor of it for writing, that is not dying, and after which the file is more than a
size (:class:`~glancefs.fs.payload.Ending`), or more than a format's header once the writer has
closed and opened the file before; or such a close that the writer makes while it exits
normally. That close returns once Glance reports the image active and verified (after the import,
with ``--import``: :mod:`glancefs.fs.importing`), and the metadata
changes made meanwhile (they wait in the session, as Glance would lose a change made while it
receives data) are applied. Any other close by a writer that still runs returns at once:
``qemu-img`` creates its output (nothing, or a size), closes it, opens it again for the header,
closes it, and opens it again for the data; the session goes on at each open, and ends when the
writer exits.

Aborted, for any reason (a refused write, a full spool, Glance failing, a bug, a cancelled task,
a writer killed by a signal, the mount ending): the PUT is broken off, the image this mount
created is deleted (or left queued with ``--keep-failed``); never active. Each step turns every
exception into that abort, logged in one line, before it raises an
:class:`~glancefs.fs.refusals.UploadAborted` with the failure's errno, as every later request
to the upload does.
"""

from __future__ import annotations

import enum
import errno
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import trio

from glancefs import GlanceError, Image, OverLimit, QuotaExceeded

from .changes import Changes
from .formats import Formats, formats_of_name
from .importing import UploadRoute
from .payload import Ending, Payload, UploadFailed
from .refusals import (
    AccessDenied,
    Busy,
    LocalFailure,
    OutOfSpace,
    Refusal,
    UploadAborted,
    errno_of,
)
from .spool import SpoolSpace
from .status import STATUS
from .writers import Writer

__all__ = ["Stage", "UploadFailed", "UploadPolicy", "UploadSession", "Uploads"]

log = logging.getLogger("glancefs.upload")

#: How long cleanup (deleting the image) may take once the task doing it is cancelled.
_CLEANUP_SECONDS = 30.0

T = TypeVar("T")

#: A change of the image's metadata, applied to its record once the data is in.
MetadataChange = Callable[[Image], Awaitable[object]]


class Stage(enum.Enum):
    """Where a session is (see the module docstring)."""

    OPEN = "open"
    WAITING = "waiting for its writer to come back"
    SIZED = "sized, waiting for a writer"
    ENDED = "ended"


@dataclass
class _Deferred:
    what: str
    apply: MetadataChange


@dataclass(frozen=True)
class UploadPolicy:
    """The mount's choices for every upload."""

    default_formats: Formats = ("raw", "bare")
    #: Every upload goes to the spool from its first byte (``--spool-dir``).
    spool_all: bool = False
    #: Leave the image of a failed upload queued (else the image this mount created is deleted).
    keep_failed: bool = False
    #: Stage and import every upload (``--import``) rather than PUT it.
    always_import: bool = False


class UploadSession:
    """One queued image's upload, across the opens and closes of its writer (see the module
    docstring). ``handles``: the file handles open on it."""

    def __init__(
        self,
        changes: Changes,
        image: Image,
        nursery: trio.Nursery,
        policy: UploadPolicy,
        spool: SpoolSpace,
        route: UploadRoute,
        *,
        created: bool,
        writer: Writer | None,
        choose_formats: bool,
    ) -> None:
        self._changes = changes
        self._nursery = nursery
        self.image_id = image.id
        #: Created by this mount (``create`` in new/): a failure deletes it.
        self.created = created
        self.writer = writer
        self._keep_failed = policy.keep_failed
        self._payload = Payload(
            changes, image, nursery, spool, policy.default_formats, route,
            choose_formats=choose_formats, spool_all=policy.spool_all,
        )  # fmt: skip
        self.stage = Stage.OPEN
        self.handles = 1
        self._deferred: list[_Deferred] = []
        self._failure: Refusal | GlanceError | None = None
        #: Writes, reads and immediate metadata changes one at a time (a PATCH racing the PUT's
        #: start would be lost).
        self._lock = trio.Lock()
        #: Held while a session whose writer is gone is settled (published, sized, ended).
        self._settling = trio.Lock()
        #: Cancels the watch on the writer of a WAITING session when it comes back.
        self._watch: trio.CancelScope | None = None
        #: A writer opened the file again after a close that did not end the upload.
        self._reopened = False

    @property
    def size(self) -> int:
        """The file's size as its writer sees it."""
        return self._payload.size

    @property
    def finished(self) -> bool:
        """Published or aborted: nothing more will be sent."""
        return self._payload.finished

    async def write(self, offset: int, data: bytes) -> int:
        self._refuse_if_aborted()
        async with self._lock:
            return await self._guarded(f"write at {offset}", self._payload.write(offset, data))

    async def truncate(self, size: int) -> None:
        """``ftruncate`` (or ``O_TRUNC``) on the file (see :meth:`Payload.truncate`)."""
        self._refuse_if_aborted()
        async with self._lock:
            await self._guarded(f"truncate to {size}", self._payload.truncate(size))

    async def read(self, offset: int, size: int) -> bytes:
        """The bytes written so far (image tools read back their headers); a refused read
        leaves the upload as it is."""
        self._refuse_if_aborted()
        async with self._lock:
            try:
                return await self._payload.read(offset, size)
            except OSError as error:
                code = error.errno or errno.EIO
                raise LocalFailure(
                    f"image {self.image_id}: read at {offset}: spool: {os.strerror(code)}", code
                ) from None

    async def change(self, what: str, apply: MetadataChange, *, formats: bool = False) -> bool:
        """Change the image's metadata: now if no data is on its way to Glance, else once the
        data is in (before the close that publishes returns; True: it waits). ``formats``: the
        change sets the disk or container format, which cannot wait (the data is declared with
        them)."""
        async with self._lock:
            if self._failure is not None or self.finished:
                raise Busy(f"{what} on {self.image_id}: its upload has ended; retry after close")
            if not self._payload.started:
                applied = await apply(await self._changes.fresh(self.image_id))
                if isinstance(applied, Image):
                    self._payload.image = applied
                if formats:
                    self._payload.choose_formats = False
                return False
            if formats:
                raise Busy(f"{what} on {self.image_id}: the formats are fixed once data is sent")
            self._deferred.append(_Deferred(what, apply))
            return True

    # -- closes and opens -----------------------------------------------------------------------

    async def close(self) -> Image | None:
        """A close of one of its files (FLUSH): publish, wait for the writer, or abort (see the
        module docstring); returns the active image when it published. Raises why the upload
        failed."""
        self._refuse_if_aborted()
        if self.stage is not Stage.OPEN or self.finished:
            return None
        writer = self.writer
        interruption = writer.interruption() if writer is not None else None
        if interruption is not None:
            if self._payload.has_data or self._payload.size or self.created:
                await self._abort(
                    f"{interruption} before it closed the file",
                    UploadFailed(f"image {self.image_id}: upload aborted: {interruption}"),
                )
            else:
                self.stage = Stage.ENDED
            return None
        if writer is not None and writer.still_writing():
            return None  # not the writer's last close: a dup's, or a forked child's copy
        async with self._lock:
            ending = await self._guarded("close", self._payload.ending())
        if self._may_go_on(ending) and writer is not None and writer.running():
            self._wait_for(writer, ending)
            return None
        return await self._end(ending)

    def _may_go_on(self, ending: Ending) -> bool:
        """Whether a close that leaves ``ending`` may be followed by more of the image: after
        nothing or only a size, always; after only a header, when its writer has closed and
        opened the file before (qemu-img creates the file, then writes the header in a second
        open, the data in a third), not a ``cp`` of an empty disk image."""
        if ending is Ending.HEADER:
            return self._reopened
        return ending is not Ending.DATA

    async def release(self) -> None:
        """One of its file handles is closed for good (RELEASE). The last one, without a close
        that decided (the writer died, or the file was closed some other way), decides now."""
        self.handles -= 1
        if self.handles == 0 and self._failure is None:
            await self.close()

    def resume(self, writer: Writer | None) -> None:
        """An open for writing of a WAITING or SIZED session: its writer came back, or another
        process takes it over (after ``truncate -s``, the next writer)."""
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        if self.stage is Stage.WAITING and self._payload.has_data:
            self._payload.expect_rewrites()  # it left a header: it will go back to it
        self.writer = writer
        self.stage = Stage.OPEN
        self.handles += 1
        self._reopened = True
        STATUS.upload_goes_on(self.image_id)

    def joins(self, writer: Writer | None) -> bool:
        """Whether an open for writing by ``writer`` belongs to this session: its own writer
        (another descriptor, another thread), or a session that waits for one."""
        if self.stage in (Stage.WAITING, Stage.SIZED):
            return True
        if self.stage is Stage.ENDED:
            return False
        if writer is None or self.writer is None:
            return True
        return writer.process == self.writer.process and writer.started == self.writer.started

    async def settle(self) -> bool:
        """Before another open of the image: a WAITING session whose writer is gone ends now
        (the open then finds the image as that ending left it), and one that is ending is
        waited for. True when it ended or was ended meanwhile: the image's record changed."""
        async with self._settling:
            if self.stage is Stage.WAITING and (self.writer is None or not self.writer.running()):
                await self._settle_departed()
        return self.finished

    def _wait_for(self, writer: Writer, ending: Ending) -> None:
        self.stage = Stage.WAITING
        STATUS.upload_waiting(
            self.image_id, self._payload.image.name, ending.value, self.size, writer.process
        )
        self._watch = trio.CancelScope()
        self._nursery.start_soon(self._watch_writer, writer, self._watch)
        log.info(
            "image %s: its writer (pid %d) closed it with %s written: the upload goes on when it "
            "opens the file again, and ends when it exits", self.image_id, writer.process,
            ending.value,
        )  # fmt: skip

    async def _watch_writer(self, writer: Writer, watch: trio.CancelScope) -> None:
        """A task of the nursery: settle the session when its writer exits (never raises)."""
        with watch:
            try:
                await writer.exited()
            except trio.Cancelled:
                if not watch.cancel_called:  # the mount is ending
                    await self._abort_at_unmount()
                raise
        if watch.cancelled_caught:
            return  # its writer came back
        async with self._settling:
            if self.stage is Stage.WAITING and self.writer is writer:
                await self._settle_departed()

    async def _settle_departed(self) -> None:
        """The writer of a WAITING session is gone: the upload ends as the file was left, with
        no close to report to (logged, and shown by ``glancefs status``)."""
        pid = self.writer.process if self.writer is not None else "unknown"
        try:
            ending = await self._guarded("close", self._payload.ending())
            log.info("image %s: its writer (pid %s) exited; it left %s", self.image_id, pid,
                     ending.value)  # fmt: skip
            await self._end(ending)
        except (GlanceError, Refusal):
            pass  # aborted, and logged, by _guarded

    async def _abort_at_unmount(self) -> None:
        with trio.CancelScope(shield=True), trio.move_on_after(_CLEANUP_SECONDS):
            await self._abort(
                "the mount ended while it waited for its writer",
                UploadFailed(f"image {self.image_id}: the mount ended before the upload did"),
            )

    async def _end(self, ending: Ending) -> Image | None:
        """End as ``ending`` says: nothing stays queued, a size waits for the next writer, a
        header or data is published."""
        STATUS.upload_goes_on(self.image_id)
        if ending is Ending.EMPTY:
            self.stage = Stage.ENDED
            return None
        if ending is Ending.SIZE:
            self.stage = Stage.SIZED
            STATUS.upload_waiting(
                self.image_id, self._payload.image.name, ending.value, self.size, None
            )
            log.info("image %s: %d bytes set as its size: it stays queued for the next writer",
                     self.image_id, self.size)  # fmt: skip
            return None
        async with self._lock:
            image = await self._guarded("close", self._payload.finish())
        self.stage = Stage.ENDED
        self._changes.uploaded(self.image_id)
        log.info("image %s: %d bytes %s", self.image_id, self.size, self._payload.verified)
        await self._apply_deferred(image)
        return image

    async def _apply_deferred(self, image: Image) -> None:
        deferred, self._deferred = self._deferred, []
        for change in deferred:
            try:
                await change.apply(await self._changes.fresh(self.image_id))
            except (GlanceError, Refusal) as error:
                log.error("image %s: uploaded, but %s failed: %s", image.id, change.what, error)
                raise
            log.info("image %s: %s applied after the upload", image.id, change.what)

    def _refuse_if_aborted(self) -> None:
        if self._failure is not None:
            raise UploadAborted(str(self._failure), errno_of(self._failure))

    async def _guarded(self, what: str, step: Awaitable[T]) -> T:
        """Run one step; any exception aborts the session first (the one log line), then the
        step raises :class:`UploadAborted` with its errno, as every later request does."""
        failure: Refusal | GlanceError
        reason: str | None = None
        try:
            return await step
        except QuotaExceeded as error:
            failure, reason = error, f"{what}: {error}"  # the project's quota: EDQUOT
        except OverLimit as error:
            failure = OutOfSpace(f"{what}: {error}")  # a size cap, a full store
        except (Refusal, GlanceError) as error:
            failure = error
        except OSError as error:
            code = error.errno or errno.EIO
            failure = LocalFailure(f"{what}: spool: {os.strerror(code)}", code)
        except Exception as error:
            log.exception("image %s: %s: internal error", self.image_id, what)
            failure = UploadFailed(f"image {self.image_id}: {what}: internal error")
            reason = f"{what}: internal error: {error}"
        except BaseException:
            # Cancelled (the mount is ending): clean up all the same, within a bounded time.
            with trio.CancelScope(shield=True), trio.move_on_after(_CLEANUP_SECONDS):
                cancelled = UploadFailed(f"image {self.image_id}: {what} was cancelled")
                await self._abort(f"{what} was cancelled", cancelled)
            raise
        await self._abort(reason or str(failure), failure)
        self._refuse_if_aborted()
        raise AssertionError("unreachable: the abort kept a failure")

    async def _abort(self, reason: str, failure: Refusal | GlanceError) -> None:
        """Abort the upload once, keeping ``failure`` for every later close to raise; the
        image this mount created is deleted (or kept queued)."""
        if self._failure is not None:
            return
        reason = reason.removeprefix(f"image {self.image_id}: ")  # the log line names it
        self._failure = failure
        self.stage = Stage.ENDED
        STATUS.upload_goes_on(self.image_id)
        if self._watch is not None:
            self._watch.cancel()
        await self._payload.abort(reason)
        self._deferred.clear()
        if self.created and not self._keep_failed:
            await self._changes.discard(self.image_id, f"upload aborted: {reason}")
            return
        kept = "left queued (--keep-failed)" if self.created else "it stays queued"
        log.warning("image %s: upload aborted: %s; %s", self.image_id, reason, kept)
        self._changes.uploaded(self.image_id)


class Uploads:
    """The mount's upload sessions, by image."""

    def __init__(
        self, changes: Changes, nursery: trio.Nursery, policy: UploadPolicy, spool: SpoolSpace
    ) -> None:
        self._changes = changes
        self._nursery = nursery
        self._policy = policy
        self._spool = spool
        self._route = UploadRoute(changes, always_import=policy.always_import)
        self._sessions: dict[str, UploadSession] = {}

    async def open(self, image: Image, *, created: bool, writer: Writer | None) -> UploadSession:
        """The session an open for writing of ``image`` writes to: the image's own (its writer's
        other descriptor, or a session waiting for a writer), else a new one. EBUSY while
        another process writes the image (Glance would refuse a second upload anyway).

        The content may choose the formats when the image's are those its name implies
        (``touch new/x.qcow2`` set them so; a later write of raw data corrects them), never
        when someone chose others.
        """
        session = self.of(image.id)
        if session is not None and await session.settle():
            raise AccessDenied(f"write {image.id}: its upload ended as the file was opened")
        # From here on nothing waits: no other task can change the session under the choice.
        session = self.of(image.id)
        if session is not None:
            if not session.joins(writer):
                holder = session.writer.process if session.writer is not None else "?"
                raise Busy(f"write {image.id}: pid {holder} is writing it")
            if session.stage is Stage.OPEN:
                session.handles += 1
            else:
                session.resume(writer)
            return session
        implied = formats_of_name(image.name or "") or self._policy.default_formats
        current = (image.get("disk_format"), image.get("container_format"))
        session = UploadSession(
            self._changes, image, self._nursery, self._policy, self._spool, self._route,
            created=created,
            writer=writer, choose_formats=created or current == implied,
        )  # fmt: skip
        self._sessions[image.id] = session
        return session

    def of(self, image_id: str) -> UploadSession | None:
        """The session of the image, if one has not ended."""
        session = self._sessions.get(image_id)
        if session is not None and session.stage is Stage.ENDED and not session.handles:
            del self._sessions[image_id]
            return None
        return session if session is not None and session.stage is not Stage.ENDED else None

    def size_of(self, image_id: str) -> int | None:
        """What ``stat`` shows of a queued image with a session: the size its writer sees."""
        session = self.of(image_id)
        return session.size if session is not None else None

    async def settle(self, image_id: str) -> bool:
        """Before an open of the image (see :meth:`UploadSession.settle`); True when the
        image's record changed."""
        session = self.of(image_id)
        return session is not None and await session.settle()

    async def release(self, session: UploadSession) -> None:
        """One of the session's file handles is closed for good."""
        try:
            await session.release()
        finally:
            self.of(session.image_id)  # forgets it once it ended
