"""Metadata definitions (metadefs): the catalog of properties that images may carry.

A *namespace* (``OS::Compute::Quota``, ...) groups *properties* (a JSON-schema definition each),
*objects* (named groups of properties), *tags* (plain names), and *resource type associations*
(which kinds of resource, e.g. ``OS::Glance::Image``, the namespace applies to, with an optional
property prefix). The managers mirror python-glanceclient's: ``client.metadefs_namespace``,
``client.metadefs_object``, ``client.metadefs_property``, ``client.metadefs_tag`` and
``client.metadefs_resource_type``.

Pitfalls:

* Glance's ``PUT`` replaces a whole definition: a field left out is reset (a namespace's
  ``visibility`` falls back to ``private``). The ``update`` methods here therefore read the
  definition, apply the changes and send it back complete.
* Namespaces and tags list a page at a time; objects and properties come in one answer.
* Creating metadefs needs a project-scoped request (Glance without auth fails with 500).
"""

from __future__ import annotations

import builtins
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ._records import Record, api_path, paginate

if TYPE_CHECKING:
    from ._client import Client

__all__ = [
    "MetadefObject",
    "MetadefProperty",
    "MetadefTag",
    "Namespace",
    "NamespacesManager",
    "ObjectsManager",
    "PropertiesManager",
    "ResourceType",
    "ResourceTypesManager",
    "TagsManager",
]

#: Keys Glance sets itself; they are dropped before a definition is sent back in a PUT.
_READ_ONLY = frozenset({"created_at", "updated_at", "self", "schema"})


def _ns_path(namespace: str, *rest: str) -> str:
    """The path of ``namespace`` or of something in it; every part is caller text, encoded."""
    return api_path("/v2/metadefs/namespaces", namespace, *rest)


def _writable(record: Mapping[str, Any], drop: Iterable[str] = ()) -> dict[str, Any]:
    skip = _READ_ONLY | set(drop)
    return {k: v for k, v in record.items() if k not in skip}


class Namespace(Record):
    """A metadef namespace: ``namespace``, ``display_name``, ``description``, ``visibility``,
    ``protected``, ``owner``; a fetched one also has ``properties``, ``objects``, ``tags`` and
    ``resource_type_associations``."""

    __slots__ = ()
    _repr_keys = ("namespace", "visibility")

    @property
    def namespace(self) -> str:
        return str(self._record["namespace"])


class MetadefObject(Record):
    """A metadef object: ``name``, ``description``, ``required`` and ``properties``."""

    __slots__ = ()
    _repr_keys = ("name",)

    @property
    def name(self) -> str:
        return str(self._record["name"])


class MetadefProperty(Record):
    """A metadef property: ``name``, ``title``, ``type`` and the rest of its JSON schema."""

    __slots__ = ()
    _repr_keys = ("name", "type")

    @property
    def name(self) -> str:
        return str(self._record["name"])


class MetadefTag(Record):
    """A metadef tag: its ``name``."""

    __slots__ = ()
    _repr_keys = ("name",)

    @property
    def name(self) -> str:
        return str(self._record["name"])


class ResourceType(Record):
    """A resource type (``name``), or its association with a namespace (adds ``prefix`` and
    ``properties_target``)."""

    __slots__ = ()
    _repr_keys = ("name", "prefix")

    @property
    def name(self) -> str:
        return str(self._record["name"])


