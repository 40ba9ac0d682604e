"""Where the client gets its endpoint and token from.

The client asks an :class:`Auth` for request headers before every request and tells it when Glance
answered 401, so that a fresh token is fetched and the request retried once. Two implementations:

* :class:`TokenAuth`: a fixed endpoint and token (``--os-image-url`` + ``--os-auth-token``), no
  Keystone involved. A 401 cannot be cured, so ``invalidate()`` says so.
* :class:`SessionAuth`: a keystoneauth1 ``Session``. keystoneauth1 is blocking (it may talk to
  Keystone on any call), so every call into it runs in a worker thread: a token renewal never stalls
  the trio loop and with it the FUSE requests it serves.
"""

from __future__ import annotations

from typing import Any, Protocol

import trio

from ._exceptions import AuthError

__all__ = ["Auth", "SessionAuth", "TokenAuth"]


class Auth(Protocol):
    """What the client needs from an authentication source."""

    async def endpoint(self) -> str:
        """The image service's base URL (unversioned, without ``/v2``)."""
        ...

    async def headers(self) -> dict[str, str]:
        """Headers that authenticate one request (may renew the token first)."""
        ...

    async def invalidate(self) -> bool:
        """Forget the current token after a 401; True when a retry may now succeed."""
        ...

    def secrets(self) -> list[str]:
        """Values that must never appear in a log line (tokens, passwords)."""
        ...


def strip_version(url: str) -> str:
    """Catalogs list the image endpoint with or without ``/v2``; the client adds it itself."""
    url = url.rstrip("/")
    for suffix in ("/v2.0", "/v2", "/v1"):
        if url.endswith(suffix):
            return url[: -len(suffix)]
    return url


class TokenAuth:
    """A fixed endpoint and token, or no token at all for an unauthenticated Glance."""

    def __init__(self, endpoint: str, token: str | None = None) -> None:
        self._endpoint = strip_version(endpoint)
        self._token = token

    async def endpoint(self) -> str:
        return self._endpoint

    async def headers(self) -> dict[str, str]:
        return {"X-Auth-Token": self._token} if self._token else {}

    async def invalidate(self) -> bool:
        return False

    def secrets(self) -> list[str]:
        return [self._token] if self._token else []


class SessionAuth:
    """Endpoint and tokens from a keystoneauth1 ``Session`` (clouds.yaml, ``OS_*`` variables).

    ``interface`` and ``region_name`` choose the catalog entry; ``endpoint_override`` skips the
    catalog (``--os-image-url`` with Keystone credentials).
    """

    def __init__(
        self,
        session: Any,
        *,
        interface: str = "public",
        region_name: str | None = None,
        endpoint_override: str | None = None,
    ) -> None:
        self._session = session
        self._interface = interface
        self._region_name = region_name
        self._endpoint = strip_version(endpoint_override) if endpoint_override else None
        self._known_tokens: list[str] = []

    async def endpoint(self) -> str:
        if self._endpoint is None:
            url = await trio.to_thread.run_sync(self._catalog_endpoint)
            self._endpoint = strip_version(url)
        return self._endpoint

    def _catalog_endpoint(self) -> str:
        url = self._session.get_endpoint(
            service_type="image", interface=self._interface, region_name=self._region_name
        )
        if not url:
            raise AuthError(
                f"no image endpoint in the service catalog (interface {self._interface}, "
                f"region {self._region_name or 'any'})"
            )
        return str(url)

    async def headers(self) -> dict[str, str]:
        headers: dict[str, str] = await trio.to_thread.run_sync(self._session.get_auth_headers)
        token = headers.get("X-Auth-Token")
        if token and token not in self._known_tokens:
            self._known_tokens = [*self._known_tokens[-7:], token]
        return dict(headers)

    async def invalidate(self) -> bool:
        return bool(await trio.to_thread.run_sync(self._session.invalidate))

    def secrets(self) -> list[str]:
        return list(self._known_tokens)
