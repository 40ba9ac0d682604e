"""Stores and web-downloads in the filesystem core, on the fake Glance: ``--store`` on uploads,
``user.stores`` (copy-image, delete from a store), ``ln -s URL new/NAME`` (web-download), and the
imports followed to their end (fs/imports.py), on trio's autojump clock (the polls cost no time).
"""

from __future__ import annotations

import logging
import stat

import pytest
import trio
from fakes import record
from test_filesystem import NEW_INODE, ROOT_INODE, _close, _upload, filesystem
from trio.testing import MockClock

from glancefs import Forbidden
from glancefs.fs.namespace import link_target, web_download_url
from glancefs.fs.refusals import InvalidArgument, NotPermitted, ReadOnly
from glancefs.fs.status import STATUS
from glancefs.fs.xattrs import store_changes

URL = "http://127.0.0.1:8080/images/cirros.qcow2"

# -- pure decisions ---------------------------------------------------------------------------


def test_store_changes_add_and_remove_and_refuse_what_glance_cannot_do() -> None:
    offered = ["fs", "ceph", "swift"]
    assert store_changes(["fs"], "user.stores", b"fs, ceph", offered) == (["ceph"], [])
    assert store_changes(["fs", "ceph"], "user.stores", b"ceph", offered) == ([], ["fs"])
    assert store_changes(["fs"], "user.stores", b"swift,fs,swift", offered) == (["swift"], [])
    for value in (b"", b" , ", b"fs,nope", b"ceph"):  # empty, unknown, a move
        with pytest.raises(InvalidArgument):
            store_changes(["fs"], "user.stores", value, offered)
    with pytest.raises(InvalidArgument, match="no choice of stores"):
        store_changes([], "user.stores", b"fs", [])  # a Glance without multi-store


def test_only_http_urls_are_web_downloads_and_show_as_links_until_active() -> None:
    assert web_download_url(URL) == URL
    assert web_download_url("https://example.com/a b") is None
    for target in ("ftp://host/x", "/tmp/disk.qcow2", "http://", "disk.qcow2", "http:///x"):
        assert web_download_url(target) is None
    assert link_target("importing", URL) == URL
    assert link_target("queued", URL) == URL  # a failed one kept with --keep-failed
    assert link_target("active", URL) is None
    assert link_target("queued", None) is None


# -- --store ----------------------------------------------------------------------------------


async def test_uploads_go_to_the_mount_s_store() -> None:
    async with filesystem(store="ceph") as (fs, glance, _):
        _, handle = await _upload(fs, "disk.raw", b"data")
        await _close(fs, handle)
        [image] = glance.named("disk.raw")
        assert glance.upload_stores[image["id"]] == "ceph"
    async with filesystem() as (fs, glance, _):
        _, handle = await _upload(fs, "disk.raw", b"data")
        await _close(fs, handle)
        assert list(glance.upload_stores.values()) == [None]  # Glance's default store


# -- user.stores ------------------------------------------------------------------------------


async def test_user_stores_copies_to_the_added_and_deletes_from_the_removed(
    autojump_clock: MockClock,
) -> None:
    async with filesystem([record(1, stores="fs")]) as (fs, glance, _):
        image_id = record(1)["id"]
        inode = (await fs.tree.lookup(ROOT_INODE, "image-1")).inode
        assert await fs.getxattr(inode, "user.stores") == b"fs"
        await fs.setxattr(inode, "user.stores", b"fs,ceph")
        assert glance.imports == [(image_id, "copy-image", None, ["ceph"])]
        assert STATUS.imports[image_id]["what"] == "copy to ceph"
        with pytest.raises(InvalidArgument):  # the copy holds the image's import lock
            await fs.setxattr(inode, "user.stores", b"ceph")
        await trio.sleep(10)
        assert image_id in STATUS.imports  # still copying
        glance.end_import(image_id, stores="fs,ceph")
        await trio.sleep(2)
        assert image_id not in STATUS.imports
        assert await fs.getxattr(inode, "user.stores") == b"fs,ceph"
        await fs.setxattr(inode, "user.stores", b"ceph")
        assert glance.record(image_id)["stores"] == "ceph"
        assert ("delete_from_store", image_id) in glance.calls
        assert len(glance.imports) == 1  # nothing copied


