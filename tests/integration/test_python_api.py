"""The Python API (glancefs.Client) against a real Glance, every call, in the fakeauth flavor.

The fakeauth flavor makes Glance see a project-scoped admin (project ``glancefs-test``), so owner is
set and tasks, import, metadefs and members work; a second client sends its own ``X-Project-Id``
and ``X-Roles`` to act as another, non-admin project. This module's Glance also has:

* a second file store ``fs2`` (copy-image, ``delete_from_store``, ``info.stores``);
* ``image_size_cap`` = 64 KiB, so that a 413 costs only a small upload, and a tag quota of 8;
* import filtering that lets Glance fetch from a tiny HTTP server of the test (web-download and the
  legacy import task), which Glance refuses by default (loopback, port not 80/443).
"""

from __future__ import annotations

import ast
import copy
import io
import pickle
import random
import re
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.lowlevel

import glancefs
from lab.servers import GlanceServer, free_port

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "python-api.md"
SIZE_CAP = 64 * 1024
TAG_QUOTA = 8
OTHER_PROJECT = "glancefs-other"
REQUEST_ID = re.compile(r"req-[0-9a-f-]{36}")


# -- servers -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def web(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """An HTTP server on loopback serving a directory: write files into it to publish them.

    A process of its own (``python -m http.server``), so that nothing in the test process can
    keep it from answering Glance's web-download.
    """
    root = tmp_path_factory.mktemp("web")
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", "--directory", str(root),
         str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                break
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise
            time.sleep(0.05)
    yield url, root
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, web: tuple[str, dict[str, bytes]]
) -> Iterator[GlanceServer]:
    workdir = tmp_path_factory.mktemp("g")
    port = web[0].rsplit(":", 1)[1]
    overrides = {
        "DEFAULT": {
            "image_size_cap": str(SIZE_CAP),
            "image_tag_quota": str(TAG_QUOTA),
            "enabled_backends": "fs:file,fs2:file",
        },
        "fs2": {"filesystem_store_datadir": f"{workdir}/data/fs2/"},
        "import_filtering_opts": {"allowed_hosts": "[127.0.0.1]", "allowed_ports": f"[{port}]"},
    }
    with GlanceServer(workdir, flavor="fakeauth", conf_overrides=overrides) as glance_server:
        yield glance_server


class ProjectAuth:
    """A glancefs.Auth acting as another project: fakeauth trusts the identity headers sent."""

    def __init__(self, endpoint: str, project: str, roles: str = "member,reader") -> None:
        self._endpoint = endpoint
        self._headers = {"X-Auth-Token": "token-of-" + project, "X-Project-Id": project}
        self._headers["X-Roles"] = roles

    async def endpoint(self) -> str:
        return self._endpoint

    async def headers(self) -> dict[str, str]:
        return dict(self._headers)

    async def invalidate(self, token: str | None = None) -> bool:
        return False

    def secrets(self) -> list[str]:
        return [self._headers["X-Auth-Token"]]

    async def roles(self) -> frozenset[str] | None:
        return frozenset(self._headers["X-Roles"].split(","))


@pytest.fixture
async def client(server: GlanceServer) -> AsyncIterator[glancefs.Client]:
    """The owner: project glancefs-test, roles admin,member,reader."""
    async with glancefs.Client(endpoint=server.url, token="owner-token") as glance:
        yield glance


@pytest.fixture
async def other(server: GlanceServer) -> AsyncIterator[glancefs.Client]:
    """Another project, member and reader but not admin."""
    async with glancefs.Client(auth=ProjectAuth(server.url, OTHER_PROJECT)) as glance:
        yield glance


# -- helpers -------------------------------------------------------------------------------------


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


async def new_image(
    glance: glancefs.Client, data: bytes | None = None, **fields: Any
) -> glancefs.Image:
    fields.setdefault("name", unique("api"))
    fields.setdefault("disk_format", "raw")
    fields.setdefault("container_format", "bare")
    image = await glance.images.create(**fields)
    if data is not None:
        await glance.images.upload(image.id, data)
        image = await glance.images.get(image.id)
    return image


async def read_all(glance: glancefs.Client, image_id: str, **kwargs: Any) -> bytes:
    return b"".join([chunk async for chunk in glance.images.data(image_id, **kwargs)])


# Glance 33 on SQLite now and then leaves an async task "processing" for good (seen in about one
# full-suite run in three; never when this module runs alone): a task-driven test is retried with a
# fresh image and task rather than waiting longer.
GLANCE_TASK = pytest.mark.flaky(reruns=2)


async def eventually(
    probe: Callable[[], Awaitable[Any]], done: Callable[[Any], bool], seconds: float = 45
) -> Any:
    """Call ``probe`` until ``done(result)``; fail after ``seconds``."""
    with trio.fail_after(seconds):
        while True:
            result = await probe()
            if done(result):
                return result
            await trio.sleep(0.2)


async def imported(glance: glancefs.Client, image_id: str) -> glancefs.Image:
    """Wait until every import task of the image has ended; return the image.

    Waiting for the tasks, not only for the image's status, matters: a task still writes to
    Glance's SQLite after the image is active, and a request writing at that moment fails with
    500 "database is locked" (a limit of the SQLite lab, not of Glance on a real database).
    """
    await eventually(
        lambda: glance.images.get_associated_image_tasks(image_id),
        lambda tasks: bool(tasks) and all(t.status in ("success", "failure") for t in tasks),
    )
    return await glance.images.get(image_id)


async def chunks_of(data: bytes, size: int) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        await trio.lowlevel.checkpoint()
        yield data[start : start + size]


def assert_clean(error: glancefs.HTTPError, status: int) -> None:
    """One line of text that ends with Glance's request id."""
    text = str(error)
    assert error.status == status
    assert error.request_id is not None
    assert REQUEST_ID.fullmatch(error.request_id)
    assert text.startswith(f"{status} ")
    assert text.endswith(f" (request {error.request_id})")
    assert "\n" not in text, text
    assert "<" not in text, text
    assert '"message"' not in text, text
    assert len(error.detail) > 5


