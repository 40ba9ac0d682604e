"""Records that Glance returns (members, tasks, metadefs, schemas), and the paging they share.

Every record is the JSON object Glance sent, readable both as attributes (``task.status``) and as a
read-only mapping (``task["status"]``, ``dict(task)``), like :class:`~glancefs.Image`. A few common
fields are typed properties; any other key is reachable as an attribute too.

Pitfall: Glance path segments (image ids, tags, member ids, metadef names such as
``OS::Compute::Quota``) are user text: every path the client builds from them comes from
:func:`api_path`, which percent-encodes each one, so a space, ``/`` or ``?`` cannot change the
request (``by-id/x?y`` must not become ``GET /v2/images/x`` with a query).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

if TYPE_CHECKING:
    from ._client import Client

__all__ = ["Record", "api_path", "paginate"]


def api_path(base: str, *segments: str) -> str:
    """The request path ``base`` (a literal such as ``/v2/images``) then ``segments``, each
    percent-encoded as one URL path segment: the one place caller text enters a URL path.

    Literal segments (``file``, ``tags``) come out unchanged. ``.`` and ``..`` are encoded too
    (``%2E``): as they are, URL normalisation would drop them or climb a level.
    """
    return "/".join([base, *(_segment(str(s)) for s in segments)])


def _segment(text: str) -> str:
    if text in (".", ".."):
        return text.replace(".", "%2E")
    return quote(text, safe="")


class Record(Mapping[str, Any]):
    """A JSON object from Glance, readable as attributes and as a read-only mapping."""

    __slots__ = ("_record",)
    _repr_keys: tuple[str, ...] = ()

    def __init__(self, record: Mapping[str, Any]) -> None:
        self._record = dict(record)

    def __getitem__(self, key: str) -> Any:
        return self._record[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._record)

    def __len__(self) -> int:
        return len(self._record)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):  # never recurse on _record while copying or unpickling
            raise AttributeError(name)
        try:
            return self._record[name]
        except KeyError:
            raise AttributeError(name) from None

    def __repr__(self) -> str:
        keys = self._repr_keys or tuple(self._record)[:3]
        fields = ", ".join(f"{k}={self._record.get(k)!r}" for k in keys)
        return f"{type(self).__name__}({fields})"

    def to_dict(self) -> dict[str, Any]:
        """A plain (shallow) copy of the record."""
        return dict(self._record)


async def paginate(
    client: Client,
    path: str,
    key: str,
    params: list[tuple[str, str]],
    *,
    limit: int | None = None,
    page_size: int | None = None,
) -> AsyncIterator[dict[str, Any]]:
    """Every item of the list ``key`` across pages, following Glance's ``next`` links.

    ``limit`` caps the total; ``page_size`` is the ``limit`` sent per request (Glance's default
    when None).
    """
    if limit is not None and limit <= 0:
        return
    remaining = limit
    sizes = [s for s in (page_size, remaining) if s is not None]
    query: list[tuple[str, str]] | None = list(params)
    if sizes:
        query = [*params, ("limit", str(min(sizes)))]
    next_path: str | None = path
    while next_path is not None:
        body = (await client.request("GET", next_path, params=query)).json()
        items = body.get(key) or []
        for item in items:
            yield item
            if remaining is not None:
                remaining -= 1
                if remaining <= 0:
                    return
        link = body.get("next")
        if not link or not items:
            return
        # Glance's next link is relative to the endpoint and repeats every parameter.
        if not link.startswith(("/", "http://", "https://")):
            link = "/" + link
        next_path, query = link, None
