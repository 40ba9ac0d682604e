"""A fake Glance client below FUSE, to drive the filesystem's state machines quickly in unit tests.

It implements what the filesystem needs of glancefs.Client (the protocol
:class:`glancefs.fs.glance.Glance`, which mypy checks) from records in memory; its downloads are
``glancefs.ImageData`` over a fake body. What a server defines (HTTP, Glance's own rules) is tested
against the real Glance in tests/integration; this fake is for what glancefs decides: caching,
ordering, failure handling.
"""

from __future__ import annotations

import builtins
import hashlib
from collections import Counter
from collections.abc import AsyncIterable, AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
import trio

from glancefs import ConnectError, Image, ImageData, NotFound, RangesRefused, Task
from glancefs.plumbing import ConnectionBudget


def record(n: int, name: str | None = None, **fields: Any) -> dict[str, Any]:
    return {
        "id": f"{n:08x}-0000-4000-8000-000000000000",
        "name": f"image-{n}" if name is None else name,
        "status": "active",
        "size": n * 10,
        "updated_at": "2026-01-01T00:00:00Z",
        "tags": [],
        "os_distro": "x" * 100,
        **fields,
    }


def data_record(n: int, data: bytes, **fields: Any) -> dict[str, Any]:
    """An active image record whose data is ``data`` (give it to ``FakeClient(data=...)``)."""
    return record(
        n,
        size=len(data),
        os_hash_algo="sha512",
        os_hash_value=hashlib.sha512(data).hexdigest(),
        checksum=hashlib.md5(data).hexdigest(),
        **fields,
    )


@dataclass(eq=False)
class DataFault:
    """A fault of :meth:`FakeImages.open_data` responses, for the next ``times`` that it picks.

    It picks a response of ``image_id`` (any if None) that covers image byte ``at`` (any if
    None) and starts at ``response_start`` (any if None). ``flip``: that byte arrives inverted;
    ``reset``: the connection breaks just before it; ``pause``: delivery stops just before it
    until ``resume`` is set.
    """

    kind: str  # "flip", "reset" or "pause"
    at: int | None = None
    image_id: str | None = None
    #: Pick only a response that starts at this image offset.
    response_start: int | None = None
    times: int = 1
    resume: trio.Event = field(default_factory=trio.Event)
    #: Set when a paused response reached the byte.
    paused: trio.Event = field(default_factory=trio.Event)

    def picks(self, image_id: str, start: int, end: int) -> bool:
        if self.times <= 0 or (self.image_id is not None and self.image_id != image_id):
            return False
        if self.response_start is not None and self.response_start != start:
            return False
        return self.at is None or start <= self.at < end


class FakeBody(httpx.AsyncByteStream):
    """The body of one :meth:`FakeImages.open_data` response: the bytes ``[offset, end)`` in small
    chunks, with a checkpoint between chunks, holding a ``download`` slot of the budget until
    closed. ``glancefs.ImageData`` reads it as it reads Glance's."""

    def __init__(
        self, images: FakeImages, image_id: str, offset: int, end: int, fault: DataFault | None
    ) -> None:
        self._images = images
        self._image_id = image_id
        self._offset = offset
        self._end = end
        self._fault = fault
        self._closed = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        data = self._images.client.data[self._image_id]
        fault = self._fault
        at = None if fault is None else (self._offset if fault.at is None else fault.at)
        position = self._offset
        while position < self._end:
            chunk_end = min(self._end, position + self._images.chunk_size)
            if at is not None and fault is not None and position <= at < chunk_end:
                if fault.kind == "flip":
                    chunk = bytearray(data[position:chunk_end])
                    chunk[at - position] ^= 0xFF
                    at = None
                    await trio.sleep(self._images.chunk_delay)
                    yield bytes(chunk)
                    position = chunk_end
                    continue
                if at > position:
                    chunk_end = at  # deliver up to the byte first
                else:
                    at = None
                    if fault.kind == "reset":
                        raise ConnectError("image download interrupted: fake reset")
                    fault.paused.set()
                    await fault.resume.wait()
                    continue
            await trio.sleep(self._images.chunk_delay)
            yield data[position:chunk_end]
            position = chunk_end

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            self._images.open_streams[self._image_id] -= 1
            self._images.client.connections.release("download")