# -- the documented example ----------------------------------------------------------------------


def doc_example() -> str:
    match = re.search(r"```python\n(.*?)```", DOC.read_text(), re.DOTALL)
    assert match, f"no python code block in {DOC}"
    return match.group(1)


@pytest.mark.parametrize("kind", ["bytes", "file", "async iterable"])
async def test_doc_example_runs_as_written(
    server: GlanceServer,
    client: glancefs.Client,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    kind: str,
) -> None:
    code = doc_example()
    assert 'glancefs.Client(endpoint="http://glance:9292", token=TOKEN)' in code
    payload = random.Random(kind).randbytes(20_000)
    data: Any
    if kind == "bytes":
        data = payload
    elif kind == "file":
        (tmp_path / "disk.img").write_bytes(payload)
        data = open(tmp_path / "disk.img", "rb")  # noqa: SIM115, ASYNC230 (the API takes a file)
    else:
        data = chunks_of(payload, 3000)
    scope: dict[str, Any] = {"glancefs": glancefs, "TOKEN": "doc-token", "data": data}
    compiled = compile(
        code.replace("http://glance:9292", server.url),
        str(DOC),
        "exec",
        flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT,
    )
    try:
        coroutine = eval(compiled, scope)
        if coroutine is not None:
            await coroutine
    finally:
        if kind == "file":
            data.close()
    assert capsys.readouterr().out == "queued\n"
    image = scope["image"]
    assert image.status == "active"
    assert image.size == len(payload)
    assert isinstance(scope["chunk"], bytes)
    with pytest.raises(glancefs.NotFound):
        await client.images.get(image.id)


# -- images --------------------------------------------------------------------------------------


async def test_images_create_get_update_patch_delete(client: glancefs.Client) -> None:
    name = unique("crud")
    image = await client.images.create(
        name=name, disk_format="raw", container_format="bare", old="x", keep="k"
    )
    assert image.status == "queued"
    assert image.name == name
    assert image["old"] == "x"
    assert image.old == "x"
    assert image.properties == {"old": "x", "keep": "k"}
    assert dict(image)["id"] == image.id
    assert "owner" in image
    fetched = await client.images.get(image.id)
    assert fetched == image

    updated = await client.images.update(
        image.id, min_ram=256, keep="changed", new="n", remove_props=["old", "absent"]
    )
    assert updated.min_ram == 256
    assert updated["keep"] == "changed"
    assert updated["new"] == "n"
    assert "old" not in updated
    patched = await client.images.patch(
        image.id, [{"op": "replace", "path": "/name", "value": name + "-p"}]
    )
    assert patched.name == name + "-p"

    await client.images.delete(image.id)
    with pytest.raises(glancefs.NotFound):
        await client.images.get(image.id)


async def test_images_list_filters_sort_and_paging(client: glancefs.Client) -> None:
    batch = unique("batch")
    made = [await new_image(client, name=f"{batch}-{i}", batch=batch) for i in (2, 0, 1)]
    await client.image_tags.update(made[0].id, batch)
    by_name = sorted(made, key=lambda image: str(image.name))

    listed = [
        image.id
        async for image in client.images.list(
            sort="name:asc", filters={"batch": batch}, page_size=1
        )
    ]
    assert listed == [image.id for image in by_name]  # three pages of one, by next links
    first_two = [
        i.id async for i in client.images.list(sort="name:desc", filters={"batch": batch}, limit=2)
    ]
    assert first_two == [by_name[2].id, by_name[1].id]
    after = [
        i.id
        async for i in client.images.list(
            sort="name:asc", filters={"batch": batch}, marker=by_name[0].id
        )
    ]
    assert after == [by_name[1].id, by_name[2].id]
    tagged = [i.id async for i in client.images.list(filters={"tag": [batch]})]
    assert tagged == [made[0].id]
    several = client.images.list(filters={"name": f'in:"{batch}-0","{batch}-2"'})
    assert {i.name async for i in several} == {f"{batch}-0", f"{batch}-2"}
    assert [i async for i in client.images.list(filters={"batch": batch}, limit=0)] == []


