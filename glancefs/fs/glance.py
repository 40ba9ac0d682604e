"""What the filesystem needs of Glance: the part of :class:`glancefs.Client` it calls, as protocols.

The filesystem's modules take a :class:`Glance`, not the concrete client, so that the unit tests
below FUSE hand them a fake (tests/fakes.py) that mypy checks against the same protocol;
``glancefs.Client`` satisfies it (the mount hands one over, and tests/unit/test_client_request.py
assigns one to a ``Glance``). A call the filesystem starts to make goes here first, with the
signature the client's method has.
"""

from __future__ import annotations

import builtins
from collections.abc import AsyncIterable, AsyncIterator, Mapping, Sequence
from typing import Any, Protocol

from glancefs import Image, ImageData, Task
from glancefs.plumbing import ConnectionBudget

__all__ = ["Glance", "ImageTags", "Images", "Info"]


class Images(Protocol):
    """``client.images``: records, changes and data of images."""

    def list(
        self,
        *,
        sort: str | None = None,
        filters: Mapping[str, str | bool | int | Sequence[str]] | None = None,
        limit: int | None = None,
    ) -> AsyncIterator[Image]: ...

    async def get(self, image_id: str) -> Image: ...

    async def create(self, **fields: Any) -> Image: ...

    async def update(self, image_id: str, **changes: Any) -> Image: ...

    async def patch(self, image_id: str, operations: Sequence[Mapping[str, Any]]) -> Image: ...

    async def delete(self, image_id: str) -> None: ...

    async def upload(
        self,
        image_id: str,
        data: AsyncIterable[bytes],
        size: int | None = None,
        *,
        backend: str | None = None,
    ) -> None: ...

    async def image_import(
        self,
        image_id: str,
        method: str = "glance-direct",
        uri: str | None = None,
        *,
        stores: Sequence[str] | None = None,
    ) -> None: ...

    async def delete_from_store(self, store_id: str, image_id: str) -> None: ...

    async def get_associated_image_tasks(self, image_id: str) -> builtins.list[Task]: ...

    async def stage(
        self, image_id: str, data: AsyncIterable[bytes], size: int | None = None
    ) -> None: ...

    async def open_data(
        self,
        image_id: str,
        offset: int = 0,
        length: int | None = None,
        *,
        retries: int | None = None,
    ) -> ImageData: ...


class ImageTags(Protocol):
    """``client.image_tags``: one tag at a time."""

    async def update(self, image_id: str, tag_value: str) -> None: ...

    async def delete(self, image_id: str, tag_value: str) -> None: ...


class Info(Protocol):
    """``client.info``: the project's quota usage (``statfs``), the import methods and stores."""

    async def usage(self) -> dict[str, dict[str, int]]: ...

    async def import_methods(self) -> list[str]: ...

    async def stores(self, *, detail: bool = False) -> list[dict[str, Any]]: ...


class Glance(Protocol):
    """The client as the filesystem uses it: its managers, its connection budget (a paused
    download gives its slot back when others wait) and its retry count (a broken download
    resumes at most that often)."""

    @property
    def images(self) -> Images: ...

    @property
    def image_tags(self) -> ImageTags: ...

    @property
    def info(self) -> Info: ...

    @property
    def connections(self) -> ConnectionBudget: ...

    @property
    def retries(self) -> int: ...
