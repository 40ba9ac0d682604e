"""``make soak``: mixed load on the production lab through 5 % network faults, for a while.

    python -m bench.soak [--minutes 10] [--seed 14] [--report RELIABILITY.md]

Starts lab.production (two Glance nodes behind HAProxy on PostgreSQL, their images on Ceph RBD,
which takes no ranged reads) and lab.faults' proxy in front of it, mounts glancefs on the proxy,
and runs these workers until the time is up (every loop checks the clock; nothing waits longer
than the hang limit):

- readers read whole images (by-id/) and compare every byte with what was uploaded;
- writers ``cp`` new images into new/ and check Glance's record when cp succeeded;
- a mover renames those images (``mv`` in the root) and removes them (``rm``);
- a lister runs ``ls -l`` on the root; a tagger runs ``setfattr`` and reads the value back.

No SIGHUP is sent: a flipped byte fails the readers of that pass, and the next open reads afresh
(two bad passes of one image in a row would make it fail every read: counted as EIO).

The proxy answers 503, resets or truncates a response, flips a data byte or resets an upload
on about 5 % of requests (seeded). Refusals with an errno (EIO after the retries) are expected
and counted; what must not happen is counted as a failure:

- wrong bytes: a read that returned without error but differs from the image (bytes counted);
- hung operations: any operation still running after HANG_AFTER seconds;
- half-made images: images of the soak that are not active once the load stops (a failed
  upload must leave nothing);
- memory: the mount's mean RSS in the last minute against the first (within 10 %).

The figures are printed as JSON and written into ``--report`` (between the ``soak:results``
markers, with the command, the commit and the date); the exit status is 1 when a figure fails.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import hashlib
import json
import random
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from queue import Empty, Queue
from typing import Any

from bench.harness import source_version, wrap, write_section
from lab.faults import IMAGE_DATA, FaultProxy, Rule
from lab.glance_http import GlanceAPI, GlanceHTTPError
from lab.mounts import Mount, mount_argv
from lab.production import ProductionLab

MiB = 1024 * 1024
#: An operation running longer than this is hung: far above --timeout x (--retries + 1).
HANG_AFTER = 150.0
MOUNT_OPTIONS = ["--timeout", "10", "--retries", "3", "--allow-delete", "--listing-ttl", "2"]
PREFIX = "soak-"
READ_SIZES = (3 * MiB + 5, 12 * MiB, 40 * MiB + 1)


def add_faults(proxy: FaultProxy) -> list[Rule]:
    """About 5 % of requests get a fault (each rule draws from its own seeded generator)."""
    return [
        proxy.fail(503, probability=0.02),
        proxy.reset_after(MiB + 17, probability=0.01),  # bodies over 1 MiB: image data
        proxy.truncate_after(512 * 1024 + 3, probability=0.01),
        proxy.flip_byte(method="GET", path=IMAGE_DATA, probability=0.01),
        proxy.reset_upload_after(2 * MiB + 5, method="PUT", path=IMAGE_DATA, probability=0.005),
    ]


@dataclass
class Figures:
    """What the soak counts; ``outcomes`` per operation ("read ok", "write EIO", ...)."""

    outcomes: Counter[str] = field(default_factory=Counter)
    wrong_bytes: int = 0
    wrong_reads: int = 0
    bad_records: int = 0
    hung: int = 0
    half_made: list[str] = field(default_factory=list)
    rss: list[tuple[float, int]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def count(self, what: str) -> None:
        with self.lock:
            self.outcomes[what] += 1


class Watchdog:
    """Which operations run now, since when; counts each one that outlives HANG_AFTER once."""

    def __init__(self, figures: Figures) -> None:
        self.figures = figures
        self._running: dict[int, tuple[str, float]] = {}
        self._flagged: set[int] = set()
        self._lock = threading.Lock()
        self._next = 0

    @contextlib.contextmanager
    def operation(self, what: str) -> Iterator[None]:
        with self._lock:
            self._next += 1
            key = self._next
            self._running[key] = (what, time.monotonic())
        try:
            yield
        finally:
            with self._lock:
                del self._running[key]

    def check(self) -> None:
        now = time.monotonic()
        with self._lock:
            for key, (what, started) in self._running.items():
                if now - started > HANG_AFTER and key not in self._flagged:
                    self._flagged.add(key)
                    self.figures.hung += 1
                    print(f"soak: {what} running for {now - started:.0f} s: hung", flush=True)

    def still_running(self) -> list[str]:
        with self._lock:
            return [what for what, _ in self._running.values()]


class Soak:
    def __init__(self, lab: ProductionLab, mount: Mount, seed: int, deadline: float) -> None:
        self.lab = lab
        self.mount = mount
        self.glance = GlanceAPI(lab.url)  # straight to HAProxy: the checks see no faults
        self.deadline = deadline
        self.seed = seed
        self.figures = Figures()
        self.watchdog = Watchdog(self.figures)
        self.made: Queue[str] = Queue()
        self.images: list[tuple[str, bytes]] = []

    def listed(self, **query: str) -> list[dict[str, Any]]:
        """Glance's images (straight through HAProxy), asked again when a kept-alive connection
        was closed under the request: the checks must not fail for reasons of their own."""
        for _ in range(4):
            with contextlib.suppress(GlanceHTTPError):
                return self.glance.list(**query)
            time.sleep(1)
        return self.glance.list(**query)

    def running(self) -> bool:
        return time.monotonic() < self.deadline

    def setup(self) -> None:
        rng = random.Random(self.seed)
        for i, size in enumerate(READ_SIZES):
            data = rng.randbytes(size)
            self.images.append((self.glance.create(f"{PREFIX}read-{i}", data)["id"], data))

    # -- workers ----------------------------------------------------------------------------------
    def reader(self, worker: int) -> None:
        rng = random.Random(f"{self.seed}-read-{worker}")
        while self.running():
            image_id, data = rng.choice(self.images)
            with self.watchdog.operation(f"read {image_id}"):
                try:
                    got = (self.mount.path / "by-id" / image_id).read_bytes()
                except OSError as error:
                    self.figures.count(f"read {errno.errorcode.get(error.errno or 0, error)}")
                    continue
            if got == data:
                self.figures.count("read ok")
                continue
            wrong = abs(len(got) - len(data)) + sum(a != b for a, b in zip(got, data, strict=False))
            with self.figures.lock:
                self.figures.wrong_bytes += wrong
                self.figures.wrong_reads += 1
            print(f"soak: read of {image_id} returned {wrong} wrong bytes", flush=True)

    def writer(self, worker: int, scratch: Path) -> None:
        """``cp`` of a new local file into new/ (a process of its own, as a user's cp is)."""
        rng = random.Random(f"{self.seed}-write-{worker}")
        source = scratch / f"source-{worker}.raw"
        number = 0
        while self.running():
            number += 1
            name = f"{PREFIX}w{worker}-{number}.raw"
            data = rng.randbytes(rng.randrange(1, 8 * MiB))
            source.write_bytes(data)
            with self.watchdog.operation(f"cp {name}"):
                if not self._run("cp", ["cp", str(source), str(self.mount.path / "new" / name)]):
                    continue
            held = self.listed(name=name)
            if (
                len(held) == 1
                and held[0]["status"] == "active"
                and held[0]["os_hash_value"] == hashlib.sha512(data).hexdigest()
            ):
                self.made.put(name)
            else:
                with self.figures.lock:
                    self.figures.bad_records += 1
                print(f"soak: {name} copied, but Glance holds {held}", flush=True)

    def mover(self) -> None:
        while self.running():
            try:
                name = self.made.get(timeout=1)
            except Empty:
                continue
            moved = name.replace(".raw", ".moved")
            with self.watchdog.operation(f"mv {name}"):
                self._run("mv", ["mv", str(self.mount.path / name), str(self.mount.path / moved)])
            with self.watchdog.operation(f"rm {moved}"):
                self._run("rm", ["rm", "-f", str(self.mount.path / moved)])

    def lister(self) -> None:
        while self.running():
            with self.watchdog.operation("ls -l"):
                self._run("ls", ["ls", "-l", str(self.mount.path)])

    def tagger(self) -> None:
        rng = random.Random(f"{self.seed}-xattr")
        while self.running():
            image_id, _ = rng.choice(self.images)
            path = str(self.mount.path / "by-id" / image_id)
            value = f"v{rng.randrange(10**6)}"
            with self.watchdog.operation(f"setfattr {image_id}"):
                if not self._run("setfattr", ["setfattr", "-n", "user.soak", "-v", value, path]):
                    continue
                read = subprocess.run(
                    ["getfattr", "--only-values", "-n", "user.soak", path],
                    capture_output=True,
                    text=True,
                    timeout=HANG_AFTER,
                    check=False,
                )
            if read.returncode == 0 and read.stdout != value:
                with self.figures.lock:
                    self.figures.bad_records += 1
                print(f"soak: user.soak set to {value}, reads {read.stdout!r}", flush=True)

    def _run(self, what: str, command: list[str]) -> bool:
        """Run a tool (bounded by HANG_AFTER) and count how it ended; True if it succeeded."""
        try:
            result = subprocess.run(
                command, capture_output=True, text=True, timeout=HANG_AFTER, check=False
            )
        except subprocess.TimeoutExpired:
            self.figures.count(f"{what} killed")
            return False
        if result.returncode == 0:
            self.figures.count(f"{what} ok")
            return True
        reason = result.stderr.strip().rpartition(": ")[2] or f"exit {result.returncode}"
        self.figures.count(f"{what} {reason}")
        return False

    def sample_memory(self, started: float) -> None:
        while self.running():
            with contextlib.suppress(OSError, KeyError):
                self.figures.rss.append((time.monotonic() - started, self.mount.status("VmRSS")))
            self.watchdog.check()
            time.sleep(2)

    # -- after the load ---------------------------------------------------------------------------
    def count_half_made(self) -> None:
        """Soak images not active once uploads have settled (saving ones get a minute)."""
        deadline = time.monotonic() + 60
        while True:
            left = [i for i in self.listed() if (i["name"] or "").startswith(PREFIX)]
            if not any(i["status"] == "saving" for i in left) or time.monotonic() > deadline:
                break
            time.sleep(1)
        self.figures.half_made = [
            f"{i['name']} {i['status']}" for i in left if i["status"] != "active"
        ]


def rss_change(samples: list[tuple[float, int]], seconds: float) -> tuple[int, int, float]:
    """Mean RSS in the first and the last minute (a quarter of shorter runs) and the change."""
    window = min(60.0, seconds / 4)
    first = [rss for t, rss in samples if t <= window]
    last = [rss for t, rss in samples if t >= seconds - window]
    if not first or not last:
        return 0, 0, 0.0
    before, after = sum(first) // len(first), sum(last) // len(last)
    return before, after, after / before - 1


def soak(minutes: float, seed: int, workdir: Path) -> tuple[dict[str, Any], bool]:
    seconds = minutes * 60
    with (
        ProductionLab(workdir / "lab") as lab,
        FaultProxy(lab.url, seed=seed) as proxy,
        Mount(
            workdir / "mnt",
            workdir / "mount.log",
            mount_argv(proxy.url, workdir / "mnt", *MOUNT_OPTIONS),
        ) as mount,
    ):
        started = time.monotonic()
        runner = Soak(lab, mount, seed, started + seconds)
        runner.setup()
        rules = add_faults(proxy)
        workers: list[Callable[[], None]] = [
            lambda: runner.reader(0),
            lambda: runner.reader(1),
            lambda: runner.writer(0, workdir),
            lambda: runner.writer(1, workdir),
            runner.mover,
            runner.lister,
            runner.tagger,
            lambda: runner.sample_memory(started),
        ]
        threads = [threading.Thread(target=work, daemon=True) for work in workers]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(max(0.0, started + seconds + HANG_AFTER - time.monotonic()))
        runner.watchdog.check()
        stuck = runner.watchdog.still_running()
        proxy.clear()
        faults = sum(proxy.counts().values())
        if stuck:  # unblock them: abort the FUSE connection, as fusermount -u cannot
            Path(f"/sys/fs/fuse/connections/{mount.connection}/abort").write_text("1")
        runner.count_half_made()
        figures = runner.figures
        before, after, change = rss_change(figures.rss, seconds)
        result: dict[str, Any] = {
            "minutes": minutes,
            "seed": seed,
            "requests through the proxy": faults,
            "faults injected": {rule.kind: rule.fired for rule in rules},
            "operations": dict(sorted(figures.outcomes.items())),
            "wrong bytes": figures.wrong_bytes,
            "reads with wrong bytes": figures.wrong_reads,
            "records not as written": figures.bad_records,
            "hung operations": figures.hung,
            "half-made images": figures.half_made,
            "mount RSS first/last minute (MiB)": [round(before / MiB, 1), round(after / MiB, 1)],
            "RSS change": round(change, 3),
        }
    passed = (
        figures.wrong_bytes == 0
        and figures.hung == 0
        and not figures.half_made
        and figures.bad_records == 0
        and abs(change) <= 0.10
    )
    return result, passed


def write_report(report: Path, command: str, result: dict[str, Any], passed: bool) -> None:
    """Replace the soak section of ``report`` (or append one) with these figures."""
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    ops = result["operations"]
    lines = [
        f"`{command}` at {source_version()}, {when}: **{'PASS' if passed else 'FAIL'}**",
        "",
        "| figure | value | required |",
        "| --- | --- | --- |",
        f"| wrong bytes returned by reads | {result['wrong bytes']} "
        f"({result['reads with wrong bytes']} reads) | 0 |",
        f"| hung operations (> {HANG_AFTER:.0f} s) | {result['hung operations']} | 0 |",
        f"| images left half-made | {len(result['half-made images'])} | 0 |",
        f"| records not as written (uploads, xattrs) | {result['records not as written']} | 0 |",
        f"| mount RSS, mean of first / last minute | "
        f"{' / '.join(map(str, result['mount RSS first/last minute (MiB)']))} MiB "
        f"({result['RSS change']:+.1%}) | within 10 % |",
        "",
        *wrap(
            f"{result['requests through the proxy']} requests through the fault proxy; faults "
            f"injected: {result['faults injected']}."
        ),
        "",
        *wrap(
            "Operations and how they ended: "
            + ", ".join(f"{what} {count}" for what, count in ops.items())
            + "."
        ),
    ]
    write_section(report, "soak:results", lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--seed", type=int, default=14)
    parser.add_argument("--report", type=Path, default=Path("RELIABILITY.md"))
    args = parser.parse_args(argv)
    # `kill` or `timeout` ends the soak like Ctrl-C: the lab and the mount are taken down.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    command = shlex.join(["python", "-m", "bench.soak", *(argv or sys.argv[1:])])
    with tempfile.TemporaryDirectory(prefix="glancefs-soak-") as work:
        result, passed = soak(args.minutes, args.seed, Path(work))
    print(json.dumps(result, indent=2))
    write_report(args.report, command, result, passed)
    print(f"soak: {'PASS' if passed else 'FAIL'}; figures in {args.report}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
