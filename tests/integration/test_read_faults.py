"""Reads through a fault-injecting proxy (lab.faults) in front of a real Glance, on real mounts:
a flipped byte never reaches a reader as a clean end of file, and a small Glance under many
readers and writers does not stall."""

from __future__ import annotations

import errno
import hashlib
import os
import random
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import MountFactory
from support import GlanceAPI, Mount

from lab.faults import IMAGE_DATA, FaultProxy, Request
from lab.servers import GlanceServer

MiB = 1024 * 1024
#: Seconds any one operation may take before the test calls it a stall.
OPERATION_TIMEOUT = 60


class CountingProxy(FaultProxy):
    """A FaultProxy that also counts image-data GETs in flight per image (and the most ever).

    A GET is in flight from its arrival until its answer is relayed or the client hangs up (a
    watcher polls the client's socket: the proxy itself notices only when it next writes, which
    may be seconds later behind a slow Glance).
    """

    def __init__(self, upstream: str, **kwargs: Any) -> None:
        super().__init__(upstream, **kwargs)
        self._flight_lock = threading.Lock()
        self._in_flight: Counter[str] = Counter()
        self.peak_in_flight: Counter[str] = Counter()

    def _exchange(self, request: Request, reader: Any, client: Any) -> bool:
        image_id = request.image_id if request.method == "GET" else None
        if image_id is None:
            return super()._exchange(request, reader, client)
        with self._flight_lock:
            self._in_flight[image_id] += 1
            self.peak_in_flight[image_id] = max(
                self.peak_in_flight[image_id], self._in_flight[image_id]
            )
        ended = threading.Event()
        watcher = threading.Thread(target=self._land, args=(image_id, client, ended), daemon=True)
        watcher.start()
        try:
            return super()._exchange(request, reader, client)
        finally:
            ended.set()
            watcher.join()

    def _land(self, image_id: str, client: socket.socket, ended: threading.Event) -> None:
        """Count the GET out when its exchange ends or the client closes, whichever is first."""
        poller = select.poll()
        poller.register(client, select.POLLRDHUP | select.POLLHUP | select.POLLERR)
        while not ended.is_set() and not poller.poll(20):
            pass
        with self._flight_lock:
            self._in_flight[image_id] -= 1


@pytest.fixture
def proxy(glance: GlanceServer) -> Iterator[CountingProxy]:
    with CountingProxy(glance.url, seed=11) as started:
        yield started


def _image(api: GlanceAPI, size: int, seed: int) -> tuple[dict, bytes]:
    data = random.Random(seed).randbytes(size)
    return api.create(f"faulty-{uuid.uuid4().hex[:8]}", data), data


def _run(*command: str, timeout: float = OPERATION_TIMEOUT) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(command, capture_output=True, timeout=timeout, check=False)


READ_PAUSING = """
import os, sys, time
fd = os.open(sys.argv[1], os.O_RDONLY)
size = os.fstat(fd).st_size
data = os.read(fd, size // 2)
time.sleep(3)  # longer than the stream keeps an idle connection
while chunk := os.read(fd, 1 << 20):
    data += chunk
sys.stdout.buffer.write(data)
"""

READ_TWICE = """
import sys
for _ in range(2):
    try:
        with open(sys.argv[1], "rb") as f:
            data = f.read()
    except OSError as error:
        print(error.errno, file=sys.stderr)
    else:
        sys.stdout.buffer.write(data)
        sys.exit(0)
sys.exit(1)
"""


READ_WHOLE = """
import sys
with open(sys.argv[1], "rb") as f:
    sys.stdout.buffer.write(f.read())  # one read(2) of the whole file: readahead out of order
"""


