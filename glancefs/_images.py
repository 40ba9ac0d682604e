"""Images: records, listing with pagination, metadata changes, and the data itself.

Names follow python-glanceclient's ``client.images`` so that its users find their way.
"""

from __future__ import annotations

import builtins
import io
import json as jsonlib
import os
import re
import stat
import uuid
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Mapping, Sequence
from datetime import datetime
from types import TracebackType
from typing import TYPE_CHECKING, Any, BinaryIO, ClassVar, cast

import httpcore
import httpx
import trio

from ._exceptions import (
    BadRequest,
    Conflict,
    ConnectError,
    GlanceError,
    NotFound,
    RangeNotSatisfiable,
    RangesRefused,
    Timeout,
    transport_reason,
)
from ._integrity import Verifier
from ._records import Record, api_path, paginate

if TYPE_CHECKING:
    from ._client import Client
    from ._tasks import Task

__all__ = ["Image", "ImageData", "ImagesManager", "parse_time"]

# Glance's image schema, the one source of its field lists (the filesystem's xattrs use them).
#: Fields Glance computes or owns: a PATCH of them is refused.
READ_ONLY_FIELDS = frozenset(
    {"id", "status", "checksum", "os_hash_algo", "os_hash_value", "size", "virtual_size",
     "created_at", "updated_at", "owner", "self", "file", "schema", "direct_url", "locations",
     "stores"}
)  # fmt: skip
#: Fields the image's owner may change; they always exist in a record (replaced, never added).
WRITABLE_FIELDS = frozenset(
    {"name", "visibility", "protected", "min_ram", "min_disk", "os_hidden", "tags",
     "disk_format", "container_format"}
)  # fmt: skip
#: Every field of the schema; every other key of an image record is a custom property.
CORE_FIELDS = READ_ONLY_FIELDS | WRITABLE_FIELDS

JSON_PATCH = "application/openstack-images-v2.1-json-patch"
#: What :meth:`ImagesManager.upload` and :meth:`ImagesManager.stage` accept as data.
UploadData = bytes | bytearray | memoryview | BinaryIO | AsyncIterable[bytes]
PAGE_SIZE_MAX = 1000  # Glance's default api_limit_max


def parse_time(value: str | None) -> int:
    """Glance's ISO 8601 UTC timestamps as nanoseconds since the epoch (0 when absent)."""
    if not value:
        return 0
    return int(datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()) * 1_000_000_000


class Image(Record):
    """One image record, readable as attributes (``image.status``) and as a mapping.

    The mapping holds exactly what Glance returned; custom properties are top-level keys, as in
    Glance's API, and also collected in :attr:`properties`.
    """

    __slots__ = ()
    _repr_keys = ("id", "name", "status")
    #: The fields of Glance's image schema: read-only and writable ones partition them.
    CORE_FIELDS: ClassVar[frozenset[str]] = CORE_FIELDS
    READ_ONLY_FIELDS: ClassVar[frozenset[str]] = READ_ONLY_FIELDS
    WRITABLE_FIELDS: ClassVar[frozenset[str]] = WRITABLE_FIELDS

    @property
    def id(self) -> str:
        return str(self._record["id"])

    @property
    def name(self) -> str | None:
        name = self._record.get("name")
        return None if name is None else str(name)

    @property
    def status(self) -> str:
        return str(self._record.get("status", ""))

    @property
    def size(self) -> int | None:
        size = self._record.get("size")
        return None if size is None else int(size)

    @property
    def tags(self) -> list[str]:
        return list(self._record.get("tags") or [])

    @property
    def properties(self) -> dict[str, Any]:
        """The custom properties: every key that is not a core field of Glance's schema."""
        return {k: v for k, v in self._record.items() if k not in CORE_FIELDS}


