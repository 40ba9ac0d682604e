"""The async Glance v2 client: one HTTP connection pool, retries, typed errors, redacted logs.

All of glancefs's HTTP goes through :meth:`Client.request`. It adds authentication, asks Glance
for JSON error bodies, retries what is safe to retry, turns error statuses into the typed errors of
:mod:`glancefs._exceptions`, and logs one curl-like line per request at DEBUG level with every
token replaced by a hash, as keystoneauth1 does.

Pitfalls:

* Only idempotent requests (GET, HEAD, PUT of a replayable body, DELETE) are retried after a
  transport failure or a 502/503/504, and a POST its caller declares safe to repeat
  (``idempotent=True``: an image create with an id of its own); a streamed upload is never sent
  twice.
* Every request holds a slot of :attr:`Client.connections` (see :mod:`glancefs._budget`) while it
  is in flight, a streamed response until it is closed: close them promptly.
* A 401 invalidates the token and retries once, when the auth source can fetch a new token and the
  body can be sent again. A streamed body cannot, so with Keystone a cheap authenticated GET goes
  first: Glance checks the token only when a request starts, and an upload may outlive it.
"""

from __future__ import annotations

import logging
import math
import os
import ssl
import time
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import certifi
import httpx
import trio

from ._auth import Auth, SessionAuth, TokenAuth
from ._budget import ConnectionBudget, RequestKind
from ._exceptions import (
    RETRY_STATUSES,
    HTTPError,
    Timeout,
    TransportError,
    Unauthorized,
    connect_error,
    error_for_status,
    redact,
    transport_reason,
)
from ._images import ImagesManager
from ._info import InfoManager
from ._members import ImageMembersManager
from ._metadefs import (
    NamespacesManager,
    ObjectsManager,
    PropertiesManager,
    ResourceTypesManager,
    TagsManager,
)
from ._schemas import SchemasManager
from ._tags import ImageTagsManager
from ._tasks import TasksManager
from ._transport import Transport

__all__ = ["Client", "RequestEvent"]

log = logging.getLogger("glancefs.http")

_IDEMPOTENT = frozenset({"GET", "HEAD", "PUT", "DELETE", "OPTIONS"})
Body = bytes | AsyncIterable[bytes] | None


@dataclass(frozen=True)
class RequestEvent:
    """One HTTP exchange with Glance, as ``Client(on_request=...)`` reports it.

    ``status`` is None when no answer came (connection refused, timeout: ``reason`` says which);
    ``attempt`` counts from 1, so an event with ``attempt > 1`` is a retry.
    """

    method: str
    path: str
    status: int | None
    attempt: int
    reason: str | None = None


def tls_context(
    verify: bool | str | ssl.SSLContext = True, cert: str | tuple[str, str | None] | None = None
) -> ssl.SSLContext | bool:
    """What httpx takes as ``verify``: ``verify`` (True, False, a CA bundle file or directory, an
    ``ssl.SSLContext``) with the client certificate ``cert`` (a file, or a ``(cert, key)`` pair)
    loaded into it.

    httpx 0.28 silently drops ``cert`` when ``verify`` is a path, so the context is built here.
    Raises OSError or ``ssl.SSLError`` for unusable files.
    """
    if isinstance(verify, ssl.SSLContext):
        context = verify
    elif verify is True and cert is None:
        return True  # httpx's own default (certifi's bundle)
    elif isinstance(verify, str):
        directory = os.path.isdir(verify)
        context = ssl.create_default_context(
            cafile=None if directory else verify, capath=verify if directory else None
        )
    else:
        context = ssl.create_default_context(cafile=certifi.where())
        if verify is False:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
    if cert is not None:
        certfile, keyfile = (cert, None) if isinstance(cert, str) else cert
        context.load_cert_chain(certfile, keyfile)
    return context


