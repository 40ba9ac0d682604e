"""Unit tests of the status registry, its text, the mountinfo parser and the metrics collector."""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import socket
import urllib.request
from pathlib import Path

import pytest
import trio

from glancefs import RequestEvent
from glancefs.fs import control
from glancefs.fs.cache import CacheStats
from glancefs.fs.config import ConfigError
from glancefs.fs.metrics import MetricsServer, parse_address
from glancefs.fs.status import ErrorLog, MountStatus, format_bytes, format_duration, render


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def registry(clock: FakeClock) -> MountStatus:
    return MountStatus(clock=clock, wall=lambda: 1_700_000_000.0)


def test_a_transfer_is_listed_from_its_first_byte_until_it_ends(registry: MountStatus) -> None:
    transfer = registry.started_transfer("id-1", "disk.qcow2", "upload")
    assert registry.snapshot()["transfers"] == []  # opened, nothing moved (a touch)
    transfer.progress(1024)
    (shown,) = registry.snapshot()["transfers"]
    assert (shown["image_id"], shown["name"], shown["direction"], shown["done"]) == (
        "id-1", "disk.qcow2", "upload", 1024,
    )  # fmt: skip
    assert shown["total"] is None
    assert shown["eta"] is None
    transfer.finished("failed")
    transfer.finished("aborted")  # the later exit path of the same failure: ignored
    snapshot = registry.snapshot()
    assert snapshot["transfers"] == []
    assert snapshot["counters"]["uploads"] == {"failed": 1}
    assert snapshot["counters"]["bytes_uploaded"] == 1024


def test_rate_and_eta_over_the_last_seconds(registry: MountStatus, clock: FakeClock) -> None:
    transfer = registry.started_transfer("id-2", "big", "read", total=100 * 1024 * 1024)
    for _ in range(10):  # 1 MiB every 0.5 s: 2 MiB/s
        clock.now += 0.5
        transfer.progress(1024 * 1024)
    (shown,) = registry.snapshot()["transfers"]
    assert shown["rate"] == pytest.approx(2 * 1024 * 1024)
    assert shown["eta"] == pytest.approx(90 / 2)
    assert registry.counters()["bytes_from_glance"] == 10 * 1024 * 1024
    assert registry.counters()["open_files"] == 1
    transfer.finished("closed")
    assert registry.counters()["uploads"] == {}  # reads are not uploads


def test_requests_retries_and_health(registry: MountStatus, clock: FakeClock) -> None:
    registry.request(RequestEvent("GET", "/v2/images", 200, 1))
    assert registry.snapshot()["healthy"]
    registry.request(RequestEvent("GET", "/v2/images/x/file", None, 1, "connection refused"))
    clock.now += 3
    snapshot = registry.snapshot()
    assert not snapshot["healthy"]
    assert snapshot["problems"] == [
        "Glance failing for 3s: GET /v2/images/x/file: connection refused"
    ]
    clock.now += 1
    registry.request(RequestEvent("GET", "/v2/images/x/file", 206, 2))  # the retry worked
    snapshot = registry.snapshot()
    assert snapshot["healthy"]
    assert snapshot["problems"] == []
    assert snapshot["counters"]["requests"] == [
        {"method": "GET", "status": "200", "count": 1},
        {"method": "GET", "status": "206", "count": 1},
        {"method": "GET", "status": "error", "count": 1},
    ]
    assert snapshot["counters"]["retries"] == {"GET": 1}


def test_errors_served_bytes_and_the_error_log(registry: MountStatus) -> None:
    assert registry.served(b"abc") == b"abc"
    registry.refused(errno.EPERM)
    registry.refused(errno.EPERM)
    logger = logging.getLogger("glancefs.test-status")
    handler = ErrorLog(registry)
    logger.addHandler(handler)
    try:
        logger.info("not kept")
        logger.warning("unlink: rm x: deleting images needs --allow-delete")
    finally:
        logger.removeHandler(handler)
    snapshot = registry.snapshot()
    assert snapshot["counters"]["bytes_served"] == 3
    assert snapshot["counters"]["errors"] == {"EPERM": 2}
    assert [e["message"] for e in snapshot["errors"]] == [
        "unlink: rm x: deleting images needs --allow-delete"
    ]
    json.dumps(snapshot)  # what the control socket sends


def test_render_shows_what_matters(registry: MountStatus) -> None:
    registry.describe(
        mountpoint="/mnt/g", endpoint="http://127.0.0.1:9292", project=None,
        options={"ro": True, "allow_delete": False, "sort": "name:asc", "limit": None},
    )  # fmt: skip
    registry.started_transfer("id-3", "cirros", "read", total=4096).progress(1024)
    text = render("/mnt/g", "ok", registry.snapshot(), bars=True)
    assert "/mnt/g: ok" in text
    assert "endpoint   http://127.0.0.1:9292" in text
    assert "options    ro, sort=name:asc" in text
    assert "read    cirros (id-3)  [#####...............]  1.0 KiB / 4.0 KiB 25%" in text
    assert "cache      off" in text
    assert render("/mnt/x", "dead: gone", None, bars=False) == "/mnt/x: dead: gone"
    registry.cache = _CACHE_FIGURES
    text = render("/mnt/g", "ok", registry.snapshot(), bars=True)
    assert (
        "cache      3.0 MiB of 1.0 GiB, 2 images (1 verified); 12 hits (3.0 MiB), 4 misses, "
        "1 evicted, 2 damaged blocks dropped"
    ) in text