class FakeImages:
    """``client.images``: records from :attr:`records`, data from the client's ``data``, changes
    as Glance makes them (``create`` makes a queued image, ``upload`` stores the data and makes
    it active with its size and hashes, a PATCH replaces top-level fields, ``delete`` removes it).
    """

    def __init__(self, client: FakeClient, records: list[dict[str, Any]]) -> None:
        self.client = client
        self.records = records
        #: Faults of open_data's responses, applied in order.
        self.faults: list[DataFault] = []
        self.chunk_size = 64 * 1024
        #: Seconds each chunk takes to arrive (0: a checkpoint only).
        self.chunk_delay = 0.0
        #: Every open_data call: (image id, offset, length).
        self.data_gets: list[tuple[str, int, int | None]] = []
        #: Stores (an image record's ``stores``) that refuse ranges, as rbd and swift do.
        self.stores_without_ranges: set[str] = set()
        #: Responses open right now per image, and the most there ever were at once.
        self.open_streams: Counter[str] = Counter()
        self.peak_streams: Counter[str] = Counter()
        self.lists: list[dict[str, Any]] = []
        self.gets = 0
        #: When set: the listing stops after this many records until ``resume`` is set, then
        #: raises ``error`` if there is one (a second page that is slow, then fails).
        self.pause_after: int | None = None
        self.resume = trio.Event()
        self.error: Exception | None = None
        self._created = 0

    async def list(self, **query: Any) -> AsyncIterator[Image]:
        self.lists.append(query)
        for index, r in enumerate(self.records):
            if index == self.pause_after:
                await self.resume.wait()
                if self.error is not None:
                    raise self.error
            yield Image(r)

    async def get(self, image_id: str) -> Image:
        self.gets += 1
        for r in self.records:
            if r["id"] == image_id:
                if r["status"] == "importing" and image_id in self.client.staged:
                    self._end_import(r)
                    return Image(dict(r, status="importing"))  # one poll sees it importing
                return Image(r)
        raise NotFound(404, image_id)

    async def open_data(
        self,
        image_id: str,
        offset: int = 0,
        length: int | None = None,
        *,
        retries: int | None = None,
    ) -> ImageData:
        """Like ``Client.images.open_data``, from the client's ``data``, with :attr:`faults`."""
        self.data_gets.append((image_id, offset, length))
        store = next((r.get("stores") for r in self.records if r["id"] == image_id), None)
        if store in self.stores_without_ranges and (offset > 0 or length is not None):
            raise RangesRefused(400, "Getting images randomly from this store is not supported")
        data = self.client.data[image_id]
        end = len(data) if length is None else min(len(data), offset + length)
        await self.client.connections.acquire("download")
        self.open_streams[image_id] += 1
        self.peak_streams[image_id] = max(self.peak_streams[image_id], self.open_streams[image_id])
        fault = next((f for f in self.faults if f.picks(image_id, offset, end)), None)
        if fault is not None:
            fault.times -= 1
        body = FakeBody(self, image_id, offset, end, fault)
        return ImageData(httpx.Response(206, stream=body), offset, end, len(data))

    async def create(self, **fields: Any) -> Image:
        self._created += 1
        image_id = f"{self._created:08x}-1111-4000-8000-000000000000"
        self.client.called("create", image_id)
        r = {"id": image_id, "status": "queued", "size": None, "tags": [], "checksum": None,
             "updated_at": "2026-01-01T00:00:00Z", "protected": False, **fields}  # fmt: skip
        self.records.append(r)
        return Image(dict(r))

    async def update(self, image_id: str, **changes: Any) -> Image:
        self.client.called("update", image_id)
        self.client.record(image_id).update(changes)
        return Image(dict(self.client.record(image_id)))

    async def patch(self, image_id: str, operations: Sequence[Mapping[str, Any]]) -> Image:
        self.client.called("patch", image_id)
        r = self.client.record(image_id)
        for op in operations:
            key = op["path"][1:].replace("~1", "/").replace("~0", "~")
            if op["op"] == "remove":
                r.pop(key, None)
            else:
                r[key] = op["value"]
        return Image(dict(r))

    async def upload(
        self,
        image_id: str,
        data: AsyncIterable[bytes],
        size: int | None = None,
        *,
        backend: str | None = None,
    ) -> None:
        self.client.called("upload", image_id)
        self.client.upload_sizes[image_id] = size
        self.client.upload_stores[image_id] = backend
        r = self.client.record(image_id)
        r["status"] = "saving"
        chunks = []
        async for chunk in data:
            chunks.append(chunk)
            if self.client.hold_upload is not None:
                await self.client.hold_upload.wait()
        body = b"".join(chunks)
        if size is not None and len(body) != size:  # the client fails such a body
            raise AssertionError(f"{len(body)} bytes sent, {size} announced")
        self.client.data[image_id] = body
        r.update(status="active", size=len(body), os_hash_algo="sha512",
                 os_hash_value=hashlib.sha512(body).hexdigest(),
                 checksum=hashlib.md5(body).hexdigest())  # fmt: skip

    async def stage(
        self, image_id: str, data: AsyncIterable[bytes], size: int | None = None
    ) -> None:
        self.client.called("stage", image_id)
        r = self.client.record(image_id)
        r["status"] = "uploading"
        body = b"".join([chunk async for chunk in data])
        self.client.staged[image_id] = body
        r["size"] = len(body)

    def _end_import(self, r: dict[str, Any]) -> None:
        """An import ends as the client's ``import_failure`` or ``conversion`` say."""
        client = self.client
        body = client.staged.pop(r["id"])
        r.pop("os_glance_import_task", None)
        if client.import_failure is not None:
            r.update(status="queued", size=None, os_glance_failed_import="fs")
            client.tasks[r["id"]] = [
                {"id": "t", "status": "failure", "message": client.import_failure}
            ]
            return
        if client.conversion is not None:
            r["disk_format"], body, r["virtual_size"] = client.conversion(body)
        client.data[r["id"]] = body
        r.update(status="active", size=len(body), os_hash_algo="sha512",
                 os_hash_value=hashlib.sha512(body).hexdigest(),
                 checksum=hashlib.md5(body).hexdigest(), os_glance_failed_import="")  # fmt: skip

    async def delete(self, image_id: str) -> None:
        self.client.called("delete", image_id)
        self.records.remove(self.client.record(image_id))

    async def image_import(
        self,
        image_id: str,
        method: str = "glance-direct",
        uri: str | None = None,
        *,
        stores: Sequence[str] | None = None,
    ) -> None:
        """Accepts the import (202) and takes the image's import lock; the test ends it with
        :meth:`FakeClient.end_import`."""
        self.client.called("import", image_id)
        self.client.imports.append((image_id, method, uri, list(stores or [])))
        r = self.client.record(image_id)
        r["os_glance_import_task"] = "task-" + image_id
        if method in ("web-download", "glance-direct"):
            r["status"] = "importing"

    async def delete_from_store(self, store_id: str, image_id: str) -> None:
        self.client.called("delete_from_store", image_id)
        r = self.client.record(image_id)
        r["stores"] = ",".join(s for s in r["stores"].split(",") if s != store_id)

    async def get_associated_image_tasks(self, image_id: str) -> builtins.list[Task]:
        return [Task(t) for t in self.client.tasks.get(image_id, [])]


