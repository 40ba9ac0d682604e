"""glancefs's transport leans on httpcore and httpx internals (glancefs._transport): these tests
fail loudly, naming the internal, when an upgrade moves one. A tiny HTTP/1.1 server on loopback
stands in for Glance: what is checked is the connection objects, not Glance's answers.
"""

from __future__ import annotations

import contextlib
import functools

import httpcore
import httpx
import pytest
import trio

import glancefs
from glancefs._transport import READ_SIZE, Transport

HTTPCORE_DEFAULT_READ = 64 * 1024
BODY = b"x" * (5 * 1024 * 1024)  # above _images._DIRECT_READ_MIN: the read goes around h11


async def _answer(stream: trio.SocketStream) -> None:
    """Answer every request on the connection with BODY (keep-alive) until the client hangs up."""
    with contextlib.suppress(trio.BrokenResourceError):
        await _answer_until_closed(stream)


async def _answer_until_closed(stream: trio.SocketStream) -> None:
    received = b""
    async with stream:
        while True:
            while b"\r\n\r\n" not in received:
                data = await stream.receive_some()
                if not data:
                    return
                received += data
            received = received.split(b"\r\n\r\n", 1)[1]
            head = f"HTTP/1.1 200 OK\r\nContent-Length: {len(BODY)}\r\n\r\n".encode()
            await stream.send_all(head + BODY)


@pytest.fixture
async def server_url(nursery: trio.Nursery) -> str:
    listeners = await nursery.start(functools.partial(trio.serve_tcp, _answer, 0, host="127.0.0.1"))
    port = listeners[0].socket.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def test_the_internals_the_transport_sets_are_where_it_expects() -> None:
    assert httpcore.AsyncHTTP11Connection.READ_NUM_BYTES == HTTPCORE_DEFAULT_READ, (
        "httpcore no longer reads 64 KiB via AsyncHTTP11Connection.READ_NUM_BYTES, or something "
        "patched it globally: revisit glancefs/_transport.py"
    )
    transport = Transport(verify=True, limits=httpx.Limits())
    assert isinstance(vars(transport).get("_pool"), httpcore.AsyncConnectionPool), (
        "httpx.AsyncHTTPTransport no longer keeps its pool in _pool: revisit glancefs/_transport.py"
    )
    connection = httpcore.AsyncHTTPConnection(httpcore.Origin(b"http", b"127.0.0.1", 80))
    assert "_connection" in vars(connection), (
        "httpcore.AsyncHTTPConnection no longer keeps its protocol object in _connection: "
        "revisit glancefs/_transport.py"
    )


async def test_glancefs_connections_read_1_mib_and_other_clients_keep_the_default(
    server_url: str,
) -> None:
    async with glancefs.Client(endpoint=server_url) as glance:
        async with await glance.images.open_data("some-id") as data:
            chunks = [chunk async for chunk in data.chunks()]
        assert b"".join(chunks) == BODY
        # The download went around h11, on the stream httpcore exposes as an extension.
        response = await glance.request("GET", "/v2/images/some-id/file", stream=True)
        assert "network_stream" in response.extensions, "httpcore dropped 'network_stream'"
        assert isinstance(glance._transport, Transport), "the client's default transport"
        protocols = [
            vars(connection)["_connection"] for connection in glance._transport._pool.connections
        ]
        await response.aclose()
    assert protocols, "glancefs's pool made no connection: its create_connection is not called"
    assert all(isinstance(p, httpcore.AsyncHTTP11Connection) for p in protocols)
    assert {p.READ_NUM_BYTES for p in protocols} == {READ_SIZE}

    async with httpx.AsyncClient() as other:
        assert (await other.get(server_url)).content == BODY
    assert httpcore.AsyncHTTP11Connection.READ_NUM_BYTES == HTTPCORE_DEFAULT_READ
