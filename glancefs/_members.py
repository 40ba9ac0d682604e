"""``client.image_members``: sharing an image with other projects.

An image of visibility ``shared`` can be offered to another project by adding that project as a
member. The membership starts ``pending``; only the member (a request scoped to that project) can
set it to ``accepted`` or ``rejected``, and only an accepted image appears in the member's image
list (a pending one can still be read by id). Only the owner adds and removes members.

Pitfall: adding a member to an image whose visibility is not ``shared`` is refused (403).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from ._records import Record, api_path

if TYPE_CHECKING:
    from ._client import Client

__all__ = ["ImageMembersManager", "Member"]


class Member(Record):
    """One membership: ``image_id``, ``member_id`` (a project id) and its ``status``."""

    __slots__ = ()
    _repr_keys = ("image_id", "member_id", "status")

    @property
    def image_id(self) -> str:
        return str(self._record["image_id"])

    @property
    def member_id(self) -> str:
        return str(self._record["member_id"])

    @property
    def status(self) -> str:
        """``pending``, ``accepted`` or ``rejected``."""
        return str(self._record.get("status", ""))


class ImageMembersManager:
    """``client.image_members``, as in python-glanceclient."""

    def __init__(self, client: Client) -> None:
        self._client = client

    def _path(self, image_id: str, member_id: str | None = None) -> str:
        if member_id is None:
            return api_path("/v2/images", image_id, "members")
        return api_path("/v2/images", image_id, "members", member_id)

    async def list(self, image_id: str) -> AsyncIterator[Member]:
        """The image's members (as its owner), or this project's own membership (as a member)."""
        body = (await self._client.request("GET", self._path(image_id))).json()
        for record in body.get("members") or []:
            yield Member(record)

    async def get(self, image_id: str, member_id: str) -> Member:
        """One membership; :class:`~glancefs.NotFound` when the project is not a member."""
        return Member((await self._client.request("GET", self._path(image_id, member_id))).json())

    async def create(self, image_id: str, member_id: str) -> Member:
        """Offer the image to project ``member_id`` (status ``pending``).

        :class:`~glancefs.Conflict` when it is a member already.
        """
        response = await self._client.request(
            "POST", self._path(image_id), json={"member": member_id}
        )
        return Member(response.json())

    async def update(self, image_id: str, member_id: str, member_status: str) -> Member:
        """Set the membership's status: ``accepted``, ``rejected`` or ``pending``.

        Only the member project itself may do this (the owner gets :class:`~glancefs.Forbidden`).
        """
        response = await self._client.request(
            "PUT", self._path(image_id, member_id), json={"status": member_status}
        )
        return Member(response.json())

    async def delete(self, image_id: str, member_id: str) -> None:
        """Stop sharing the image with ``member_id`` (owner only)."""
        await self._client.request("DELETE", self._path(image_id, member_id))
