"""``client.info``: what this Glance offers: import methods, stores, and the project's quota usage.

Pitfall: ``usage()`` is empty unless Glance enforces quotas through Keystone unified limits
(``[DEFAULT] use_keystone_limits``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._client import Client

__all__ = ["InfoManager"]


class InfoManager:
    """``client.info``: the ``/v2/info`` calls."""

    def __init__(self, client: Client) -> None:
        self._client = client

    async def import_info(self) -> dict[str, Any]:
        """Glance's answer about interoperable import, as python-glanceclient's
        ``images.get_import_info()``: ``{"import-methods": {"value": ["glance-direct", ...]}}``."""
        body: dict[str, Any] = (await self._client.request("GET", "/v2/info/import")).json()
        return body

    async def import_methods(self) -> list[str]:
        """Just the enabled import methods, e.g. ``["glance-direct", "web-download"]``."""
        info = await self.import_info()
        return [str(m) for m in (info.get("import-methods") or {}).get("value") or []]

    async def stores(self, *, detail: bool = False) -> list[dict[str, Any]]:
        """The storage backends: ``{"id": "fs", "default": "true"}`` for the default one.

        ``detail=True`` (admin only) adds each store's ``type``, ``weight`` and ``properties``.
        Glance without multi-store configuration answers :class:`~glancefs.NotFound`.
        """
        path = "/v2/info/stores/detail" if detail else "/v2/info/stores"
        body = (await self._client.request("GET", path)).json()
        return [dict(store) for store in body.get("stores") or []]

    async def usage(self) -> dict[str, dict[str, int]]:
        """The project's quota usage, ``{"image_size_total": {"limit": L, "usage": U}, ...}``."""
        body = (await self._client.request("GET", "/v2/info/usage")).json()
        usage: dict[str, dict[str, int]] = body.get("usage") or {}
        return usage
