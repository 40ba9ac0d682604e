"""The fault proxy (lab.faults) in front of the session's real Glance, with plain HTTP clients.

Each fault is checked for exactly what its docstring promises, from the client's side (what
bytes arrive, how the connection ends) and from Glance's (what it holds afterwards).
"""

from __future__ import annotations

import hashlib
import os
import random
import socket
import threading
import time
import urllib.parse
from collections.abc import Iterator

import httpx
import pytest
from support import GlanceAPI

from lab.faults import IMAGE_DATA, LATER_PAGES, DataGet, FaultProxy
from lab.servers import GlanceServer, free_port

MIB = 1024 * 1024


@pytest.fixture
def proxy(glance: GlanceServer) -> Iterator[FaultProxy]:
    with FaultProxy(glance.url, max_wait=10) as p:
        yield p


@pytest.fixture(scope="module")
def image(api: GlanceAPI) -> tuple[str, bytes]:
    """A 4 MiB raw image uploaded straight to Glance (not through any proxy)."""
    data = random.Random(1).randbytes(4 * MIB)
    return api.create("faults", data)["id"], data


@pytest.fixture
def client(proxy: FaultProxy) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=proxy.url, timeout=30) as c:
        yield c


def raw_get(url: str, target: str) -> tuple[bytes, bytes, str]:
    """One GET on a fresh socket: the head, the body bytes, and how the connection ended."""
    parts = urllib.parse.urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=30) as sock:
        sock.sendall(f"GET {target} HTTP/1.1\r\nHost: {parts.netloc}\r\n\r\n".encode())
        received = bytearray()
        try:
            while chunk := sock.recv(MIB):
                received += chunk
            end = "eof"
        except ConnectionResetError:
            end = "reset"
    head, _, body = bytes(received).partition(b"\r\n\r\n")
    return head, body, end


def chunked(data: bytes, size: int = 256 * 1024) -> Iterator[bytes]:
    """The data as an iterator, so httpx sends it with Transfer-Encoding: chunked."""
    for start in range(0, len(data), size):
        yield data[start : start + size]


