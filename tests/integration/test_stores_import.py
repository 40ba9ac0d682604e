"""Stores and web-download through the mount, against real Glances (lab.stores: its file store
``fs`` and Ceph RBD ``ceph``), checked against what Glance holds:

* ``--store``: uploads land in that store; an unknown id fails the mount with the list;
* ``user.stores``: getfattr shows the stores, setfattr copies (copy-image) and deletes from a
  store; EPERM for a non-admin token (a Keystone-authenticated Glance on the same stores, whose
  default policy keeps copy-image for admins);
* ``ln -s URL new/NAME``: Glance fetches the URL from a web server of this module (web-download,
  allowed for loopback and its port by ``import_filtering_opts``); the link shows the URL while
  the server holds the body back; EPERM where Glance lacks web-download, EINVAL for a target that
  is not an http(s) URL.
"""

from __future__ import annotations

import errno
import filecmp
import http.server
import os
import random
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import MountFactory
from support import GlanceAPI, tool, unique, wait_for

from lab.ceph import CephCluster
from lab.mounts import GLANCEFS, mount_argv
from lab.servers import USERS, GlanceServer, free_port
from lab.stores import StoresLab

MiB = 1024 * 1024


class HeldWebServer:
    """An HTTP server on loopback, in a thread of the test: ``files`` by path; a path in
    ``held`` sends its headers, then waits for :attr:`release` before its body (an import in
    flight for as long as the test needs)."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.held: set[str] = set()
        self.release = threading.Event()
        web = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                data = web.files.get(self.path)
                if data is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.path in web.held:
                    web.release.wait(timeout=120)
                self.wfile.write(data)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.port = free_port()
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def __enter__(self) -> HeldWebServer:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release.set()
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture(scope="module")
def web() -> Iterator[HeldWebServer]:
    with HeldWebServer() as server:
        yield server


@pytest.fixture(scope="module")
def glance(
    tmp_path_factory: pytest.TempPathFactory, ceph: CephCluster, web: HeldWebServer
) -> Iterator[GlanceServer]:
    """A Glance offering its file store ``fs`` and the session's Ceph ``ceph``, allowed to fetch
    from ``web`` (loopback and its port, which Glance refuses by default); fakeauth: an import
    task needs an owner, which the noauth flavor lacks."""
    overrides = {
        "import_filtering_opts": {
            "allowed_hosts": "[127.0.0.1]",
            "allowed_ports": f"[80,443,{web.port}]",
        }
    }
    workdir = tmp_path_factory.mktemp("stores-glance")
    with GlanceServer(
        workdir, flavor="fakeauth", stores=(ceph,), conf_overrides=overrides
    ) as server:
        yield server


@pytest.fixture(scope="module")
def api(glance: GlanceServer) -> Iterator[GlanceAPI]:
    with GlanceAPI(glance.url) as client:
        yield client


@pytest.fixture(scope="module")
def member_glance(
    stores: StoresLab, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GlanceServer]:
    """A Glance on the stores lab's fs and Ceph that checks Keystone tokens (default policy:
    copy-image is for admins) and offers no web-download."""
    server = GlanceServer(
        tmp_path_factory.mktemp("member-glance"),
        flavor="keystone",
        keystone_url=stores.keystone.url,
        stores=(stores.ceph,),
        conf_overrides={"DEFAULT": {"enabled_import_methods": "[glance-direct,copy-image]"}},
    )
    with server:
        yield server


def member_env(stores: StoresLab, tmp_path: Path) -> dict[str, str]:
    """The environment of the lab Keystone's ``demo`` user (role member, not admin)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OS_")}
    env.update(
        XDG_CONFIG_HOME=str(tmp_path / "xdg"),  # no user's clouds.yaml
        OS_AUTH_URL=stores.keystone.url, OS_IDENTITY_API_VERSION="3", OS_USERNAME="demo",
        OS_PASSWORD=USERS["demo"], OS_PROJECT_NAME="demo", OS_USER_DOMAIN_NAME="Default",
        OS_PROJECT_DOMAIN_ID="default", OS_REGION_NAME="RegionOne",
    )  # fmt: skip
    return env


def stores_of(api: GlanceAPI, image_id: str) -> str:
    return str(api.get(image_id).get("stores", ""))


def copied(api: GlanceAPI, image_id: str, stores: str) -> bool:
    """The image is in ``stores`` and no import holds it any more."""
    image = api.get(image_id)
    return image.get("stores") == stores and "os_glance_import_task" not in image


def refused(command: list[str], code: int) -> None:
    """``command`` fails with the message of errno ``code``."""
    result = tool(*command)
    assert result.returncode != 0, result
    assert os.strerror(code) in result.stderr, result.stderr


# -- --store and user.stores ------------------------------------------------------------------


@pytest.mark.parametrize("store", ["fs", "ceph"])
def test_store_option_chooses_where_uploads_land(
    store: str,
    glance: GlanceServer,
    api: GlanceAPI,
    mount_glancefs: MountFactory,
    tmp_path: Path,
) -> None:
    mount = mount_glancefs(glance.url, "-o", f"store={store}")
    source = tmp_path / (unique("stored") + ".raw")
    source.write_bytes(random.Random(24).randbytes(MiB + 5))
    copied = tool("cp", str(source), str(mount.path / "new") + "/")
    assert copied.returncode == 0, copied.stderr
    image = api.only(source.name)
    assert (image["status"], image["stores"], image["size"]) == ("active", store, MiB + 5)
    assert filecmp.cmp(source, mount.path / source.name, shallow=False)
    shown = tool("getfattr", "--only-values", "-n", "user.stores", str(mount.path / source.name))
    assert shown.stdout == store


