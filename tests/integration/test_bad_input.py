"""Bad input through a real mount: hostile image names and extended attributes, hostile paths.

Hypothesis makes the names and attributes (few examples: each one costs real Glance requests).
For every example the mount must answer (no crash, no hang), refuse only with an errno, and
show exactly what Glance holds: file names follow glancefs.fs.naming's rules (the reference),
every file reads as its own image, and a setxattr that returned 0 reads back, from the mount and
from Glance, under the very name given.
"""

from __future__ import annotations

import errno
import os
import uuid
from collections.abc import Callable, Iterator

import pytest
from conftest import MountFactory
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from support import GlanceAPI, Mount

import glancefs
from glancefs.fs.namespace import ROOT_ENTRIES
from glancefs.fs.naming import assign_names
from lab.faults import FaultProxy
from lab.servers import GlanceServer

EXAMPLES = settings(
    max_examples=8,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
#: Stands for "the id of an image made earlier in this example" in a generated name list.
EARLIER_ID = "\x00earlier-id\x00"
FRESH = ("--listing-ttl", "0", "--metadata-ttl", "0")

# Every script (any code point UTF-8 can encode: no lone surrogates), controls and NUL included.
any_text = st.text(st.characters(codec="utf-8"), max_size=24)
special_names = st.sampled_from(
    ["", ".", "..", "/", "a/b", "\x00", "\n", " ", "x" * 255, "é" * 128, "by-id", "new", "a~1"]
)
names = st.lists(st.one_of(any_text, special_names, st.just(EARLIER_ID)), min_size=1, max_size=4)


@pytest.fixture(scope="module")
def module_proxy(glance: GlanceServer) -> Iterator[FaultProxy]:
    """A rule-less proxy in front of the session's Glance: it counts the mount's requests."""
    with FaultProxy(glance.url) as proxy:
        yield proxy


@pytest.fixture
def counted(module_proxy: FaultProxy, mount_glancefs: MountFactory) -> tuple[Mount, FaultProxy]:
    mount = mount_glancefs(module_proxy.url, *FRESH)
    module_proxy.reset_counts()
    return mount, module_proxy


@pytest.fixture
def fresh(glance: GlanceServer, mount_glancefs: MountFactory) -> Mount:
    return mount_glancefs(glance.url, *FRESH, "--allow-delete")


# --- names ---------------------------------------------------------------------------------------


@pytest.fixture
def tagged(glance: GlanceServer, mount_glancefs: MountFactory) -> tuple[str, Mount]:
    """A tag of the test's own, and a mount whose root view shows only the images with it."""
    tag = f"names-{uuid.uuid4().hex[:8]}"
    return tag, mount_glancefs(glance.url, *FRESH, "--tag", tag)


@settings(EXAMPLES, max_examples=6)
@given(wanted=names)
@example(wanted=["twin", "twin", EARLIER_ID, ".", "..", "", "a/b", "a\u2215b"])
@example(wanted=["x" * 255, "x" * 255, "é" * 128, "\x00", "\x01\x7f\u200b\ufeff", "by-id"])
def test_hostile_image_names_are_listed_stated_and_read(
    api: GlanceAPI, tagged: tuple[str, Mount], wanted: list[str]
) -> None:
    tag, mount = tagged
    made: list[dict] = []
    try:
        for name in wanted:
            if name == EARLIER_ID:
                name = made[0]["id"] if made else ""
            response = api.http.post(
                "/v2/images",
                json={
                    "name": name,
                    "tags": [tag],
                    "disk_format": "raw",
                    "container_format": "bare",
                },
            )
            if response.status_code == 400:
                continue  # Glance's own refusal (4-byte UTF-8 characters, over 255 characters)
            response.raise_for_status()
            image = response.json()
            api.upload(image["id"], f"{len(made)}:{image['id']}".encode())
            made.append(api.get(image["id"]))  # the name as Glance stored it
        expected = assign_names(((i["id"], i["name"]) for i in made), ROOT_ENTRIES.keys())
        listed = os.listdir(mount.path)
        assert sorted(listed) == sorted([*expected.values(), *ROOT_ENTRIES])
        for image in made:
            path = mount.path / expected[image["id"]]
            assert path.stat().st_size == image["size"]
            assert path.stat().st_ino == (mount.path / "by-id" / image["id"]).stat().st_ino
            assert path.read_bytes().endswith(f":{image['id']}".encode())
    finally:
        for image in made:
            api.delete(image["id"])


# --- paths ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["x?y", "x#y", "a%2Fb", "...", "not-an-id", "x" * 255])
def test_by_id_of_text_that_is_no_id_is_enoent_without_a_request(
    counted: tuple[Mount, FaultProxy], name: str
) -> None:
    mount, proxy = counted
    with pytest.raises(FileNotFoundError):
        os.stat(mount.path / "by-id" / name)
    assert proxy.counts() == {}


def test_by_id_of_an_unknown_id_asks_glance_once(counted: tuple[Mount, FaultProxy]) -> None:
    mount, proxy = counted
    unknown = str(uuid.uuid4())
    with pytest.raises(FileNotFoundError):
        os.stat(mount.path / "by-id" / unknown)
    assert proxy.counts() == {("GET", f"/v2/images/{unknown}"): 1}


async def test_client_paths_are_percent_encoded(module_proxy: FaultProxy) -> None:
    module_proxy.reset_counts()
    async with glancefs.Client(endpoint=module_proxy.url, retries=0) as client:
        with pytest.raises(glancefs.NotFound):
            await client.images.get("a?b/c d")
        with pytest.raises(glancefs.GlanceError):
            await client.image_tags.update("..", "t?g")
    counts = module_proxy.counts()
    assert counts[("GET", "/v2/images/a%3Fb%2Fc%20d")] == 1
    assert counts[("PUT", "/v2/images/%2E%2E/tags/t%3Fg")] == 1


# --- extended attributes -------------------------------------------------------------------------

#: Fields with a meaning of their own (checked in test_write_path.py): kept out of the fuzzing.
CORE = {
    "name", "visibility", "protected", "min_ram", "min_disk", "os_hidden", "tags", "tags.add",
    "tags.remove", "disk_format", "container_format", "id", "status", "checksum", "os_hash_algo",
    "os_hash_value", "size", "virtual_size", "created_at", "updated_at", "owner", "self", "file",
    "schema", "direct_url", "locations", "stores",
}  # fmt: skip
keys = st.one_of(
    st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=12).map(str.encode),
    st.sampled_from([b"", b" ", b".", b"..", b"~", b"/", b"a~0b", b"a/b", b"x" * 300, b"a b"]),
    st.sampled_from([b" lead", b"trail ", b"\tx", b"x\n", b"\xff", b"a\xc3", b"\xed\xa0\x80"]),
).filter(lambda key: key.decode("utf-8", "replace") not in CORE)
values = st.one_of(
    st.binary(max_size=40),
    st.text(max_size=40).map(str.encode),
    st.sampled_from([b"", b"v" * 300, b"w" * 65536, b"\xff\xfe", b" padded "]),
)
XATTR_EXAMPLES = [
    (b" lead", b"X"),
    (b"trail ", b"X"),
    (b"a~b", b"tilde"),
    (b"a/b", b"slash"),
    (b"~1", b"escaped-looking"),
    (b"", b"empty key"),
    (b"x" * 300, b"long key"),
    (b"k.with.dots", b"w" * 65536),
    (b"\xff", b"bad key"),
    (b"bad-value", b"\xff\xfe"),
]


