"""Views, listings and caches against a real Glance and real mounts.

The root view's sort, filters, tags and limit are Glance's: each test asks Glance's list API the
same question and expects exactly its answer, in its order (``ls -U`` shows readdir order).
Catalogs too large to create through the API are inserted into the test Glance's SQLite
(:func:`insert_images`); they are then read only through the API and the mount.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from conftest import MountFactory
from support import GlanceAPI, Mount

from lab.faults import LATER_PAGES, FaultProxy
from lab.rows import insert_images, remove_inserted
from lab.servers import GlanceServer

FIXED = {"by-id", "by-tag", "new"}
RESULTS = Path(__file__).resolve().parents[2] / ".cache" / "scale-results.json"


def listed(mount: Mount, path: str = ".") -> list[str]:
    """The entries of a directory of the mount in readdir order (``ls -U``), without the fixed
    sub-directories of the root."""
    names = mount.run("ls", "-U", path).splitlines()
    return names if path != "." else [n for n in names if n not in FIXED]


# -- views: sort, filters, tags, limit ---------------------------------------------------------


@pytest.fixture(scope="module")
def known(api: GlanceAPI) -> Iterator[tuple[str, str, list[dict]]]:
    """Nine images of known sizes, properties and tags under one fresh tag, created in two
    batches a second apart; yields (tag, created_at boundary between the batches, images)."""
    tag = f"views-{uuid.uuid4().hex[:8]}"
    plan = [  # name, size, os_distro
        ("delta", 30, "ubuntu"), ("alpha", 10, "debian"), ("echo", 20, "ubuntu"),
        ("bravo", 20, "fedora"), ("charlie", 10, "ubuntu"),
        ("golf", 50, "debian"), ("foxtrot", 20, "ubuntu"), ("hotel", 5, "fedora"),
        ("india", 10, "ubuntu"),
    ]  # fmt: skip
    images = []
    for i, (name, size, distro) in enumerate(plan):
        if i == 5:
            time.sleep(1.2)  # the second batch is created at least a second later
        images.append(
            api.create(f"{name}-{tag}", b"x" * size, tags=[tag], os_distro=distro, seq=str(i))
        )
    images.append(api.create(f"juliet-{tag}", None, tags=[tag], os_distro="ubuntu"))  # queued
    # Glance keeps microseconds but shows seconds: the next second after the first batch's last.
    last = datetime.fromisoformat(images[4]["created_at"].replace("Z", "+00:00"))
    boundary = (last + timedelta(seconds=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    yield tag, boundary, images
    for image in images:
        api.delete(image["id"])


def glance_names(api: GlanceAPI, tag: str, **params: str) -> list[str]:
    return [image["name"] for image in api.list(tag=tag, **params)]


@pytest.mark.parametrize("sort", ["size:desc,name:asc", "name:desc", "created_at:desc"])
def test_ls_u_order_is_glances_order(
    api: GlanceAPI, glance: GlanceServer, mount_glancefs: MountFactory, known: tuple, sort: str
) -> None:
    tag, _, _ = known
    mount = mount_glancefs(glance.url, "--sort", sort, "--tag", tag)
    expected = glance_names(api, tag, sort=sort)
    assert len(expected) == 10
    assert listed(mount) == expected


@pytest.mark.parametrize(
    "query",
    [
        {"os_distro": "ubuntu"},
        {"size_min": "20"},
        {"size_max": "10", "os_distro": "ubuntu"},
        {"status": "queued"},
        {"created_at": "gt:BOUNDARY"},
        {"name": "in:NAMES"},
    ],
    ids=lambda q: ",".join(q),
)
def test_filters_select_what_glance_selects(
    api: GlanceAPI, glance: GlanceServer, mount_glancefs: MountFactory, known: tuple, query: dict
) -> None:
    tag, boundary, images = known
    query = dict(query)
    if query.get("created_at"):
        query["created_at"] = f"gt:{boundary}"
    if query.get("name"):
        query["name"] = f'in:"{images[0]["name"]}","{images[7]["name"]}"'
    filters = [arg for key, value in query.items() for arg in ("--filter", f"{key}={value}")]
    mount = mount_glancefs(glance.url, *filters, "--tag", tag)
    expected = glance_names(api, tag, sort="name:asc", **query)
    assert 0 < len(expected) < len(images), query  # the filter does select something
    assert listed(mount) == expected


def test_created_at_filter_splits_the_batches(
    api: GlanceAPI, glance: GlanceServer, mount_glancefs: MountFactory, known: tuple
) -> None:
    tag, boundary, images = known
    mount = mount_glancefs(glance.url, "--filter", f"created_at=gt:{boundary}", "--tag", tag)
    assert set(listed(mount)) == {image["name"] for image in images[5:]}


def test_limit_shows_that_many(
    api: GlanceAPI, glance: GlanceServer, mount_glancefs: MountFactory, known: tuple
) -> None:
    tag, _, _ = known
    mount = mount_glancefs(glance.url, "--limit", "5", "--tag", tag, "--sort", "size:asc,name:asc")
    assert listed(mount) == glance_names(api, tag, sort="size:asc,name:asc")[:5]
    assert len(mount.run("ls").split()) == 5 + len(FIXED)


def test_by_tag_lists_the_tag_and_by_id_ignores_the_view(
    api: GlanceAPI, glance: GlanceServer, mount_glancefs: MountFactory, known: tuple
) -> None:
    tag, _, images = known
    mount = mount_glancefs(glance.url, "--tag", tag, "--filter", "os_distro=fedora")
    assert listed(mount, f"by-tag/{tag}") == glance_names(api, tag, sort="name:asc")
    assert tag in listed(mount, "by-tag")
    by_id = set(listed(mount, "by-id"))
    assert {image["id"] for image in images} <= by_id
    assert len(by_id) == len(api.list())


def test_statfs_without_quotas(glance: GlanceServer, mount_glancefs: MountFactory) -> None:
    mount = mount_glancefs(glance.url)
    stats = os.statvfs(mount.path)
    assert stats.f_bsize == 4096
    assert stats.f_namemax == 255
    # The lab's Glance enforces no unified limits (/v2/info/usage answers {}): all free.
    assert stats.f_blocks == stats.f_bfree == stats.f_bavail > 0
    assert mount.run("df", "-k", ".").splitlines()[1].split()[2] == "0"  # used


# -- listings while the catalog changes, TTLs, SIGHUP ------------------------------------------


def test_readdir_hands_out_names_while_later_pages_are_on_their_way(
    glance: GlanceServer, mount_glancefs: MountFactory
) -> None:
    tag = f"stream-{uuid.uuid4().hex[:8]}"
    inserted = insert_images(glance.sqlite_path, 2500, tag, tag=tag)  # three pages
    try:
        with FaultProxy(glance.url) as proxy:
            held = proxy.hold(method="GET", path=LATER_PAGES)
            mount = mount_glancefs(proxy.url, "--tag", tag)
            with os.scandir(mount.path) as directory:
                entries = iter(directory)
                first_page = [next(entries).name for _ in range(len(FIXED) + 900)]
                # Those came from page 1 alone: the request for page 2 is still held.
                assert held.wait_holding()
                held.release()
                rest = [entry.name for entry in entries]
        names = [name for name in first_page + rest if name not in FIXED]
        assert names == sorted(name for _, name in inserted)  # all, once, in Glance's order
    finally:
        remove_inserted(glance.sqlite_path, [image_id for image_id, _ in inserted])


def test_listing_during_creates_and_deletes_lists_each_survivor_once(
    api: GlanceAPI, glance: GlanceServer, mount_glancefs: MountFactory
) -> None:
    tag = f"churn-{uuid.uuid4().hex[:8]}"
    inserted = insert_images(glance.sqlite_path, 4000, f"churn-{tag}", tag=tag)
    deleted: set[str] = set()
    created: list[dict] = []
    stop = threading.Event()
    started = threading.Event()
    victims = random.Random(7).sample(inserted, 400)

    def churn() -> None:
        other = GlanceAPI(glance.url)  # its own connection, as another process would have
        try:
            for image_id, _ in victims:
                if stop.is_set():
                    return
                created.append(other.create(f"new-{uuid.uuid4().hex[:6]}", tags=[tag]))
                other.delete(image_id)
                deleted.add(image_id)
                if len(deleted) >= 3:
                    started.set()
        finally:
            other.close()

    worker = threading.Thread(target=churn)
    try:
        mount = mount_glancefs(glance.url, "--tag", tag)
        worker.start()
        assert started.wait(30)
        before = len(deleted)
        names = listed(mount)  # a cold listing: 4 pages, paged while the churn goes on
        during = len(deleted) - before
        stop.set()
        worker.join(60)
        counts = Counter(names)
        assert [n for n, c in counts.items() if c > 1] == []
        survivors = {name for image_id, name in inserted if image_id not in deleted}
        assert survivors <= set(names)
        known_names = {name for _, name in inserted} | {image["name"] for image in created}
        assert set(names) <= known_names
        assert during > 0, "the catalog did not change while the listing ran"
        print(f"\nchurn: {during} deletions and creations while listing {len(names)} images")
    finally:
        stop.set()
        worker.join(60)
        remove_inserted(glance.sqlite_path, [image_id for image_id, _ in inserted])
        for image in created:
            api.delete(image["id"])


def test_api_changes_show_within_the_listing_ttl(
    api: GlanceAPI, glance: GlanceServer, mount_glancefs: MountFactory
) -> None:
    tag = f"ttl-{uuid.uuid4().hex[:8]}"
    ttl = 2.0
    mount = mount_glancefs(glance.url, "--tag", tag, "--listing-ttl", str(ttl))
    assert listed(mount) == []  # the (empty) listing is now cached
    image = api.create(f"fresh-{tag}", b"abc", tags=[tag])
    created = time.monotonic()
    while image["name"] not in listed(mount):
        assert time.monotonic() - created < ttl + 1.5, "created image not shown within the TTL"
        time.sleep(0.1)
    assert (mount.path / image["name"]).stat().st_size == 3
    api.delete(image["id"])
    gone = time.monotonic()
    while image["name"] in listed(mount):
        assert time.monotonic() - gone < ttl + 1.5, "deleted image still shown after the TTL"
        time.sleep(0.1)


def test_sighup_drops_every_cache(
    api: GlanceAPI, glance: GlanceServer, mount_glancefs: MountFactory
) -> None:
    tag = f"hup-{uuid.uuid4().hex[:8]}"
    kept = api.create(f"kept-{tag}", b"1", tags=[tag])
    gone = api.create(f"gone-{tag}", b"22", tags=[tag])
    mount = mount_glancefs(
        glance.url, "--tag", tag, "--listing-ttl", "300", "--metadata-ttl", "300"
    )
    kept_file = mount.path / "by-id" / kept["id"]
    assert listed(mount) == [gone["name"], kept["name"]]
    assert os.getxattr(kept_file, "user.min_ram") == b"0"
    api.delete(gone["id"])
    added = api.create(f"added-{tag}", b"333", tags=[tag])
    api.http.patch(
        f"/v2/images/{kept['id']}",
        json=[{"op": "replace", "path": "/min_ram", "value": 512}],
        headers={"Content-Type": "application/openstack-images-v2.1-json-patch"},
    ).raise_for_status()
    time.sleep(0.5)
    assert listed(mount) == [gone["name"], kept["name"]]  # both cached for 300 s
    assert os.getxattr(kept_file, "user.min_ram") == b"0"
    assert mount.proc is not None
    mount.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 5
    while listed(mount) != [added["name"], kept["name"]]:
        assert time.monotonic() < deadline, "SIGHUP did not drop the listing"
        time.sleep(0.1)
    assert os.getxattr(kept_file, "user.min_ram") == b"512"  # the record cache went too
    api.delete(added["id"])
    api.delete(kept["id"])


# -- scale ----------------------------------------------------------------------------------------

SCALE = 100_000


@pytest.fixture(scope="module")
def scale_glance(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GlanceServer]:
    """A Glance of its own holding 100,000 images (inserted into its SQLite in a few seconds)."""
    with GlanceServer(tmp_path_factory.mktemp("scale-glance"), flavor="noauth") as server:
        started = time.monotonic()
        insert_images(server.sqlite_path, SCALE, "scale")
        print(f"\ninserted {SCALE} images in {time.monotonic() - started:.1f} s")
        yield server


def curl_paging(url: str, query: str) -> tuple[float, int]:
    """Seconds curl takes to page ``/v2/images?<query>`` with limit=1000 following ``next``."""
    started = time.monotonic()
    count = 0
    path: str | None = f"/v2/images?limit=1000&{query}"
    while path:
        body = json.loads(subprocess.run(["curl", "-sf", url + path], capture_output=True,
                                         check=True).stdout)  # fmt: skip
        count += len(body["images"])
        path = body.get("next") if body["images"] else None
    return time.monotonic() - started, count


def timed(mount: Mount, *command: str) -> tuple[float, str]:
    started = time.monotonic()
    output = mount.run(*command, timeout=600)
    return time.monotonic() - started, output


def peak_rss_mb(mount: Mount) -> float:
    assert mount.proc is not None
    status = Path(f"/proc/{mount.proc.pid}/status").read_text()
    line = next(line for line in status.splitlines() if line.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


@pytest.mark.scale
@pytest.mark.timeout(900)
def test_100k_images(scale_glance: GlanceServer, mount_glancefs: MountFactory) -> None:
    url = scale_glance.url
    results: dict[str, float] = {"images": SCALE}
    # 5,000 images (the figure `make bench` sets targets for): the first 5,000 by name.
    small = mount_glancefs(url, "--limit", "5000", name="mnt5k")
    results["curl_5k_s"] = _curl_first(url, 5000)
    cold_5k, output = timed(small, "ls", "-l")
    warm_5k, _ = timed(small, "ls", "-l")
    assert len(output.splitlines()) == 5000 + len(FIXED) + 1  # "total" line
    results.update(cold_ls_l_5k_s=cold_5k, warm_ls_l_5k_s=warm_5k)
    results["ratio_5k"] = cold_5k / results["curl_5k_s"]
    small.stop()

    # 100,000 images: curl first, then the mount's cold and warm ls -l, in the same run.
    mount = mount_glancefs(url, "--listing-ttl", "600", name="mnt100k")
    curl_s, count = curl_paging(url, "sort=name:asc")
    assert count == SCALE
    cold, output = timed(mount, "ls", "-l")
    assert len(output.splitlines()) == SCALE + len(FIXED) + 1
    warm, _ = timed(mount, "ls", "-l")
    assert int(mount.run("sh", "-c", "ls | wc -l")) == SCALE + len(FIXED)
    results.update(curl_100k_s=curl_s, cold_ls_l_100k_s=cold, warm_ls_l_100k_s=warm)
    results["ratio_100k"] = cold / curl_s
    results["peak_rss_mb"] = peak_rss_mb(mount)
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print("\n" + "\n".join(f"{key}: {value:.3f}" for key, value in results.items()))
    # Not timings (reported above), but memory must stay bounded: a compact entry per image.
    assert results["peak_rss_mb"] < 600


def _curl_first(url: str, total: int) -> float:
    """curl paging the first ``total`` images by name (limit=1000 per page, following next)."""
    started = time.monotonic()
    path: str | None = "/v2/images?limit=1000&sort=name:asc"
    count = 0
    while path and count < total:
        body = json.loads(subprocess.run(["curl", "-sf", url + path], capture_output=True,
                                         check=True).stdout)  # fmt: skip
        count += len(body["images"])
        path = body.get("next") if body["images"] else None
    return time.monotonic() - started