def test_an_unknown_store_fails_the_mount_with_the_list(
    glance: GlanceServer, tmp_path: Path
) -> None:
    (tmp_path / "mnt").mkdir()
    mounted = tool(*mount_argv(glance.url, tmp_path / "mnt", "--store", "tape"))
    assert mounted.returncode != 0
    assert mounted.stderr.strip().splitlines()[-1] == (
        "glancefs: --store tape: not one of this Glance's stores: fs, ceph"
    )
    assert "Traceback" not in mounted.stderr


def test_user_stores_copies_to_a_store_and_deletes_from_one(
    ceph: CephCluster, glance: GlanceServer, api: GlanceAPI, mount_glancefs: MountFactory
) -> None:
    name = unique("copied")
    data = random.Random(7).randbytes(2 * MiB)
    image = api.create(name, data, store="fs")
    mount = mount_glancefs(glance.url)
    path = str(mount.path / name)
    mount.run("setfattr", "-n", "user.stores", "-v", "fs,ceph", path)  # returns once accepted
    wait_for(lambda: copied(api, image["id"], "fs,ceph"), "the copy to ceph")
    wait_for(
        lambda: '"imports": []' in tool(GLANCEFS, "status", "--json", str(mount.path)).stdout,
        "the copy to leave glancefs status",
    )
    assert mount.run("getfattr", "--only-values", "-n", "user.stores", path) == "fs,ceph"
    assert ceph.image_data(image["id"]) == data
    mount.run("setfattr", "-n", "user.stores", "-v", "fs", path)
    assert stores_of(api, image["id"]) == "fs"  # the delete is synchronous
    with pytest.raises(RuntimeError, match="No such file"):
        ceph.image_data(image["id"])  # gone from the pool
    for value in ("", "fs,tape"):
        refused(["setfattr", "-n", "user.stores", "-v", value, path], errno.EINVAL)
    assert "no store tape here; the stores: fs, ceph" in mount.log()
    with open(mount.path / name, "rb") as copy:
        assert copy.read() == data


def test_user_stores_is_eperm_for_a_non_admin_and_web_download_where_glance_lacks_it(
    stores: StoresLab,
    member_glance: GlanceServer,
    web: HeldWebServer,
    mount_glancefs: MountFactory,
    tmp_path: Path,
) -> None:
    env = member_env(stores, tmp_path)
    mount = mount_glancefs(member_glance.url, "--store", "fs", env=env)
    source = tmp_path / (unique("member") + ".raw")
    source.write_bytes(b"member data" * 1000)
    mount.run("cp", str(source), "new/")
    path = str(mount.path / source.name)
    assert mount.run("getfattr", "--only-values", "-n", "user.stores", path) == "fs"
    refused(["setfattr", "-n", "user.stores", "-v", "fs,ceph", path], errno.EPERM)
    refused(["ln", "-s", web.url("/any.raw"), str(mount.path / "new" / "any")], errno.EPERM)
    assert "does not offer web-download" in mount.log()
    assert not (mount.path / "new" / "any").is_symlink()


# -- ln -s URL new/NAME -----------------------------------------------------------------------


def test_ln_s_of_a_url_imports_it_and_shows_the_url_until_active(
    web: HeldWebServer,
    glance: GlanceServer,
    api: GlanceAPI,
    mount_glancefs: MountFactory,
    tmp_path: Path,
) -> None:
    raw, expected = tmp_path / "disk.raw", tmp_path / "disk.qcow2"
    raw.write_bytes(random.Random(5).randbytes(3 * MiB))
    converted = tool("qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(expected))
    assert converted.returncode == 0, converted.stderr
    web.files["/images/disk.qcow2"] = expected.read_bytes()
    web.held.add("/images/disk.qcow2")
    url = web.url("/images/disk.qcow2")
    mount = mount_glancefs(glance.url)
    name = unique("fetched")
    link = mount.path / "new" / name
    mount.run("ln", "-s", url, str(link))  # returns while the server holds the body
    assert mount.run("readlink", str(link)).strip() == url
    assert link.is_symlink()
    status = tool(GLANCEFS, "status", str(mount.path)).stdout
    assert f"web-download of {url}" in status, status
    image = api.only(name)
    assert image["glancefs_source_url"] == url
    assert (image["disk_format"], image["container_format"]) == ("qcow2", "bare")
    web.release.set()
    wait_for(lambda: api.get(image["id"])["status"] == "active", "the web-download")
    wait_for(lambda: not link.is_symlink(), "the link to become the image's file")
    assert filecmp.cmp(expected, link, shallow=False)
    assert filecmp.cmp(expected, mount.path / name, shallow=False)


def test_ln_s_refusals_and_a_failed_web_download(
    web: HeldWebServer, glance: GlanceServer, api: GlanceAPI, mount_glancefs: MountFactory
) -> None:
    mount = mount_glancefs(glance.url)
    new = mount.path / "new"
    for target in ("/etc/hostname", "ftp://127.0.0.1/disk.raw"):
        refused(["ln", "-s", target, str(new / "bad")], errno.EINVAL)
    refused(["ln", "-s", web.url("/x.raw"), str(mount.path / "outside")], errno.EPERM)
    name = unique("missing")
    url = web.url("/missing.raw")  # the server answers 404
    mount.run("ln", "-s", url, str(new / name))
    wait_for(lambda: api.list(name=name) == [], "the failed image to be deleted")
    failure = f"web-download of {url} failed"
    wait_for(lambda: failure in mount.log(), "the failure's log line")
    assert mount.log().count(failure) == 1
    assert failure in tool(GLANCEFS, "status", str(mount.path)).stdout