class FakeTags:
    def __init__(self, client: FakeClient) -> None:
        self._client = client

    async def update(self, image_id: str, tag_value: str) -> None:
        self._client.called("tag", image_id)
        tags = self._client.record(image_id)["tags"]
        if tag_value not in tags:
            tags.append(tag_value)

    async def delete(self, image_id: str, tag_value: str) -> None:
        self._client.called("untag", image_id)
        self._client.record(image_id)["tags"].remove(tag_value)


class FakeInfo:
    def __init__(self) -> None:
        #: What /v2/info/stores lists (ids), and /v2/info/import.
        self.store_ids = ["fs", "ceph"]
        self.methods = ["glance-direct", "web-download", "copy-image"]

    async def usage(self) -> dict[str, dict[str, int]]:
        return {}  # as Glance without unified limits answers

    async def import_methods(self) -> list[str]:
        return list(self.methods)

    async def stores(self, *, detail: bool = False) -> list[dict[str, Any]]:
        return [{"id": store} for store in self.store_ids]


class FakeClient:
    """A fake Glance behind what the filesystem needs of the client (:class:`glancefs.fs.glance.
    Glance`): records that change, data that is stored and hashed, and failures to inject
    (``fail[method] = error``, raised by every later call of it; ``hold_upload``: an upload waits
    for it after its first chunk, to catch a session mid-PUT). Enough of Glance's behaviour for the
    filesystem's state machines; never a substitute for the real one. An import ends at the
    second ``get`` after it started: failed with ``import_failure`` (the task's message), else
    active, its data converted by ``conversion`` (data → disk format, data, virtual size).
    """

    @classmethod
    def serving(
        cls, payloads: list[bytes], **options: Any
    ) -> tuple[FakeClient, list[dict[str, Any]], dict[str, bytes]]:
        """A client whose Glance holds one active image per payload, with the records and
        the data by image id."""
        records = [data_record(n + 1, payload) for n, payload in enumerate(payloads)]
        data = {r["id"]: payload for r, payload in zip(records, payloads, strict=True)}
        return cls(records, data=data, **options), records, data

    def __init__(
        self,
        records: list[dict[str, Any]] | None = None,
        *,
        data: dict[str, bytes] | None = None,
        max_connections: int = 8,
        retries: int = 1,
    ) -> None:
        self.images = FakeImages(self, records if records is not None else [])
        self.image_tags = FakeTags(self)
        self.info = FakeInfo()
        self.connections = ConnectionBudget(max_connections)
        self.retries = retries
        #: Image data by id: what open_data serves and upload stores.
        self.data: dict[str, bytes] = dict(data or {})
        self.calls: list[tuple[str, str]] = []
        self.fail: dict[str, Exception] = {}
        self.hold_upload: trio.Event | None = None
        #: The size each upload announced (x-openstack-image-size), None when it sent none.
        self.upload_sizes: dict[str, int | None] = {}
        #: The store each upload named (X-Image-Meta-Store), None when it named none.
        self.upload_stores: dict[str, str | None] = {}
        #: Every import accepted: (image id, method, uri, stores).
        self.imports: list[tuple[str, str, str | None, list[str]]] = []
        #: The import tasks of each image (records, as get_associated_image_tasks gives them).
        self.tasks: dict[str, list[dict[str, Any]]] = {}
        #: Staged data by image id, until its import.
        self.staged: dict[str, bytes] = {}
        self.import_failure: str | None = None
        self.conversion: Callable[[bytes], tuple[str, bytes, int]] | None = None

    def record(self, image_id: str) -> dict[str, Any]:
        for r in self.images.records:
            if r["id"] == image_id:
                return r
        raise NotFound(404, image_id)

    def end_import(self, image_id: str, *, failure: str | None = None, **fields: Any) -> None:
        """The import task of the image ends: its lock goes, ``fields`` change (status,
        stores, os_glance_failed_import); ``failure`` is the failed task's message."""
        r = self.record(image_id)
        r.pop("os_glance_import_task", None)
        r.update(fields)
        if failure is not None:
            self.tasks.setdefault(image_id, []).append(
                {"id": "task-" + image_id, "status": "failure", "message": failure}
            )

    def named(self, name: str) -> list[dict[str, Any]]:
        return [r for r in self.images.records if r.get("name") == name]

    def called(self, method: str, image_id: str) -> None:
        """Note a call; raise the failure injected for ``method``, if any."""
        self.calls.append((method, image_id))
        if method in self.fail:
            raise self.fail[method]
