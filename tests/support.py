"""Helpers for integration tests: a plain HTTP view of the real Glance and real mounts (both from
lab/, shared with the benchmark and the demo), and the tools the tests drive.

The tests talk to Glance directly (lab.glance_http, synchronously) to set up and check what the
mount shows, so that a bug in glancefs's own client cannot hide behind itself.
"""

from __future__ import annotations

import shutil
import subprocess

from lab.glance_http import GlanceAPI
from lab.mounts import GLANCEFS, Mount, default_sigint

__all__ = [
    "GLANCEFS",
    "GlanceAPI",
    "Mount",
    "default_sigint",
    "metrics",
    "require_tools",
    "tool",
]


def tool(*command: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run a command, capture its output, never raise on a non-zero exit."""
    return subprocess.run(
        command, capture_output=True, text=True, errors="replace", timeout=timeout, check=False
    )


def require_tools(*names: str) -> None:
    missing = [n for n in names if shutil.which(n) is None]
    if missing:
        raise RuntimeError(f"missing tools {missing}: run `make deps`")


def metrics(port: int) -> dict[str, float]:
    """The series a mount's ``--metrics-addr`` serves, by name and labels."""
    result = tool("curl", "-sf", f"http://127.0.0.1:{port}/metrics")
    assert result.returncode == 0, result.stderr
    series = {}
    for line in result.stdout.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            series[key] = float(value)
    return series