async def test_hidden_images(client: glancefs.Client) -> None:
    batch = unique("hidden")
    hidden = await new_image(client, name=batch + "-h", batch=batch, os_hidden=True)
    shown = await new_image(client, name=batch + "-s", batch=batch)
    assert hidden["os_hidden"] is True

    async def names(**filters: Any) -> set[str]:
        return {str(i.name) async for i in client.images.list(filters={"batch": batch, **filters})}

    assert await names() == {str(shown.name)}
    assert await names(os_hidden=True) == {str(hidden.name)}
    assert (await client.images.get(hidden.id)).id == hidden.id
    await client.images.update(hidden.id, os_hidden=False)
    assert await names() == {str(shown.name), str(hidden.name)}


async def test_deactivate_and_reactivate(client: glancefs.Client) -> None:
    image = await new_image(client, b"d" * 100)
    await client.images.deactivate(image.id)
    assert (await client.images.get(image.id)).status == "deactivated"
    await client.images.reactivate(image.id)
    assert (await client.images.get(image.id)).status == "active"
    assert await read_all(client, image.id) == b"d" * 100


# -- data ----------------------------------------------------------------------------------------


class Unsized(io.RawIOBase):
    """A binary file whose size cannot be known in advance (like a pipe)."""

    def __init__(self, data: bytes) -> None:
        self._data = io.BytesIO(data)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        return self._data.readinto(buffer)


@pytest.mark.parametrize(
    "kind",
    [
        "bytes",
        "bytearray",
        "regular file",
        "unsized file",
        "async iterable, size given",
        "async iterable, size unknown",
    ],
)
async def test_upload_kinds(client: glancefs.Client, tmp_path: Path, kind: str) -> None:
    payload = random.Random(kind).randbytes(40_000)
    image = await new_image(client)
    source: Any
    size = None
    if kind == "bytes":
        source = payload
    elif kind == "bytearray":
        source = bytearray(payload)
    elif kind == "regular file":
        (tmp_path / "f").write_bytes(b"skip" + payload)
        source = open(tmp_path / "f", "rb")  # noqa: SIM115, ASYNC230 (the API takes a file)
        source.read(4)  # the upload starts at the file's position
    elif kind == "unsized file":
        source = io.BufferedReader(Unsized(payload))
    else:
        source = chunks_of(payload, 7000)
        size = len(payload) if "given" in kind else None
    await client.images.upload(image.id, source, size)
    if hasattr(source, "close"):
        source.close()
    image = await client.images.get(image.id)
    assert image.status == "active"
    assert image.size == len(payload)
    assert await read_all(client, image.id) == payload


async def test_data_ranges_and_integrity(client: glancefs.Client, server: GlanceServer) -> None:
    payload = random.Random(7).randbytes(50_000)
    image = await new_image(client, payload)
    assert await read_all(client, image.id, offset=1000, length=500) == payload[1000:1500]
    assert await read_all(client, image.id, offset=49_990) == payload[49_990:]
    assert await read_all(client, image.id, offset=49_990, length=100) == payload[49_990:]
    assert await read_all(client, image.id, offset=50_000) == b""
    assert await read_all(client, image.id, offset=10, length=0) == b""
    async with await client.images.open_data(image.id, 100, 50) as stream:
        assert (stream.offset, stream.end, stream.image_size) == (100, 150, 50_000)
        assert b"".join([c async for c in stream.chunks()]) == payload[100:150]
    queued = await new_image(client)
    assert await read_all(client, queued.id) == b""

    # Corrupt the stored copy (same length): a whole download notices, a range cannot.
    stored = server.store_dir / image.id
    stored.write_bytes(payload[:-1] + bytes([payload[-1] ^ 1]))
    with pytest.raises(glancefs.IntegrityError, match=image.id):
        await read_all(client, image.id)
    assert len(await read_all(client, image.id, verify=False)) == len(payload)
    assert await read_all(client, image.id, offset=0, length=10) == payload[:10]


# -- import --------------------------------------------------------------------------------------


