"""``client.schemas``: the JSON schemas Glance publishes for its records.

Names are Glance's: ``image``, ``images``, ``member``, ``members``, ``task``, ``tasks``,
``metadefs/namespace``, ``metadefs/object``, ``metadefs/property``, ``metadefs/tag``, ... A core
property of the image schema is a field Glance defines itself; anything else on an image is a
custom property.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._records import Record

if TYPE_CHECKING:
    from ._client import Client

__all__ = ["Schema", "SchemasManager"]


class Schema(Record):
    """One JSON schema: ``name``, ``properties`` (name to definition), ``links``..."""

    __slots__ = ()
    _repr_keys = ("name",)

    @property
    def name(self) -> str:
        return str(self._record.get("name", ""))

    @property
    def properties(self) -> dict[str, Any]:
        """Property name to its JSON-schema definition."""
        return dict(self._record.get("properties") or {})

    def is_core_property(self, property_name: str) -> bool:
        """True for a property the schema defines (for images: not a custom property)."""
        return property_name in (self._record.get("properties") or {})

    def raw(self) -> dict[str, Any]:
        """The schema as Glance sent it, as python-glanceclient's ``Schema.raw()``."""
        return self.to_dict()


class SchemasManager:
    """``client.schemas``, as in python-glanceclient."""

    def __init__(self, client: Client) -> None:
        self._client = client

    async def get(self, schema_name: str) -> Schema:
        """The schema called ``schema_name`` (``image``, ``metadefs/namespace``, ...)."""
        path = "/v2/schemas/" + schema_name.strip("/")
        return Schema((await self._client.request("GET", path)).json())