class ImageData:
    """An open download of image data from byte ``offset``; close it (or use ``async with``).

    ``end`` is one past the last byte this response covers and ``image_size`` the size of the whole
    image when Glance said it (``Content-Range``). An answer 204 (image without data) or 416 (offset
    at or past the end) is an empty stream, as reading a file past its end is.
    """

    def __init__(
        self, response: httpx.Response | None, offset: int, end: int, image_size: int | None
    ) -> None:
        self._response = response
        self.offset = offset
        self.end = end
        self.image_size = image_size

    async def __aenter__(self) -> ImageData:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def chunks(self) -> AsyncIterator[bytes]:
        """The data in the pieces the socket delivers (up to 1 MiB each)."""
        if self._response is None:
            return
        # httpx types it as an iterator, but it is an async generator: close it when done here
        # rather than whenever it is collected (a read around h11 leaves it unfinished).
        body = cast(AsyncGenerator[bytes, None], self._response.aiter_raw())
        try:
            length = _direct_read_length(self._response)
            if length is None:
                async for chunk in body:
                    yield chunk
                return
            # h11 copies every byte twice (into its buffer, out of it) and httpcore once more:
            # a third of the CPU of a download. Its first chunk empties what h11 buffered with the
            # headers; the rest comes straight from the connection's stream. h11 then still waits
            # for the body, so aclose() closes the connection instead of pooling it again.
            first = await anext(body, b"")
            yield first
            start = self.offset + len(first)
            async for chunk in _read_exactly(self._response, start, self.offset + length):
                yield chunk
        except (httpx.TimeoutException, httpcore.TimeoutException) as exc:
            raise Timeout("image download: Glance stopped sending data") from exc
        except (httpx.TransportError, httpcore.NetworkError) as exc:
            raise ConnectError(f"image download interrupted: {transport_reason(exc)}") from exc
        finally:
            await body.aclose()

    async def aclose(self) -> None:
        if self._response is not None:
            await self._response.aclose()


_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")

#: Bodies at least this long skip h11 (and their connection is closed after them, which costs one
#: new connection per download); smaller ones keep theirs for the next request.
_DIRECT_READ_MIN = 4 * 1024 * 1024
#: Bytes asked of the socket per read when going around h11.
_DIRECT_READ_SIZE = 1024 * 1024


def _direct_read_length(response: httpx.Response) -> int | None:
    """The body length of ``response`` when it is worth reading around h11, else None.

    Only a plain HTTP/1.1 body of known length qualifies: h11 must not have to decode anything.
    """
    if response.http_version != "HTTP/1.1" or "transfer-encoding" in response.headers:
        return None
    if "network_stream" not in response.extensions:
        return None
    try:
        length = int(response.headers["content-length"])
    except (KeyError, ValueError):
        return None
    return length if length >= _DIRECT_READ_MIN else None


#: Bytes asked per read of a TLS stream: each read gives at most one TLS record (16 KiB), and
#: Python's ssl allocates the whole size asked for before it shrinks it to that record.
_TLS_READ_SIZE = 64 * 1024