def wait_status(api: GlanceAPI, image_id: str, status: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while (current := api.get(image_id)["status"]) != status:
        assert time.monotonic() < deadline, f"image {image_id} still {current}"
        time.sleep(0.1)


# -- plain forwarding and counting ---------------------------------------------------------------


def test_forwards_unchanged_on_one_kept_alive_connection(
    proxy: FaultProxy, client: httpx.Client, image: tuple[str, bytes]
) -> None:
    image_id, data = image
    peers = set()
    for _ in range(3):
        r = client.get(f"/v2/images/{image_id}/file", headers={"Range": "bytes=1000-1999"})
        assert r.status_code == 206
        assert r.headers["Content-Range"] == f"bytes 1000-1999/{len(data)}"
        assert r.content == data[1000:2000]
        peers.add(r.extensions["network_stream"].get_extra_info("client_addr"))
    assert client.get(f"/v2/images/{image_id}/file").content == data
    assert len(peers) == 1  # keep-alive: every request on the same client connection
    assert client.get(f"/v2/images/{image_id}").json()["id"] == image_id


def test_counts_requests_and_data_gets(
    proxy: FaultProxy, client: httpx.Client, image: tuple[str, bytes]
) -> None:
    image_id, _ = image
    client.get(f"/v2/images/{image_id}")
    client.get(f"/v2/images/{image_id}/file")
    client.get(f"/v2/images/{image_id}/file", headers={"Range": "bytes=0-9"})
    client.get("/v2/images", params={"limit": 1})
    assert proxy.counts() == {
        ("GET", f"/v2/images/{image_id}"): 1,
        ("GET", f"/v2/images/{image_id}/file"): 2,
        ("GET", "/v2/images"): 1,
    }
    assert proxy.count("GET", IMAGE_DATA) == 2
    assert proxy.count() == 4
    assert proxy.data_gets(image_id) == [DataGet(image_id, None), DataGet(image_id, "bytes=0-9")]
    assert proxy.data_gets("another") == []
    proxy.reset_counts()
    assert proxy.count() == 0
    assert proxy.data_gets() == []
    assert proxy.counts() == {}


def test_uploads_chunked_and_with_content_length(
    proxy: FaultProxy, client: httpx.Client, api: GlanceAPI
) -> None:
    data = random.Random(2).randbytes(3 * MIB + 17)
    for body in (chunked(data), data):
        image_id = api.create("upload-through-proxy")["id"]
        r = client.put(
            f"/v2/images/{image_id}/file",
            content=body,
            headers={"Content-Type": "application/octet-stream"},
        )
        assert r.status_code == 204, r.text
        image = api.get(image_id)
        assert image["status"] == "active"
        assert image["size"] == len(data)
        assert image["checksum"] == hashlib.md5(data).hexdigest()
    assert proxy.count("PUT", IMAGE_DATA) == 2
    chunked_put, sized_put = proxy.requests("PUT", IMAGE_DATA)
    assert chunked_put.header("Transfer-Encoding") == "chunked"
    assert chunked_put.header("Content-Length") is None
    assert sized_put.header("content-length") == str(len(data))  # any case
    proxy.reset_counts()
    assert proxy.requests() == []


def timed_get(port: int, image_id: str) -> tuple[bytes, int, bytes, float]:
    """GET an image's data on a raw socket: head, body length, body sha256, seconds taken."""
    digest = hashlib.sha256()
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(f"GET /v2/images/{image_id}/file HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            head += sock.recv(4096)
        head, _, first = head.partition(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        digest.update(first)
        received = len(first)
        buffer = bytearray(MIB)
        while received < length and (n := sock.recv_into(buffer)):
            digest.update(memoryview(buffer)[:n])
            received += n
    return head, received, digest.digest(), time.monotonic() - started


def test_256_mib_pass_through_byte_exact(
    proxy: FaultProxy, api: GlanceAPI, glance: GlanceServer
) -> None:
    data = os.urandom(256 * MIB)
    image_id = api.create("big", data)["id"]
    try:
        head, received, digest, elapsed = timed_get(proxy.port, image_id)
        *_, direct = timed_get(glance.port, image_id)
        print(
            f"\n256 MiB GET through the fault proxy: {len(data) / elapsed / 1e6:.0f} MB/s "
            f"({elapsed:.2f} s; straight from Glance {len(data) / direct / 1e6:.0f} MB/s)"
        )
        assert head.startswith(b"HTTP/1.1 200 ")
        assert received == len(data)
        assert digest == hashlib.sha256(data).digest()
    finally:
        api.delete(image_id)


# -- the faults ----------------------------------------------------------------------------------


def test_fail_answers_a_glance_like_error_then_passes(
    proxy: FaultProxy, client: httpx.Client, image: tuple[str, bytes], glance: GlanceServer
) -> None:
    image_id, data = image
    rule = proxy.fail(method="GET", path=IMAGE_DATA, times=1, headers=[("Retry-After", "1")])
    r = client.get(f"/v2/images/{image_id}/file")
    assert r.status_code == 503
    assert "<h1>503 Service Unavailable</h1>" in r.text
    assert r.headers["Retry-After"] == "1"
    assert r.headers["X-Openstack-Request-Id"]
    assert client.get(f"/v2/images/{image_id}/file").content == data  # times=1: next one passes
    assert rule.fired == 1
    assert proxy.count("GET", IMAGE_DATA) == 2  # the failed one was counted too

    proxy.fail(500, method="GET")
    r = client.get("/v2/images/no-such-image", headers={"Accept": "application/json"})
    real = httpx.get(f"{glance.url}/v2/images/x", headers={"Accept": "application/json"})
    assert r.status_code == 500
    assert set(r.json()) == set(real.json()) == {"message", "code", "title"}
    assert r.json()["code"] == "500 Internal Server Error"


def test_fail_drains_an_upload_and_keeps_the_connection(
    proxy: FaultProxy, client: httpx.Client, api: GlanceAPI
) -> None:
    image_id = api.create("refused")["id"]
    proxy.fail(method="PUT", times=1)
    headers = {"Content-Type": "application/octet-stream"}
    r = client.put(f"/v2/images/{image_id}/file", content=chunked(b"x" * MIB), headers=headers)
    assert r.status_code == 503
    assert api.get(image_id)["status"] == "queued"  # Glance never saw it
    assert client.get(f"/v2/images/{image_id}").status_code == 200


def test_reset_after_n_body_bytes(
    proxy: FaultProxy, image: tuple[str, bytes], client: httpx.Client
) -> None:
    image_id, data = image
    proxy.reset_after(100_000, method="GET", path=IMAGE_DATA, times=1)
    head, body, end = raw_get(proxy.url, f"/v2/images/{image_id}/file")
    assert head.startswith(b"HTTP/1.1 200 ")
    assert f"Content-Length: {len(data)}".encode() in head
    assert (body, end) == (data[:100_000], "reset")
    proxy.reset_after(10, method="GET", path=IMAGE_DATA, times=1)
    with pytest.raises(httpx.ReadError):
        client.get(f"/v2/images/{image_id}/file")


def test_truncate_after_n_body_bytes(proxy: FaultProxy, image: tuple[str, bytes]) -> None:
    image_id, data = image
    proxy.truncate_after(123_456, method="GET", path=IMAGE_DATA, times=1)
    head, body, end = raw_get(proxy.url, f"/v2/images/{image_id}/file")
    assert f"Content-Length: {len(data)}".encode() in head
    assert (body, end) == (data[:123_456], "eof")
    proxy.truncate_after(0, method="GET", path=IMAGE_DATA, times=1)
    with pytest.raises(httpx.RemoteProtocolError):
        httpx.get(f"{proxy.url}/v2/images/{image_id}/file")


def test_flip_byte_at_an_offset_of_a_range(
    proxy: FaultProxy, client: httpx.Client, image: tuple[str, bytes]
) -> None:
    image_id, data = image
    proxy.flip_byte(10, method="GET", path=IMAGE_DATA, times=1)
    r = client.get(f"/v2/images/{image_id}/file", headers={"Range": "bytes=2000000-2999999"})
    expected = bytearray(data[2_000_000:3_000_000])
    expected[10] ^= 0xFF
    assert r.content == expected
    (flip,) = proxy.flips
    assert (flip.image_id, flip.body_offset, flip.image_offset) == (image_id, 10, 2_000_010)
    assert (flip.old, flip.new) == (data[2_000_010], data[2_000_010] ^ 0xFF)


def test_flip_byte_at_a_random_offset_is_reproducible(
    glance: GlanceServer, image: tuple[str, bytes]
) -> None:
    image_id, data = image
    offsets = []
    for _ in range(2):
        with FaultProxy(glance.url, seed=42) as proxy:
            proxy.flip_byte(method="GET", path=IMAGE_DATA)
            body = httpx.get(f"{proxy.url}/v2/images/{image_id}/file").content
            (flip,) = proxy.flips
        assert [i for i in range(0, len(data), MIB) if body[i : i + MIB] != data[i : i + MIB]]
        assert body[flip.body_offset] == data[flip.body_offset] ^ 0xFF
        assert body[: flip.body_offset] + body[flip.body_offset + 1 :] == (
            data[: flip.body_offset] + data[flip.body_offset + 1 :]
        )
        offsets.append(flip.image_offset)
    assert offsets[0] == offsets[1] == random.Random(42).randrange(len(data))


def test_delay(proxy: FaultProxy, client: httpx.Client) -> None:
    rule = proxy.delay(1.0, path="^/versions", times=1)
    started = time.monotonic()
    assert client.get("/versions").status_code == 200
    assert time.monotonic() - started >= 1.0
    assert rule.fired == 1


def test_hang_until_the_bound_then_close(proxy: FaultProxy, client: httpx.Client) -> None:
    proxy.hang(0.5, path="^/versions", times=1)
    started = time.monotonic()
    with pytest.raises(httpx.RemoteProtocolError):  # closed without any answer
        client.get("/versions")
    assert time.monotonic() - started >= 0.5
    assert client.get("/versions").status_code == 200


def test_hang_ends_on_release_and_on_stop(glance: GlanceServer) -> None:
    errors: list[BaseException] = []

    def get(url: str) -> None:
        try:
            httpx.get(f"{url}/versions", timeout=30)
        except httpx.HTTPError as e:
            errors.append(e)

    for end in ("release", "stop"):
        with FaultProxy(glance.url, max_wait=30) as proxy:
            rule = proxy.hang(path="^/versions")
            thread = threading.Thread(target=get, args=(proxy.url,))
            thread.start()
            assert rule.wait_holding()
            started = time.monotonic()
            if end == "release":
                rule.release()
            else:
                proxy.stop()
            thread.join(10)
            assert not thread.is_alive()
            assert time.monotonic() - started < 5
    assert len(errors) == 2


def test_reset_upload_after_n_bytes(
    proxy: FaultProxy, client: httpx.Client, api: GlanceAPI
) -> None:
    data = random.Random(4).randbytes(8 * MIB)
    image_id = api.create("cut-upload")["id"]
    proxy.reset_upload_after(MIB, method="PUT", path=IMAGE_DATA, times=1)
    headers = {"Content-Type": "application/octet-stream"}
    with pytest.raises(httpx.TransportError):
        client.put(f"/v2/images/{image_id}/file", content=chunked(data), headers=headers)
    wait_status(api, image_id, "queued")  # Glance saw the upload cut and dropped it
    r = client.put(f"/v2/images/{image_id}/file", content=chunked(data), headers=headers)
    assert r.status_code == 204
    assert api.get(image_id)["checksum"] == hashlib.md5(data).hexdigest()


def test_hold_later_pages_until_released(
    proxy: FaultProxy, client: httpx.Client, image: tuple[str, bytes]
) -> None:
    image_id, _ = image
    rule = proxy.hold(method="GET", path=LATER_PAGES)
    assert client.get("/v2/images", params={"limit": 1}).status_code == 200  # not held
    answers: list[int] = []
    thread = threading.Thread(
        target=lambda: answers.append(
            httpx.get(f"{proxy.url}/v2/images", params={"marker": image_id}).status_code
        )
    )
    thread.start()
    assert rule.wait_holding()
    assert rule.holding
    assert not answers
    rule.release()
    thread.join(10)
    assert answers == [200]
    assert not rule.holding
    assert client.get("/v2/images", params={"marker": image_id}).status_code == 200  # released


# -- choosing requests ---------------------------------------------------------------------------


def test_probability_is_reproducible_with_a_seed(proxy: FaultProxy, client: httpx.Client) -> None:
    proxy.fail(path="^/versions$", probability=0.3, seed=5)
    statuses = [client.get("/versions").status_code for _ in range(40)]
    rng = random.Random(5)
    assert statuses == [503 if rng.random() < 0.3 else 200 for _ in range(40)]


def test_rules_change_while_running(
    proxy: FaultProxy, client: httpx.Client, image: tuple[str, bytes]
) -> None:
    image_id, data = image
    first = proxy.fail(502, where=lambda request: request.image_id == image_id)
    proxy.fail(504)
    assert client.get(f"/v2/images/{image_id}/file").status_code == 502  # first rule wins
    assert client.get("/versions").status_code == 504
    first.remove()
    assert client.get(f"/v2/images/{image_id}/file").status_code == 504
    proxy.clear()
    assert proxy.rules == []
    assert client.get(f"/v2/images/{image_id}/file").content == data


def test_upstream_down_is_a_bad_gateway() -> None:
    with FaultProxy(f"http://127.0.0.1:{free_port()}") as proxy:
        r = httpx.get(f"{proxy.url}/versions")
        assert r.status_code == 502
        assert proxy.count() == 1


def test_stop_ends_every_thread(glance: GlanceServer) -> None:
    with FaultProxy(glance.url) as proxy:
        idle = socket.create_connection(("127.0.0.1", proxy.port))  # a kept-alive client
        rule = proxy.hold()
        thread = threading.Thread(target=lambda: raw_get(proxy.url, "/versions"))
        thread.start()
        assert rule.wait_holding()
    thread.join(10)
    idle.close()
    assert not [t for t in threading.enumerate() if t.name.startswith("faultproxy")]
