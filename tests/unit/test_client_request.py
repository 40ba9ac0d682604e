"""Client.request on httpx.MockTransport: retries, re-authentication, typed errors, timeouts.

Every test hands the client a transport (``Client(transport=...)``) that answers from a script
and records what it was sent; nothing listens on a socket. A test that makes the client retry
runs on trio's autojump clock (the ``autojump_clock`` fixture), so that the backoff between
attempts (0.25 s, 0.5 s, ...) passes at once.
"""

from __future__ import annotations

import json as jsonlib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from trio.testing import MockClock

import glancefs
from glancefs.fs.glance import Glance

ENDPOINT = "http://glance.test:9292"
IMAGE_ID = "6f0c8b8e-4f6d-4c2b-9e0f-3a1d2b3c4d5e"
REQUEST_ID = "req-00000000-0000-0000-0000-000000000001"

Answer = Callable[[httpx.Request], httpx.Response]


def status(code: int, body: Any = None) -> Answer:
    """An answer with ``code``, ``body`` as JSON (an image record by default) and a request id."""

    def answer(request: httpx.Request) -> httpx.Response:
        record = {"id": IMAGE_ID, "name": "x", "status": "queued"} if body is None else body
        return httpx.Response(code, json=record, headers={"x-openstack-request-id": REQUEST_ID})

    return answer


class Body(httpx.AsyncByteStream):
    """A response body that is streamed (one made from bytes counts as read already)."""

    def __init__(self, data: bytes) -> None:
        self._data = data

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield self._data


def data(request: httpx.Request) -> httpx.Response:
    """Image data, as Glance answers a download."""
    return httpx.Response(200, headers={"Content-Length": "4"}, stream=Body(b"data"))


def broken(request: httpx.Request) -> httpx.Response:
    """No answer: the connection broke."""
    raise httpx.ReadError("connection reset by peer", request=request)


def hanging(request: httpx.Request) -> httpx.Response:
    """No answer in time."""
    raise httpx.ReadTimeout("timed out", request=request)


class Script:
    """The transport's side: the answers to give in order (the last one repeats), and the
    requests it got."""

    def __init__(self, *answers: Answer) -> None:
        self.answers = list(answers)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return self.answers[min(len(self.requests), len(self.answers)) - 1](request)

    @property
    def sent(self) -> list[str]:
        return [f"{r.method} {r.url.path}" for r in self.requests]


@asynccontextmanager
async def client(script: Script, **options: Any) -> AsyncIterator[glancefs.Client]:
    options.setdefault("token", "token-1")
    async with glancefs.Client(
        endpoint=ENDPOINT, transport=httpx.MockTransport(script), **options
    ) as glance:
        yield glance


async def chunks(*pieces: bytes) -> AsyncIterator[bytes]:
    for piece in pieces:
        yield piece


class RenewingAuth:
    """An auth whose token Glance may refuse once: ``invalidate`` fetches the next one."""

    def __init__(self) -> None:
        self.token = "old-token"
        self.invalidated: list[str | None] = []

    async def endpoint(self) -> str:
        return ENDPOINT

    async def headers(self) -> dict[str, str]:
        return {"X-Auth-Token": self.token}

    async def invalidate(self, token: str | None = None) -> bool:
        self.invalidated.append(token)
        self.token = "new-token"
        return True

    def secrets(self) -> list[str]:
        return ["old-token", "new-token"]

    async def roles(self) -> frozenset[str] | None:
        return None


async def test_the_client_is_what_the_filesystem_needs_of_glance() -> None:
    async with client(Script(status(200))) as glance:
        needs: Glance = glance  # mypy checks the protocol here
        assert needs.retries == 3


# -- retries ---------------------------------------------------------------------------------------

IDEMPOTENT_CALLS: dict[str, Callable[[glancefs.Client], Awaitable[object]]] = {
    "GET": lambda glance: glance.images.get(IMAGE_ID),
    "DELETE": lambda glance: glance.images.delete(IMAGE_ID),
    "PUT": lambda glance: glance.images.upload(IMAGE_ID, b"replayable"),
}


