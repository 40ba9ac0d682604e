"""A rate-limited link for the benchmark: a network namespace joined to this one by a veth pair
whose two ends a ``tbf`` qdisc limits, both directions, and which is gone again at the end.

    with LinkedNamespace(rate="1gbit") as link:      # as root; iproute2
        GlanceServer(work, host=link.inside, netns=link.name)   # serves inside
        curl https://{link.inside}:PORT/...          # from here, through the link
        link.set_rate("10gbit")                      # the same link, another rate

- **Names**: the namespace is ``gfsbench-<pid>``, the veth ends ``gfsb<pid>`` (here) and
  ``gfsb<pid>n`` (inside): the bench's process id, so that two benches (a run and the harness's
  test) never touch each other's. Entering, leftovers of a bench whose process is gone (a run
  killed with SIGKILL, when no ``finally`` runs) are removed first.
- **Addresses**: a /30 of 10.254.0.0/16 picked from the pid, skipped while any interface holds
  an address in it: ``.1`` inside (``inside``), ``.2`` on this end (``outside``). Nothing else
  changes in this namespace: no route, no forwarding; the /30 is reachable only over the pair.
- **The limit**: ``tbf rate RATE burst BURST latency 10ms`` on each end's egress (this end's
  limits what is sent in, the inside end's what comes out). BURST is 1 ms of the rate (125 kB at
  1 Gbit/s), at least 64 KiB + a frame so that one GSO packet of the veth always fits; 10 ms of
  queue lets TCP fill the link without the seconds of buffering a deep queue would add.
- **Teardown**: leaving the block, also by an exception or Ctrl-C, deletes this end of the pair
  (which takes the other with it at once; deleting a namespace frees its devices only later)
  and then the namespace. Processes started inside must be stopped before.
"""

from __future__ import annotations

import ipaddress
import os
import re
import subprocess
from pathlib import Path

from lab.servers import Started

__all__ = ["PREFIX", "LinkedNamespace", "bench_devices", "bench_namespaces", "remove_leftovers"]

#: What every namespace the bench makes is called (then its pid).
PREFIX = "gfsbench-"
#: What every veth end it makes is called (then its pid, then ``n`` for the inside end).
DEVICE_PREFIX = "gfsb"
SUBNETS = ipaddress.IPv4Network("10.254.0.0/16")
QUEUE_LATENCY = "10ms"
MIN_BURST = 64 * 1024 + 1514  # bytes: one GSO packet of a veth, and one frame


def _command(tool: str, *args: str) -> str:
    result = subprocess.run([tool, *args], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{tool} {' '.join(args)}: {result.stderr.strip()}")
    return result.stdout


def _ip(*args: str) -> str:
    return _command("ip", *args)


def _tc(*args: str) -> str:
    return _command("tc", *args)


def bench_namespaces() -> list[str]:
    """The network namespaces whose name starts with PREFIX."""
    names = [line.split()[0] for line in _ip("netns", "list").splitlines() if line.strip()]
    return [name for name in names if name.startswith(PREFIX)]


def bench_devices() -> list[str]:
    """The network devices of this namespace that the bench's pairs named."""
    devices = re.findall(r"^\d+: ([^:@]+)", _ip("-o", "link", "show"), re.MULTILINE)
    return [device for device in devices if re.fullmatch(rf"{DEVICE_PREFIX}\d+n?", device)]


def _alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


def remove_leftovers() -> list[str]:
    """Delete the namespaces and veth ends of benches whose process is gone; return their
    names."""
    removed = []
    for device in bench_devices():
        if not _alive(int(device.removeprefix(DEVICE_PREFIX).rstrip("n"))):
            _ip("link", "del", device)
            removed.append(device)
    for name in bench_namespaces():
        owner = name.removeprefix(PREFIX)
        if not (owner.isdigit() and _alive(int(owner))):
            _ip("netns", "del", name)
            removed.append(name)
    return removed


def burst_bytes(rate: str) -> int:
    """1 ms of ``rate`` ("1gbit", "10gbit", "500mbit") in bytes, at least MIN_BURST."""
    match = re.fullmatch(r"(\d+)([kmg]?)bit", rate)
    if match is None:
        raise ValueError(f"rate {rate!r}: give it as NUMBER[k|m|g]bit")
    bits = int(match[1]) * {"": 1, "k": 10**3, "m": 10**6, "g": 10**9}[match[2]]
    return max(bits // 8 // 1000, MIN_BURST)


class LinkedNamespace(Started):
    """A network namespace reached over a veth pair limited to ``rate``; see the module."""

    def __init__(self, rate: str) -> None:
        pid = os.getpid()
        self.name = f"{PREFIX}{pid}"
        self.outside_device = f"{DEVICE_PREFIX}{pid}"
        self.inside_device = f"{self.outside_device}n"
        self.rate = rate
        burst_bytes(rate)  # a bad rate fails here, before anything is made
        self.inside = ""
        self.outside = ""

    def _free_subnet(self) -> ipaddress.IPv4Network:
        taken = [
            ipaddress.ip_interface(address).network
            for address in re.findall(r"inet (\S+)", _ip("-o", "-4", "addr", "show"))
        ]
        subnets: list[ipaddress.IPv4Network] = list(SUBNETS.subnets(new_prefix=30))
        start = os.getpid() % len(subnets)
        for subnet in subnets[start:] + subnets[:start]:
            if not any(subnet.overlaps(other) for other in taken):
                return subnet
        raise RuntimeError(f"no free /30 in {SUBNETS}")

    def start(self) -> None:
        """Remove dead benches' leftovers, then make the namespace and the limited pair (all or
        nothing)."""
        remove_leftovers()
        try:
            self._create()
        except BaseException:
            self.stop()
            raise

    def _create(self) -> None:
        subnet = self._free_subnet()
        inside, outside = list(subnet.hosts())
        self.inside, self.outside = str(inside), str(outside)
        _ip("netns", "add", self.name)
        _ip("link", "add", self.outside_device, "type", "veth",
            "peer", "name", self.inside_device, "netns", self.name)  # fmt: skip
        _ip("addr", "add", f"{outside}/30", "dev", self.outside_device)
        _ip("link", "set", self.outside_device, "up")
        _ip("-n", self.name, "addr", "add", f"{inside}/30", "dev", self.inside_device)
        _ip("-n", self.name, "link", "set", self.inside_device, "up")
        _ip("-n", self.name, "link", "set", "lo", "up")
        self._limit("add")

    def _limit(self, action: str) -> None:
        shape = ["root", "tbf", "rate", self.rate, "burst", str(burst_bytes(self.rate)),
                 "latency", QUEUE_LATENCY]  # fmt: skip
        _tc("qdisc", action, "dev", self.outside_device, *shape)
        _tc("-n", self.name, "qdisc", action, "dev", self.inside_device, *shape)

    def set_rate(self, rate: str) -> None:
        """Limit both directions to ``rate`` from now on."""
        burst_bytes(rate)
        self.rate = rate
        self._limit("change")

    def qdiscs(self) -> str:
        """``tc qdisc show`` of both ends (what limits the link now)."""
        return _tc("qdisc", "show", "dev", self.outside_device) + _tc(
            "-n", self.name, "qdisc", "show", "dev", self.inside_device
        )

    def stop(self) -> None:
        """Delete the pair (both ends at once) and the namespace, whichever exist."""
        if self.outside_device in bench_devices():
            _ip("link", "del", self.outside_device)
        if self.name in bench_namespaces():
            _ip("netns", "del", self.name)