@GLANCE_TASK
async def test_glance_direct_import_ends_active(client: glancefs.Client) -> None:
    assert "glance-direct" in await client.info.import_methods()
    payload = random.Random(1).randbytes(30_000)
    image = await new_image(client)
    await client.images.stage(image.id, chunks_of(payload, 4096))  # streamed, size unknown
    assert (await client.images.get(image.id)).status == "uploading"
    await client.images.image_import(image.id, method="glance-direct")
    image = await imported(client, image.id)
    assert image.status == "active"
    assert image.size == len(payload)
    assert await read_all(client, image.id) == payload
    tasks = await client.images.get_associated_image_tasks(image.id)
    assert [(t.type, t.status) for t in tasks] == [("api_image_import", "success")]
    assert tasks[0]["input"]["import_req"]["method"]["name"] == "glance-direct"


@GLANCE_TASK
async def test_web_download_import(client: glancefs.Client, web: tuple[str, Path]) -> None:
    payload = random.Random(2).randbytes(20_000)
    (web[1] / "web.raw").write_bytes(payload)
    image = await new_image(client)
    await client.images.image_import(image.id, method="web-download", uri=web[0] + "/web.raw")
    image = await imported(client, image.id)
    assert image.status == "active", image.get("os_glance_failed_import")
    assert await read_all(client, image.id) == payload


@GLANCE_TASK
async def test_copy_image_import_and_delete_from_store(client: glancefs.Client) -> None:
    image = await new_image(client, b"c" * 1000)
    assert image["stores"] == "fs"
    await client.images.image_import(image.id, method="copy-image", stores=["fs2"])
    assert (await imported(client, image.id))["stores"] == "fs,fs2"
    await client.images.delete_from_store("fs2", image.id)
    assert (await client.images.get(image.id))["stores"] == "fs"
    assert await read_all(client, image.id) == b"c" * 1000

    second = await new_image(client)
    await client.images.upload(second.id, b"2" * 100, backend="fs2")
    assert (await client.images.get(second.id))["stores"] == "fs2"
    await client.images.image_import(
        second.id, method="copy-image", all_stores=True, allow_failure=False
    )
    second = await imported(client, second.id)
    assert set(second["stores"].split(",")) == {"fs", "fs2"}
    assert await read_all(client, second.id) == b"2" * 100


async def test_import_errors(client: glancefs.Client) -> None:
    image = await new_image(client)
    with pytest.raises(glancefs.BadRequest) as refused:  # loopback on a port not allowed
        await client.images.image_import(image.id, "web-download", "http://127.0.0.1:1/x")
    assert_clean(refused.value, 400)
    with pytest.raises(glancefs.Conflict) as nothing_staged:
        await client.images.image_import(image.id, "glance-direct")
    assert_clean(nothing_staged.value, 409)


# -- tags, members -------------------------------------------------------------------------------


async def test_image_tags(client: glancefs.Client) -> None:
    image = await new_image(client, tags=["kept"])
    await client.image_tags.update(image.id, "with space")
    await client.image_tags.update(image.id, "with space")  # already there: no change
    await client.image_tags.update(image.id, "b")
    assert sorted((await client.images.get(image.id)).tags) == ["b", "kept", "with space"]
    await client.image_tags.delete(image.id, "with space")
    assert sorted((await client.images.get(image.id)).tags) == ["b", "kept"]
    with pytest.raises(glancefs.NotFound) as absent:
        await client.image_tags.delete(image.id, "never")
    assert_clean(absent.value, 404)
    for i in range(TAG_QUOTA - 2):
        await client.image_tags.update(image.id, f"t{i}")
    with pytest.raises(glancefs.OverLimit) as too_many:
        await client.image_tags.update(image.id, "one-too-many")
    assert_clean(too_many.value, 413)