@pytest.mark.parametrize("method", IDEMPOTENT_CALLS)
async def test_an_idempotent_request_is_retried_after_a_broken_connection(
    method: str, autojump_clock: MockClock
) -> None:
    script = Script(broken, broken, status(200))
    events: list[glancefs.RequestEvent] = []
    async with client(script, retries=2, on_request=events.append) as glance:
        await IDEMPOTENT_CALLS[method](glance)
    assert [r.method for r in script.requests] == [method] * 3
    assert [(e.status, e.attempt) for e in events] == [(None, 1), (None, 2), (200, 3)]
    assert events[0].reason is not None
    assert "connection reset by peer" in events[0].reason


@pytest.mark.parametrize("code", [502, 503, 504])
async def test_an_idempotent_request_is_retried_after_a_gateway_error(
    code: int, autojump_clock: MockClock
) -> None:
    script = Script(status(code, {"message": "try later"}), status(200))
    async with client(script) as glance:
        image = await glance.images.get(IMAGE_ID)
    assert image.id == IMAGE_ID
    assert script.sent == [f"GET /v2/images/{IMAGE_ID}"] * 2


async def test_retries_end_with_the_last_failure(autojump_clock: MockClock) -> None:
    script = Script(status(503, {"message": "try later"}))
    async with client(script, retries=2) as glance:
        with pytest.raises(glancefs.ServiceUnavailable) as unavailable:
            await glance.images.get(IMAGE_ID)
        assert len(script.requests) == 3
        assert str(unavailable.value) == f"503 try later (request {REQUEST_ID})"

        script.answers, script.requests = [broken], []
        with pytest.raises(glancefs.ConnectError) as refused:
            await glance.request("GET", "/v2/images", retries=1)  # the request's own count
        assert len(script.requests) == 2
        assert str(refused.value) == "GET /v2/images: connection reset by peer"


async def test_an_internal_server_error_is_not_retried() -> None:
    script = Script(status(500, {"message": "boom"}), status(200))
    async with client(script) as glance:
        with pytest.raises(glancefs.ServerError) as failed:
            await glance.images.get(IMAGE_ID)
    assert failed.value.status == 500
    assert len(script.requests) == 1


NOT_REPEATABLE: dict[str, Callable[[glancefs.Client], Awaitable[object]]] = {
    "a plain POST": lambda glance: glance.request("POST", f"/v2/images/{IMAGE_ID}/import"),
    "a create with the caller's id": lambda glance: glance.images.create(id=IMAGE_ID),
    "a PATCH": lambda glance: glance.images.patch(IMAGE_ID, []),
    "a streamed upload": lambda glance: glance.images.upload(IMAGE_ID, chunks(b"a", b"b")),
}


@pytest.mark.parametrize("call", NOT_REPEATABLE)
@pytest.mark.parametrize("failure", [broken, status(503, {"message": "try later"})])
async def test_a_request_that_is_not_idempotent_is_sent_once(call: str, failure: Answer) -> None:
    script = Script(failure, status(200))
    async with client(script) as glance:
        with pytest.raises((glancefs.ConnectError, glancefs.ServiceUnavailable)):
            await NOT_REPEATABLE[call](glance)
    assert len(script.requests) == 1


async def test_a_create_with_an_id_of_its_own_is_retried_with_the_same_body(
    autojump_clock: MockClock,
) -> None:
    script = Script(broken, status(503, {"message": "try later"}), status(201))
    async with client(script) as glance:
        image = await glance.images.create(name="x")
    assert script.sent == ["POST /v2/images"] * 3
    bodies = [jsonlib.loads(r.content) for r in script.requests]
    assert bodies[0] == bodies[1] == bodies[2]
    assert bodies[0]["name"] == "x"
    assert bodies[0]["id"]
    assert image.id == IMAGE_ID


async def test_a_repeated_create_whose_first_attempt_landed_returns_that_image(
    autojump_clock: MockClock,
) -> None:
    made: dict[str, Any] = {}

    def create_then_lose_the_answer(request: httpx.Request) -> httpx.Response:
        made.update(jsonlib.loads(request.content), status="queued")
        return broken(request)

    script = Script(
        create_then_lose_the_answer,
        status(409, {"message": "Image with identifier already exists"}),
        lambda request: httpx.Response(200, json=made),
    )
    async with client(script) as glance:
        image = await glance.images.create(name="x")
    assert script.sent == ["POST /v2/images", "POST /v2/images", f"GET /v2/images/{made['id']}"]
    assert image.id == made["id"]
    assert image.name == "x"


