"""``client.image_tags``: add and remove one tag of an image.

Glance replaces an image's tags as a whole list in a PATCH (``images.update(id, tags=[...])``);
these calls change a single tag without reading the list first, so concurrent taggers do not
overwrite each other. Adding a tag that is there already changes nothing; removing one that is not
there is :class:`~glancefs.NotFound`; more tags than ``image_tag_quota`` is
:class:`~glancefs.OverLimit`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._records import api_path

if TYPE_CHECKING:
    from ._client import Client

__all__ = ["ImageTagsManager"]


class ImageTagsManager:
    """``client.image_tags``, as in python-glanceclient."""

    def __init__(self, client: Client) -> None:
        self._client = client

    async def update(self, image_id: str, tag_value: str) -> None:
        """Add ``tag_value`` to the image's tags (nothing changes when it is already there)."""
        await self._client.request("PUT", api_path("/v2/images", image_id, "tags", tag_value))

    async def delete(self, image_id: str, tag_value: str) -> None:
        """Remove ``tag_value`` from the image's tags; :class:`~glancefs.NotFound` if absent."""
        await self._client.request("DELETE", api_path("/v2/images", image_id, "tags", tag_value))