def _readers(case: str, path: Path) -> list[subprocess.CompletedProcess[bytes]]:
    """Run the readers of one case to the end; each result's stdout is what it read."""
    if case == "in step":
        return [_run("cat", str(path))]
    if case == "pausing":
        return [_run(sys.executable, "-c", READ_PAUSING, str(path))]
    if case == "twice":
        return [_run(sys.executable, "-c", READ_TWICE, str(path))]
    command, count = (
        (["cat"], 4) if case == "four at once" else ([sys.executable, "-c", READ_WHOLE], 2)
    )
    commands = [
        subprocess.Popen([*command, str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for _ in range(count)
    ]
    results = []
    for process in commands:
        out, err = process.communicate(timeout=OPERATION_TIMEOUT)
        results.append(subprocess.CompletedProcess(process.args, process.returncode, out, err))
    return results


@pytest.mark.parametrize("case", ["in step", "pausing", "four at once", "twice", "two whole"])
def test_a_flipped_byte_fails_the_readers_of_that_pass_and_heals_at_the_next_open(
    case: str, api: GlanceAPI, proxy: CountingProxy, mount_glancefs: MountFactory
) -> None:
    image, data = _image(api, 24 * MiB, seed=len(case))
    mount = mount_glancefs(proxy.url)
    path = mount.path / "by-id" / image["id"]
    flip = proxy.flip_byte(method="GET", path=IMAGE_DATA)  # every data response

    results = _readers(case, path)
    assert proxy.flips, "the proxy flipped nothing"
    for result in results:
        assert result.returncode != 0, (
            f"{case}: a reader exited 0 (same data: {result.stdout == data})"
        )
        # cat and Python's traceback say it in words; READ_TWICE prints the errno of each try.
        failures = result.stderr.split() if case == "twice" else []
        assert b"Input/output error" in result.stderr or failures == [b"5", b"5"], result.stderr
    if case == "four at once":
        assert proxy.peak_in_flight[image["id"]] == 1
    lines = [line for line in mount.log().splitlines() if image["id"] in line and "corrupt" in line]
    # A reader that opens the file again after the failure (READ_TWICE) makes a second pass,
    # which fails too: two in a row, sticky until SIGHUP.
    passes = 2 if case == "twice" else 1
    assert len(lines) == passes, lines
    assert "sha512" in lines[0] or "crc32" in lines[0]
    assert "Traceback" not in mount.log()

    flip.remove()
    if passes == 2:
        assert _run("cat", str(path)).returncode != 0
        assert mount.proc is not None
        mount.proc.send_signal(signal.SIGHUP)
        _wait_for_log(mount, "SIGHUP")
    again = _run("cat", str(path))  # without SIGHUP after one bad pass: a new download
    assert again.returncode == 0, again.stderr
    assert again.stdout == data
    record = api.get(image["id"])
    assert record["status"] == "active"
    assert record["os_hash_value"] == hashlib.sha512(data).hexdigest()


def test_two_bad_passes_in_a_row_stick_until_sighup(
    api: GlanceAPI, proxy: CountingProxy, mount_glancefs: MountFactory
) -> None:
    image, data = _image(api, 4 * MiB, seed=7)
    mount = mount_glancefs(proxy.url)
    path = mount.path / "by-id" / image["id"]
    flip = proxy.flip_byte(method="GET", path=IMAGE_DATA)
    for _ in range(2):
        assert _run("cat", str(path)).returncode != 0
    flip.remove()
    gets = proxy.count("GET", IMAGE_DATA)
    sticky = _run("cat", str(path))
    assert sticky.returncode != 0
    assert b"Input/output error" in sticky.stderr
    assert proxy.count("GET", IMAGE_DATA) == gets  # a sticky image asks Glance nothing
    assert mount.proc is not None
    mount.proc.send_signal(signal.SIGHUP)
    _wait_for_log(mount, "SIGHUP")
    again = _run("cat", str(path))
    assert again.returncode == 0, again.stderr
    assert again.stdout == data


def _wait_for_log(mount: Mount, text: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while text not in mount.log():
        if time.monotonic() > deadline:
            raise AssertionError(f"{text!r} never logged:\n{mount.log()}")
        time.sleep(0.05)


def test_reset_downloads_resume_and_verify(
    api: GlanceAPI, proxy: CountingProxy, mount_glancefs: MountFactory
) -> None:
    image, data = _image(api, 24 * MiB, seed=5)
    mount = mount_glancefs(proxy.url)
    proxy.reset_after(5 * MiB + 3, method="GET", path=IMAGE_DATA, times=3)
    result = _run("cat", str(mount.path / "by-id" / image["id"]))
    assert result.returncode == 0, result.stderr
    assert result.stdout == data
    gets = proxy.data_gets(image["id"])
    assert gets[0].range is None
    assert len(gets) >= 4
    assert all(get.range is not None and get.range.startswith("bytes=") for get in gets[1:])
    assert "Traceback" not in mount.log()


@pytest.fixture(params=[4, 8], ids=["4 threads", "8 threads"])
def small_glance(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[GlanceServer]:
    with GlanceServer(tmp_path / "glance", flavor="noauth", threads=request.param) as server:
        yield server


def test_sixteen_readers_and_four_writers_on_a_small_glance(
    small_glance: GlanceServer, mount_glancefs: MountFactory, tmp_path: Path
) -> None:
    api = GlanceAPI(small_glance.url)
    try:
        images = [_image(api, 64 * MiB, seed=n) for n in range(4)]
        sources = []
        for n in range(4):
            source = tmp_path / f"upload-{n}.raw"
            source.write_bytes(random.Random(100 + n).randbytes(32 * MiB))
            sources.append(source)
        with CountingProxy(small_glance.url) as proxy:
            mount = mount_glancefs(proxy.url)
            readers = [
                subprocess.Popen(
                    ["sha256sum", str(mount.path / "by-id" / image["id"])],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                )
                for image, _ in images
                for _ in range(4)
            ]
            writers = [
                subprocess.Popen(
                    ["cp", str(source), str(mount.path / "new" / source.name)],
                    stderr=subprocess.PIPE,
                )
                for source in sources
            ]
            for index, process in enumerate(readers):
                out, err = process.communicate(timeout=OPERATION_TIMEOUT)
                assert process.returncode == 0, err
                expected = hashlib.sha256(images[index // 4][1]).hexdigest()
                assert out.split()[0].decode() == expected
            failed_uploads = set()
            for source, process in zip(sources, writers, strict=True):
                _, err = process.communicate(timeout=OPERATION_TIMEOUT)
                if process.returncode != 0 and _sqlite_locked(small_glance):
                    # The lab Glance's SQLite gives up on a lock under this load (a 500): the
                    # upload fails cleanly, which is the write path's promise.
                    failed_uploads.add(source.name)
                    continue
                assert process.returncode == 0, err
            for image, _ in images:
                assert proxy.peak_in_flight[image["id"]] == 1, proxy.data_gets(image["id"])
        for source in sources:
            uploads = api.list(name=source.name)
            if source.name in failed_uploads:
                assert uploads == []
                continue
            (uploaded,) = uploads
            assert uploaded["status"] == "active"
            assert uploaded["size"] == 32 * MiB
            assert uploaded["checksum"] == hashlib.md5(source.read_bytes()).hexdigest()
        assert len(failed_uploads) < len(sources)
        assert "Traceback" not in mount.log()
    finally:
        api.close()


def _sqlite_locked(glance: GlanceServer) -> bool:
    return "database is locked" in glance.log_path.read_text(errors="replace")


def test_a_frozen_glance_fails_reads_within_the_documented_bound(
    tmp_path: Path, mount_glancefs: MountFactory
) -> None:
    timeout, retries = 2, 1
    with GlanceServer(tmp_path / "glance", flavor="noauth") as server:
        api = GlanceAPI(server.url)
        image, data = _image(api, 32 * MiB, seed=9)
        api.close()
        mount = mount_glancefs(server.url, "--timeout", str(timeout), "--retries", str(retries))
        fd = os.open(mount.path / "by-id" / image["id"], os.O_RDONLY)
        try:
            assert os.read(fd, MiB) == data[:MiB]  # a stream is open and running
            assert server.pid is not None
            os.killpg(server.pid, signal.SIGSTOP)
            try:
                started = time.monotonic()
                with pytest.raises(OSError) as failure:
                    read_to_end(fd)
                elapsed = time.monotonic() - started
            finally:
                os.killpg(server.pid, signal.SIGCONT)
            assert failure.value.errno == errno.EIO
            # The documented bound: --timeout x (--retries + 1) + 1 s.
            assert elapsed < timeout * (retries + 1) + 1, elapsed
            print(f"frozen Glance: EIO after {elapsed:.2f} s")
        finally:
            os.close(fd)


def read_to_end(fd: int) -> None:
    """Read ``fd`` until EOF, 1 MiB at a time."""
    while os.read(fd, MiB):
        pass
