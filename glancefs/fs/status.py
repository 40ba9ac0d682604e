"""What a mount is doing: transfers in flight, recent errors and counters, in one registry.

The mount process has one registry, :data:`STATUS`. One-line hooks feed it: the readers and
uploads register a :class:`Transfer` and report its bytes, the FUSE boundary counts errnos, the
client reports every HTTP exchange (``Client(on_request=STATUS.request)``), and a logging
handler keeps the last warnings and errors. Two readers use it: the control socket answers
``glancefs status`` with :meth:`MountStatus.snapshot` (JSON), and the Prometheus collector reads
:meth:`MountStatus.counters` at every scrape.

Pitfalls: the hooks run on the trio thread and the metrics server scrapes from its own thread, so
every change and every copy holds the registry's lock (uncontended, it costs nanoseconds per FUSE
read). Nothing here does I/O; :func:`render` turns a snapshot into the text ``glancefs status``
prints.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from glancefs import RequestEvent, __version__

from .config import MountConfig

__all__ = [
    "STATUS",
    "ErrorLog",
    "MountStatus",
    "Transfer",
    "format_bytes",
    "format_duration",
    "options_of",
    "render",
]

#: Warnings and errors a snapshot carries.
RECENT_ERRORS = 10
#: Seconds of progress the rate of a transfer is measured over.
RATE_WINDOW = 5.0
_SAMPLE_EVERY = 0.5


class Transfer:
    """One image being read from Glance or uploaded to it, from open to close.

    ``done`` counts the bytes that crossed the network for it (downloaded for a read, handed to
    the PUT for an upload); ``total`` is the image size when known (uploads: None). Call
    :meth:`progress` as bytes move and :meth:`finished` once; later calls of ``finished`` are
    ignored, so every exit path of an upload may call it.

    A transfer is listed from its first byte on: a file opened and served from the page cache
    (or a ``touch`` in new/) moves nothing and is not one. An upload held in memory or spooled
    (its writer went back, or ``--spool-dir``) therefore appears when it is sent, at its end.
    """

    def __init__(
        self,
        registry: MountStatus,
        number: int,
        image_id: str,
        name: str | None,
        direction: str,
        total: int | None,
    ) -> None:
        self._registry = registry
        self.number = number
        self.image_id = image_id
        self.name = name
        self.direction = direction
        self.total = total
        self.done = 0
        self.started = registry.clock()
        self.outcome: str | None = None
        #: (time, done) pairs of the last RATE_WINDOW seconds, for the rate.
        self._samples: deque[tuple[float, int]] = deque([(self.started, 0)])

    def progress(self, size: int) -> None:
        """``size`` more bytes moved."""
        registry = self._registry
        with registry.lock:
            if self.done == 0 and self.outcome is None:
                registry.transfers[self.number] = self
            self.done += size
            registry.bytes_moved[self.direction] += size
            now = registry.clock()
            if now - self._samples[-1][0] >= _SAMPLE_EVERY:
                self._samples.append((now, self.done))
                while now - self._samples[0][0] > RATE_WINDOW and len(self._samples) > 2:
                    self._samples.popleft()

    def finished(self, outcome: str) -> None:
        """The transfer ended: ``closed`` (a read), ``uploaded``, ``failed``, ``aborted``,
        ``empty`` (an upload without data)."""
        self._registry.transfer_ended(self, outcome)

    def rate(self, now: float) -> float:
        """Bytes per second over the last few seconds (since the start, when younger)."""
        then, done_then = self._samples[0]
        if now - then < 1e-3:
            return 0.0
        return (self.done - done_then) / (now - then)

    def as_dict(self, now: float) -> dict[str, Any]:
        rate = self.rate(now)
        eta = None
        if self.total is not None and rate > 0 and self.done < self.total:
            eta = (self.total - self.done) / rate
        return {
            "image_id": self.image_id,
            "name": self.name,
            "direction": self.direction,
            "done": self.done,
            "total": self.total,
            "rate": rate,
            "eta": eta,
            "seconds": now - self.started,
        }


class MountStatus:
    """The registry of one mount; see the module docstring."""

    def __init__(
        self, clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time
    ) -> None:
        self.clock = clock
        self.wall = wall
        self.lock = threading.Lock()
        self.started = clock()
        self.started_at = wall()
        self.description: dict[str, Any] = {}
        self.transfers: dict[int, Transfer] = {}
        self._numbers = itertools.count(1)
        self.bytes_moved: Counter[str] = Counter()
        self.bytes_served = 0
        self.requests: Counter[tuple[str, str]] = Counter()
        self.retries: Counter[str] = Counter()
        self.uploads: Counter[str] = Counter()
        self.errnos: Counter[str] = Counter()
        self.streams = 0
        #: Bytes in the spool's files (reads without ranges, uploads out of order) right now.
        self.spool_bytes = 0
        #: Uploads whose writer closed the file before their end, by image id: what waits.
        self.waiting_uploads: dict[str, dict[str, Any]] = {}
        #: Imports Glance runs for this mount (web-downloads, copies to stores), by image id.
        self.imports: dict[str, dict[str, Any]] = {}
        #: The data cache's counters (``CacheStats`` as a dict, refreshed by the mount while it
        #: runs: the metrics thread must not walk the cache's own tables); None: no cache.
        self.cache: Mapping[str, int] | None = None
        self.recent_errors: deque[dict[str, Any]] = deque(maxlen=RECENT_ERRORS)
        self._last_success = 0.0
        self._last_failure: tuple[float, str] | None = None

    def describe(self, **fields: Any) -> None:
        """What ``glancefs status`` shows about the mount itself (mountpoint, endpoint, ...)."""
        with self.lock:
            self.description.update(fields)

    # -- hooks --------------------------------------------------------------------------------

    def started_transfer(
        self, image_id: str, name: str | None, direction: str, total: int | None = None
    ) -> Transfer:
        """A read (``direction="read"``) or an upload (``"upload"``) that may begin."""
        with self.lock:
            return Transfer(self, next(self._numbers), image_id, name, direction, total)

    def transfer_ended(self, transfer: Transfer, outcome: str) -> None:
        with self.lock:
            if transfer.outcome is not None:
                return
            self.transfers.pop(transfer.number, None)
            transfer.outcome = outcome
            if transfer.direction == "upload":
                self.uploads[outcome] += 1

    def served(self, data: bytes) -> bytes:
        """Count ``data`` as answered to a reader; returns it, to wrap a read's result."""
        with self.lock:
            self.bytes_served += len(data)
        return data

    def refused(self, code: int) -> None:
        """A FUSE request failed with errno ``code``."""
        with self.lock:
            self.errnos[errno.errorcode.get(code, str(code))] += 1

    def stream_opened(self, delta: int = 1) -> None:
        """A prefetching stream started (``delta=-1``: one stopped)."""
        with self.lock:
            self.streams += delta

    def upload_waiting(
        self, image_id: str, name: str | None, what: str, size: int, writer: int | None
    ) -> None:
        """An upload waits: for its writer (the pid ``writer``) to come back or exit, or
        (``writer`` None) for the next writer; ``what`` the file holds so far."""
        with self.lock:
            self.waiting_uploads[image_id] = {
                "image_id": image_id, "name": name, "holds": what, "size": size,
                "writer": writer, "since": self.wall(),
            }  # fmt: skip

    def upload_goes_on(self, image_id: str) -> None:
        """The upload waits no more: a writer opened the file, or it ended."""
        with self.lock:
            self.waiting_uploads.pop(image_id, None)

    def import_started(self, image_id: str, name: str | None, what: str) -> None:
        """Glance accepted an import (``what``: a web-download, a copy to stores)."""
        with self.lock:
            self.imports[image_id] = {
                "image_id": image_id, "name": name, "what": what, "since": self.wall()
            }  # fmt: skip

    def import_ended(self, image_id: str) -> None:
        """The image's import ended, either way."""
        with self.lock:
            self.imports.pop(image_id, None)

    def spooled(self, delta: int) -> None:
        """``delta`` bytes written to the spool (negative: a spool file was freed)."""
        with self.lock:
            self.spool_bytes += delta

    def request(self, event: RequestEvent) -> None:
        """The client's ``on_request`` hook: one HTTP exchange with Glance ended."""
        status = "error" if event.status is None else str(event.status)
        now = self.clock()
        with self.lock:
            self.requests[(event.method, status)] += 1
            if event.attempt > 1:
                self.retries[event.method] += 1
            if event.status is None or event.status >= 500:
                reason = event.reason or f"HTTP {event.status}"
                self._last_failure = (now, f"{event.method} {event.path}: {reason}")
            else:
                self._last_success = now

    def log_record(self, record: logging.LogRecord) -> None:
        with self.lock:
            self.recent_errors.append(
                {"time": record.created, "level": record.levelname, "message": record.getMessage()}
            )

    # -- readers ------------------------------------------------------------------------------

    def problems(self) -> list[str]:
        """Why the mount is unhealthy; empty when it is healthy.

        Glance counts as unreachable while its latest answer was a failure (no answer, or a
        5xx after the retries) with no success since: a single failed request that a retry
        repaired does not count.
        """
        if self._last_failure is None:
            return []
        when, what = self._last_failure
        if when < self._last_success:
            return []
        return [f"Glance failing for {format_duration(self.clock() - when)}: {what}"]

    def counters(self) -> dict[str, Any]:
        """A consistent copy of every counter (for the metrics)."""
        with self.lock:
            cache = None if self.cache is None else dict(self.cache)
            return {
                "requests": dict(self.requests),
                "retries": dict(self.retries),
                "bytes_from_glance": self.bytes_moved["read"],
                "bytes_uploaded": self.bytes_moved["upload"],
                "bytes_served": self.bytes_served,
                "uploads": dict(self.uploads),
                "errors": dict(self.errnos),
                "open_files": len(self.transfers),
                "streams": self.streams,
                "spool_bytes": self.spool_bytes,
                "cache": cache,
                "uptime": self.clock() - self.started,
            }

    def snapshot(self) -> dict[str, Any]:
        """Everything ``glancefs status`` shows, as JSON-ready values."""
        counters = self.counters()
        with self.lock:
            now = self.clock()
            problems = self.problems()
            transfers = [t.as_dict(now) for t in self.transfers.values()]
            waiting = list(self.waiting_uploads.values())
            imports = list(self.imports.values())
            errors = list(self.recent_errors)
            description = dict(self.description)
        counters["requests"] = [
            {"method": method, "status": status, "count": count}
            for (method, status), count in sorted(counters["requests"].items())
        ]
        cache = counters.pop("cache")
        return {
            **description,
            "version": __version__,
            "pid": os.getpid(),
            "started_at": self.started_at,
            "uptime": counters.pop("uptime"),
            "healthy": not problems,
            "problems": problems,
            "transfers": transfers,
            "waiting": waiting,
            "imports": imports,
            "errors": errors,
            "counters": counters,
            "cache": cache,
        }