class NamespacesManager:
    """``client.metadefs_namespace``."""

    def __init__(self, client: Client) -> None:
        self._client = client

    async def list(
        self,
        *,
        visibility: str | None = None,
        resource_types: Sequence[str] = (),
        sort_key: str | None = None,
        sort_dir: str | None = None,
        limit: int | None = None,
        page_size: int | None = None,
        marker: str | None = None,
    ) -> AsyncIterator[Namespace]:
        """Every namespace visible to the project, a page at a time.

        ``visibility`` (``public``/``private``) and ``resource_types`` (any of them) filter;
        ``marker`` starts after that namespace.
        """
        params: list[tuple[str, str]] = []
        if resource_types:
            params.append(("resource_types", ",".join(resource_types)))
        for key, value in (
            ("visibility", visibility),
            ("sort_key", sort_key),
            ("sort_dir", sort_dir),
            ("marker", marker),
        ):
            if value is not None:
                params.append((key, value))
        async for record in paginate(
            self._client,
            "/v2/metadefs/namespaces",
            "namespaces",
            params,
            limit=limit,
            page_size=page_size,
        ):
            yield Namespace(record)

    async def get(self, namespace: str, *, resource_type: str | None = None) -> Namespace:
        """The namespace with its properties, objects, tags and resource type associations.

        With ``resource_type``, property names carry that association's prefix.
        """
        params = {"resource_type": resource_type} if resource_type else None
        response = await self._client.request("GET", _ns_path(namespace), params=params)
        return Namespace(response.json())

    async def create(self, namespace: str, **fields: Any) -> Namespace:
        """Create a namespace; ``fields`` are ``display_name``, ``description``, ``visibility``
        (``private`` by default), ``protected``, and may include ``properties``, ``objects``,
        ``tags`` and ``resource_type_associations`` to fill it in one request.

        :class:`~glancefs.Conflict` when it exists already.
        """
        body = {"namespace": namespace, **fields}
        response = await self._client.request("POST", "/v2/metadefs/namespaces", json=body)
        return Namespace(response.json())

    async def update(self, namespace: str, /, **changes: Any) -> Namespace:
        """Change fields of the namespace (``namespace=`` renames it); the others are kept."""
        current = await self.get(namespace)
        body = _writable(
            current, drop=("properties", "objects", "tags", "resource_type_associations")
        )
        body.update(changes)
        response = await self._client.request("PUT", _ns_path(namespace), json=body)
        return Namespace(response.json())

    async def delete(self, namespace: str) -> None:
        """Delete the namespace and everything in it (:class:`~glancefs.Forbidden` if
        protected)."""
        await self._client.request("DELETE", _ns_path(namespace))


class ObjectsManager:
    """``client.metadefs_object``."""

    def __init__(self, client: Client) -> None:
        self._client = client

    async def list(self, namespace: str) -> AsyncIterator[MetadefObject]:
        """The namespace's objects."""
        body = (await self._client.request("GET", _ns_path(namespace, "objects"))).json()
        for record in body.get("objects") or []:
            yield MetadefObject(record)

    async def get(self, namespace: str, object_name: str) -> MetadefObject:
        path = _ns_path(namespace, "objects", object_name)
        return MetadefObject((await self._client.request("GET", path)).json())

    async def create(self, namespace: str, name: str, **fields: Any) -> MetadefObject:
        """Create an object; ``fields`` are ``description``, ``required`` (property names) and
        ``properties`` (name to JSON-schema definition)."""
        response = await self._client.request(
            "POST", _ns_path(namespace, "objects"), json={"name": name, **fields}
        )
        return MetadefObject(response.json())

    async def update(self, namespace: str, object_name: str, **changes: Any) -> MetadefObject:
        """Change fields of the object (``name=`` renames it); the others are kept."""
        path = _ns_path(namespace, "objects", object_name)
        body = _writable((await self._client.request("GET", path)).json())
        body.update(changes)
        return MetadefObject((await self._client.request("PUT", path, json=body)).json())

    async def delete(self, namespace: str, object_name: str) -> None:
        await self._client.request("DELETE", _ns_path(namespace, "objects", object_name))

    async def delete_all(self, namespace: str) -> None:
        """Delete every object of the namespace."""
        await self._client.request("DELETE", _ns_path(namespace, "objects"))


class PropertiesManager:
    """``client.metadefs_property``."""

    def __init__(self, client: Client) -> None:
        self._client = client

    async def list(self, namespace: str) -> AsyncIterator[MetadefProperty]:
        """The namespace's properties (those outside objects)."""
        body = (await self._client.request("GET", _ns_path(namespace, "properties"))).json()
        for name, definition in (body.get("properties") or {}).items():
            yield MetadefProperty({"name": name, **definition})

    async def get(self, namespace: str, prop_name: str) -> MetadefProperty:
        path = _ns_path(namespace, "properties", prop_name)
        return MetadefProperty((await self._client.request("GET", path)).json())

    async def create(
        self, namespace: str, name: str, *, title: str, type: str, **fields: Any
    ) -> MetadefProperty:
        """Create a property: ``title``, a JSON-schema ``type`` (``string``, ``integer``,
        ``boolean``, ``array``, ...) and any other JSON-schema keywords (``enum``,
        ``minimum``, ``description``, ...)."""
        body = {"name": name, "title": title, "type": type, **fields}
        response = await self._client.request("POST", _ns_path(namespace, "properties"), json=body)
        return MetadefProperty(response.json())

    async def update(self, namespace: str, prop_name: str, **changes: Any) -> MetadefProperty:
        """Change keywords of the property (``name=`` renames it); the others are kept."""
        path = _ns_path(namespace, "properties", prop_name)
        body = _writable((await self._client.request("GET", path)).json())
        body.setdefault("name", prop_name)
        body.update(changes)
        return MetadefProperty((await self._client.request("PUT", path, json=body)).json())

    async def delete(self, namespace: str, prop_name: str) -> None:
        await self._client.request("DELETE", _ns_path(namespace, "properties", prop_name))

    async def delete_all(self, namespace: str) -> None:
        """Delete every property of the namespace."""
        await self._client.request("DELETE", _ns_path(namespace, "properties"))