async def test_a_conflict_of_a_create_is_raised_when_no_attempt_made_the_image() -> None:
    script = Script(status(409, {"message": "name taken"}), status(404, {"message": "no such"}))
    async with client(script) as glance:
        with pytest.raises(glancefs.Conflict) as refused:
            await glance.images.create(name="x")
        assert str(refused.value).startswith("409 name taken")
        assert [r.method for r in script.requests] == ["POST", "GET"]

        script.answers, script.requests = [status(409, {"message": "taken"})], []
        with pytest.raises(glancefs.Conflict):
            await glance.images.create(id=IMAGE_ID, name="x")
        assert [r.method for r in script.requests] == ["POST"]  # the caller's id: no lookup


# -- authentication --------------------------------------------------------------------------------


def unless_new_token(request: httpx.Request) -> httpx.Response:
    if request.headers["X-Auth-Token"] == "new-token":
        return status(200)(request)
    return status(401, {"message": "The request you have made requires authentication."})(request)


async def test_a_refused_token_is_renewed_and_the_request_sent_again() -> None:
    auth = RenewingAuth()
    script = Script(unless_new_token)
    events: list[glancefs.RequestEvent] = []
    async with client(script, auth=auth, on_request=events.append) as glance:
        image = await glance.images.get(IMAGE_ID)
    assert image.id == IMAGE_ID
    assert [r.headers["X-Auth-Token"] for r in script.requests] == ["old-token", "new-token"]
    assert auth.invalidated == ["old-token"]
    assert [(e.status, e.attempt) for e in events] == [(401, 1), (200, 1)]  # not a retry


async def test_a_token_refused_again_after_renewal_is_an_authentication_error() -> None:
    auth = RenewingAuth()
    script = Script(status(401, {"error": {"message": "token not valid"}}))
    async with client(script, auth=auth, retries=3) as glance:
        with pytest.raises(glancefs.Unauthorized) as refused:
            await glance.images.get(IMAGE_ID)
    assert len(script.requests) == 2
    assert auth.invalidated == ["old-token"]  # once
    assert str(refused.value) == f"401 token not valid (request {REQUEST_ID})"
    assert "token-" not in str(refused.value)


async def test_a_fixed_token_that_is_refused_is_not_sent_again() -> None:
    script = Script(status(401, {"message": "expired"}))
    async with client(script) as glance:
        with pytest.raises(glancefs.Unauthorized):
            await glance.images.get(IMAGE_ID)
    assert len(script.requests) == 1


async def test_a_streamed_upload_checks_the_token_first_and_is_sent_once() -> None:
    auth = RenewingAuth()
    script = Script(unless_new_token)
    async with client(script, auth=auth) as glance:
        await glance.images.upload(IMAGE_ID, chunks(b"a", b"b"))
        assert script.sent == [
            "GET /v2/images",  # 401: renewed before the body is sent
            "GET /v2/images",
            f"PUT /v2/images/{IMAGE_ID}/file",
        ]
        assert script.requests[-1].headers["X-Auth-Token"] == "new-token"

        # A 401 of the upload itself: its body is gone, so it is not sent again.
        script.answers = [status(200), status(401, {"message": "expired"})]
        script.requests = []
        with pytest.raises(glancefs.Unauthorized):
            await glance.images.upload(IMAGE_ID, chunks(b"a", b"b"))
        assert [r.method for r in script.requests] == ["GET", "PUT"]


# -- typed errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "error"),
    [
        (400, glancefs.BadRequest),
        (403, glancefs.Forbidden),
        (404, glancefs.NotFound),
        (409, glancefs.Conflict),
        (413, glancefs.OverLimit),
        (415, glancefs.UnsupportedMediaType),
        (416, glancefs.RangeNotSatisfiable),
        (418, glancefs.HTTPError),
    ],
)
async def test_an_error_status_is_its_typed_error(code: int, error: type[Exception]) -> None:
    script = Script(status(code, {"message": "Glance says no"}))
    async with client(script) as glance:
        with pytest.raises(error) as refused:
            await glance.request("GET", "/v2/images")
    assert type(refused.value) is error
    assert isinstance(refused.value, glancefs.HTTPError)
    assert (refused.value.status, refused.value.request_id) == (code, REQUEST_ID)
    assert str(refused.value) == f"{code} Glance says no (request {REQUEST_ID})"
    assert len(script.requests) == 1


