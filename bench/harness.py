"""What every measurement needs: timed commands, the page cache, results and the table, and the
section of a Markdown file a run rewrites with its figures (mounts: lab.mounts)."""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

MB = 1_000_000  # throughput is reported in MB/s (10^6 bytes)


def run(*command: str, cwd: Path | None = None, timeout: float = 600) -> str:
    """Run a command; raise with its stderr when it fails; return its stdout."""
    result = subprocess.run(
        command, cwd=cwd, capture_output=True, text=True, errors="replace", timeout=timeout
    )
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited {result.returncode}: {result.stderr}")
    return result.stdout


def timed(*command: str, timeout: float = 600) -> tuple[float, str]:
    """Wall-clock seconds of one command (process start to exit), and its stderr+stdout."""
    started = time.perf_counter()
    result = subprocess.run(
        command, capture_output=True, text=True, errors="replace", timeout=timeout
    )
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited {result.returncode}: {result.stderr}")
    return elapsed, result.stderr + result.stdout


def source_version() -> str:
    """The commit the code runs at, and whether the code (glancefs/, bench/, lab/) differs."""
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    changed = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no", "--", "glancefs", "bench", "lab"],
        capture_output=True, text=True, check=False,
    ).stdout.strip()  # fmt: skip
    return f"{commit or '?'}{' with uncommitted changes' if changed else ''}"


def wrap(text: str, indent: str = "") -> list[str]:
    """``text`` in lines of at most 100 columns, as the repository's Markdown is written (a list
    item's lines after the first indented by ``indent``)."""
    return textwrap.wrap(
        text, 100, subsequent_indent=indent, break_long_words=False, break_on_hyphens=False
    )


def write_section(path: Path, name: str, lines: list[str]) -> None:
    """Replace what stands between ``<!-- NAME -->`` and ``<!-- /NAME -->`` in ``path`` with
    ``lines``, or append the section, markers included, if it has none."""
    begin, end = f"<!-- {name} -->", f"<!-- /{name} -->"
    section = "\n".join([begin, *lines, end])
    text = path.read_text() if path.exists() else ""
    if begin in text and end in text:
        head, _, rest = text.partition(begin)
        text = head + section + rest.partition(end)[2]
    else:
        text = text.rstrip("\n") + ("\n\n" if text.strip() else "") + section + "\n"
    path.write_text(text)


def drop_page_cache() -> None:
    """Write back and drop the page cache, dentries and inodes (root only)."""
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def warm(path: Path) -> None:
    """Read a file once so that it sits in the page cache."""
    with path.open("rb") as f:
        while f.read(8 * 1024 * 1024):
            pass


def children_cpu_seconds() -> float:
    """User + system CPU seconds of this process's children that ended and were waited for, each
    with its own waited-for children (getrusage RUSAGE_CHILDREN): the difference over a block is
    what the commands run in it used, pipelines' every process included."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def cpu_seconds(pid: int, children: bool = False) -> float:
    """User + system CPU seconds of a process, or of its direct children (gunicorn's workers)."""
    pids = [pid]
    if children:
        tasks = Path(f"/proc/{pid}/task")
        pids = [int(c) for t in tasks.iterdir() for c in (t / "children").read_text().split()]
    total = 0
    for each in pids:
        fields = Path(f"/proc/{each}/stat").read_text().rpartition(")")[2].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
    return total / os.sysconf("SC_CLK_TCK")


@dataclass
class Series:
    """The values of several runs of one tool, in the metric's unit."""

    tool: str
    values: list[float] = field(default_factory=list)
    #: Per run, CPU seconds per GiB moved: the tool's processes (and the mount's, for glancefs).
    cpu: list[float] = field(default_factory=list)
    #: Per run, CPU seconds per GiB moved of each server (Glance, HAProxy), by name.
    servers: dict[str, list[float]] = field(default_factory=dict)

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    def summary(self) -> dict[str, object]:
        return {
            "tool": self.tool,
            "median": round(self.median, 4),
            "min": round(min(self.values), 4),
            "max": round(max(self.values), 4),
            "runs": [round(v, 4) for v in self.values],
            "cpu_s_per_gib": [round(v, 3) for v in self.cpu],
            "servers_cpu_s_per_gib": {
                name: [round(v, 3) for v in values] for name, values in self.servers.items()
            },
        }


@dataclass
class Metric:
    """One line of the table.

    ``ratio`` is ours/peer of the medians: a speed-up for throughputs (higher is better, the
    target is a minimum) and a time factor for latencies (lower is better, the target a maximum).
    Without a peer the target applies to our median itself.
    """

    name: str
    unit: str
    higher_is_better: bool
    ours: Series
    peer: Series | None = None
    target: float | None = None
    note: str = ""

    @property
    def ratio(self) -> float | None:
        if self.peer is None or not self.peer.values or not self.ours.values:
            return None
        return self.ours.median / self.peer.median

    @property
    def target_text(self) -> str:
        if self.target is None:
            return "-"
        op = ">=" if self.higher_is_better else "<="
        if self.peer is None:
            return f"{op} {self.target:g} {self.unit}"
        return f"{op} {self.target:g}x"

    @property
    def passed(self) -> bool | None:
        if self.target is None or not self.ours.values:
            return None
        value = self.ratio if self.peer is not None else self.ours.median
        if value is None:
            return None
        return value >= self.target if self.higher_is_better else value <= self.target

    def json_line(self) -> str:
        return json.dumps(
            {
                "metric": self.name,
                "unit": self.unit,
                "ours": self.ours.summary() if self.ours.values else None,
                "peer": self.peer.summary() if self.peer and self.peer.values else None,
                "ratio": None if self.ratio is None else round(self.ratio, 3),
                "target": self.target_text,
                "pass": self.passed,
                "note": self.note,
            }
        )


def _fmt(value: float) -> str:
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}"


def _cell(series: Series | None) -> str:
    if series is None or not series.values:
        return "-"
    return (
        f"{_fmt(series.median)} ({_fmt(min(series.values))}-{_fmt(max(series.values))}) "
        f"{series.tool}"
    )


def _cpu_cell(series: Series | None) -> str:
    """Median CPU s per GiB of the tool, then of each server: "1.2; Glance 0.6, HAProxy 0.4"."""
    if series is None or not series.cpu:
        return "-"
    servers = ", ".join(
        f"{name} {statistics.median(values):.2f}" for name, values in series.servers.items()
    )
    return f"{statistics.median(series.cpu):.2f}" + (f"; {servers}" if servers else "")


def table(metrics: list[Metric]) -> str:
    """A Markdown table: median (min-max) of ours and of the peer, ratio, target, verdict, and
    the CPU seconds per GiB of each side and its servers (when measured)."""
    rows = [
        ("metric", "unit", "glancefs median (min-max)", "peer median (min-max)", "ratio",
         "target", "pass", "CPU s/GiB glancefs; servers", "CPU s/GiB peer; servers"),
    ]  # fmt: skip
    for m in metrics:
        verdict = {True: "PASS", False: "FAIL", None: "-"}[m.passed]
        ratio = "-" if m.ratio is None else f"{m.ratio:.2f}x"
        rows.append(
            (m.name, m.unit, _cell(m.ours), _cell(m.peer), ratio, m.target_text, verdict,
             _cpu_cell(m.ours), _cpu_cell(m.peer))
        )  # fmt: skip
    # A pipeline's name holds a |, which would end its cell.
    cells = [[cell.replace("|", "\\|") for cell in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    lines = [
        "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |"
        for row in cells
    ]
    lines.insert(1, "| " + " | ".join("-" * w for w in widths) + " |")
    return "\n".join(lines)
