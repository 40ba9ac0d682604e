"""``client.tasks``: Glance's asynchronous tasks.

Every interoperable import (``images.image_import``) runs as a task of type ``api_image_import``;
``tasks.create(type="import", ...)`` starts a legacy import task that creates a new image from a
URL. A task is ``pending``, then ``processing``, then ``success`` or ``failure`` (``message`` says
why); Glance forgets it after ``expires_at``.

Pitfalls: the task API is admin-only under Glance's default policy; a listed task carries no
``input``/``result`` (get it by id for those).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import TYPE_CHECKING, Any

from ._records import Record, api_path, paginate

if TYPE_CHECKING:
    from ._client import Client

__all__ = ["Task", "TasksManager"]


class Task(Record):
    """One task: ``id``, ``type``, ``status``, ``input``, ``result``, ``message``, ``owner``..."""

    __slots__ = ()
    _repr_keys = ("id", "type", "status")

    @property
    def id(self) -> str:
        return str(self._record["id"])

    @property
    def type(self) -> str:
        return str(self._record.get("type", ""))

    @property
    def status(self) -> str:
        """``pending``, ``processing``, ``success`` or ``failure``."""
        return str(self._record.get("status", ""))

    @property
    def message(self) -> str:
        return str(self._record.get("message") or "")


class TasksManager:
    """``client.tasks``, as in python-glanceclient."""

    def __init__(self, client: Client) -> None:
        self._client = client

    async def list(
        self,
        *,
        filters: Mapping[str, str] | None = None,
        sort_key: str | None = None,
        sort_dir: str | None = None,
        limit: int | None = None,
        page_size: int | None = None,
        marker: str | None = None,
    ) -> AsyncIterator[Task]:
        """Every task visible to the project, newest first unless ``sort_key``/``sort_dir`` say.

        ``filters`` are Glance's ``type`` and ``status``; ``limit`` caps the total, ``page_size``
        is the number fetched per request, ``marker`` starts after that task id.
        """
        params = [(k, str(v)) for k, v in (filters or {}).items()]
        params += [
            (k, v)
            for k, v in (("sort_key", sort_key), ("sort_dir", sort_dir), ("marker", marker))
            if v is not None
        ]
        async for record in paginate(
            self._client, "/v2/tasks", "tasks", params, limit=limit, page_size=page_size
        ):
            yield Task(record)

    async def get(self, task_id: str) -> Task:
        """The task with its ``input``, ``result`` and ``message``."""
        return Task((await self._client.request("GET", api_path("/v2/tasks", task_id))).json())

    async def create(self, *, type: str, input: Mapping[str, Any]) -> Task:
        """Start a task, e.g. ``type="import"`` with ``input={"import_from": URL,
        "import_from_format": "raw", "image_properties": {...}}``. Returns it ``pending``."""
        response = await self._client.request(
            "POST", "/v2/tasks", json={"type": type, "input": dict(input)}
        )
        return Task(response.json())