async def test_members_share_an_image_between_two_projects(
    client: glancefs.Client, other: glancefs.Client, server: GlanceServer
) -> None:
    payload = b"shared data"
    image = await new_image(client, payload, visibility="shared")

    async def others_list() -> list[str]:
        return [i.id async for i in other.images.list(filters={"name": str(image.name)})]

    assert await others_list() == []
    with pytest.raises(glancefs.NotFound):
        await other.images.get(image.id)

    member = await client.image_members.create(image.id, OTHER_PROJECT)
    assert isinstance(member, glancefs.Member)
    assert (member.image_id, member.member_id, member.status) == (
        image.id,
        OTHER_PROJECT,
        "pending",
    )
    with pytest.raises(glancefs.Conflict) as twice:
        await client.image_members.create(image.id, OTHER_PROJECT)
    assert_clean(twice.value, 409)

    # Pending: readable by id, not listed; only the member can accept.
    assert (await other.images.get(image.id)).id == image.id
    assert await others_list() == []
    # (the owner's admin role could; as a plain member of its project it cannot)
    async with glancefs.Client(auth=ProjectAuth(server.url, "glancefs-test")) as owner:
        with pytest.raises(glancefs.Forbidden) as not_owners_call:
            await owner.image_members.update(image.id, OTHER_PROJECT, "accepted")
    assert_clean(not_owners_call.value, 403)
    accepted = await other.image_members.update(image.id, OTHER_PROJECT, "accepted")
    assert accepted.status == "accepted"
    assert await others_list() == [image.id]
    assert await read_all(other, image.id) == payload
    assert [m.member_id async for m in other.image_members.list(image.id)] == [OTHER_PROJECT]

    assert [(m.member_id, m.status) async for m in client.image_members.list(image.id)] == [
        (OTHER_PROJECT, "accepted")
    ]
    assert (await client.image_members.get(image.id, OTHER_PROJECT)).status == "accepted"
    with pytest.raises(glancefs.Forbidden) as not_the_owner:
        await other.images.delete(image.id)
    assert_clean(not_the_owner.value, 403)

    await client.image_members.delete(image.id, OTHER_PROJECT)
    assert [m async for m in client.image_members.list(image.id)] == []
    with pytest.raises(glancefs.NotFound):
        await client.image_members.get(image.id, OTHER_PROJECT)
    with pytest.raises(glancefs.NotFound):
        await other.images.get(image.id)

    private = await new_image(client, visibility="private")
    with pytest.raises(glancefs.Forbidden):
        await client.image_members.create(private.id, OTHER_PROJECT)


# -- tasks, info, schemas ------------------------------------------------------------------------


@GLANCE_TASK
async def test_tasks_create_get_list(client: glancefs.Client, web: tuple[str, Path]) -> None:
    payload = random.Random(3).randbytes(10_000)
    (web[1] / "task.raw").write_bytes(payload)
    name = unique("task")
    task = await client.tasks.create(
        type="import",
        input={
            "import_from": web[0] + "/task.raw",
            "import_from_format": "raw",
            "image_properties": {"name": name, "disk_format": "raw", "container_format": "bare"},
        },
    )
    assert isinstance(task, glancefs.Task)
    assert task.type == "import"
    assert task.status in ("pending", "processing")
    task = await eventually(
        lambda: client.tasks.get(task.id), lambda t: t.status in ("success", "failure")
    )
    assert task.status == "success", task.message
    image = await client.images.get(task.result["image_id"])
    assert image.name == name
    assert await read_all(client, image.id) == payload

    listed = [t.id async for t in client.tasks.list(filters={"type": "import"})]
    assert task.id in listed
    assert [
        t async for t in client.tasks.list(filters={"status": "failure", "type": "import"})
    ] == []
    for _ in range(2):  # an api_image_import task or two, for paging
        staged = await new_image(client)
        await client.images.stage(staged.id, b"s" * 100)
        await client.images.image_import(staged.id)
        assert (await imported(client, staged.id)).status == "active"
    paged = [t.id async for t in client.tasks.list(page_size=1, sort_key="created_at")]
    assert len(paged) >= 3
    assert len(set(paged)) == len(paged)
    after = [t.id async for t in client.tasks.list(marker=paged[0], sort_key="created_at")]
    assert after == paged[1:]
    oldest_first = [t.id async for t in client.tasks.list(sort_key="created_at", sort_dir="asc")]
    assert oldest_first == paged[::-1]
    assert len([t async for t in client.tasks.list(limit=2)]) == 2
    with pytest.raises(glancefs.NotFound):
        await client.tasks.get(str(uuid.uuid4()))


async def test_info(client: glancefs.Client, other: glancefs.Client) -> None:
    info = await client.info.import_info()
    assert set(info["import-methods"]["value"]) == {"glance-direct", "web-download", "copy-image"}
    assert sorted(await client.info.import_methods()) == [
        "copy-image",
        "glance-direct",
        "web-download",
    ]
    stores = await client.info.stores()
    assert {s["id"] for s in stores} == {"fs", "fs2"}
    assert [s["id"] for s in stores if s.get("default") == "true"] == ["fs"]
    detail = await client.info.stores(detail=True)
    assert {(s["id"], s["type"]) for s in detail} == {("fs", "file"), ("fs2", "file")}
    with pytest.raises(glancefs.Forbidden):  # detail is for admins
        await other.info.stores(detail=True)
    assert {s["id"] for s in await other.info.stores()} == {"fs", "fs2"}
    assert await client.info.usage() == {}  # no Keystone unified limits in this lab


async def test_schemas(client: glancefs.Client) -> None:
    image = await client.schemas.get("image")
    assert isinstance(image, glancefs.Schema)
    assert image.name == "image"
    assert image.is_core_property("os_hidden")
    assert not image.is_core_property("my_property")
    assert image.properties["status"]["readOnly"] is True
    assert image.raw()["name"] == "image"
    namespace = await client.schemas.get("metadefs/namespace")
    assert "namespace" in namespace.properties
    members = await client.schemas.get("members")
    assert members.name == "members"
    with pytest.raises(glancefs.NotFound):
        await client.schemas.get("no-such-schema")


