"""Glance over plain HTTP, for the tests, the benchmark and the demo: never glancefs's own client.

Tests arrange and check what a mount shows through this, so that a bug in glancefs's client cannot
hide behind itself; the benchmark and the demo make their images with it. Synchronous httpx on
loopback: proxies from the environment are ignored (trust_env=False), they must never see these
requests.
"""

from __future__ import annotations

from typing import Any

import httpx

__all__ = ["GlanceAPI", "GlanceHTTPError"]

JSON_PATCH = "application/openstack-images-v2.1-json-patch"


class GlanceHTTPError(RuntimeError):
    """A request Glance refused or did not answer; one line with Glance's own explanation."""


class GlanceAPI:
    """Just enough of the Glance v2 API to arrange and inspect images.

    ``http`` is the underlying ``httpx.Client`` (base URL set) for the calls not wrapped here.
    """

    def __init__(
        self, url: str, headers: dict[str, str] | None = None, timeout: float = 60
    ) -> None:
        self.url = url
        self.http = httpx.Client(
            base_url=url, headers=headers or {}, timeout=timeout, trust_env=False
        )

    def __enter__(self) -> GlanceAPI:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """One request; a non-2xx answer or a transport failure raises GlanceHTTPError."""
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.TransportError as error:
            raise GlanceHTTPError(f"{method} {self.url}{path}: {error}") from None
        if not response.is_success:
            detail = " ".join(response.text.split())[:300]
            raise GlanceHTTPError(
                f"{method} {self.url}{path}: HTTP {response.status_code}: {detail}"
            )
        return response

    def create(
        self,
        name: str | None = "image",
        data: bytes | None = None,
        *,
        store: str | None = None,
        **fields: Any,
    ) -> dict[str, Any]:
        """A new image (raw/bare unless ``fields`` say otherwise), with ``data`` uploaded if any
        (into ``store``, see upload())."""
        fields.setdefault("disk_format", "raw")
        fields.setdefault("container_format", "bare")
        image: dict[str, Any] = self.request(
            "POST", "/v2/images", json={"name": name, **fields}
        ).json()
        if data is not None:
            self.upload(image["id"], data, store=store)
            image = self.get(image["id"])
        return image

    def upload(self, image_id: str, data: bytes, *, store: str | None = None) -> None:
        """PUT the image's data, into Glance's default store or the one named ``store`` (its id
        in ``enabled_backends``: ``fs``, ``ceph``, ``swift`` in lab.stores)."""
        headers = {"Content-Type": "application/octet-stream"}
        if store is not None:
            headers["X-Image-Meta-Store"] = store
        self.request("PUT", f"/v2/images/{image_id}/file", content=data, headers=headers)

    def get(self, image_id: str) -> dict[str, Any]:
        image: dict[str, Any] = self.request("GET", f"/v2/images/{image_id}").json()
        return image

    def exists(self, image_id: str) -> bool:
        return self.http.get(f"/v2/images/{image_id}").status_code == 200

    def list(self, **params: Any) -> list[dict[str, Any]]:
        """Every image matching the query ``params``, following Glance's ``next`` links."""
        images: list[dict[str, Any]] = []
        path: str | None = "/v2/images"
        query: dict[str, Any] | None = {"limit": 1000, **params}
        while path:
            body = self.request("GET", path, params=query).json()
            images += body["images"]
            path = body.get("next") if body["images"] else None
            query = None  # the next link carries it
        return images

    def only(self, name: str) -> dict[str, Any]:
        """The one image called ``name`` (fails the test if there are none or several)."""
        images = self.list(name=name)
        assert len(images) == 1, images
        return images[0]

    def delete(self, image_id: str) -> None:
        """Delete the image, protected or not; an image already gone is fine."""
        self.http.patch(
            f"/v2/images/{image_id}",
            json=[{"op": "replace", "path": "/protected", "value": False}],
            headers={"Content-Type": JSON_PATCH},
        )
        self.http.delete(f"/v2/images/{image_id}")

    def close(self) -> None:
        self.http.close()
