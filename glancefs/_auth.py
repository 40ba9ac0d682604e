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

import contextlib
import logging
from collections.abc import Iterable, Iterator
from typing import Any, Protocol

import trio

from ._exceptions import AuthError, connect_error, redact

__all__ = ["Auth", "SessionAuth", "TokenAuth"]

log = logging.getLogger("glancefs.auth")


class Auth(Protocol):
    """What the client needs from an authentication source."""

    async def endpoint(self) -> str:
        """The image service's base URL (unversioned, without ``/v2``)."""
        ...

    async def headers(self) -> dict[str, str]:
        """Headers that authenticate one request (may renew the token first)."""
        ...

    async def invalidate(self, token: str | None = None) -> bool:
        """Forget ``token`` after Glance refused it (401); True when a retry may now succeed.

        When a newer token than ``token`` is already in use (another request re-authenticated
        meanwhile), nothing is forgotten: a burst of 401s costs one re-authentication.
        """
        ...

    def secrets(self) -> list[str]:
        """Values that must never appear in a log line (tokens, passwords)."""
        ...

    async def roles(self) -> frozenset[str] | None:
        """The role names the token carries in its project; None when unknown."""
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

    async def invalidate(self, token: str | None = None) -> bool:
        return False

    def secrets(self) -> list[str]:
        return [self._token] if self._token else []

    async def roles(self) -> frozenset[str] | None:
        return None  # a bare token says nothing about itself


class SessionAuth:
    """Endpoint and tokens from a keystoneauth1 ``Session`` (clouds.yaml, ``OS_*`` variables).

    ``interface`` and ``region_name`` choose the catalog entry; ``endpoint_override`` skips the
    catalog (``--os-image-url`` with Keystone credentials). ``secrets`` are further values to keep
    out of logs (the password the session authenticates with).

    keystoneauth1 renews a token that expires within 120 s whenever headers are asked for, so a
    mount stays authenticated for as long as its credentials are valid. Its errors (Keystone
    unreachable, credentials refused, a certificate problem) become :class:`AuthError` or
    :class:`~glancefs.ConnectError` with one clean line.
    """

    def __init__(
        self,
        session: Any,
        *,
        interface: str | list[str] = "public",
        region_name: str | None = None,
        endpoint_override: str | None = None,
        secrets: Iterable[str] = (),
    ) -> None:
        self._session = session
        self._interface = interface
        self._region_name = region_name
        self._endpoint = strip_version(endpoint_override) if endpoint_override else None
        self._known_tokens: list[str] = []
        self._secrets = [s for s in secrets if s]
        self._current: str | None = None
        self._renewing = trio.Lock()

    async def endpoint(self) -> str:
        if self._endpoint is None:
            url = await trio.to_thread.run_sync(self._catalog_endpoint)
            self._endpoint = strip_version(url)
        return self._endpoint

    def _catalog_endpoint(self) -> str:
        with _keystone_errors(self.secrets()):
            url = self._session.get_endpoint(
                service_type="image", interface=self._interface, region_name=self._region_name
            )
        if not url:
            interface = self._interface
            if not isinstance(interface, str):
                interface = ",".join(interface)
            raise AuthError(
                f"no image endpoint in the service catalog (interface {interface}, "
                f"region {self._region_name or 'any'})"
            )
        return str(url)

    async def headers(self) -> dict[str, str]:
        return await trio.to_thread.run_sync(self._headers)

    def _headers(self) -> dict[str, str]:
        """In a worker thread: the current token, fetching a new one when needed."""
        with _keystone_errors(self.secrets()):
            headers = dict(self._session.get_auth_headers() or {})
        token = headers.get("X-Auth-Token")
        if token and token not in self._known_tokens:
            self._known_tokens = [*self._known_tokens[-7:], token]
            self._log_new_token()
        if token:
            self._current = token
        return headers

    def _log_new_token(self) -> None:
        try:
            access = self._session.auth.get_access(self._session)
            who = f"user {access.username or access.user_id}"
            if access.project_name or access.project_id:
                who += f", project {access.project_name or access.project_id}"
            expires = access.expires.isoformat(timespec="seconds") if access.expires else "never"
        except Exception:  # only for the log line: never let it fail a request
            who, expires = "?", "?"
        log.info("authenticated with Keystone (%s); token expires %s", who, expires)

    async def invalidate(self, token: str | None = None) -> bool:
        async with self._renewing:
            if token is not None and self._current is not None and token != self._current:
                return True  # a concurrent request already got a new token
            if not await trio.to_thread.run_sync(self._session.invalidate):
                return False
            await self.headers()  # under the lock: concurrent 401s see the new token
            return True

    def secrets(self) -> list[str]:
        return [*self._secrets, *self._known_tokens]

    async def roles(self) -> frozenset[str] | None:
        return await trio.to_thread.run_sync(self._roles)

    def _roles(self) -> frozenset[str] | None:
        """In a worker thread: the role names of the current token (authenticating if needed)."""
        auth = self._session.auth
        if auth is None or not hasattr(auth, "get_access"):
            return None  # a plugin that is not a Keystone identity (a fixed token endpoint)
        with _keystone_errors(self.secrets()):
            names = auth.get_access(self._session).role_names
        return frozenset(names) if names else None

    async def project(self) -> str | None:
        """``name (id)`` of the project the token is scoped to; None when unknown."""
        return await trio.to_thread.run_sync(self._project)

    def _project(self) -> str | None:
        auth = self._session.auth
        if auth is None or not hasattr(auth, "get_access"):
            return None
        with _keystone_errors(self.secrets()):
            access = auth.get_access(self._session)
        if not access.project_id:
            return None
        return f"{access.project_name} ({access.project_id})"


@contextlib.contextmanager
def _keystone_errors(secrets: list[str]) -> Iterator[None]:
    """Turn keystoneauth1's exceptions into glancefs's, with one clean line and no secret."""
    from keystoneauth1 import exceptions as ks

    try:
        yield
    except ks.ConnectionError as error:  # refused, timed out, DNS, TLS...
        # keystoneauth1's text is "Unable to establish connection to URL: <requests' long story>":
        # its head, then the innermost reason.
        head = str(error).partition(": ")[0]
        raise connect_error(f"Keystone: {head}", error, secrets) from None
    except ks.Unauthorized:
        raise AuthError("Keystone refused the credentials (401)") from None
    except ks.EndpointNotFound as error:
        raise AuthError(redact(f"service catalog: {error}", secrets)) from None
    except ks.ClientException as error:
        raise AuthError(redact(f"Keystone: {error}", secrets)) from None