# -- metadefs ------------------------------------------------------------------------------------


async def test_metadefs_namespaces(client: glancefs.Client, other: glancefs.Client) -> None:
    prefix = unique("GlanceFS::Test")
    names = [f"{prefix}::{i}" for i in range(3)]
    created = await client.metadefs_namespace.create(
        names[0], display_name="Zero", description="first", visibility="public"
    )
    assert isinstance(created, glancefs.Namespace)
    assert created.namespace == names[0]
    assert created.owner == "glancefs-test"
    for name in names[1:]:
        await client.metadefs_namespace.create(name)
    with pytest.raises(glancefs.Conflict) as exists:
        await client.metadefs_namespace.create(names[0])
    assert_clean(exists.value, 409)

    fetched = await client.metadefs_namespace.get(names[0])
    assert (fetched.display_name, fetched.visibility) == ("Zero", "public")
    listed = [
        ns.namespace async for ns in client.metadefs_namespace.list(page_size=1)
    ]  # one page per namespace, by next links
    assert set(names) <= set(listed)
    assert len(set(listed)) == len(listed)
    public = [ns.namespace async for ns in client.metadefs_namespace.list(visibility="public")]
    assert names[0] in public
    assert names[1] not in public
    assert len([ns async for ns in client.metadefs_namespace.list(limit=2)]) == 2
    after_first = client.metadefs_namespace.list(
        sort_key="namespace", sort_dir="asc", marker=names[0]
    )
    assert [n for n in [ns.namespace async for ns in after_first] if n.startswith(prefix)] == names[
        1:
    ]
    # another project sees the public namespace only
    theirs = {ns.namespace async for ns in other.metadefs_namespace.list()}
    assert names[0] in theirs
    assert names[1] not in theirs

    updated = await client.metadefs_namespace.update(names[0], description="changed")
    assert (updated.description, updated.display_name, updated.visibility) == (
        "changed",
        "Zero",
        "public",
    )
    renamed = await client.metadefs_namespace.update(names[2], namespace=names[2] + "-r")
    assert renamed.namespace == names[2] + "-r"

    await client.metadefs_namespace.update(names[1], protected=True)
    with pytest.raises(glancefs.Forbidden) as protected:
        await client.metadefs_namespace.delete(names[1])
    assert_clean(protected.value, 403)
    await client.metadefs_namespace.update(names[1], protected=False)
    for name in (names[0], names[1], names[2] + "-r"):
        await client.metadefs_namespace.delete(name)
    with pytest.raises(glancefs.NotFound):
        await client.metadefs_namespace.get(names[0])