class Client:
    """An async client for the Glance v2 API on trio.

    Give it either ``endpoint`` (and ``token``, unless Glance runs without auth), a keystoneauth1
    ``session``, or any :class:`~glancefs._auth.Auth`. Use it as an async context manager, which
    closes its connection pool::

        async with glancefs.Client(endpoint="http://glance:9292", token=TOKEN) as glance:
            async for image in glance.images.list(sort="name:asc"):
                print(image.name)

    ``timeout`` bounds every wait for Glance (connect, and each read of a response); ``retries`` is
    how often an idempotent request is repeated after a transport failure or a 502/503/504.
    ``verify`` is True, False, the path of a CA bundle or an ``ssl.SSLContext``; ``cert`` a client
    certificate file or a ``(cert, key)`` pair. ``max_connections`` bounds the requests in flight
    at once, streamed responses included (:attr:`connections`); more than Glance has request
    threads only queue inside Glance. ``on_request`` is called (synchronously, on the trio
    thread: keep it cheap, never raise) with a :class:`RequestEvent` after every exchange,
    retries included, to count requests without wrapping the client. ``transport`` (an
    ``httpx.AsyncBaseTransport``, such as ``httpx.MockTransport`` in tests) replaces glancefs's
    own connection pool; ``verify`` and ``cert`` then do not apply, and ``max_connections`` only
    to the budget.
    """

    def __init__(
        self,
        endpoint: str | None = None,
        token: str | None = None,
        *,
        session: Any = None,
        auth: Auth | None = None,
        timeout: float = 30.0,
        retries: int = 3,
        verify: bool | str | ssl.SSLContext = True,
        cert: str | tuple[str, str | None] | None = None,
        max_connections: int = 8,
        on_request: Callable[[RequestEvent], None] | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.auth = auth if auth is not None else _auth_from(endpoint, token, session)
        self.timeout = timeout
        self.retries = retries
        #: The slots every request holds while in flight.
        self.connections = ConnectionBudget(max_connections)
        self._on_request = on_request or (lambda event: None)
        if transport is None:
            # Our own transport (1 MiB socket reads); with it httpx no longer reads HTTP(S)_PROXY
            # from the environment: Glance is reached directly.
            transport = Transport(
                verify=tls_context(verify, cert),
                limits=httpx.Limits(
                    max_connections=max_connections, max_keepalive_connections=max_connections
                ),
            )
        self._transport = transport
        self._http = httpx.AsyncClient(
            timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
            transport=self._transport,
            follow_redirects=False,
        )
        self.images = ImagesManager(self)
        self.image_tags = ImageTagsManager(self)
        self.image_members = ImageMembersManager(self)
        self.tasks = TasksManager(self)
        self.info = InfoManager(self)
        self.schemas = SchemasManager(self)
        self.metadefs_namespace = NamespacesManager(self)
        self.metadefs_object = ObjectsManager(self)
        self.metadefs_property = PropertiesManager(self)
        self.metadefs_tag = TagsManager(self)
        self.metadefs_resource_type = ResourceTypesManager(self)

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close every pooled connection."""
        await self._http.aclose()

    async def url(self, path: str) -> str:
        """The absolute URL of an API path such as ``/v2/images``."""
        return (await self.auth.endpoint()) + path

    async def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | list[tuple[str, Any]] | None = None,
        json: Any = None,
        content: Body = None,
        headers: Mapping[str, str] | None = None,
        stream: bool = False,
        # httpx's per-request read timeout (each wait for data), not a deadline: fail_after
        # would cut a long download that keeps delivering.
        timeout: float | None = None,  # noqa: ASYNC109
        retries: int | None = None,
        idempotent: bool = False,
    ) -> httpx.Response:
        """Send one request and return its successful (2xx) response.

        With ``stream=True`` the body is not read: the caller must ``aclose()`` the response,
        which gives its connection slot back. ``retries`` overrides the client's for this request.
        ``idempotent`` retries a POST as a GET would be: the caller knows that a second
        copy of it changes nothing the first did not (and handles the answer it then gets).
        Raises a :class:`~glancefs.GlanceError` subclass for anything else.
        """
        replayable = not isinstance(content, AsyncIterable)
        if not replayable and not isinstance(self.auth, TokenAuth):
            # A streamed body cannot be sent again after a 401, and Glance checks the token
            # only when the request starts (an upload may then outlive it): make sure the token
            # is accepted right now, re-authenticating if it is not.
            await self.request("GET", "/v2/images", params={"limit": 1})
        retry_transport = (idempotent or method in _IDEMPOTENT) and replayable
        attempts = 1 + ((self.retries if retries is None else retries) if retry_transport else 0)
        kind: RequestKind = "upload" if not replayable else "download" if stream else "short"
        return await self._send_with_retries(
            method,
            path,
            attempts,
            lambda: self._send_in_slot(
                kind,
                stream,
                lambda: self._send_once(
                    method, path, params, json, content, headers, stream, timeout
                ),
            ),
            may_reauthenticate=replayable,
        )

    async def _send_with_retries(
        self,
        method: str,
        path: str,
        attempts: int,
        send: Callable[[], Awaitable[httpx.Response]],
        *,
        may_reauthenticate: bool,
    ) -> httpx.Response:
        """The first successful response of up to ``attempts`` calls of ``send`` (one request to
        ``method path``), backing off between them; once more with a new token after a 401."""
        attempt = 0
        while True:
            attempt += 1
            try:
                response = await send()
            except TransportError as failure:
                self._on_request(RequestEvent(method, path, None, attempt, str(failure)))
                if attempt >= attempts:
                    raise
                await trio.sleep(_backoff(attempt))
                continue
            self._on_request(RequestEvent(method, path, response.status_code, attempt))
            if response.is_success:
                return response
            error = await self._error_from(response)
            if isinstance(error, Unauthorized) and may_reauthenticate:
                may_reauthenticate = False
                if await self.auth.invalidate(response.request.headers.get("X-Auth-Token")):
                    log.info("token refused (401): re-authenticating once")
                    attempt -= 1
                    continue
            if error.status in RETRY_STATUSES and attempt < attempts:
                await trio.sleep(_backoff(attempt))
                continue
            raise error

    async def _send_in_slot(
        self, kind: RequestKind, stream: bool, send: Callable[[], Awaitable[httpx.Response]]
    ) -> httpx.Response:
        """One attempt (``send``), holding a slot of the budget: until the response is read, or,
        for a streamed success, until the caller closes it."""
        await self.connections.acquire(kind)
        try:
            response = await send()
        except BaseException:
            self.connections.release(kind)
            raise
        if stream and response.is_success:
            response.stream = _SlotStream(response.stream, lambda: self.connections.release(kind))
        else:
            self.connections.release(kind)
        return response

    async def _send_once(
        self,
        method: str,
        path: str,
        params: Mapping[str, Any] | list[tuple[str, Any]] | None,
        json: Any,
        content: Body,
        headers: Mapping[str, str] | None,
        stream: bool,
        timeout: float | None,  # noqa: ASYNC109 (as in request)
    ) -> httpx.Response:
        """One exchange: its response with the body read, or with only its head when it is a
        streamed success."""
        all_headers = {"Accept": "application/json", **(headers or {})}
        all_headers.update(await self.auth.headers())
        url = path if path.startswith(("http://", "https://")) else await self.url(path)
        request = self._http.build_request(
            method,
            url,
            params=params,
            json=json,
            content=content,
            headers=all_headers,
            timeout=httpx.USE_CLIENT_DEFAULT if timeout is None else timeout,
        )
        response = await self._send_head(request)
        if not stream or not response.is_success:
            try:
                await response.aread()
            except httpx.TimeoutException as exc:
                raise Timeout(f"{method} {request.url.path}: Glance stopped answering") from exc
            except httpx.TransportError as exc:
                raise connect_error(f"{method} {request.url.path}", exc) from exc
            finally:
                await response.aclose()
        return response

    async def _send_head(self, request: httpx.Request) -> httpx.Response:
        """Send ``request`` and wait for the head of its answer; one debug line says how it went."""
        what = f"{request.method} {request.url.path}"
        started = time.monotonic()
        debug = log.isEnabledFor(logging.DEBUG)
        try:
            response = await self._http.send(request, stream=True)
        except httpx.TimeoutException as exc:
            if debug:
                log.debug("%s -> no answer in time", self._curl_line(request))
            raise Timeout(f"{what}: no answer from Glance in time") from exc
        except (httpx.TransportError, OSError) as exc:
            if debug:
                log.debug("%s -> %s", self._curl_line(request), transport_reason(exc))
            # The bare exception text of a refused connection is all the user needs.
            raise connect_error(what, exc) from exc
        if debug:
            # One line per request, written when the answer's head arrives.
            log.debug(
                "%s -> %s in %.0f ms (%s)",
                self._curl_line(request),
                response.status_code,
                (time.monotonic() - started) * 1000,
                response.headers.get("x-openstack-request-id", "-"),
            )
        return response

    def _curl_line(self, request: httpx.Request) -> str:
        parts = [f"curl -g -i -X {request.method} '{request.url}'"]
        for name in ("X-Auth-Token", "Content-Type", "Range"):
            if name in request.headers:
                parts.append(f"-H '{name}: {request.headers[name]}'")
        return redact(" ".join(parts), self.auth.secrets())

    async def _error_from(self, response: httpx.Response) -> HTTPError:
        detail = ""
        try:
            body = response.json()
        except ValueError:
            detail = response.text
        else:
            if isinstance(body, dict):
                # Glance nests its explanation differently per endpoint.
                inner = body.get("error")
                record = inner if isinstance(inner, dict) else body
                detail = str(record.get("message") or record.get("title") or "")
        if not detail:
            detail = response.reason_phrase
        detail = redact(detail, self.auth.secrets())
        return error_for_status(
            response.status_code, detail, response.headers.get("x-openstack-request-id")
        )


def _auth_from(endpoint: str | None, token: str | None, session: Any) -> Auth:
    """The auth of a client given a keystoneauth1 ``session`` (``endpoint`` overriding its
    catalog), else a fixed ``endpoint`` and ``token``."""
    if session is not None:
        return SessionAuth(session, endpoint_override=endpoint)
    if endpoint is not None:
        return TokenAuth(endpoint, token)
    raise ValueError("Client needs an endpoint, a keystoneauth1 session or an auth")


class _SlotStream(httpx.AsyncByteStream):
    """A streamed response body that gives its connection slot back when closed (once)."""

    def __init__(
        self, inner: httpx.SyncByteStream | httpx.AsyncByteStream, release: Callable[[], None]
    ) -> None:
        assert isinstance(inner, httpx.AsyncByteStream)
        self._inner = inner
        self._release: Callable[[], None] | None = release

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._inner:
            yield chunk

    async def aclose(self) -> None:
        try:
            await self._inner.aclose()
        finally:
            release, self._release = self._release, None
            if release is not None:
                release()


def _backoff(attempt: int) -> float:
    """Seconds to wait before retry number ``attempt`` (1-based): 0.25, 0.5, 1, 2, 2, ..."""
    return min(0.25 * math.pow(2, attempt - 1), 2.0)
