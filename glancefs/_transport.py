"""glancefs's own httpx transport: HTTP/1.1 connections that read the socket 1 MiB at a time.

httpcore's HTTP/1.1 connection reads 64 KiB per socket read (its class attribute
``READ_NUM_BYTES``), and that, not the network, caps a download through h11 at about a third of
what the socket delivers (measured: 500-700 MB/s against 1.5 GB/s with 1 MiB reads). Setting the
class attribute would change every httpx client in the process; here each connection of
glancefs's pool gets the bigger size on its own instance, and nobody else's does.

Pitfalls: this leans on three httpcore internals, pinned in pyproject.toml and checked by
tests/unit/test_transport.py, which fails loudly when one moves: ``AsyncHTTP11Connection.
READ_NUM_BYTES`` (read through ``self`` on every socket read), ``AsyncHTTPConnection._connection``
(the protocol connection it creates on its first request), and httpx's ``AsyncHTTPTransport._pool``.
:mod:`glancefs._images` also reads the ``network_stream`` response extension (httpcore's public
extension) to go around h11 for large bodies.
"""

from __future__ import annotations

import ssl

import httpcore
import httpx

__all__ = ["READ_SIZE", "Transport"]

#: Bytes asked of the socket per read by glancefs's HTTP/1.1 connections.
READ_SIZE = 1024 * 1024


class Transport(httpx.AsyncHTTPTransport):
    """httpx's transport for direct HTTP/1.1 connections (no proxy), with 1 MiB socket reads."""

    def __init__(self, *, verify: ssl.SSLContext | bool, limits: httpx.Limits) -> None:
        ssl_context = httpx.create_ssl_context(verify=verify)
        super().__init__(verify=ssl_context, limits=limits)
        # httpx built a pool of plain connections (it has opened none yet): use ours instead.
        self._pool = _Pool(
            ssl_context=ssl_context,
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
        )


class _Pool(httpcore.AsyncConnectionPool):
    def __init__(
        self,
        *,
        ssl_context: ssl.SSLContext,
        max_connections: int | None,
        max_keepalive_connections: int | None,
        keepalive_expiry: float | None,
    ) -> None:
        super().__init__(
            ssl_context=ssl_context,
            max_connections=max_connections,
            max_keepalive_connections=max_keepalive_connections,
            keepalive_expiry=keepalive_expiry,
        )
        self._connection_ssl_context = ssl_context
        self._connection_keepalive_expiry = keepalive_expiry

    def create_connection(self, origin: httpcore.Origin) -> httpcore.AsyncConnectionInterface:
        return _Connection(
            origin=origin,
            ssl_context=self._connection_ssl_context,
            keepalive_expiry=self._connection_keepalive_expiry,
        )


class _Connection(httpcore.AsyncHTTPConnection):
    """A connection whose HTTP/1.1 protocol object reads :data:`READ_SIZE` bytes at a time.

    httpcore creates that object inside the first request, so the size is set as soon as the
    request returns: before any of the body is read, but after the first read of the headers.
    """

    async def handle_async_request(self, request: httpcore.Request) -> httpcore.Response:
        response = await super().handle_async_request(request)
        protocol = self._connection
        if isinstance(protocol, httpcore.AsyncHTTP11Connection):
            protocol.READ_NUM_BYTES = READ_SIZE
        return response