class ErrorLog(logging.Handler):
    """Keeps the mount's warnings and errors (the one line each refusal logs) in the registry."""

    def __init__(self, registry: MountStatus) -> None:
        super().__init__(logging.WARNING)
        self._registry = registry

    def emit(self, record: logging.LogRecord) -> None:
        self._registry.log_record(record)


#: The registry of this process's mount.
STATUS = MountStatus()


# -- text -------------------------------------------------------------------------------------


def format_bytes(size: float) -> str:
    """``1.5 MiB``: binary units, three significant figures."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def format_duration(seconds: float) -> str:
    """``3s``, ``4m05s``, ``2h03m``, ``3d04h``."""
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"


def _bar(done: int, total: int, width: int = 20) -> str:
    filled = min(width, width * done // total) if total else width
    return "[" + "#" * filled + "." * (width - filled) + "]"


def _transfer_line(transfer: Mapping[str, Any], bars: bool) -> str:
    name = transfer["name"] or "-"
    done, total = transfer["done"], transfer["total"]
    amount = format_bytes(done)
    if total is not None:
        amount += f" / {format_bytes(total)}"
        if total:
            amount += f" {100 * min(done, total) // total}%"
    parts = [f"{transfer['direction']:<6}", f"{name} ({transfer['image_id']})", amount]
    if bars and total:
        parts.insert(2, _bar(done, total))
    parts.append(f"{format_bytes(transfer['rate'])}/s")
    if transfer["eta"] is not None:
        parts.append(f"ETA {format_duration(transfer['eta'])}")
    return "    " + "  ".join(parts)


def _waiting_line(upload: Mapping[str, Any]) -> str:
    name = upload["name"] or "-"
    until = (
        f"its writer (pid {upload['writer']}) to open it again or exit"
        if upload["writer"] is not None
        else "the next writer"
    )
    return (
        f"    {name} ({upload['image_id']})  {format_bytes(upload['size'])}, "
        f"{upload['holds']}; waits for {until}"
    )


def render(mountpoint: str, state: str, snapshot: Mapping[str, Any] | None, *, bars: bool) -> str:
    """The text of one mount in ``glancefs status`` (``bars``: progress bars, for ``--watch``)."""
    if snapshot is None:
        return f"{mountpoint}: {state}"
    counters = snapshot["counters"]
    lines = [
        f"{mountpoint}: {state} (pid {snapshot['pid']}, up {format_duration(snapshot['uptime'])}"
        f", glancefs {snapshot['version']})",
        f"  endpoint   {snapshot.get('endpoint') or '-'}",
        f"  project    {snapshot.get('project') or '-'}",
        f"  options    {', '.join(_options_text(snapshot.get('options', {})))}",
    ]
    lines += [f"  problem    {problem}" for problem in snapshot["problems"]]
    lines.append(
        f"  traffic    {format_bytes(counters['bytes_from_glance'])} read from Glance, "
        f"{format_bytes(counters['bytes_served'])} served, "
        f"{format_bytes(counters['bytes_uploaded'])} uploaded; requests: "
        f"{sum(r['count'] for r in counters['requests'])}"
    )
    if counters.get("spool_bytes"):
        lines.append(f"  spool      {format_bytes(counters['spool_bytes'])} of image data")
    cache = snapshot.get("cache")
    if cache is None:
        lines.append("  cache      off")
    else:
        lines.append(
            f"  cache      {format_bytes(cache['bytes'])} of {format_bytes(cache['max_bytes'])}, "
            f"{cache['entries']} images ({cache['verified_entries']} verified); "
            f"{cache['hits']} hits ({format_bytes(cache['hit_bytes'])}), {cache['misses']} misses, "
            f"{cache['evictions']} evicted, {cache['damaged_blocks']} damaged blocks dropped"
        )
    transfers = snapshot["transfers"]
    lines.append(f"  transfers  {len(transfers) or 'none'}")
    lines += [_transfer_line(t, bars) for t in transfers]
    waiting = snapshot.get("waiting", [])
    if waiting:
        lines.append(f"  waiting    {len(waiting)} uploads (written in part, not yet the end)")
        lines += [_waiting_line(w) for w in waiting]
    imports = snapshot.get("imports", [])
    if imports:
        lines.append(f"  imports    {len(imports)} in flight (Glance imports in the background)")
        lines += [
            f"    {i['name'] or '-'} ({i['image_id']})  {i['what']}, "
            f"since {time.strftime('%H:%M:%S', time.localtime(i['since']))}"
            for i in imports
        ]
    errors = snapshot["errors"]
    if errors:
        lines.append("  last errors")
        lines += [
            f"    {time.strftime('%H:%M:%S', time.localtime(e['time']))} {e['message']}"
            for e in errors
        ]
    return "\n".join(lines)


def _options_text(options: Mapping[str, Any]) -> Iterable[str]:
    for name, value in options.items():
        if value is True:
            yield name
        elif value not in (False, None, "", ()):
            yield f"{name}={value}"


def options_of(
    config: MountConfig, fuse_options: Iterable[str], metrics_addr: tuple[str, int] | None
) -> dict[str, Any]:
    """The options of a mount that change what users see, for ``glancefs status``."""
    view = config.view
    return {
        "ro": config.read_only,
        "allow_other": "allow_other" in fuse_options,
        "allow_delete": config.allow_delete,
        "keep_failed": config.keep_failed,
        "store": config.store,
        "import_uploads": config.import_uploads,
        "no_verify": not config.verify,
        "spool_dir": str(config.spool_dir) if config.spool_dir else None,
        "sort": view.sort,
        "filter": ",".join(f"{key}={value}" for key, value in view.filters),
        "tag": ",".join(view.tags),
        "limit": view.limit,
        "metadata_ttl": config.metadata_ttl,
        "listing_ttl": config.listing_ttl,
        "metrics": f"{metrics_addr[0]}:{metrics_addr[1]}" if metrics_addr else None,
    }
