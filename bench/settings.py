"""Where the bench's Glance is, as the mount and the peers reach it: the settings each read and
upload comparison runs in (BENCHMARKS.md, "The settings").

- ``loopback``: the bench's Glance on 127.0.0.1, plain HTTP.
- ``tls``: that Glance behind lab.production's HAProxy on 127.0.0.1, which terminates TLS with a
  certificate of a CA made for the run (trustme, as the TLS tests do).
- ``link-1g``, ``link-10g``: a Glance of its own and HAProxy (TLS) inside a network namespace
  (bench.netns), reached over a veth pair limited to 1 and 10 Gbit/s in each direction.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from bench.harness import cpu_seconds
from bench.netns import LinkedNamespace
from lab.glance_http import GlanceAPI
from lab.production import HAProxyServer
from lab.servers import GlanceServer

__all__ = ["LINK_RATES", "SETTINGS", "Endpoint", "Pki", "link", "loopback", "tls"]

#: The rate of each link setting (tbf's notation).
LINK_RATES = {"link-1g": "1gbit", "link-10g": "10gbit"}
SETTINGS = ("loopback", "tls", *LINK_RATES)


class Pki:
    """A CA made for the run (in ``where``), and certificates it issues for HAProxy."""

    def __init__(self, where: Path) -> None:
        import trustme  # a dev dependency, as the bench is

        where.mkdir(parents=True, exist_ok=True)
        self.where = where
        self._ca = trustme.CA()
        self.ca_file = where / "ca.pem"
        self._ca.cert_pem.write_to_path(str(self.ca_file))

    def certificate(self, host: str) -> Path:
        """One PEM file holding a certificate for ``host`` (an address), its chain and its key:
        what HAProxy's ``crt`` takes."""
        issued = self._ca.issue_cert(host)
        pem = self.where / f"{host}.pem"
        pem.write_bytes(b"".join(blob.bytes() for blob in issued.cert_chain_pems))
        issued.private_key_pem.write_to_path(str(pem), append=True)
        return pem


@dataclass
class Endpoint:
    """One setting's Glance: the URL the mount and the peers use, the server behind it, and the
    HAProxy in front of it (None on loopback)."""

    name: str
    url: str
    glance: GlanceServer
    haproxy: HAProxyServer | None = None
    cacert: Path | None = None
    #: The 1 GiB image every read of this setting uses (set by the bench once uploaded).
    image_id: str = ""

    @property
    def curl_options(self) -> list[str]:
        return ["--cacert", str(self.cacert)] if self.cacert else []

    @property
    def client_options(self) -> list[str]:
        """What ``glancefs mount`` and ``glance`` (python-glanceclient) need to trust it."""
        return ["--os-cacert", str(self.cacert)] if self.cacert else []

    def api(self) -> GlanceAPI:
        """Glance's API straight, plain HTTP: for arranging images, never measured."""
        return GlanceAPI(self.glance.url, timeout=600)

    def servers_cpu(self) -> dict[str, float]:
        """CPU seconds so far of Glance's worker and of HAProxy (when there is one)."""
        assert self.glance.pid is not None
        used = {"Glance": cpu_seconds(self.glance.pid, children=True)}
        if self.haproxy is not None:
            assert self.haproxy.pid is not None
            used["HAProxy"] = cpu_seconds(self.haproxy.pid)
        return used


def loopback(glance: GlanceServer) -> Endpoint:
    return Endpoint("loopback", glance.url, glance)


@contextlib.contextmanager
def tls(work: Path, glance: GlanceServer, pki: Pki) -> Iterator[Endpoint]:
    """HAProxy terminating TLS on 127.0.0.1 in front of ``glance`` (the loopback one)."""
    with HAProxyServer(
        work / "haproxy-tls",
        [("glance", glance.port)],
        certificate=pki.certificate("127.0.0.1"),
    ) as haproxy:
        yield Endpoint("tls", haproxy.url, glance, haproxy, pki.ca_file, glance_image(glance))


def glance_image(glance: GlanceServer) -> str:
    """The id of the bench's 1 GiB image on ``glance`` (named bench-1g.raw)."""
    with GlanceAPI(glance.url) as api:
        (image,) = api.list(name="bench-1g.raw")
    return str(image["id"])


@dataclass
class Link:
    """The rate-limited link and the Glance behind it: endpoint() gives one rate's setting."""

    namespace: LinkedNamespace
    glance: GlanceServer
    haproxy: HAProxyServer
    cacert: Path
    #: The 1 GiB image on this Glance (once the bench uploaded it).
    image_id: str = ""

    def endpoint(self, name: str) -> Endpoint:
        """The setting ``name`` (a key of LINK_RATES): the link set to its rate."""
        if self.namespace.rate != LINK_RATES[name]:
            self.namespace.set_rate(LINK_RATES[name])
        return Endpoint(
            name, self.haproxy.url, self.glance, self.haproxy, self.cacert, self.image_id
        )


@contextlib.contextmanager
def link(work: Path, pki: Pki, rate: str) -> Iterator[Link]:
    """A namespace limited to ``rate``, a Glance and HAProxy (TLS) inside it on its address;
    everything stopped and the namespace removed at the end, also on an error."""
    with LinkedNamespace(rate) as namespace:
        address = namespace.inside
        glance = GlanceServer(work / "glance-link", host=address, netns=namespace.name)
        with glance:
            haproxy = HAProxyServer(
                work / "haproxy-link",
                [("glance", glance.port)],
                host=address,
                certificate=pki.certificate(address),
                netns=namespace.name,
            )
            with haproxy:
                yield Link(namespace, glance, haproxy, pki.ca_file)