async def test_metadefs_objects_properties_tags_resource_types(client: glancefs.Client) -> None:
    ns = unique("GlanceFS::Contents")
    await client.metadefs_namespace.create(ns, display_name="Contents")
    try:
        # objects
        obj = await client.metadefs_object.create(
            ns,
            "Backup",
            description="backup settings",
            required=["policy"],
            properties={"policy": {"type": "string", "title": "Policy"}},
        )
        assert isinstance(obj, glancefs.MetadefObject)
        assert obj.name == "Backup"
        await client.metadefs_object.create(ns, "Other", properties={})
        assert {o.name async for o in client.metadefs_object.list(ns)} == {"Backup", "Other"}
        got = await client.metadefs_object.get(ns, "Backup")
        assert got.required == ["policy"]
        changed = await client.metadefs_object.update(ns, "Backup", description="new")
        assert changed.description == "new"
        assert changed.required == ["policy"]
        assert "policy" in changed.properties
        await client.metadefs_object.delete(ns, "Other")
        with pytest.raises(glancefs.NotFound):
            await client.metadefs_object.get(ns, "Other")
        await client.metadefs_object.delete_all(ns)
        assert [o async for o in client.metadefs_object.list(ns)] == []

        # properties
        prop = await client.metadefs_property.create(
            ns, "level", title="Level", type="integer", minimum=1, maximum=5
        )
        assert isinstance(prop, glancefs.MetadefProperty)
        assert (prop.name, prop.type, prop.maximum) == ("level", "integer", 5)
        await client.metadefs_property.create(ns, "mode", title="Mode", type="string", enum=["a"])
        assert {p.name async for p in client.metadefs_property.list(ns)} == {"level", "mode"}
        assert (await client.metadefs_property.get(ns, "mode")).enum == ["a"]
        level = await client.metadefs_property.update(ns, "level", maximum=9)
        assert (level.maximum, level.minimum, level.title) == (9, 1, "Level")
        await client.metadefs_property.delete(ns, "mode")
        assert [p.name async for p in client.metadefs_property.list(ns)] == ["level"]
        await client.metadefs_property.delete_all(ns)
        assert [p async for p in client.metadefs_property.list(ns)] == []

        # tags
        tag = await client.metadefs_tag.create(ns, "t1")
        assert isinstance(tag, glancefs.MetadefTag)
        assert tag.name == "t1"
        with pytest.raises(glancefs.Conflict):
            await client.metadefs_tag.create(ns, "t1")
        made = await client.metadefs_tag.create_multiple(ns, ["t2", "t3"], append=True)
        assert {t.name for t in made} == {"t2", "t3"}
        assert {t.name async for t in client.metadefs_tag.list(ns)} == {"t1", "t2", "t3"}
        assert len([t async for t in client.metadefs_tag.list(ns, limit=2)]) == 2
        by_name = client.metadefs_tag.list(ns, sort_key="name", sort_dir="asc", marker="t1")
        assert [t.name async for t in by_name] == ["t2", "t3"]
        await client.metadefs_tag.create_multiple(ns, ["only"])  # replaces all
        assert [t.name async for t in client.metadefs_tag.list(ns)] == ["only"]
        assert (await client.metadefs_tag.get(ns, "only")).name == "only"
        assert (await client.metadefs_tag.update(ns, "only", name="renamed")).name == "renamed"
        await client.metadefs_tag.create(ns, "second")
        await client.metadefs_tag.delete(ns, "renamed")
        assert [t.name async for t in client.metadefs_tag.list(ns)] == ["second"]
        await client.metadefs_tag.delete_all(ns)
        assert [t async for t in client.metadefs_tag.list(ns)] == []

        # resource types
        association = await client.metadefs_resource_type.associate(
            ns, "OS::Glance::Image", prefix="contents_"
        )
        assert isinstance(association, glancefs.ResourceType)
        assert (association.name, association.prefix) == ("OS::Glance::Image", "contents_")
        assert "OS::Glance::Image" in {r.name async for r in client.metadefs_resource_type.list()}
        assert [(r.name, r.prefix) async for r in client.metadefs_resource_type.get(ns)] == [
            ("OS::Glance::Image", "contents_")
        ]
        await client.metadefs_property.create(ns, "size", title="Size", type="string")
        prefixed = await client.metadefs_namespace.get(ns, resource_type="OS::Glance::Image")
        assert list(prefixed.properties) == ["contents_size"]
        assert list((await client.metadefs_namespace.get(ns)).properties) == ["size"]
        filtered = client.metadefs_namespace.list(resource_types=["OS::Glance::Image"])
        assert ns in {n.namespace async for n in filtered}
        await client.metadefs_resource_type.deassociate(ns, "OS::Glance::Image")
        assert [r async for r in client.metadefs_resource_type.get(ns)] == []
    finally:
        await client.metadefs_namespace.delete(ns)


# -- errors, timeouts, retries -------------------------------------------------------------------


async def test_error_types_and_messages(client: glancefs.Client) -> None:
    with pytest.raises(glancefs.NotFound) as missing:
        await client.images.get(str(uuid.uuid4()))
    assert_clean(missing.value, 404)
    assert "No image found" in str(missing.value)

    image = await new_image(client, b"1234", protected=True)
    with pytest.raises(glancefs.Conflict) as active:
        await client.images.upload(image.id, b"again")
    assert_clean(active.value, 409)
    with pytest.raises(glancefs.Forbidden) as protected:
        await client.images.delete(image.id)
    assert_clean(protected.value, 403)
    with pytest.raises(glancefs.Forbidden) as read_only:
        await client.images.update(image.id, status="killed")
    assert_clean(read_only.value, 403)
    with pytest.raises(glancefs.BadRequest) as not_a_string:
        await client.images.update(image.id, my_property=5)
    assert_clean(not_a_string.value, 400)

    big = await new_image(client)
    with pytest.raises(glancefs.OverLimit) as too_big:
        await client.images.upload(big.id, b"x" * (SIZE_CAP + 1))
    assert_clean(too_big.value, 413)
    with pytest.raises(glancefs.OverLimit) as too_big_streamed:
        await client.images.upload(big.id, chunks_of(b"x" * (SIZE_CAP + 1), 8192))
    assert_clean(too_big_streamed.value, 413)
    assert (await client.images.get(big.id)).status == "queued"  # and it can be retried
    await client.images.upload(big.id, b"fits")
    assert (await client.images.get(big.id)).status == "active"
    for error in (missing, active, protected, too_big):
        assert isinstance(error.value, glancefs.HTTPError)
        assert isinstance(error.value, glancefs.GlanceError)