class TagsManager:
    """``client.metadefs_tag``."""

    def __init__(self, client: Client) -> None:
        self._client = client

    async def list(
        self,
        namespace: str,
        *,
        sort_key: str | None = None,
        sort_dir: str | None = None,
        limit: int | None = None,
        marker: str | None = None,
    ) -> AsyncIterator[MetadefTag]:
        """The namespace's tags; ``marker`` starts after that tag name."""
        params = [
            (k, v)
            for k, v in (("sort_key", sort_key), ("sort_dir", sort_dir), ("marker", marker))
            if v is not None
        ]
        async for record in paginate(
            self._client, _ns_path(namespace, "tags"), "tags", params, limit=limit
        ):
            yield MetadefTag(record)

    async def get(self, namespace: str, tag_name: str) -> MetadefTag:
        path = _ns_path(namespace, "tags", tag_name)
        return MetadefTag((await self._client.request("GET", path)).json())

    async def create(self, namespace: str, tag_name: str) -> MetadefTag:
        """Add one tag (:class:`~glancefs.Conflict` when it exists)."""
        path = _ns_path(namespace, "tags", tag_name)
        return MetadefTag((await self._client.request("POST", path)).json())

    async def create_multiple(
        self, namespace: str, tags: Sequence[str], *, append: bool = False
    ) -> builtins.list[MetadefTag]:
        """Set the namespace's tags to ``tags`` (replacing all), or add them with ``append``."""
        headers = {"X-Openstack-Append": "True"} if append else None
        response = await self._client.request(
            "POST",
            _ns_path(namespace, "tags"),
            json={"tags": [{"name": t} for t in tags]},
            headers=headers,
        )
        return [MetadefTag(r) for r in response.json().get("tags") or []]

    async def update(self, namespace: str, tag_name: str, *, name: str) -> MetadefTag:
        """Rename a tag."""
        path = _ns_path(namespace, "tags", tag_name)
        return MetadefTag((await self._client.request("PUT", path, json={"name": name})).json())

    async def delete(self, namespace: str, tag_name: str) -> None:
        await self._client.request("DELETE", _ns_path(namespace, "tags", tag_name))

    async def delete_all(self, namespace: str) -> None:
        """Delete every tag of the namespace."""
        await self._client.request("DELETE", _ns_path(namespace, "tags"))


class ResourceTypesManager:
    """``client.metadefs_resource_type``."""

    def __init__(self, client: Client) -> None:
        self._client = client

    async def list(self) -> AsyncIterator[ResourceType]:
        """Every resource type some namespace was ever associated with."""
        body = (await self._client.request("GET", "/v2/metadefs/resource_types")).json()
        for record in body.get("resource_types") or []:
            yield ResourceType(record)

    async def get(self, namespace: str) -> AsyncIterator[ResourceType]:
        """The namespace's resource type associations."""
        body = (await self._client.request("GET", _ns_path(namespace, "resource_types"))).json()
        for record in body.get("resource_type_associations") or []:
            yield ResourceType(record)

    async def associate(
        self,
        namespace: str,
        name: str,
        *,
        prefix: str | None = None,
        properties_target: str | None = None,
    ) -> ResourceType:
        """Apply the namespace to resource type ``name`` (e.g. ``OS::Glance::Image``); its
        properties then appear with ``prefix`` on such resources."""
        body: dict[str, Any] = {"name": name}
        if prefix is not None:
            body["prefix"] = prefix
        if properties_target is not None:
            body["properties_target"] = properties_target
        response = await self._client.request(
            "POST", _ns_path(namespace, "resource_types"), json=body
        )
        return ResourceType(response.json())

    async def deassociate(self, namespace: str, resource: str) -> None:
        await self._client.request("DELETE", _ns_path(namespace, "resource_types", resource))
