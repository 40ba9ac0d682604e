"""The bench's rate-limited link (bench.netns): it carries traffic, and its namespace, veth pair
and qdiscs are gone afterwards, also when the run inside fails. Needs root and iproute2."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench.netns import LinkedNamespace, bench_devices, bench_namespaces, burst_bytes

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("tc") is None,
    reason="needs root and iproute2",
)


def ours(link: LinkedNamespace) -> bool:
    """Whether anything of ``link`` is left: its namespace, a veth end, a qdisc on one."""
    qdiscs = subprocess.run(["tc", "qdisc", "show"], capture_output=True, text=True, check=True)
    return (
        link.name in bench_namespaces()
        or link.outside_device in bench_devices()
        or link.outside_device in qdiscs.stdout
    )


def failing_run(link: LinkedNamespace) -> None:
    """A run on ``link`` that fails half-way."""
    with link:
        assert ours(link)
        assert link.qdiscs().count("rate 1Gbit") == 2  # both directions
        link.set_rate("10gbit")
        assert link.qdiscs().count("rate 10Gbit") == 2
        raise RuntimeError("the run failed")


def test_a_failing_run_leaves_nothing() -> None:
    link = LinkedNamespace("1gbit")
    with pytest.raises(RuntimeError, match="the run failed"):
        failing_run(link)
    assert not ours(link)


def test_leftovers_of_a_dead_bench_are_removed_first() -> None:
    # The pid of a process that is gone now: a bench killed before its finally ran.
    pid = int(subprocess.run(["sh", "-c", "echo $$"], capture_output=True, text=True).stdout)
    name, device = f"gfsbench-{pid}", f"gfsb{pid}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    subprocess.run(
        ["ip", "link", "add", device, "type", "veth", "peer", "name", f"{device}n", "netns", name],
        check=True,
    )
    with LinkedNamespace("1gbit") as link:
        assert name not in bench_namespaces()
        assert device not in bench_devices()
        assert ours(link)
    assert not ours(link)


def test_a_server_inside_is_reached_through_the_link(tmp_path: Path) -> None:
    (tmp_path / "hello").write_text("through the link\n")
    with LinkedNamespace("10gbit") as link:
        server = subprocess.Popen(
            ["ip", "netns", "exec", link.name, sys.executable, "-u", "-m", "http.server",
             "--bind", link.inside, "8025"],
            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )  # fmt: skip
        try:
            assert server.stdout is not None
            server.stdout.readline()  # "Serving HTTP on ..." once it listens
            answer = subprocess.run(
                ["curl", "-sS", "-f", "--noproxy", "*", f"http://{link.inside}:8025/hello"],
                capture_output=True, text=True, check=True, timeout=30,
            )  # fmt: skip
        finally:
            server.kill()
            server.wait()
        assert answer.stdout == "through the link\n"
    assert not ours(link)


def test_the_burst_is_a_millisecond_of_the_rate_at_least_one_gso_packet() -> None:
    assert burst_bytes("10gbit") == 1_250_000
    assert burst_bytes("1gbit") == 125_000
    assert burst_bytes("100mbit") == 64 * 1024 + 1514
    with pytest.raises(ValueError, match="NUMBER"):
        burst_bytes("1 GB/s")