@pytest.fixture(scope="module")
def target(api: GlanceAPI) -> Iterator[dict]:
    image = api.create(f"xattrs-{uuid.uuid4().hex[:6]}", b"data")
    yield image
    api.delete(image["id"])


def _set(path: bytes, name: bytes, value: bytes) -> int:
    """os.setxattr's outcome: 0 or the errno."""
    try:
        os.setxattr(path, name, value)
    except OSError as error:
        return error.errno or -1
    return 0


def _examples(test: Callable[..., None]) -> Callable[..., None]:
    for key, value in XATTR_EXAMPLES:
        test = example(key=key, value=value)(test)
    return test


@EXAMPLES
@given(key=keys, value=values)
@_examples
def test_setxattr_answers_0_or_an_errno_and_the_mount_lives_on(
    api: GlanceAPI, fresh: Mount, target: dict, key: bytes, value: bytes
) -> None:
    path = os.fsencode(fresh.path / "by-id" / target["id"])
    before = api.get(target["id"])
    outcome = _set(path, b"user." + key, value)
    assert outcome == 0 or outcome in errno.errorcode
    if outcome:
        after = api.get(target["id"])  # a refusal changed nothing
        assert {k: v for k, v in after.items() if k != "updated_at"} == {
            k: v for k, v in before.items() if k != "updated_at"
        }
    assert os.listxattr(path)  # still answering
    assert os.stat(path).st_size == 4


@EXAMPLES
@given(key=keys, value=values)
@_examples
def test_every_setxattr_that_succeeds_reads_back_under_its_name(
    api: GlanceAPI, fresh: Mount, target: dict, key: bytes, value: bytes
) -> None:
    path = os.fsencode(fresh.path / "by-id" / target["id"])
    name = b"user." + key
    if _set(path, name, value) != 0:
        return
    assert os.getxattr(path, name) == value
    assert name in [os.fsencode(n) for n in os.listxattr(path)]
    held = api.get(target["id"])
    assert held.get(key.decode()) == value.decode()
    os.removexattr(path, name)
    assert key.decode() not in api.get(target["id"])