async def _read_exactly(response: httpx.Response, position: int, end: int) -> AsyncIterator[bytes]:
    """Image bytes ``[position, end)`` from ``response``'s connection, with its read timeout.

    Each chunk ends at a multiple of 1 MiB of the image, where the kernel's FUSE reads end: a
    chunk that arrives whole is then served without being copied. Over TLS a chunk is gathered
    from many reads of a record each (one copy per MiB rather than a join per FUSE read).
    """
    stream: httpcore.AsyncNetworkStream = response.extensions["network_stream"]
    timeout = response.request.extensions.get("timeout", {}).get("read")
    tls = stream.get_extra_info("ssl_object") is not None
    while position < end:
        boundary = (position // _DIRECT_READ_SIZE + 1) * _DIRECT_READ_SIZE
        wanted = min(end, boundary) - position
        if tls:
            chunk = await _gather(stream, wanted, timeout)
        else:
            chunk = await stream.read(wanted, timeout=timeout)
        if not chunk:
            raise ConnectError(
                f"image download interrupted: Glance closed the connection {end - position} "
                "bytes before the end of the data"
            )
        position += len(chunk)
        yield chunk


async def _gather(
    stream: httpcore.AsyncNetworkStream, wanted: int, read_timeout: float | None
) -> bytes:
    """Up to ``wanted`` bytes from a TLS ``stream``, in reads of a record or so each; fewer only
    where the connection ends."""
    pieces: list[bytes] = []
    received = 0
    while received < wanted:
        piece = await stream.read(min(wanted - received, _TLS_READ_SIZE), timeout=read_timeout)
        if not piece:
            break
        pieces.append(piece)
        received += len(piece)
    return pieces[0] if len(pieces) == 1 else b"".join(pieces)


class ImagesManager:
    """``client.images``: the image calls of the Glance v2 API."""

    def __init__(self, client: Client) -> None:
        self._client = client

    async def list(
        self,
        *,
        sort: str | None = None,
        filters: Mapping[str, str | bool | int | Sequence[str]] | None = None,
        limit: int | None = None,
        page_size: int = PAGE_SIZE_MAX,
        marker: str | None = None,
    ) -> AsyncIterator[Image]:
        """Every image matching ``filters`` in ``sort`` order, fetched a page at a time.

        ``sort`` is Glance's ``key:dir,key:dir`` syntax; ``filters`` are Glance's query parameters
        (a sequence value repeats the parameter, as several ``tag`` filters do; booleans are sent
        as ``true``/``false``); ``limit`` caps the total; ``marker`` starts after that image id.
        Pages follow Glance's ``next`` links. Hidden images (``os_hidden``) are left out unless
        ``filters={"os_hidden": True}``, which lists only them.
        """
        if limit is not None and limit <= 0:
            return
        params: list[tuple[str, str]] = []
        for key, value in (filters or {}).items():
            values = [value] if isinstance(value, str | bool | int) else list(value)
            params.extend((key, _query_value(v)) for v in values)
        if sort:
            params.append(("sort", sort))
        if marker:
            params.append(("marker", marker))
        async for record in paginate(
            self._client, "/v2/images", "images", params, limit=limit, page_size=page_size
        ):
            yield Image(record)

    async def get(self, image_id: str) -> Image:
        """The image record; :class:`~glancefs.NotFound` when it does not exist (or is hidden)."""
        return Image((await self._client.request("GET", api_path("/v2/images", image_id))).json())

    async def create(self, **fields: Any) -> Image:
        """Create a queued image with these core fields and custom properties.

        Without an ``id`` among them the client picks one (a random UUID, as Glance would),
        which makes the request safe to repeat: it is retried after a network failure or a
        502/503/504 like a GET.  An answer lost on the way back (a load balancer dropping a
        reused connection, a node dying after its commit) then costs neither an error nor an
        orphan image: the repeat is refused (409), and the image that attempt made is returned.
        """
        chosen = "id" not in fields
        body = {"id": str(uuid.uuid4()), **fields} if chosen else fields
        try:
            response = await self._client.request(
                "POST", "/v2/images", json=body, idempotent=chosen
            )
        except Conflict as conflict:
            if not chosen:
                raise
            # A fresh UUID can only be taken by an earlier attempt of this very request; a 409
            # for anything else leaves no image of that id behind.
            try:
                return await self.get(body["id"])
            except NotFound:
                raise conflict from None
        return Image(response.json())

    async def update(
        self, image_id: str, remove_props: Sequence[str] = (), **changes: Any
    ) -> Image:
        """Set fields and properties and remove ``remove_props``, in one JSON-patch request."""
        current = await self.get(image_id)
        patch: list[dict[str, Any]] = [
            {"op": "replace" if key in current else "add", "path": f"/{key}", "value": value}
            for key, value in changes.items()
        ]
        patch += [{"op": "remove", "path": f"/{key}"} for key in remove_props if key in current]
        return await self.patch(image_id, patch)

    async def patch(self, image_id: str, operations: Sequence[Mapping[str, Any]]) -> Image:
        """Send raw JSON-patch ``operations`` (``op``, ``path``, ``value``) to the image."""
        response = await self._client.request(
            "PATCH",
            api_path("/v2/images", image_id),
            content=jsonlib.dumps(list(operations)).encode(),
            headers={"Content-Type": JSON_PATCH},
        )
        return Image(response.json())

    async def delete(self, image_id: str) -> None:
        """Delete the image (:class:`~glancefs.Forbidden` when it is protected)."""
        await self._client.request("DELETE", api_path("/v2/images", image_id))

    async def deactivate(self, image_id: str) -> None:
        """Make the image's data unreadable to non-admins until :meth:`reactivate`."""
        await self._client.request(
            "POST", api_path("/v2/images", image_id, "actions", "deactivate")
        )

    async def reactivate(self, image_id: str) -> None:
        await self._client.request(
            "POST", api_path("/v2/images", image_id, "actions", "reactivate")
        )

    async def upload(
        self,
        image_id: str,
        data: UploadData,
        size: int | None = None,
        *,
        backend: str | None = None,
    ) -> None:
        """Upload the image's data in one streamed request; returns once Glance has accepted it.

        ``data`` is bytes, a binary file (read in 8 MiB pieces in a worker thread) or an async
        iterable of bytes; ``size``, when known, is sent as Content-Length and as
        ``x-openstack-image-size`` (a regular file's size is found by itself), else the body is
        sent chunked. A body that is not ``size`` bytes long fails before its end is sent.
        ``backend`` names the store to write to when Glance has several. Bytes are sent again
        after a transport failure; a file or an iterable is sent once.
        """
        headers = {"X-Image-Meta-Store": backend} if backend else {}
        await self._put_data(api_path("/v2/images", image_id, "file"), data, size, headers)

    async def stage(self, image_id: str, data: UploadData, size: int | None = None) -> None:
        """Upload data to the staging area for a later ``glance-direct`` :meth:`image_import`.

        ``data`` and ``size`` are as for :meth:`upload`; the image goes from ``queued`` to
        ``uploading``.
        """
        await self._put_data(api_path("/v2/images", image_id, "stage"), data, size, {})

    async def _put_data(
        self, path: str, data: UploadData, size: int | None, extra: Mapping[str, str]
    ) -> None:
        headers = {"Content-Type": "application/octet-stream", **extra}
        body: bytes | AsyncIterable[bytes]
        if isinstance(data, bytes | bytearray | memoryview):
            body = bytes(data)
        elif isinstance(data, AsyncIterable):
            body = data
        else:
            if size is None:
                size = _remaining_file_size(data)
            body = _read_file(data)
        if size is not None:
            # Glance (31 and later) takes the image's size from x-openstack-image-size: the rbd
            # store then makes the image that large at once instead of growing it as data
            # arrives, and a quota can refuse the upload before the data is sent.
            headers["Content-Length"] = headers["x-openstack-image-size"] = str(size)
        await self._client.request("PUT", path, content=body, headers=headers)

    async def image_import(
        self,
        image_id: str,
        method: str = "glance-direct",
        uri: str | None = None,
        *,
        stores: Sequence[str] | None = None,
        all_stores: bool | None = None,
        allow_failure: bool = True,
        backend: str | None = None,
        remote_region: str | None = None,
        remote_image_id: str | None = None,
        remote_service_interface: str | None = None,
    ) -> None:
        """Start an interoperable import; Glance answers at once and imports in the background.

        ``method`` is one of :meth:`InfoManager.import_methods`: ``glance-direct`` (the data
        :meth:`stage` uploaded), ``web-download`` (Glance fetches ``uri``), ``copy-image`` (copy an
        active image's data to further ``stores``) or ``glance-download`` (from another region:
        ``remote_region``, ``remote_image_id``, ``remote_service_interface``). ``stores`` or
        ``all_stores`` choose target stores; with ``allow_failure=False`` the import fails
        unless every store succeeds; ``backend`` is the single target store (an older header).

        Poll :meth:`get` until ``status`` is ``active``. A failed import puts the image back in
        its earlier status (``queued`` for web-download) and lists the store that failed in
        ``os_glance_failed_import``; :meth:`get_associated_image_tasks` tells why.
        """
        body: dict[str, Any] = {"method": {"name": method}}
        if uri is not None:
            body["method"]["uri"] = uri
        for key, value in (
            ("glance_region", remote_region),
            ("glance_image_id", remote_image_id),
            ("glance_service_interface", remote_service_interface),
        ):
            if value is not None:
                body["method"][key] = value
        if stores is not None:
            body["stores"] = list(stores)
        if all_stores is not None:
            body["all_stores"] = all_stores
        if stores is not None or all_stores is not None:
            body["all_stores_must_succeed"] = not allow_failure
        headers = {"X-Image-Meta-Store": backend} if backend else None
        await self._client.request(
            "POST", api_path("/v2/images", image_id, "import"), json=body, headers=headers
        )

    async def delete_from_store(self, store_id: str, image_id: str) -> None:
        """Delete the image's data from one store only (it must remain in another)."""
        await self._client.request("DELETE", api_path("/v2/stores", store_id, image_id))

    async def get_associated_image_tasks(self, image_id: str) -> builtins.list[Task]:
        """The import tasks that ran for this image, with their ``input``, ``result`` and
        ``message`` (admin, or the image's owner)."""
        from ._tasks import Task

        body = (await self._client.request("GET", api_path("/v2/images", image_id, "tasks"))).json()
        return [Task(record) for record in body.get("tasks") or []]

    async def open_data(
        self,
        image_id: str,
        offset: int = 0,
        length: int | None = None,
        *,
        retries: int | None = None,
    ) -> ImageData:
        """Start a download of the image's bytes ``[offset, offset + length)`` (to the end if None).

        One ``Range`` request; the caller reads :meth:`ImageData.chunks` and closes it (it holds a
        slot of :attr:`Client.connections <glancefs.Client.connections>` until then).
        ``retries`` overrides the client's retries for opening it. Raises
        :class:`~glancefs.RangesRefused` for any range (``offset`` > 0 or a ``length``) of an
        image whose store sends whole images only (rbd, swift).
        """
        if length is not None and length <= 0:
            return ImageData(None, offset, offset, None)
        headers: dict[str, str] = {}
        if offset > 0 or length is not None:
            last = "" if length is None else str(offset + length - 1)
            headers["Range"] = f"bytes={offset}-{last}"
        try:
            response = await self._client.request(
                "GET",
                api_path("/v2/images", image_id, "file"),
                headers=headers,
                stream=True,
                retries=retries,
            )
        except RangeNotSatisfiable:
            return ImageData(None, offset, offset, None)
        except BadRequest as error:
            if not headers:
                raise
            # Glance's only 400 to a GET of data with one range: the store takes no ranges.
            raise RangesRefused(error.status, error.detail, error.request_id) from None
        return await _image_data(response, image_id, offset)

    async def data(
        self,
        image_id: str,
        *,
        offset: int = 0,
        length: int | None = None,
        verify: bool = True,
    ) -> AsyncIterator[bytes]:
        """The image's data as it streams in, ``[offset, offset + length)`` or all of it.

        A whole download (``offset=0``, no ``length``) is checked against the image's
        ``os_hash_value`` (or MD5 ``checksum``) unless ``verify=False``;
        :class:`~glancefs.IntegrityError` is raised after the last chunk when it does not match.
        A range cannot be checked (Glance records only whole-image hashes).
        """
        verifier = None
        if verify and offset == 0 and length is None:
            verifier = Verifier.for_image(await self.get(image_id))
        async with await self.open_data(image_id, offset, length) as stream:
            async for chunk in stream.chunks():
                if verifier is not None:
                    await verifier.update(chunk)
                yield chunk
        if verifier is not None:
            verifier.check()


async def _image_data(response: httpx.Response, image_id: str, offset: int) -> ImageData:
    """The download a successful (streamed) answer to a GET of image data from ``offset`` is:
    where its bytes are in the image, from its status and ``Content-Range``."""
    if response.status_code == 204:
        await response.aclose()
        return ImageData(None, 0, 0, 0)
    match = _CONTENT_RANGE.fullmatch(response.headers.get("content-range", ""))
    if response.status_code == 206 and match:
        start, last, total = match.groups()
        image_size = None if total == "*" else int(total)
        return ImageData(response, int(start), int(last) + 1, image_size)
    if offset > 0:
        # Glance always honours Range; a proxy that dropped it would make us misplace data.
        await response.aclose()
        raise GlanceError(f"image {image_id}: the server ignored the requested range")
    size = int(response.headers.get("content-length", "0"))
    return ImageData(response, 0, size, size)


def _query_value(value: str | bool | int) -> str:
    """A filter value as Glance expects it in a query: booleans in lower case."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _remaining_file_size(file: BinaryIO) -> int | None:
    """Bytes left to read in a regular file, or None when that cannot be known (pipe, socket)."""
    try:
        info = os.fstat(file.fileno())
        if not stat.S_ISREG(info.st_mode):
            return None
        return max(info.st_size - file.tell(), 0)
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        return None


async def _read_file(file: BinaryIO, chunk_size: int = 8 * 1024 * 1024) -> AsyncIterator[bytes]:
    """A blocking binary file as async chunks, each read in a worker thread."""
    while chunk := await trio.to_thread.run_sync(file.read, chunk_size):
        yield chunk