class FakeGlance:
    """A loopback HTTP server that counts requests and answers 503, or never answers."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.requests: list[str] = []
        self.port = 0

    async def serve(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, stream: trio.SocketStream) -> None:
        buffer = b""
        with trio.move_on_after(30):
            while True:
                while b"\r\n\r\n" not in buffer:
                    data = await stream.receive_some(65536)
                    if not data:
                        return
                    buffer += data
                head, buffer = buffer.split(b"\r\n\r\n", 1)
                self.requests.append(head.split(b" ", 1)[0].decode())
                length = re.search(rb"(?i)content-length: *(\d+)", head)
                if b"chunked" in head.lower():
                    while not buffer.endswith(b"0\r\n\r\n"):
                        buffer += await stream.receive_some(65536)
                    buffer = b""
                elif length:
                    while len(buffer) < int(length.group(1)):
                        buffer += await stream.receive_some(65536)
                    buffer = buffer[int(length.group(1)) :]
                if self.mode == "hang":
                    await trio.sleep_forever()
                body = b'{"message": "try later", "code": "503", "title": "Unavailable"}'
                await stream.send_all(
                    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                    b"x-openstack-request-id: req-00000000-0000-0000-0000-000000000503\r\n"
                    + f"Content-Length: {len(body)}\r\n\r\n".encode()
                    + body
                )


async def test_retries_only_idempotent_requests() -> None:
    fake = FakeGlance("503")
    async with trio.open_nursery() as nursery:
        await nursery.start(fake.serve)
        async with glancefs.Client(
            endpoint=f"http://127.0.0.1:{fake.port}", token="fake-token", retries=2
        ) as glance:
            image_id = str(uuid.uuid4())
            calls: list[tuple[str, Callable[[], Awaitable[Any]], int]] = [
                ("GET", lambda: glance.images.get(image_id), 3),
                ("DELETE", lambda: glance.images.delete(image_id), 3),
                ("PUT", lambda: glance.images.upload(image_id, b"replayable"), 3),
                ("PUT", lambda: glance.image_tags.update(image_id, "t"), 3),
                ("PUT", lambda: glance.images.upload(image_id, chunks_of(b"s" * 10, 5)), 1),
                # an id the client chose makes a create safe to repeat; the caller's id does not
                ("POST", lambda: glance.images.create(name="x"), 3),
                ("POST", lambda: glance.images.create(id=image_id, name="x"), 1),
                ("POST", lambda: glance.images.image_import(image_id), 1),
                ("POST", lambda: glance.tasks.create(type="import", input={}), 1),
                ("PATCH", lambda: glance.images.patch(image_id, []), 1),
            ]
            for method, call, expected in calls:
                fake.requests.clear()
                with pytest.raises(glancefs.ServiceUnavailable) as unavailable:
                    await call()
                assert fake.requests == [method] * expected, method
                assert str(unavailable.value) == (
                    "503 try later (request req-00000000-0000-0000-0000-000000000503)"
                )
        nursery.cancel_scope.cancel()


async def test_every_call_has_a_timeout() -> None:
    fake = FakeGlance("hang")
    async with trio.open_nursery() as nursery:
        await nursery.start(fake.serve)
        async with glancefs.Client(
            endpoint=f"http://127.0.0.1:{fake.port}", token="fake-token", timeout=0.5, retries=1
        ) as glance:
            started = trio.current_time()
            with pytest.raises(glancefs.Timeout) as timed_out:
                await glance.images.create(id=str(uuid.uuid4()), name="x")
            assert fake.requests == ["POST"]  # not sent twice
            assert "\n" not in str(timed_out.value)
            assert "POST /v2/images" in str(timed_out.value)
            fake.requests.clear()
            with pytest.raises(glancefs.Timeout):
                await glance.info.stores()
            assert fake.requests == ["GET", "GET"]  # retried once
            assert trio.current_time() - started < 10
        nursery.cancel_scope.cancel()


async def test_connect_error_is_one_clean_line() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nobody listens there once closed
    async with glancefs.Client(
        endpoint=f"http://127.0.0.1:{port}", token="secret-token", retries=0
    ) as glance:
        with pytest.raises(glancefs.ConnectError) as refused:
            await glance.schemas.get("image")
    text = str(refused.value)
    assert "\n" not in text
    assert "secret-token" not in text
    assert text.startswith("GET ")


def test_records_copy_and_pickle() -> None:
    records: list[Any] = [
        glancefs.Image({"id": "i", "name": "n", "status": "active"}),
        glancefs.Member({"image_id": "i", "member_id": "m", "status": "pending"}),
        glancefs.Task({"id": "t", "type": "import", "status": "success"}),
        glancefs.Namespace({"namespace": "N::S"}),
    ]
    for record in records:
        assert copy.copy(record) == record
        assert copy.deepcopy(record) == record
        assert pickle.loads(pickle.dumps(record)) == record
        assert type(pickle.loads(pickle.dumps(record))) is type(record)
        with pytest.raises(AttributeError):
            _ = record.no_such_field
    assert repr(records[1]) == "Member(image_id='i', member_id='m', status='pending')"