def test_uploads_waiting_for_a_writer_are_shown_until_they_go_on(registry: MountStatus) -> None:
    registry.upload_waiting("id-4", "disk.qcow2", "only a format's header", 196616, 4242)
    registry.upload_waiting("id-5", "sized.raw", "only a size", 8 * 1024 * 1024, None)
    text = render("/mnt/g", "ok", registry.snapshot(), bars=False)
    assert "waiting    2 uploads (written in part, not yet the end)" in text
    assert (
        "disk.qcow2 (id-4)  192.0 KiB, only a format's header; waits for its writer (pid 4242) "
        "to open it again or exit"
    ) in text
    assert "sized.raw (id-5)  8.0 MiB, only a size; waits for the next writer" in text
    registry.upload_goes_on("id-4")
    registry.upload_goes_on("id-5")
    assert registry.snapshot()["waiting"] == []
    assert "waiting" not in render("/mnt/g", "ok", registry.snapshot(), bars=False)


#: What ``dataclasses.asdict(DataCache.stats())`` gives, as the mount copies it in.
_CACHE_FIGURES = dataclasses.asdict(
    CacheStats(
        hits=12, hit_bytes=3 * 1024 * 1024, misses=4, written_bytes=5 * 1024 * 1024,
        bytes=3 * 1024 * 1024, max_bytes=1024**3, entries=2, verified_entries=1, evictions=1,
        damaged_blocks=2, rejected_entries=0, refused_blocks=0, mismatched_blocks=0,
    )
)  # fmt: skip


def test_formats() -> None:
    assert [format_bytes(n) for n in (5, 1536, 3 * 1024**3)] == ["5 B", "1.5 KiB", "3.0 GiB"]
    assert [format_duration(s) for s in (3, 245, 7380, 93600)] == ["3s", "4m05s", "2h03m", "1d02h"]


def test_parse_mountinfo_finds_glancefs_mounts_with_escaped_paths() -> None:
    text = (
        "36 35 98:0 / /mnt1 rw,noatime master:1 - ext3 /dev/root rw,errors=continue\n"
        "61 30 0:52 / /tmp/a\\040b ro,nosuid,nodev,relatime shared:33 - fuse.glancefs glancefs "
        "ro,user_id=0,group_id=0\n"
        "62 30 0:53 / /srv/g rw,relatime - fuse.glancefs glancefs rw,user_id=1000,group_id=1000\n"
    )
    assert control.parse_mountinfo(text) == [
        control.MountEntry("/tmp/a b", "glancefs", 0, True),
        control.MountEntry("/srv/g", "glancefs", 1000, False),
    ]


def test_parse_address() -> None:
    assert parse_address("127.0.0.1:9464") == ("127.0.0.1", 9464)
    assert parse_address("[::1]:80") == ("::1", 80)
    for bad in ("9464", "host:", ":80", "h:0", "h:99999"):
        with pytest.raises(ConfigError, match="expected HOST:PORT"):
            parse_address(bad)


def _scrape(registry: MountStatus, port: int) -> list[str]:
    """The lines of one scrape of a metrics server started for it (stopped twice: a no-op)."""
    server = MetricsServer(("127.0.0.1", port), registry)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
            text: str = answer.read().decode()
            return text.splitlines()
    finally:
        server.stop()
        server.stop()


def test_metrics_exposition(registry: MountStatus) -> None:
    registry.request(RequestEvent("GET", "/v2/images", 200, 1))
    registry.started_transfer("id-4", "x", "read", total=10).progress(10)
    registry.served(b"x" * 10)
    registry.refused(errno.EIO)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    lines = _scrape(registry, port)
    for line in (
        'glancefs_requests_total{method="GET",status="200"} 1.0',
        "glancefs_read_bytes_total 10.0",
        "glancefs_served_bytes_total 10.0",
        "glancefs_uploaded_bytes_total 0.0",
        'glancefs_errors_total{errno="EIO"} 1.0',
        "glancefs_open_files 1.0",
        "glancefs_streams 0.0",
        "glancefs_spool_bytes 0.0",
        "glancefs_cache_hits_total 0.0",
        "glancefs_cache_bytes 0.0",
    ):
        assert line in lines, line
    registry.cache = _CACHE_FIGURES
    lines = _scrape(registry, port)
    for line in (
        "glancefs_cache_hits_total 12.0",
        "glancefs_cache_hit_bytes_total 3.145728e+06",
        "glancefs_cache_misses_total 4.0",
        "glancefs_cache_stored_bytes_total 5.24288e+06",
        "glancefs_cache_evictions_total 1.0",
        "glancefs_cache_damaged_blocks_total 2.0",
        "glancefs_cache_rejected_entries_total 0.0",
        "glancefs_cache_bytes 3.145728e+06",
        "glancefs_cache_max_bytes 1.073741824e+09",
        "glancefs_cache_entries 2.0",
    ):
        assert line in lines, line
    with pytest.raises(OSError):  # stopped: the port is closed
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5)


async def test_control_socket_answers_and_is_private(
    registry: MountStatus, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    directory = tmp_path / "run"
    monkeypatch.setattr(control, "_candidate_dirs", lambda uid: [directory])
    registry.describe(mountpoint="/mnt/q")
    async with trio.open_nursery() as nursery:
        path = await nursery.start(control.serve_control, registry, "/mnt/q")
        assert path == control.socket_path("/mnt/q")
        assert directory.stat().st_mode & 0o777 == 0o700
        assert path.stat().st_mode & 0o777 == 0o600
        answer = await trio.to_thread.run_sync(control._query, path)
        assert answer["mountpoint"] == "/mnt/q"
        assert answer["healthy"]
        nursery.cancel_scope.cancel()
    assert not path.exists()