@pytest.mark.parametrize(
    "body",
    [
        {"error": {"message": "Glance says no", "code": 400}},  # Glance's nested form
        {"title": "Glance says no"},
        "<html><body><h1>400 Bad Request</h1>Glance says no</body></html>",
    ],
)
async def test_the_detail_of_an_error_is_one_line_of_text(body: Any) -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        if isinstance(body, str):
            return httpx.Response(400, text=body)
        return httpx.Response(400, json=body)

    async with client(Script(answer)) as glance:
        with pytest.raises(glancefs.BadRequest) as refused:
            await glance.request("GET", "/v2/images")
    assert "Glance says no" in str(refused.value)
    assert "<" not in str(refused.value)
    assert "\n" not in str(refused.value)


# -- timeouts --------------------------------------------------------------------------------------


async def test_every_call_carries_the_client_timeout() -> None:
    script = Script(status(200, {"images": []}))
    async with client(script, timeout=5.0) as glance:
        await glance.images.get(IMAGE_ID)
        await glance.images.delete(IMAGE_ID)
        await glance.images.upload(IMAGE_ID, b"data")
        [_ async for _ in glance.images.list()]
        script.answers = [data]
        assert b"".join([c async for c in glance.images.data(IMAGE_ID, verify=False)]) == b"data"
        await glance.request("GET", "/v2/images", timeout=60.0)
    timeouts = [r.extensions["timeout"] for r in script.requests]
    client_timeout = {"connect": 5.0, "read": 5.0, "write": 5.0, "pool": 5.0}
    assert timeouts[:-1] == [client_timeout] * 5
    assert timeouts[-1]["read"] == 60.0  # the request's own


async def test_the_connect_timeout_is_at_most_ten_seconds() -> None:
    script = Script(status(200))
    async with client(script) as glance:
        await glance.images.get(IMAGE_ID)
    assert script.requests[0].extensions["timeout"]["connect"] == 10.0
    assert script.requests[0].extensions["timeout"]["read"] == 30.0


async def test_no_answer_in_time_is_a_timeout_retried_only_when_idempotent(
    autojump_clock: MockClock,
) -> None:
    script = Script(hanging)
    async with client(script, retries=1) as glance:
        with pytest.raises(glancefs.Timeout) as timed_out:
            await glance.images.create(id=IMAGE_ID, name="x")
        assert str(timed_out.value) == "POST /v2/images: no answer from Glance in time"
        assert len(script.requests) == 1

        script.requests = []
        with pytest.raises(glancefs.Timeout):
            await glance.info.stores()
        assert [r.method for r in script.requests] == ["GET", "GET"]


# -- where a download's bytes are ------------------------------------------------------------------


def ranged(code: int, **headers: str) -> Answer:
    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(code, headers=headers, stream=Body(b"data"))

    return answer


@pytest.mark.parametrize(
    ("answer", "offset", "placed"),
    [
        (ranged(206, **{"Content-Range": "bytes 8-11/20"}), 8, (8, 12, 20)),
        (ranged(206, **{"Content-Range": "bytes 8-11/*"}), 8, (8, 12, None)),
        (ranged(200, **{"Content-Length": "4"}), 0, (0, 4, 4)),
        (ranged(204), 0, (0, 0, 0)),  # an image without data
        (status(416, {"message": "past the end"}), 30, (30, 30, None)),
    ],
)
async def test_a_download_is_placed_by_its_answer(
    answer: Answer, offset: int, placed: tuple[int, int, int | None]
) -> None:
    async with client(Script(answer)) as glance:
        data = await glance.images.open_data(IMAGE_ID, offset)
        async with data:
            assert (data.offset, data.end, data.image_size) == placed


async def test_a_range_the_answer_ignores_or_the_store_refuses_is_an_error() -> None:
    script = Script(ranged(200, **{"Content-Length": "4"}))  # a proxy dropped the Range header
    async with client(script) as glance:
        with pytest.raises(glancefs.GlanceError, match="ignored the requested range"):
            await glance.images.open_data(IMAGE_ID, 8)
        script.answers = [status(400, {"message": "not from this store"})]
        with pytest.raises(glancefs.RangesRefused):
            await glance.images.open_data(IMAGE_ID, 8)
        with pytest.raises(glancefs.BadRequest) as whole:
            await glance.images.open_data(IMAGE_ID)  # no range: a 400 is Glance's own
        assert type(whole.value) is glancefs.BadRequest
