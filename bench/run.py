"""The measurements, in the order `make bench` runs them, and the command line."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import random
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from datetime import UTC, datetime
from pathlib import Path

from bench.data import GIB, random_file, sparse_file
from bench.harness import (
    MB,
    Metric,
    Series,
    children_cpu_seconds,
    cpu_seconds,
    drop_page_cache,
    run,
    source_version,
    table,
    timed,
    warm,
    wrap,
    write_section,
)
from bench.settings import LINK_RATES, SETTINGS, Endpoint, Link, Pki, link, loopback, tls
from lab.glance_http import GlanceAPI
from lab.mounts import Mount, mount_argv
from lab.rows import insert_images
from lab.servers import GlanceServer
from lab.stores import StoresLab
from lab.venvs import ensure_venv

GLANCECLIENT = "python-glanceclient==4.13.0"
LISTED_IMAGES = 5000
RANDOM_READS = 200  # per fio run
CURL_RANGES = 30  # ranged curl GETs per run
RSS_COPIES = 10
LS_TIMEOUT = 60.0
SHARED_IMAGES = 4
SHARED_SIZE = 64 * 1024 * 1024
READERS_PER_IMAGE = 4
WRITERS = 4
WRITER_SIZE = 32 * 1024 * 1024
FUSECTL = "/sys/fs/fuse/connections"


def log(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


#: The targets of the settings behind TLS (issue 25's): per setting, metric -> target. The
#: loopback table keeps the targets set for it in each measurement; the others only these.
NETWORK_TARGETS: dict[str, dict[str, float]] = {
    "link-1g": {
        "first read, verified, vs curl": 0.95,
        "upload 1 GiB": 0.95,
        "cold read from the cache": 4,
        "qemu-img convert of a cached qcow2": 0.3,
    },
    "link-10g": {
        "first read, verified, vs curl | openssl dgst -sha512": 1.1,
        "first read, --no-verify": 0.8,
    },
}
#: CPU per GiB targets in every setting but loopback.
CPU_TARGETS = {
    "CPU per GiB, first read, verified, vs curl | openssl dgst -sha512": 0.85,
    "CPU per GiB, first read, --no-verify, vs curl": 2.0,
}
#: The groups that run in every setting; the others run on loopback only.
NETWORK_GROUPS = ("upload", "read", "cache")


class Bench:
    def __init__(self, work: Path, runs: int, mount_options: list[str]) -> None:
        self.work = work
        self.runs = runs
        self.mount_options = mount_options
        self.loopback_glance = GlanceServer(work / "glance", flavor="noauth")
        #: Each setting's metrics, in the order they ran.
        self.metrics: dict[str, list[Metric]] = {}
        self.settings: dict[str, str] = {}
        self.endpoint: Endpoint
        self.loopback: Endpoint
        self.api: GlanceAPI
        self.source: Path
        self.source_sha512 = ""
        #: The verified single-stream read, for the shared-read target (when "read" ran first).
        self.verified_single: Series | None = None
        self.mounted_fusectl = False
        self.pki = Pki(work / "pki")
        #: What close() stops: the settings' servers and the link's namespace.
        self.stack = ExitStack()
        self.link: Link | None = None

    # -- setup --------------------------------------------------------------------------------

    def setup(self) -> None:
        if not os.path.ismount(FUSECTL):
            # systemd mounts it at boot (sys-fs-fuse-connections.mount); a container may not,
            # and without it the mount cannot raise its FUSE queue limits (max_background).
            log(f"mounting fusectl at {FUSECTL} (unmounted again at the end)")
            run("mount", "-t", "fusectl", "fusectl", FUSECTL)
            self.mounted_fusectl = True
        log("installing python-glanceclient (cached) and starting Glance")
        self.glanceclient = ensure_venv("glanceclient-4.13.0", [GLANCECLIENT]) / "bin" / "glance"
        self.stack.enter_context(self.loopback_glance)
        log("writing 1 GiB of random data")
        self.source = random_file(self.work / "source.raw")
        self.source_sha512 = _sha512(self.source)
        self.loopback = loopback(self.loopback_glance)
        self.use(self.loopback)
        self.upload_image()
        log(f"inserting {LISTED_IMAGES} image rows into Glance's SQLite")
        insert_images(self.glance.sqlite_path, LISTED_IMAGES, "list")

    def upload_image(self) -> None:
        """The 1 GiB image every read of the setting uses, uploaded with curl -T."""
        self.endpoint.image_id = self.api.create("bench-1g.raw")["id"]
        self.curl_upload(self.image_id)
        image = self.api.get(self.image_id)
        assert image["status"] == "active", image
        assert image["size"] == GIB, image

    def use(self, endpoint: Endpoint) -> None:
        """Measure against ``endpoint`` from now on."""
        if hasattr(self, "api"):
            self.api.close()
        self.endpoint = endpoint
        self.api = endpoint.api()
        self.metrics.setdefault(endpoint.name, [])

    def enter(self, setting: str) -> None:
        """Start what ``setting`` needs (stopped by close()) and use it."""
        log(f"setting {setting}")
        if setting == "loopback":
            self.use(self.loopback)
        elif setting == "tls":
            self.use(self.stack.enter_context(tls(self.work, self.loopback_glance, self.pki)))
        else:
            if self.link is None:
                self.link = self.stack.enter_context(link(self.work, self.pki, LINK_RATES[setting]))
                self.use(self.link.endpoint(setting))
                log(f"uploading the 1 GiB image into the link's Glance ({self.link.glance.url})")
                self.upload_image()
                self.link.image_id = self.image_id
            else:
                self.use(self.link.endpoint(setting))

    def close(self) -> None:
        if hasattr(self, "api"):
            self.api.close()
        self.stack.close()
        if self.mounted_fusectl:
            run("umount", FUSECTL)

    # -- helpers ------------------------------------------------------------------------------

    @property
    def glance(self) -> GlanceServer:
        """The Glance of the setting in use."""
        return self.endpoint.glance

    @property
    def image_id(self) -> str:
        """The 1 GiB image of the setting in use."""
        return self.endpoint.image_id

    def data_url(self, image_id: str) -> str:
        return f"{self.endpoint.url}/v2/images/{image_id}/file"

    def curl(self, *arguments: str) -> list[str]:
        """A curl command that fails on an HTTP error and trusts the setting's CA."""
        return ["curl", "-sS", "-f", *self.endpoint.curl_options, *arguments]

    def glance_client(self, *arguments: str, url: str | None = None) -> list[str]:
        """A python-glanceclient command against the setting's Glance (or the one at ``url``)."""
        options = [] if url else self.endpoint.client_options
        # glance 4.13 looks up /versions without its --os-cacert; requests' variable reaches it.
        trust = [f"REQUESTS_CA_BUNDLE={self.endpoint.cacert}"] if options else []
        return [
            "env", *trust, str(self.glanceclient), "--os-image-url", url or self.endpoint.url,
            "--os-auth-token", "bench", *options, *arguments,
        ]  # fmt: skip

    @contextmanager
    def mount(self, name: str, *options: str, url: str | None = None) -> Iterator[Mount]:
        """A mount of the setting's Glance (or of the one at ``url``, plain HTTP)."""
        path = self.work / "mnt" / name
        trust = [] if url else self.endpoint.client_options
        argv = mount_argv(url or self.endpoint.url, path, *trust, *self.mount_options, *options)
        with Mount(path, self.work / f"{name}.log", argv) as mount:
            mount.wait_tuned()
            if not self.settings:
                self.settings = mount.kernel_settings()
            yield mount

    @contextmanager
    def cpu(
        self,
        series: Series,
        size: int,
        mount: Mount | None = None,
        endpoint: Endpoint | None = None,
    ) -> Iterator[None]:
        """Appends to ``series`` the CPU seconds per GiB of ``size`` bytes used in the block:
        by the commands it ran (and waited for) plus ``mount``'s process, and by each server of
        ``endpoint`` (the setting's by default)."""  # fmt: skip
        servers = endpoint or self.endpoint
        before = children_cpu_seconds() + (cpu_seconds(mount.pid) if mount else 0.0)
        servers_before = servers.servers_cpu()
        yield
        used = children_cpu_seconds() + (cpu_seconds(mount.pid) if mount else 0.0) - before
        per_gib = GIB / size
        series.cpu.append(used * per_gib)
        for name, seconds in servers.servers_cpu().items():
            series.servers.setdefault(name, []).append((seconds - servers_before[name]) * per_gib)

    def target(self, name: str, loopback_target: float | None = None) -> float | None:
        """The target of metric ``name`` in the setting in use: ``loopback_target`` on loopback,
        else NETWORK_TARGETS' or CPU_TARGETS' (or none)."""
        setting = self.endpoint.name
        if setting == "loopback":
            return loopback_target
        return NETWORK_TARGETS.get(setting, {}).get(name, CPU_TARGETS.get(name))

    def metric(
        self,
        name: str,
        unit: str,
        higher_is_better: bool,
        ours: Series,
        peer: Series | None = None,
        loopback_target: float | None = None,
        note: str = "",
    ) -> None:
        """Add a metric with the setting's target (see target())."""  # fmt: skip
        target = self.target(name, loopback_target)
        self.add(Metric(name, unit, higher_is_better, ours, peer, target, note))

    def cold(self) -> None:
        """Empty the page cache, then read Glance's stored file again, so that every tool reads
        from a Glance whose store is in memory and none from a local cache.
        """
        drop_page_cache()
        warm(self.glance.store_dir / self.image_id)

    def curl_upload(self, image_id: str, source: Path | None = None) -> float:
        seconds, _ = timed(
            *self.curl("-T", str(source or self.source),
                       "-H", "Content-Type: application/octet-stream", self.data_url(image_id)),
        )  # fmt: skip
        return seconds

    def add(self, metric: Metric) -> None:
        self.metrics[self.endpoint.name].append(metric)
        print(json.dumps({"setting": self.endpoint.name, **json.loads(metric.json_line())}),
              flush=True)  # fmt: skip

    # -- the measurements ---------------------------------------------------------------------

    def upload(self) -> None:
        log("upload: curl -T, glance image-create --file, then cp into new/")
        curl, ours, hwm = self.compare_uploads(self.source, "up.raw")
        client = self.client_uploads(self.source)
        self.metric("upload 1 GiB", "MB/s", True, ours, curl, 0.9)
        self.metric("upload 1 GiB, vs glance image-create", "MB/s", True, ours, client)
        self.metric("peak RSS, uploads", "MB", False, hwm, None, 200,
                    "VmHWM after each of the uploads")  # fmt: skip

    def sparse_uploads(self) -> None:
        """A sparse 1 GiB raw (256 MiB of data in 16 runs) and the qcow2 qemu-img makes of it:
        cp seeks over the holes and ends with ftruncate; glancefs sends the zeros."""
        log("sparse uploads: a 1 GiB raw with 256 MiB of data, and its qcow2")
        raw = sparse_file(self.work / "sparse.raw")
        qcow2 = self.work / "sparse.qcow2"
        run("qemu-img", "convert", "-O", "qcow2", str(raw), str(qcow2))
        for source, name, label in (
            (raw, "sparse.raw", "upload sparse 1 GiB raw (256 MiB data)"),
            (qcow2, "sparse.qcow2", "upload qcow2 of it (qemu-img convert)"),
        ):
            curl, ours, _ = self.compare_uploads(source, name)
            size_mb = source.stat().st_size / MB
            self.metric(label, "MB/s", True, ours, curl, 0.9, f"{size_mb:.0f} MB")
        raw.unlink()
        qcow2.unlink()

    def compare_uploads(self, source: Path, name: str) -> tuple[Series, Series, Series]:
        """``curl -T`` of ``source`` to a new image, then ``cp`` into new/: MB/s of the file's
        size (holes included) and CPU for each, and VmHWM of the mount. Each upload is checked
        (active, size, sha512) and deleted."""
        size = source.stat().st_size
        sha512 = _sha512(source)
        curl = Series("curl -T")
        for index in range(self.runs):
            image_id = self.api.create(f"curl-{index}-{name}")["id"]
            warm(source)
            with self.cpu(curl, size):
                seconds = self.curl_upload(image_id, source)
            curl.values.append(size / seconds / MB)
            self.api.delete(image_id)
        ours, hwm = Series("cp into new/"), Series("VmHWM")
        with self.mount("upload") as mount:
            for index in range(self.runs):
                target = f"cp-{index}-{name}"
                warm(source)
                with self.cpu(ours, size, mount):
                    seconds, _ = timed("cp", str(source), str(mount.path / "new" / target))
                ours.values.append(size / seconds / MB)
                hwm.values.append(mount.status("VmHWM") / MB)
                self.check_upload(target, size, sha512)
        return curl, ours, hwm

    def check_upload(self, name: str, size: int, sha512: str) -> None:
        """The one image called ``name`` is active with ``size`` and ``sha512``; then delete it."""
        (image,) = self.api.list(name=name)
        assert image["status"] == "active", image
        assert image["size"] == size, image
        assert image["os_hash_value"] == sha512, image
        self.api.delete(image["id"])

    def client_uploads(self, source: Path) -> Series:
        """``glance image-create --file`` of ``source`` (python-glanceclient): creates the image
        and uploads in one command."""
        size = source.stat().st_size
        client = Series("glance image-create --file")
        for index in range(self.runs):
            name = f"client-{index}-{source.name}"
            warm(source)
            command = self.glance_client(
                "image-create", "--name", name, "--disk-format", "raw",
                "--container-format", "bare", "--file", str(source),
            )  # fmt: skip
            with self.cpu(client, size):
                seconds, _ = timed(*command)
            client.values.append(size / seconds / MB)
            self.check_upload(name, size, self.source_sha512)
        return client

    def read_peers(self) -> dict[str, list[str]]:
        """The peers of a first read, each a command that reads the image once (its output
        checked by check_peer)."""
        url = shlex.join(self.curl(self.data_url(self.image_id)))
        return {
            "glance image-download": self.glance_client(
                "image-download", "--file", "/dev/null", self.image_id
            ),
            "curl": self.curl("-o", "/dev/null", self.data_url(self.image_id)),
            "curl to a file": self.curl(
                "-o", str(self.work / "downloaded.raw"), self.data_url(self.image_id)
            ),
            "curl | openssl dgst -sha512": ["bash", "-o", "pipefail", "-c",
                                            f"{url} | openssl dgst -sha512"],
            "curl | sha512sum": ["bash", "-o", "pipefail", "-c", f"{url} | sha512sum"],
        }  # fmt: skip

    def reads(self) -> None:
        log("first reads: the peers, then dd through a verified and a --no-verify mount")
        commands = self.read_peers()
        peers = {name: Series(name) for name in commands}
        for _ in range(self.runs):
            for name, command in commands.items():
                self.cold()
                with self.cpu(peers[name], GIB):
                    seconds, output = timed(*command)
                if "sha512" in name and self.source_sha512 not in output:
                    raise RuntimeError(f"{name} printed {output!r}, not the image's sha512")
                peers[name].values.append(GIB / seconds / MB)
                (self.work / "downloaded.raw").unlink(missing_ok=True)
        loopback = self.endpoint.name == "loopback"
        first, second = Series("dd bs=1M"), Series("dd bs=1M")
        with self.mount("read") as mount:
            path = mount.path / "by-id" / self.image_id
            for _ in range(self.runs):
                self.cold()
                with self.cpu(first, GIB, mount):
                    first.values.append(GIB / self.dd(path) / MB)
                if loopback:
                    second.values.append(GIB / self.dd(path) / MB)
        unverified = Series("dd bs=1M")
        with self.mount("read-nv", "--no-verify") as mount:
            path = mount.path / "by-id" / self.image_id
            for _ in range(self.runs):
                self.cold()
                with self.cpu(unverified, GIB, mount):
                    unverified.values.append(GIB / self.dd(path) / MB)
        curl, openssl = peers["curl"], peers["curl | openssl dgst -sha512"]
        self.metric("first read, verified", "MB/s", True, first, peers["glance image-download"],
                    1.5)  # fmt: skip
        for name in ("curl", "curl to a file", "curl | openssl dgst -sha512", "curl | sha512sum"):
            self.metric(f"first read, verified, vs {name}", "MB/s", True, first, peers[name])
        self.metric("first read, --no-verify", "MB/s", True, unverified, curl, 0.6)
        self.metric(
            "CPU per GiB, first read, verified, vs curl | openssl dgst -sha512", "CPU s/GiB",
            False, Series("mount + dd", first.cpu), Series(openssl.tool, openssl.cpu),
        )  # fmt: skip
        self.metric(
            "CPU per GiB, first read, --no-verify, vs curl", "CPU s/GiB", False,
            Series("mount + dd", unverified.cpu), Series(curl.tool, curl.cpu),
        )  # fmt: skip
        if not loopback:
            return
        self.verified_single = first
        self.metric("second read (page cache)", "MB/s", True, second, curl, 1.5)
        self.loopback_reads(first, curl)

    def loopback_reads(self, first: Series, curl: Series) -> None:
        """The reads bound by this machine's cores: the verified read against sha512 alone, and
        the first reads past the page cache (the kernel copies each reply into dd's buffer
        instead of into new page-cache pages)."""
        direct, direct_unverified = Series("dd bs=1M"), Series("dd bs=1M")
        for series, options in ((direct, ()), (direct_unverified, ("--no-verify",))):
            with self.mount("read-direct", "--direct-io", *options) as mount:
                path = mount.path / "by-id" / self.image_id
                for _ in range(self.runs):
                    self.cold()
                    with self.cpu(series, GIB, mount):
                        series.values.append(GIB / self.dd(path) / MB)
        hashing = Series("sha512, one core")
        for _ in range(self.runs):
            warm(self.source)
            hashing.values.append(GIB / self.sha512_seconds(self.source) / MB)
        self.metric("first read, verified, vs the hash", "MB/s", True, first, hashing, 0.9)
        self.metric("first read, verified, --direct-io, vs the hash", "MB/s", True, direct,
                    hashing, 0.9)  # fmt: skip
        self.metric("first read, --no-verify --direct-io", "MB/s", True, direct_unverified,
                    curl, 0.6)  # fmt: skip

    @staticmethod
    def sha512_seconds(path: Path) -> float:
        """Wall time of hashlib's sha512 over ``path`` in 1 MiB reads, in one process (what
        the mount's hash thread does with the same bytes)."""
        script = (
            "import hashlib, sys, time\n"
            "h, started = hashlib.sha512(), time.perf_counter()\n"
            "with open(sys.argv[1], 'rb', buffering=0) as f:\n"
            "    while chunk := f.read(1 << 20):\n"
            "        h.update(chunk)\n"
            "print(time.perf_counter() - started)\n"
        )
        return float(run(sys.executable, "-c", script, str(path)))

    @staticmethod
    def dd(path: Path) -> float:
        seconds, output = timed("dd", f"if={path}", "of=/dev/null", "bs=1M")
        if f"{GIB} bytes" not in output:
            raise RuntimeError(f"dd of {path} did not read {GIB} bytes: {output}")
        return seconds

    def listing(self) -> None:
        log(f"ls -l of {LISTED_IMAGES} images: curl paging, then cold and warm mounts")
        curl = Series("curl, 1000 per page")
        count = 0
        for _ in range(self.runs):
            started = time.perf_counter()
            count = self.curl_pages()
            curl.values.append(time.perf_counter() - started)
        cold, warm_ls = Series("ls -l"), Series("ls -l")
        note = ""
        for index in range(self.runs):
            with self.mount(f"ls-{index}") as mount:
                try:
                    seconds, output = timed("ls", "-l", str(mount.path), timeout=LS_TIMEOUT)
                except subprocess.TimeoutExpired:
                    # Keep `make bench` short: a listing this slow is a lower bound, once.
                    cold.values.append(LS_TIMEOUT)
                    note = f"ls -l did not finish in {LS_TIMEOUT:.0f} s: value is a lower bound"
                    break
                cold.values.append(seconds)
                warm_ls.values.append(timed("ls", "-l", str(mount.path))[0])
            files = sum(1 for line in output.splitlines() if line.startswith("-"))
            if files != count:
                raise RuntimeError(f"ls -l showed {files} files, Glance listed {count} images")
        name = f"ls -l {LISTED_IMAGES} images"
        self.add(Metric(f"{name}, cold", "s", False, cold, curl, 1.2, note))
        self.add(Metric(f"{name}, warm", "s", False, warm_ls, None, 0.1, note))

    def curl_pages(self) -> int:
        """Page through the root listing's query (name:asc) with curl as a client would."""
        path: str | None = "/v2/images?sort=name:asc&limit=1000"
        count = 0
        while path:
            body = json.loads(run("curl", "-sS", "-f", self.glance.url + path))
            count += len(body["images"])
            path = body.get("next") if body["images"] else None
        return count

    def random_reads(self) -> None:
        log("random 4 KiB reads: fio randread on the mount, ranged curl GETs")
        curl = self.ranged_curls(random.Random(6))
        ours = Series("fio randread 4k")
        with self.mount("random") as mount:
            path = mount.path / "by-id" / self.image_id
            for index in range(self.runs):
                drop_page_cache()
                ours.values.append(self.fio_median_ms(path, index))
        self.add(Metric("random 4 KiB read, median latency", "ms", False, ours, curl, 1.5))

    def ranged_curls(self, rng: random.Random) -> Series:
        """Per run, the median ms of ``CURL_RANGES`` ranged GETs of 4 KiB at random offsets."""
        curl = Series("curl -r (4 KiB)")
        for _ in range(self.runs):
            samples = []
            for _ in range(CURL_RANGES):
                start = rng.randrange(GIB // 4096) * 4096
                output = run(
                    "curl", "-sS", "-f", "-o", "/dev/null", "-w", "%{time_total}",
                    "-r", f"{start}-{start + 4095}", self.data_url(self.image_id),
                )  # fmt: skip
                samples.append(float(output) * 1000)
            curl.values.append(statistics.median(samples))
        return curl

    @staticmethod
    def fio_median_ms(path: Path, seed: int) -> float:
        """Median ms of ``RANDOM_READS`` O_DIRECT 4 KiB reads of ``path`` by fio."""
        command = [
            "fio", "--name=randread", f"--filename={path}", "--readonly",
            "--rw=randread", "--bs=4k", "--direct=1", "--ioengine=psync",
            f"--number_ios={RANDOM_READS}", f"--randseed={seed + 1}",
            "--output-format=json",
        ]  # fmt: skip
        result = json.loads(run(*command))
        return float(result["jobs"][0]["read"]["clat_ns"]["percentile"]["50.000000"]) / 1e6

    def first_byte(self) -> None:
        log("time to first byte: head -c 1 on the mount, curl -r 0-0")
        curl, ours = Series("curl -r 0-0"), Series("head -c 1")
        for _ in range(self.runs):
            self.cold()
            seconds, _ = timed(
                "curl", "-sS", "-f", "-o", "/dev/null", "-r", "0-0", self.data_url(self.image_id)
            )
            curl.values.append(seconds * 1000)
        with self.mount("ttfb") as mount:
            path = mount.path / "by-id" / self.image_id
            for _ in range(self.runs):
                self.cold()
                ours.values.append(timed("head", "-c", "1", str(path))[0] * 1000)
        self.add(Metric("time to first byte", "ms", False, ours, curl, None))

    def shared_images(self) -> list[tuple[str, Path]]:
        """The images of the shared-read test (uploaded once), with their data files."""
        images = []
        for index in range(SHARED_IMAGES):
            source = random_file(self.work / f"shared-{index}.raw", SHARED_SIZE)
            image_id = self.api.create(f"bench-shared-{index}.raw")["id"]
            run(
                "curl", "-sS", "-f", "-T", str(source),
                "-H", "Content-Type: application/octet-stream", self.data_url(image_id),
            )  # fmt: skip
            images.append((image_id, source))
        return images

    def cold_shared(self, images: list[tuple[str, Path]]) -> None:
        drop_page_cache()
        for image_id, _ in images:
            warm(self.glance.store_dir / image_id)

    @staticmethod
    def parallel(commands: list[list[str]], may_fail: int = 0) -> tuple[float, list[list[str]]]:
        """Wall time of running ``commands`` all at once, and those that failed: each must
        succeed, except any of the last ``may_fail`` ones."""
        started = time.perf_counter()
        processes = [
            subprocess.Popen(c, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for c in commands
        ]
        failed = []
        for index, (command, process) in enumerate(zip(commands, processes, strict=True)):
            _, err = process.communicate(timeout=600)
            if process.returncode == 0:
                continue
            if index < len(commands) - may_fail:
                raise RuntimeError(f"{command} exited {process.returncode}: {err.decode()}")
            failed.append(command)
        return time.perf_counter() - started, failed

    def shared_reads(self) -> None:
        readers = SHARED_IMAGES * READERS_PER_IMAGE
        log(f"{readers} readers of {SHARED_IMAGES} images: 4 parallel curls, then the mounts")
        images = self.shared_images()
        distinct = SHARED_IMAGES * SHARED_SIZE
        curls = Series(f"{SHARED_IMAGES} parallel curls")
        for _ in range(self.runs):
            self.cold_shared(images)
            commands = [
                ["curl", "-sS", "-f", "-o", "/dev/null", self.data_url(i)] for i, _ in images
            ]
            curls.values.append(distinct / self.parallel(commands)[0] / MB)
        for name, options in (("verified", []), ("--no-verify", ["--no-verify"])):
            ours = Series(f"{readers} x cat")
            with self.mount(f"shared-{name.strip('-')}", "--debug", *options) as mount:
                paths = [mount.path / "by-id" / i for i, _ in images]
                commands = [["cat", str(p)] for p in paths for _ in range(READERS_PER_IMAGE)]
                for _ in range(self.runs):
                    self.cold_shared(images)
                    with self.cpu(ours, distinct, mount):
                        ours.values.append(distinct / self.parallel(commands)[0] / MB)
                gets = self.data_requests(mount, images)
                hwm = mount.status("VmHWM") / MB
            note = (
                f"MB/s of distinct image data ({readers} readers get {READERS_PER_IMAGE}x that); "
                f"Glance data requests per image over {self.runs} runs: {gets}; "
                f"peak RSS {hwm:.0f} MB"
            )
            if name == "verified":
                # Its peer is the verified single read of the "read" group: no ratio without it.
                peer = self.verified_single
                target = None if peer is None else 0.9
            else:
                peer, target = curls, 0.5
            self.add(Metric(f"{readers} readers x {SHARED_IMAGES} images, {name}", "MB/s", True,
                            ours, peer, target, note))  # fmt: skip
        self.shared_load(images)

    def shared_load(self, images: list[tuple[str, Path]]) -> None:
        """Peak RSS under the shared readers' load plus 4 writers (cp into new/), all at once."""
        log(f"peak RSS: {SHARED_IMAGES * READERS_PER_IMAGE} readers and {WRITERS} writers")
        sources = [random_file(self.work / f"writer-{n}.raw", WRITER_SIZE) for n in range(WRITERS)]
        hwm = Series("VmHWM")
        copied_again = 0
        with self.mount("shared-load") as mount:
            for run_index in range(self.runs):
                self.cold_shared(images)
                for source in sources:
                    warm(source)
                commands = [
                    ["cat", str(mount.path / "by-id" / i)]
                    for i, _ in images
                    for _ in range(READERS_PER_IMAGE)
                ] + [
                    ["cp", str(source), str(mount.path / "new" / f"w{run_index}-{source.name}")]
                    for source in sources
                ]
                # The bench's Glance is on SQLite, which answers "database is locked" (500) to
                # concurrent uploads now and then (the mount then fails that cp with EIO and
                # deletes the image, as it must): copied again, and counted.
                _, failed = self.parallel(commands, may_fail=len(sources))
                for command in failed:
                    copied_again += 1
                    subprocess.run(command, check=True, timeout=600)
                hwm.values.append(mount.status("VmHWM") / MB)
        for run_index in range(self.runs):
            for source in sources:
                # An admin listing shows the refused uploads' images too, as "deleted".
                listed = self.api.list(name=f"w{run_index}-{source.name}")
                images_kept = [image for image in listed if image["status"] != "deleted"]
                assert len(images_kept) == 1, listed
                assert images_kept[0]["status"] == "active", images_kept
                assert images_kept[0]["size"] == WRITER_SIZE, images_kept
                self.api.delete(images_kept[0]["id"])
        note = (
            f"VmHWM after each run of the whole load; {copied_again} of "
            f"{self.runs * len(sources)} uploads refused by SQLite (500) and copied again"
        )
        self.add(Metric("peak RSS, 16 readers + 4 writers", "MB", False, hwm, None, 250, note))

    @staticmethod
    def data_requests(mount: Mount, images: list[tuple[str, Path]]) -> str:
        """Data GETs per image the mount logged (``--debug`` logs one line per request)."""
        text = mount.log()
        counts = [text.count(f"/v2/images/{image_id}/file'") for image_id, _ in images]
        return ", ".join(str(c) for c in counts)

    def memory(self) -> None:
        log(f"peak RSS: {RSS_COPIES} cold copies of the 1 GiB image out of the mount")
        first, last = Series("VmHWM after 1 copy"), Series(f"VmHWM after {RSS_COPIES} copies")
        with self.mount("rss") as mount:
            path = mount.path / "by-id" / self.image_id
            for copy in range(RSS_COPIES):
                self.cold()
                timed("cp", str(path), "/dev/null")
                if copy == 0:
                    first.values.append(mount.status("VmHWM") / MB)
                    resident_after_first = mount.status("VmRSS") / MB
            last.values.append(mount.status("VmHWM") / MB)
            resident_after_last = mount.status("VmRSS") / MB
        self.add(Metric("peak RSS, 1 GiB copy", "MB", False, first, None, 120))
        self.add(
            Metric(
                f"peak RSS after {RSS_COPIES} copies", "MB", False, last, None, 120,
                f"peak growth over the first copy: {last.median - first.median:+.1f} MB; "
                f"resident between copies (VmRSS) after the first {resident_after_first:.0f} MB, "
                f"after the last {resident_after_last:.0f} MB",
            )
        )  # fmt: skip

    # -- the data cache (--cache-dir) ---------------------------------------------------------

    @staticmethod
    def wait_verified(cache_dir: Path, count: int, timeout: float = 300) -> None:
        """Until the cache holds ``count`` verified entries (their manifests); polled, since the
        mount verifies an entry in the background once it is complete."""
        deadline = time.monotonic() + timeout
        while len(list((cache_dir / "v1").glob("*/verified"))) < count:
            if time.monotonic() > deadline:
                raise RuntimeError(f"fewer than {count} verified entries in {cache_dir}")
            time.sleep(0.1)

    def cache(self) -> None:
        """The same Glance, the same run: a cold read from the cache after a remount against
        curl, and qemu-img convert of a cached qcow2 against glance image-download followed by
        a local convert; on loopback also random 4 KiB reads from it against one ranged curl
        GET, and the disk itself."""
        log("cache: fill it (dd through a --cache-dir mount), remount, cold dd; curl alongside")
        cache_dir = self.work / f"cache-{self.endpoint.name}"
        cached_mount = ["--cache-dir", str(cache_dir)]
        with self.mount("cache-fill", *cached_mount) as mount:
            self.dd(mount.path / "by-id" / self.image_id)
            self.wait_verified(cache_dir, 1)
        curl, cached = Series("curl"), Series("dd bs=1M, cached")
        for _ in range(self.runs):
            self.cold()
            with self.cpu(curl, GIB):
                seconds, _ = timed(*self.curl("-o", "/dev/null", self.data_url(self.image_id)))
            curl.values.append(GIB / seconds / MB)
        random_cached = Series("fio randread 4k, cached")
        with self.mount("cache-read", *cached_mount) as mount:
            path = mount.path / "by-id" / self.image_id
            for _ in range(self.runs):
                self.cold()  # the page cache holds neither the cache's files nor the mount's
                with self.cpu(cached, GIB, mount):
                    cached.values.append(GIB / self.dd(path) / MB)
            if self.endpoint.name == "loopback":
                log("cache: random 4 KiB reads (fio, O_DIRECT) from the cache")
                for index in range(self.runs):
                    drop_page_cache()
                    random_cached.values.append(self.fio_median_ms(path, index))
        self.metric("cold read from the cache", "MB/s", True, cached, curl, 1.5,
                    "page cache dropped")  # fmt: skip
        if self.endpoint.name == "loopback":
            ranged = self.ranged_curls(random.Random(15))
            blocks = sorted(str(path) for path in (cache_dir / "v1").glob("*/*.blk"))
            disk = Series("cat of the block files, cold")
            for _ in range(self.runs):
                drop_page_cache()  # what the disk itself gives
                seconds, _ = timed("sh", "-c", 'cat "$@" >/dev/null', "cat", *blocks)
                disk.values.append(GIB / seconds / MB)
            self.metric("cold read from the cache, vs the disk", "MB/s", True, cached, disk)
            self.metric("random 4 KiB read from the cache", "ms", False, random_cached, ranged,
                        0.1)  # fmt: skip
        self.convert(cached_mount, cache_dir)

    def qcow2(self) -> Path:
        """The 1 GiB source as a qcow2 (made once)."""
        qcow2 = self.work / "source.qcow2"
        if not qcow2.exists():
            run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(self.source), str(qcow2))
        return qcow2

    def convert(self, cached_mount: list[str], cache_dir: Path) -> None:
        log("cache: qemu-img convert -O raw of a cached qcow2 vs image-download + convert")
        qcow2 = self.qcow2()
        size = qcow2.stat().st_size
        image_id = self.api.create("bench-1g.qcow2", disk_format="qcow2")["id"]
        self.curl_upload(image_id, qcow2)
        output = self.work / "converted.raw"
        downloaded = self.work / "downloaded.qcow2"
        with self.mount("convert-fill", *cached_mount) as mount:
            run("dd", f"if={mount.path / 'by-id' / image_id}", "of=/dev/null", "bs=1M")
            self.wait_verified(cache_dir, 2)
        peer, ours = Series("image-download + convert"), Series("convert, cached")
        local = Series("convert of a local file, cold")
        with self.mount("convert", *cached_mount) as mount:
            path = mount.path / "by-id" / image_id

            def from_the_mount() -> float:
                with self.cpu(ours, size, mount):
                    return self.qemu_convert(path, output)

            def download_and_convert() -> float:
                warm(self.glance.store_dir / image_id)
                with self.cpu(peer, size):
                    return self.download_and_convert(image_id, downloaded, output)

            tools: list[tuple[Series, Callable[[], float]]] = [
                (ours, from_the_mount),
                (peer, download_and_convert),
            ]
            if self.endpoint.name == "loopback":
                tools.append((local, lambda: self.qemu_convert(qcow2, output)))
            for index in range(self.runs):
                # In turn, each first once: the first 1 GiB written after a while lands on
                # pages new to the VM, which costs the writer seconds of system time.
                turn = index % len(tools)
                for series, measure in tools[turn:] + tools[:turn]:
                    drop_page_cache()
                    series.values.append(measure())
        self.api.delete(image_id)
        self.metric("qemu-img convert of a cached qcow2", "s", False, ours, peer, 0.5)
        if local.values:
            self.metric(
                "qemu-img convert of a cached qcow2, vs the disk", "s", False, ours, local, None,
                "the peer converts the same qcow2 from a local file, page cache dropped; the "
                "three tools take turns going first",
            )  # fmt: skip

    # -- uploads by import ---------------------------------------------------------------------

    def imports(self) -> None:
        """The 1 GiB qcow2 imported with conversion to raw (a Glance of its own, with the
        image_conversion plugin): ``cp`` into new/ of a ``--import`` mount against ``glance
        image-create-via-import --file``, each timed until the image is active."""
        log("import: a Glance converting imports to raw; image-create-via-import, then cp")
        qcow2 = self.qcow2()
        conversion = {
            "image_import_opts": {"image_import_plugins": "['image_conversion']"},
            "image_conversion": {"output_format": "raw"},
        }
        # fakeauth: an import task needs an owner, which noauth leaves out.
        with (
            GlanceServer(
                self.work / "import-glance", flavor="fakeauth", conf_overrides=conversion
            ) as glance,
            GlanceAPI(glance.url, timeout=600) as api,
        ):
            peer, ours = Series("image-create-via-import"), Series("cp into new/, --import")
            for index in range(self.runs):
                name = f"via-import-{index}.qcow2"
                warm(qcow2)
                started = time.perf_counter()
                # stdin closed: the glance CLI takes any other stdin for the image's data.
                run(
                    "sh", "-c", 'exec "$@" <&-', "sh",
                    str(self.glanceclient), "--os-image-url", glance.url, "--os-auth-token",
                    "bench", "image-create-via-import", "--name", name, "--disk-format",
                    "qcow2", "--container-format", "bare", "--import-method", "glance-direct",
                    "--file", str(qcow2),
                )  # fmt: skip
                peer.values.append(self.until_active(api, name) - started)
            endpoint = Endpoint("import", glance.url, glance)
            with self.mount("import", "--import", url=glance.url) as mount:
                for index in range(self.runs):
                    name = f"cp-import-{index}.qcow2"
                    warm(qcow2)
                    with self.cpu(ours, GIB, mount, endpoint):
                        seconds, _ = timed("cp", str(qcow2), str(mount.path / "new" / name))
                    (image,) = api.list(name=name)
                    assert (image["status"], image["disk_format"]) == ("active", "raw"), image
                    assert image["size"] == GIB, image
                    ours.values.append(seconds)
            note = (
                f"{qcow2.stat().st_size / MB:.0f} MB qcow2 of 1 GiB of random data, converted to "
                "raw; until active (the glance CLI returns at the import's start: polled)"
            )
            self.metric("import qcow2 with conversion", "s", False, ours, peer, 1.1, note)

    @staticmethod
    def until_active(api: GlanceAPI, name: str) -> float:
        """The time (perf_counter) at which the image ``name`` was seen active, polled."""
        while True:
            (image,) = api.list(name=name)
            if image["status"] == "active":
                return time.perf_counter()
            if image["status"] not in ("queued", "uploading", "importing"):
                raise RuntimeError(f"import of {name} ended {image['status']}")
            time.sleep(0.05)

    # -- qemu-img as a writer -----------------------------------------------------------------

    def qemu_writes(self) -> None:
        """``qemu-img convert -O qcow2`` of the 1 GiB source straight into new/ against the two
        steps a user takes without glancefs: a local convert, then ``glance image-create
        --file``. Each upload is checked: active, and the hash of the local convert's output
        (qemu-img writes the same qcow2 for the same input)."""
        log("qemu-write: qemu-img convert -O qcow2 into new/ vs local convert + image-create")
        local = self.work / "local.qcow2"
        peer, ours, hwm = (
            Series("convert + image-create"),
            Series("convert into new/"),
            Series("VmHWM"),
        )
        spool_size = "2G"
        expected: str | None = None

        def convert_then_create(index: int) -> float:
            with self.cpu(peer, GIB):
                seconds, _ = timed(
                    "qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(self.source), str(local)
                )
                upload, _ = timed(
                    str(self.glanceclient), "--os-image-url", self.glance.url,
                    "--os-auth-token", "bench", "image-create", "--name", f"peer-{index}.qcow2",
                    "--disk-format", "qcow2", "--container-format", "bare", "--file", str(local),
                )  # fmt: skip
            nonlocal expected
            expected = _sha512(local)
            local.unlink()
            return seconds + upload

        with self.mount("qemu-write", "--spool-size", spool_size) as mount:

            def convert_into_mount(index: int) -> float:
                target = mount.path / "new" / f"ours-{index}.qcow2"
                with self.cpu(ours, GIB, mount):
                    seconds, _ = timed(
                        "qemu-img", "convert", "-f", "raw", "-O", "qcow2",
                        str(self.source), str(target),
                    )  # fmt: skip
                hwm.values.append(mount.status("VmHWM") / MB)
                return seconds

            tools: list[tuple[Series, Callable[[int], float]]] = [
                (ours, convert_into_mount),
                (peer, convert_then_create),
            ]
            for index in range(self.runs):
                for series, measure in tools[index % 2 :] + tools[: index % 2]:
                    drop_page_cache()
                    warm(self.source)
                    series.values.append(measure(index))
        for index in range(self.runs):
            for name in (f"ours-{index}.qcow2", f"peer-{index}.qcow2"):
                (image,) = self.api.list(name=name)
                assert image["status"] == "active", image
                assert image["os_hash_value"] == expected, image
                self.api.delete(image["id"])
        self.metric(
            "qemu-img convert -O qcow2 into new/", "s", False, ours, peer, 1.2,
            "1 GiB of random data; the peer converts to a local file, then glance image-create "
            f"--file; --spool-size {spool_size}",
        )  # fmt: skip
        self.metric("peak RSS, qemu-img convert into new/", "MB", False, hwm, None, 250)

    # -- a store without ranges ---------------------------------------------------------------

    def rbd(self) -> None:
        """Ceph RBD (lab.stores), whose Glance refuses every ranged GET: a verified first read
        and qemu-img convert of a qcow2 from the mount against glance image-download (plus a
        local convert), and random 4 KiB reads from the spool against ranged GETs of the file
        store."""
        log("rbd: Ceph, Swift, Keystone and a Glance offering fs, ceph and swift")
        with StoresLab(self.work / "stores") as stores:
            url = stores.glance.url
            raw_id = self.rbd_upload(url, "bench-rbd-1g.raw", self.source, "raw")
            qcow2_id = self.rbd_upload(url, "bench-rbd-1g.qcow2", self.qcow2(), "qcow2")
            self.rbd_read(stores.glance, raw_id)
            self.rbd_random(url, raw_id)
            self.rbd_convert(url, qcow2_id)

    def rbd_upload(self, url: str, name: str, source: Path, disk_format: str) -> str:
        api = GlanceAPI(url, timeout=600)
        try:
            image_id = str(api.create(name, disk_format=disk_format)["id"])
            run(
                "curl", "-sS", "-f", "-T", str(source), "-H", "X-Image-Meta-Store: ceph",
                "-H", "Content-Type: application/octet-stream",
                f"{url}/v2/images/{image_id}/file",
            )  # fmt: skip
            image = api.get(image_id)
        finally:
            api.close()
        assert (image["status"], image["stores"]) == ("active", "ceph"), image
        return image_id

    def image_download(self, image_id: str, target: Path | str, url: str | None = None) -> float:
        """Seconds of ``glance image-download`` from the setting's Glance (or ``url``'s)."""
        command = self.glance_client("image-download", "--file", str(target), image_id, url=url)
        return timed(*command)[0]

    @staticmethod
    def qemu_convert(source: Path, output: Path) -> float:
        """Seconds of ``qemu-img convert -O raw`` of the qcow2 ``source`` (output removed)."""
        seconds, _ = timed(
            "qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(source), str(output)
        )
        output.unlink()
        return seconds

    def download_and_convert(
        self, image_id: str, downloaded: Path, output: Path, url: str | None = None
    ) -> float:
        """The peer of a convert from the mount: glance image-download, then a local convert."""
        seconds = self.image_download(image_id, downloaded, url)
        seconds += self.qemu_convert(downloaded, output)
        downloaded.unlink()
        return seconds

    def rbd_read(self, glance: GlanceServer, image_id: str) -> None:
        log("rbd: first reads, glance image-download and dd through the mount (verified)")
        url = glance.url
        stores = Endpoint("rbd", url, glance)
        client, ours = Series("glance image-download"), Series("dd bs=1M")
        for _ in range(self.runs):
            drop_page_cache()
            with self.cpu(client, GIB, endpoint=stores):
                seconds = self.image_download(image_id, "/dev/null", url)
            client.values.append(GIB / seconds / MB)
        with self.mount("rbd-read", url=url) as mount:
            path = mount.path / "by-id" / image_id
            for _ in range(self.runs):
                drop_page_cache()
                with self.cpu(ours, GIB, mount, stores):
                    ours.values.append(GIB / self.dd(path) / MB)
        self.metric("rbd: first read, verified", "MB/s", True, ours, client)

    def rbd_random(self, url: str, image_id: str) -> None:
        log("rbd: random 4 KiB reads from the spool (fio), ranged curl GETs of the file store")
        curl = self.ranged_curls(random.Random(7))
        ours = Series("fio randread 4k, spool")
        with self.mount("rbd-spool", url=url) as mount:
            path = mount.path / "by-id" / image_id
            with path.open("rb") as held:  # the spool lives while a file of the image is open
                held.seek(GIB - 4096)
                held.read(4096)  # returns once the one download from byte 0 passed the end
                for index in range(self.runs):
                    ours.values.append(self.fio_median_ms(path, index))
        note = "the peer: ranged GETs of the same data on the file store, which takes ranges"
        self.add(
            Metric("rbd: random 4 KiB read from the spool", "ms", False, ours, curl, None, note)
        )
        self.add(
            Metric("rbd: random 4 KiB read from the spool, median", "ms", False, ours, None, 1.0)
        )

    def rbd_convert(self, url: str, image_id: str) -> None:
        log("rbd: qemu-img convert -O raw from the mount vs image-download + convert")
        output, downloaded = self.work / "rbd-converted.raw", self.work / "rbd-downloaded.qcow2"
        ours, peer = Series("convert from the mount"), Series("image-download + convert")
        with self.mount("rbd-convert", url=url) as mount:
            path = mount.path / "by-id" / image_id
            tools: list[tuple[Series, Callable[[], float]]] = [
                (ours, lambda: self.qemu_convert(path, output)),
                (peer, lambda: self.download_and_convert(image_id, downloaded, output, url)),
            ]
            for index in range(self.runs):
                for series, measure in tools[index % 2 :] + tools[: index % 2]:
                    drop_page_cache()
                    series.values.append(measure())
        self.metric("rbd: qemu-img convert of a qcow2", "s", False, ours, peer, 1.1)


GROUPS: dict[str, Callable[[Bench], None]] = {
    "upload": Bench.upload,
    "sparse": Bench.sparse_uploads,
    "read": Bench.reads,
    "shared": Bench.shared_reads,
    "ls": Bench.listing,
    "random": Bench.random_reads,
    "ttfb": Bench.first_byte,
    "rss": Bench.memory,
    "cache": Bench.cache,
    "import": Bench.imports,
    "rbd": Bench.rbd,
    "qemu-write": Bench.qemu_writes,
}


def _sha512(path: Path) -> str:
    digest = hashlib.sha512()
    with path.open("rb") as f:
        while block := f.read(16 * MB):
            digest.update(block)
    return digest.hexdigest()


def machine() -> str:
    """Cores and their model, memory, kernel and Python: what the figures depend on."""
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    model = next((line.partition(":")[2].strip() for line in cpuinfo if "model name" in line), "?")
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (
        f"{os.cpu_count()} cores ({model}), {memory:.1f} GiB RAM, Linux {platform.release()}, "
        f"Python {platform.python_version()}"
    )


def load_average() -> str:
    """The load average of the last minute."""
    return Path("/proc/loadavg").read_text().split()[0]


def results(
    bench: Bench, command: str, started: str, load_at_start: str, seconds: float
) -> list[str]:
    """The run as BENCHMARKS.md shows it: what ran where, the table, the metrics' notes."""
    settings = ", ".join(f"{k}={v}" for k, v in bench.settings.items())
    about = (
        f"`{command}` at {source_version()}, {started}, {seconds:.0f} s in all. "
        f"Machine: {machine()}; load average {load_at_start} at the start, {load_average()} at "
        f"the end. Kernel settings of the mounts: {settings}."
    )
    lines = wrap(about)
    for setting, metrics in bench.metrics.items():
        lines += ["", f"### {setting}", "", table(metrics)]
        notes = [f"- {metric.name}: {metric.note}" for metric in metrics if metric.note]
        if notes:
            lines += ["", "Notes:", ""]
            for note in notes:
                lines += wrap(note, indent="  ")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--runs", type=int, default=3, help="runs per measurement (default 3)")
    parser.add_argument(
        "--only", default=",".join(GROUPS), help=f"comma-separated, of: {', '.join(GROUPS)}"
    )
    parser.add_argument(
        "--settings",
        default=",".join(SETTINGS),
        help=f"comma-separated, of: {', '.join(SETTINGS)} (the groups {', '.join(NETWORK_GROUPS)} "
        "run in each, the others on loopback only)",
    )
    parser.add_argument(
        "--mount-option", action="append", default=[], help="extra glancefs mount argument"
    )
    parser.add_argument(
        "--report",
        type=Path,
        default=Path("BENCHMARKS.md"),
        help="where a run of every group writes its results (default BENCHMARKS.md)",
    )
    parser.add_argument("--keep-dir", action="store_true", help="keep the work directory")
    args = parser.parse_args(argv)
    groups = [g for g in args.only.split(",") if g]
    unknown = [g for g in groups if g not in GROUPS]
    if unknown:
        parser.error(f"unknown --only {unknown}")
    settings = [s for s in args.settings.split(",") if s]
    if unknown := [s for s in settings if s not in SETTINGS]:
        parser.error(f"unknown --settings {unknown}")
    if os.geteuid() != 0:
        parser.error("needs root: it mounts and drops the page cache")
    for tool in ("curl", "fio", "fusermount3", "dd", "qemu-img", "openssl", "haproxy", "ip", "tc"):
        if shutil.which(tool) is None:
            parser.error(f"{tool} is missing: `make deps` installs it")
    command = shlex.join(["python", "-m", "bench", *(sys.argv[1:] if argv is None else argv)])
    work = Path(tempfile.mkdtemp(prefix="glancefs-bench-", dir="/var/tmp"))
    bench = Bench(work, args.runs, args.mount_option)
    started = time.monotonic()
    started_at = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    load_at_start = load_average()
    log(f"{machine()}; load average {load_at_start}")
    try:
        bench.setup()
        for setting in sorted(settings, key=SETTINGS.index):
            bench.enter(setting)
            for group in groups:
                if setting == "loopback" or group in NETWORK_GROUPS:
                    GROUPS[group](bench)
    finally:
        bench.close()
        if args.keep_dir:
            log(f"work directory kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    lines = results(bench, command, started_at, load_at_start, time.monotonic() - started)
    print()
    print("\n".join(lines))
    failed = [
        f"{setting}: {m.name}"
        for setting, metrics in bench.metrics.items()
        for m in metrics
        if m.passed is False
    ]
    if failed:
        print(f"\ntargets missed: {', '.join(failed)}")
    if set(groups) == set(GROUPS) and set(settings) == set(SETTINGS):
        write_section(args.report, "bench:results", lines)
        log(f"results written into {args.report}")
    return 0
