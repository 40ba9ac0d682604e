"""Unit tests of the pure layers: inodes, config, namespace, xattrs, formats, error texts."""

from __future__ import annotations

import errno
import stat
import subprocess
from pathlib import Path
from typing import Any, ClassVar

import pytest

from glancefs._exceptions import (
    BadRequest,
    NotFound,
    OverLimit,
    QuotaExceeded,
    ServerError,
    clean_text,
    error_for_status,
)
from glancefs.fs.config import ConfigError, View, parse_filter, parse_mount_options, parse_sort
from glancefs.fs.formats import choose_formats, detect_disk_format, upload_name
from glancefs.fs.inodes import FIRST_DYNAMIC_INODE, ImageKey, InodeTable
from glancefs.fs.namespace import BY_ID, NEW, ROOT, Directory, DirKind, file_mode, query_for
from glancefs.fs.refusals import InvalidArgument, NoAttribute, NotPermitted, Unsupported
from glancefs.fs.xattrs import image_xattrs, remove_patch, set_patch, tag_operation
from glancefs.plumbing import redact

FIXED = {ROOT: 1, BY_ID: 2}


class TestInodes:
    def test_inode_is_a_function_of_the_key(self) -> None:
        assert InodeTable(FIXED).inode_of(ImageKey("a")) == InodeTable({}).inode_of(ImageKey("a"))
        assert InodeTable(FIXED).inode_of(ImageKey("a")) >= FIRST_DYNAMIC_INODE

    def test_lookup_counts_and_forget(self) -> None:
        table = InodeTable(FIXED)
        inode = table.remember(ImageKey("a"))
        assert table.remember(ImageKey("a")) == inode
        assert table.lookup_count(inode) == 2
        table.forget(inode, 1)
        assert table.key_of(inode) == ImageKey("a")
        table.forget(inode, 1)
        assert table.key_of(inode) is None
        assert len(table) == 0

    def test_fixed_inodes_survive_forget(self) -> None:
        table = InodeTable(FIXED)
        table.remember(ROOT)
        table.forget(1, 5)
        assert table.key_of(1) == ROOT

    def test_collisions_get_another_number(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import glancefs.fs.inodes as inodes

        monkeypatch.setattr(inodes, "_hashed_inode", lambda key: FIRST_DYNAMIC_INODE)
        table = InodeTable(FIXED)
        first = table.remember(ImageKey("a"))
        second = table.remember(ImageKey("b"))
        assert first != second
        assert table.key_of(second) == ImageKey("b")


class TestConfig:
    def test_sort(self) -> None:
        assert parse_sort("size:desc,name") == "size:desc,name:asc"
        for bad in ("colour", "name:up", "name:asc,"):
            with pytest.raises(ConfigError):
                parse_sort(bad)

    def test_filter(self) -> None:
        assert parse_filter("os_distro=ubuntu") == ("os_distro", "ubuntu")
        assert parse_filter("created_at=gt:2024-01-01T00:00:00Z")[1].startswith("gt:")
        with pytest.raises(ConfigError):
            parse_filter("novalue")

    def test_mount_options(self) -> None:
        options = parse_mount_options("ro,allow_other,_netdev,nofail,sort=name:desc,tag=a,tag=b")
        assert options == [
            ("ro", None),
            ("allow_other", None),
            ("sort", "name:desc"),
            ("tag", "a"),
            ("tag", "b"),
        ]
        with pytest.raises(ConfigError):
            parse_mount_options("bogus")


class TestNamespace:
    def test_modes_follow_the_lifecycle(self) -> None:
        assert file_mode("queued") == stat.S_IFREG | 0o644
        assert file_mode("queued", read_only=True) == stat.S_IFREG | 0o444
        assert file_mode("active") == stat.S_IFREG | 0o444
        assert file_mode("saving") == stat.S_IFREG | 0o444
        assert file_mode("killed") == stat.S_IFREG
        assert file_mode("deactivated") == stat.S_IFREG

    def test_queries(self) -> None:
        view = View(sort="size:desc", filters=(("os_distro", "x"),), tags=("t",), limit=5)
        root = query_for(ROOT, view)
        assert (root.sort, root.filters, root.limit) == (
            "size:desc",
            (("os_distro", "x"), ("tag", "t")),
            5,
        )
        assert query_for(BY_ID, view).filters == ()  # by-id ignores the root's filters
        assert query_for(NEW, view).filters == (("status", "queued"),)
        assert query_for(Directory(DirKind.TAG, "x"), view).filters == (("tag", "x"),)


class TestXattrs:
    record: ClassVar[dict[str, Any]] = {
        "id": "1",
        "status": "queued",
        "protected": False,
        "tags": ["b", "a"],
        "checksum": None,
        "min_ram": 0,
        "os_distro": "ubuntu",
        "locations": [],
    }

    def test_reading(self) -> None:
        attrs = image_xattrs(self.record)
        assert attrs["user.tags"] == b"a,b"
        assert attrs["user.protected"] == b"false"
        assert attrs["user.min_ram"] == b"0"
        assert "user.checksum" not in attrs

    def test_setting_converts_strictly(self) -> None:
        assert set_patch(self.record, "user.min_ram", b"512") == [
            {"op": "replace", "path": "/min_ram", "value": 512}
        ]
        assert set_patch(self.record, "user.protected", b"true")[0]["value"] is True
        assert set_patch(self.record, "user.new_prop", b"v")[0]["op"] == "add"
        assert set_patch(self.record, "user.os_distro", b"v")[0]["op"] == "replace"
        assert set_patch(self.record, "user.tags", b"x, y,x")[0]["value"] == ["x", "y"]

    @pytest.mark.parametrize(
        ("name", "value", "error"),
        [
            ("user.min_ram", b"-1", InvalidArgument),
            ("user.min_disk", b"1.5", InvalidArgument),
            ("user.protected", b"yes please", InvalidArgument),
            ("user.visibility", b"all", InvalidArgument),
            ("user.disk_format", b"floppy", InvalidArgument),
            ("user.x", b"\xff", InvalidArgument),
            ("user.id", b"2", NotPermitted),
            ("user.checksum", b"0", NotPermitted),
            ("trusted.x", b"1", Unsupported),
            ("user.", b"1", InvalidArgument),
        ],
    )
    def test_setting_refusals(self, name: str, value: bytes, error: type[Exception]) -> None:
        with pytest.raises(error):
            set_patch(self.record, name, value)

    def test_formats_only_while_queued(self) -> None:
        assert set_patch(self.record, "user.disk_format", b"qcow2")[0]["value"] == "qcow2"
        with pytest.raises(NotPermitted):
            set_patch({**self.record, "status": "active"}, "user.disk_format", b"qcow2")

    def test_removing(self) -> None:
        assert remove_patch(self.record, "user.os_distro") == [
            {"op": "remove", "path": "/os_distro"}
        ]
        assert remove_patch(self.record, "user.tags")[0]["value"] == []
        with pytest.raises(NoAttribute):
            remove_patch(self.record, "user.nothing")
        with pytest.raises(NotPermitted):
            remove_patch(self.record, "user.min_ram")

    def test_single_tags(self) -> None:
        assert tag_operation("user.tags.add", b"x") == ("add", "x")
        assert tag_operation("user.tags.remove", b"x") == ("remove", "x")
        assert tag_operation("user.os_distro", b"x") is None
        with pytest.raises(InvalidArgument):
            tag_operation("user.tags.add", b"a,b")

    def test_refusal_errnos(self) -> None:
        assert InvalidArgument("x").errno == errno.EINVAL
        assert NotPermitted("x").errno == errno.EPERM
        assert Unsupported("x").errno == errno.ENOTSUP
        assert NoAttribute("x").errno == errno.ENODATA


class TestFormats:
    def test_rsync_temporary_names(self) -> None:
        assert upload_name(".disk.iso.AbC123") == "disk.iso"
        assert upload_name(".hidden") == ".hidden"
        assert upload_name("disk.iso") == "disk.iso"

    def test_content_beats_the_name(self, tmp_path: Path) -> None:
        qcow2 = tmp_path / "d.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(qcow2), "1G"], check=True)
        head = qcow2.read_bytes()
        assert detect_disk_format(head) == "qcow2"
        assert choose_formats("disk.img", head) == ("qcow2", "bare")
        assert choose_formats(".disk.raw.Xy12Zz", head) == ("qcow2", "bare")

    def test_name_then_default(self) -> None:
        raw = bytes(range(256)) * 64
        assert choose_formats("k.aki", raw) == ("aki", "aki")
        assert choose_formats("a.ova", raw) == ("vmdk", "ova")
        assert choose_formats("noext", raw, ("vhd", "ovf")) == ("vhd", "ovf")
        # A name promising a format Glance inspects, on data that is not it: raw, not a 415.
        assert choose_formats("fake.qcow2", raw) == ("raw", "bare")
        assert choose_formats("fake.iso", raw) == ("raw", "bare")


class TestErrorTexts:
    def test_html_becomes_one_line(self) -> None:
        text = "<html><body><h1>404 Not Found</h1>\n\n<br /><br />\nNo image &amp; more</body>"
        assert clean_text(text) == "404 Not Found No image & more"

    def test_typed_errors(self) -> None:
        error = error_for_status(404, "<p>gone</p>", "req-1")
        assert isinstance(error, NotFound)
        assert str(error) == "404 gone (request req-1)"
        assert isinstance(error_for_status(400, "bad"), BadRequest)
        assert isinstance(error_for_status(502, "proxy"), ServerError)

    #: Glance's 413 for a unified limit, as its JSON error body's message says it.
    OVER_LIMIT = (
        "The request returned a 413 Request Entity Too Large. This generally means that rate "
        "limiting or a quota threshold was breached.\n\nThe response body:\nProject "
        "224230e985c2433898fb47402cef0246 is over a limit for [Resource image_count_total is "
        "over limit of 1 due to current usage 1 and delta 1]<br /><br />\n\n\n"
    )

    def test_a_unified_limit_is_named_with_its_figures(self) -> None:
        error = error_for_status(413, self.OVER_LIMIT, "req-9")
        assert isinstance(error, QuotaExceeded)
        assert isinstance(error, OverLimit)
        assert (error.resource, error.limit, error.usage, error.delta) == (
            "image_count_total",
            1,
            1,
            1,
        )
        assert str(error) == (
            "413 quota image_count_total exceeded: limit 1, in use 1, the request adds 1 "
            "(request req-9)"
        )

    def test_a_size_limit_in_mib_from_the_html_body(self) -> None:
        html_body = (
            "<html><head><title>413 Request Entity Too Large</title></head><body><h1>413 "
            "Request Entity Too Large</h1> The response body:\nProject p is over a limit for "
            "[Resource image_size_total is over limit of 64 due to current usage 70 and delta "
            "0]<br /><br />\n</body></html>"
        )
        error = error_for_status(413, html_body)
        assert isinstance(error, QuotaExceeded)
        assert str(error) == "413 quota image_size_total exceeded: limit 64 MiB, in use 70 MiB"
        stage = error_for_status(
            413, self.OVER_LIMIT.replace("image_count_total", "image_stage_total")
        )
        assert isinstance(stage, QuotaExceeded)
        assert stage.resource == "image_stage_total"
        assert "limit 1 MiB, in use 1 MiB, the request adds 1 MiB" in str(stage)

    def test_other_413s_are_not_quotas(self) -> None:
        cap = error_for_status(413, "The incoming image is too large: 4194304 > 2097152")
        assert type(cap) is OverLimit
        assert not isinstance(error_for_status(400, self.OVER_LIMIT), QuotaExceeded)

    def test_redaction(self) -> None:
        line = redact("curl -H 'X-Auth-Token: s3cr3t'", ["s3cr3t"])
        assert "s3cr3t" not in line
        assert "{SHA256}" in line