async def test_user_stores_refusals_change_nothing() -> None:
    records = [record(1, stores="fs"), record(2, status="queued")]
    async with filesystem(records) as (fs, glance, _):
        inode = (await fs.tree.lookup(ROOT_INODE, "image-1")).inode
        for value in (b"", b"fs,nowhere", b"ceph"):
            with pytest.raises(InvalidArgument):
                await fs.setxattr(inode, "user.stores", value)
        with pytest.raises(InvalidArgument):
            await fs.removexattr(inode, "user.stores")
        queued = (await fs.tree.lookup(ROOT_INODE, "image-2")).inode
        with pytest.raises(InvalidArgument):
            await fs.setxattr(queued, "user.stores", b"fs,ceph")
        glance.fail["import"] = Forbidden(403, "copy_image is disallowed by policy")
        with pytest.raises(Forbidden):  # EPERM at the boundary
            await fs.setxattr(inode, "user.stores", b"fs,ceph")
        assert glance.record(record(1)["id"])["stores"] == "fs"
        assert [c for c in glance.calls if c[0] == "delete_from_store"] == []
    async with filesystem([record(1, stores="fs")], read_only=True) as (fs, _, _):
        inode = (await fs.tree.lookup(ROOT_INODE, "image-1")).inode
        with pytest.raises(ReadOnly):
            await fs.setxattr(inode, "user.stores", b"fs,ceph")


async def test_a_failed_copy_is_logged_once_with_glance_s_reason(
    autojump_clock: MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    async with filesystem([record(1, stores="fs")]) as (fs, glance, _):
        image_id = record(1)["id"]
        inode = (await fs.tree.lookup(ROOT_INODE, "image-1")).inode
        await fs.setxattr(inode, "user.stores", b"fs,ceph")
        glance.end_import(image_id, os_glance_failed_import="ceph", failure="rbd: no space")
        await trio.sleep(10)
        failed = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert failed == [
            f"image {image_id}: copy to ceph failed: failed in store ceph; rbd: no space"
        ]
        assert image_id not in STATUS.imports


# -- ln -s URL new/NAME -----------------------------------------------------------------------


async def test_a_symlink_in_new_imports_from_its_url_and_shows_it_until_active(
    autojump_clock: MockClock,
) -> None:
    async with filesystem(store="ceph") as (fs, glance, _):
        attrs = await fs.symlink(NEW_INODE, "cirros", URL)
        assert stat.S_ISLNK(attrs.mode)
        assert attrs.size == len(URL)
        [image] = glance.named("cirros")
        assert (image["disk_format"], image["container_format"]) == ("qcow2", "bare")
        assert glance.imports == [(image["id"], "web-download", URL, ["ceph"])]
        assert await fs.readlink(attrs.inode) == URL
        assert STATUS.imports[image["id"]]["what"] == f"web-download of {URL}"
        assert stat.S_ISLNK((await fs.tree.lookup(NEW_INODE, "cirros")).mode)
        glance.end_import(image["id"], status="active", size=10)
        await trio.sleep(2)
        assert image["id"] not in STATUS.imports
        attrs = await fs.tree.lookup(NEW_INODE, "cirros")
        assert stat.S_ISREG(attrs.mode)
        assert attrs.size == 10
        with pytest.raises(InvalidArgument):
            await fs.readlink(attrs.inode)


@pytest.mark.parametrize("keep_failed", [False, True])
async def test_a_failed_web_download_is_logged_and_deleted_unless_kept(
    keep_failed: bool, autojump_clock: MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    async with filesystem(keep_failed=keep_failed) as (fs, glance, _):
        attrs = await fs.symlink(NEW_INODE, "disk.raw", URL)
        [image] = glance.named("disk.raw")
        assert image["disk_format"] == "qcow2"  # the URL's file name tells first
        glance.end_import(image["id"], status="queued", failure="HTTP 404 Not Found")
        await trio.sleep(10)
        lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        assert len(lines) == 1, lines
        assert "HTTP 404 Not Found" in lines[0]
        assert image["id"] not in STATUS.imports
        assert bool(glance.named("disk.raw")) == keep_failed
        if keep_failed:
            assert await fs.readlink(attrs.inode) == URL


async def test_symlinks_refused_where_they_cannot_be_web_downloads() -> None:
    async with filesystem() as (fs, glance, _):
        with pytest.raises(NotPermitted):
            await fs.symlink(ROOT_INODE, "cirros", URL)
        for target in ("/etc/passwd", "ftp://host/disk.raw", "cirros.qcow2"):
            with pytest.raises(InvalidArgument):
                await fs.symlink(NEW_INODE, "cirros", target)
        glance.fail["import"] = Forbidden(403, "web-download is disallowed")
        with pytest.raises(Forbidden):
            await fs.symlink(NEW_INODE, "cirros", URL)
        assert glance.named("cirros") == []  # the image it made is deleted
    async with filesystem() as (fs, glance, _):
        glance.info.methods = ["glance-direct"]
        with pytest.raises(NotPermitted):
            await fs.symlink(NEW_INODE, "cirros", URL)
        assert glance.calls == []
    async with filesystem(read_only=True) as (fs, _, _):
        with pytest.raises(ReadOnly):
            await fs.symlink(NEW_INODE, "cirros", URL)
