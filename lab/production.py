"""A production-shaped Glance on loopback: API nodes behind HAProxy, one PostgreSQL, one Ceph.

A single Glance on SQLite hides what a deployment does to a client: consecutive requests land
on different API processes, a node dies or stalls and the load balancer takes it out, many
writers share one database.  :class:`ProductionLab` builds that shape from Debian's packages
(``haproxy``, ``postgresql``; ``make deps`` installs them) and the lab's GlanceServer::

    with ProductionLab(workdir) as lab:     # about 10 s
        httpx.get(f"{lab.url}/v2/images")    # through HAProxy, round-robin over the nodes
        lab.node(0).kill()                   # or .freeze(), .thaw(), .restart(), .stop()
        lab.wait_for_states({"node0": "DOWN"})
        lab.heal()                           # every node running and UP again

- **Nodes**: ``nodes`` (2) GlanceServer processes, each its own gunicorn process group, port
  and work directory (configs, logs), all on one PostgreSQL database and one Ceph cluster
  (lab.ceph), whose rbd store is their default store, as in most production clouds: it answers
  every ranged GET with 400.  They also share a file store directory (``store_dir``), for uploads
  that ask for ``fs``.  They are named ``node0``, ``node1``... in HAProxy, and every answer
  through HAProxy says which node gave it in its ``X-Lab-Node`` header.
- **HAProxy**: round-robin per request, no stickiness, health checks ``GET /healthcheck``
  every 500 ms (fall 2, rise 1, 1 s check timeout: a frozen node is out after about 2.5 s),
  ``retries 3`` with ``option redispatch`` (a refused connection is retried on another node),
  10 minute client/server timeouts (GiB uploads), ``option http-server-close`` (keep-alive
  towards the client, one connection per request towards a node: see the pitfall below).
  :meth:`ProductionLab.states` reads its stats socket.  Pitfall: a request already sent to a
  node that then freezes waits for it (up to the server timeout); HAProxy only reroutes requests
  it could not deliver.
  Pitfall: with HAProxy's default server-side keep-alive, a request may be sent on an idle
  connection gunicorn is just closing (its keep-alive is 2 s), or to a node just killed; HAProxy
  then closes the client's connection without an answer, unlogged, so that the client retries,
  and a POST fails ("Server disconnected without sending a response"; 2 of 7,600 POSTs spaced
  2-3 s apart).  Closing each node connection after its response leaves nothing to reuse.
- **PostgreSQL**: a throwaway cluster (initdb in a new directory under /tmp, run as the
  ``postgres`` system user because postgres refuses root; 127.0.0.1 on a free port, trust
  authentication, durability off), removed when it stops.  Glance's schema comes from one
  ``glance-manage db_sync``.

- **Ceph**: lab.ceph's one-node cluster, started and stopped with the lab unless the caller
  passes one it runs itself (a test session shares one between this lab and lab.stores).

Every process is a lab.servers.ProcessGroup: stopped by stop()/``__exit__``, by an atexit
hook, and by a watchdog if the test process is killed (which also removes the database cluster).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import csv
import io
import os
import pwd
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from lab.ceph import CephCluster
from lab.servers import (
    Flavor,
    GlanceServer,
    ProcessGroup,
    Started,
    _child_env,
    _run,
    _wait_until_ready,
    free_port,
)

__all__ = ["HAProxyServer", "PostgresServer", "ProductionLab", "postgres_bin_dir"]

#: The system user PostgreSQL runs as when the tests run as root.
PG_USER = "postgres"
#: Database and role (a superuser, trust authentication on 127.0.0.1) for Glance.
DB_NAME = "glance"

HAPROXY_CONFIG = """\
global
    maxconn 2000
    stats socket {stats_socket} mode 600 level admin
    log stdout format raw local0 info

defaults
    mode http
    log global
    option httplog
    option forwardfor
    option redispatch
    option http-server-close
    retries 3
    timeout connect 1s
    timeout check 1s
    timeout client 10m
    timeout server 10m
    timeout http-request 30s
    timeout http-keep-alive 10s
    timeout queue 30s

frontend glance
    bind {host}:{port}{tls}
    default_backend glance_api

backend glance_api
    balance roundrobin
    option httpchk GET /healthcheck
    http-check expect status 200
    http-response set-header X-Lab-Node %[srv_name]
    default-server inter 500ms fastinter 250ms downinter 500ms fall 2 rise 1
{servers}
"""


def postgres_bin_dir() -> Path:
    """Binaries of the newest PostgreSQL installed by Debian (/usr/lib/postgresql/<v>/bin)."""
    found = [p for p in Path("/usr/lib/postgresql").glob("*/bin") if (p / "initdb").exists()]
    if not found:
        raise RuntimeError("lab: PostgreSQL is not installed: `make deps` (apt package postgresql)")
    return max(found, key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0)


class PostgresServer(ProcessGroup):
    """A throwaway PostgreSQL cluster on 127.0.0.1 with an empty database ``glance``.

    start() creates the cluster in a new directory under /tmp (not in the caller's work
    directory: pytest's is private to root, and postgres runs as the ``postgres`` user);
    stop() and kill() end it for good and remove that directory.  Durability is off (fsync,
    synchronous_commit, full_page_writes): the data dies with the test run anyway.
    """

    _name = "postgresql"
    # "fast" shutdown; SIGTERM ("smart") would wait for Glance's pooled connections to close
    _stop_signal = signal.SIGINT

    def __init__(self, *, log_path: Path, port: int | None = None) -> None:
        super().__init__()
        self.port = port or free_port()
        self.log_path = Path(log_path).resolve()
        self.dir: Path | None = None
        self._user = PG_USER if os.geteuid() == 0 else ""

    @property
    def url(self) -> str:
        """SQLAlchemy URL of the glance database (psycopg2 driver)."""
        return f"postgresql+psycopg2://{DB_NAME}@127.0.0.1:{self.port}/{DB_NAME}"

    def start(self) -> None:
        """initdb, start postgres, create the database; about 2 s."""
        if self.running:
            return
        self.dir = Path(tempfile.mkdtemp(prefix="glancefs-pg-"))
        self._cleanup = (self.dir,)
        if self._user:
            entry = pwd.getpwnam(self._user)
            os.chown(self.dir, entry.pw_uid, entry.pw_gid)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        bin_dir = postgres_bin_dir()
        data = self.dir / "data"
        try:
            _run(
                [str(bin_dir / "initdb"), "-D", str(data), "-U", DB_NAME, "-A", "trust",
                 "-E", "UTF8", "--no-locale", "--no-sync"],
                self.log_path, _child_env(), user=self._user,
            )  # fmt: skip
            with self.log_path.open("ab") as log:
                self._spawn(
                    [str(bin_dir / "postgres"), "-D", str(data), "-h", "127.0.0.1",
                     "-p", str(self.port), "-k", str(self.dir), "-c", "fsync=off",
                     "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
                     "-c", "max_connections=300"],
                    env=_child_env(), log=log, cwd=self.dir, user=self._user,
                )  # fmt: skip
            isready = [str(bin_dir / "pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(self.port)]
            _wait_until_ready(
                self, lambda: subprocess.call(isready) == 0, "postgres", self.log_path
            )
            _run(
                [str(bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(self.port),
                 "-U", DB_NAME, DB_NAME],
                self.log_path, _child_env(),
            )  # fmt: skip
        except BaseException:
            self.kill()
            raise


class HAProxyServer(ProcessGroup):
    """HAProxy on ``host`` (127.0.0.1 unless given) balancing ``backends`` ([(name, port)] on
    the same host) round-robin; see the module.

    Its config, log (one line per request, with the node) and stats socket are in ``workdir``.
    With ``certificate`` (one PEM file: the certificate, its chain and its key) it terminates
    TLS, as a deployment's load balancer does, and speaks plain HTTP to the backends; with
    ``netns`` it runs inside that network namespace (lab.servers.ProcessGroup).
    """

    _name = "haproxy"

    def __init__(
        self,
        workdir: Path,
        backends: list[tuple[str, int]],
        *,
        port: int | None = None,
        host: str = "127.0.0.1",
        certificate: Path | None = None,
        netns: str | None = None,
    ) -> None:
        super().__init__(netns=netns)
        self.workdir = Path(workdir).resolve()
        self.backends = backends
        self.port = port or free_port()
        self.host = host
        self.certificate = Path(certificate).resolve() if certificate else None

    @property
    def url(self) -> str:
        """http://HOST:PORT (https with a certificate), the endpoint clients use."""
        return f"{'https' if self.certificate else 'http'}://{self.host}:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.workdir / "haproxy.log"

    @property
    def stats_socket(self) -> Path:
        return self.workdir / "stats.sock"

    def start(self) -> None:
        """Start HAProxy in the foreground (-db) and wait until every backend is UP."""
        if self.running:
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        servers = "\n".join(
            f"    server {name} {self.host}:{port} check" for name, port in self.backends
        )
        config = self.workdir / "haproxy.cfg"
        tls = f" ssl crt {self.certificate}" if self.certificate else ""
        config.write_text(
            HAPROXY_CONFIG.format(
                stats_socket=self.stats_socket,
                host=self.host,
                port=self.port,
                tls=tls,
                servers=servers,
            )
        )
        with self.log_path.open("ab") as log:
            self._spawn(
                ["haproxy", "-db", "-f", str(config)], env=_child_env(), log=log, cwd=self.workdir
            )
        try:
            _wait_until_ready(self, self._all_up, "haproxy", self.log_path)
        except BaseException:
            self.kill()
            raise

    def _all_up(self) -> bool:
        try:
            return set(self.states().values()) == {"UP"}
        except OSError:
            return False  # the stats socket is not there yet

    def states(self) -> dict[str, str]:
        """Each backend's health as HAProxy sees it: UP, DOWN, "UP 1/2" (failing), MAINT..."""
        return {name: row["status"] for name, row in self._server_stats().items()}

    def sessions(self) -> dict[str, int]:
        """Requests each backend is serving right now (HAProxy's ``scur``; checks not counted)."""
        return {name: int(row["scur"] or 0) for name, row in self._server_stats().items()}

    def _server_stats(self) -> dict[str, dict[str, str]]:
        """``show stat`` on the stats socket: each backend server's row of the CSV."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(5)
            sock.connect(str(self.stats_socket))
            sock.sendall(b"show stat\n")
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        rows = csv.DictReader(io.StringIO(b"".join(chunks).decode().lstrip("# ")))
        return {
            row["svname"]: row
            for row in rows
            if row.get("svname") not in (None, "FRONTEND", "BACKEND")
        }


class ProductionLab(Started):
    """Glance nodes behind HAProxy on one PostgreSQL and one Ceph cluster; see the module.

    ``workdir`` holds a directory per node (``node0``...), HAProxy's, the shared file store
    (``images``), the cluster's (``ceph``, unless ``ceph`` is given) and postgresql.log.  start()
    is all or nothing; stop() stops everything it started.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        nodes: int = 2,
        flavor: Flavor = "noauth",
        venv: Path | None = None,
        ceph: CephCluster | None = None,
    ) -> None:
        self.workdir = Path(workdir).resolve()
        self.store_dir = self.workdir / "images"
        self._owns_ceph = ceph is None
        self.ceph = ceph or CephCluster(self.workdir / "ceph")
        self.postgres = PostgresServer(log_path=self.workdir / "postgresql.log")
        self.nodes = [
            GlanceServer(
                self.workdir / f"node{i}",
                flavor=flavor,
                venv=venv,
                database_url=self.postgres.url,
                store_dir=self.store_dir,
                stores=[self.ceph],
                default_store=self.ceph.store_id,
            )
            for i in range(nodes)
        ]
        self.haproxy = HAProxyServer(
            self.workdir / "haproxy", [(f"node{i}", n.port) for i, n in enumerate(self.nodes)]
        )

    @property
    def url(self) -> str:
        """The Glance endpoint clients use: HAProxy's."""
        return self.haproxy.url

    @property
    def database_url(self) -> str:
        """SQLAlchemy URL of the shared database (for tests that look at rows)."""
        return self.postgres.url

    def node(self, i: int) -> GlanceServer:
        """Node ``i`` (HAProxy's ``node<i>``): kill(), freeze(), thaw(), stop(), restart()..."""
        return self.nodes[i]

    def start(self) -> None:
        """Ceph beside PostgreSQL and the schema, the nodes (in parallel), then HAProxy with every
        node UP."""
        try:
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                ceph = pool.submit(self.ceph.start) if self._owns_ceph else None
                self.postgres.start()
                self.nodes[0].db_sync()
                if ceph is not None:
                    ceph.result()
            with concurrent.futures.ThreadPoolExecutor(len(self.nodes)) as pool:
                for started in [pool.submit(node.start) for node in self.nodes]:
                    started.result()
            self.haproxy.start()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop HAProxy, the nodes, PostgreSQL (removing its cluster) and the Ceph cluster this
        lab started; idempotent."""
        stops = [self.haproxy.stop, *(node.stop for node in self.nodes), self.postgres.stop]
        if self._owns_ceph:
            stops.append(self.ceph.stop)
        for stop in stops:
            with contextlib.suppress(Exception):
                stop()

    def states(self) -> dict[str, str]:
        """HAProxy's view of each node: {"node0": "UP", "node1": "DOWN", ...}."""
        return self.haproxy.states()

    def sessions(self) -> dict[str, int]:
        """Requests each node is serving through HAProxy now: {"node0": 1, "node1": 0}."""
        return self.haproxy.sessions()

    def wait_for_busy_node(self, timeout: float = 10.0) -> int:
        """The index of the first node seen serving a request (polled every millisecond).

        For faults "mid-request": a test starts a request that stays open (a paused reader, a
        slowly fed upload), and this tells which node to kill or freeze.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, current in self.sessions().items():
                if current:
                    return int(name.removeprefix("node"))
            time.sleep(0.001)
        raise TimeoutError(f"lab: no node served a request within {timeout} s")

    def wait_for_states(self, expected: dict[str, str], timeout: float = 30.0) -> float:
        """Wait until HAProxy reports ``expected`` for those nodes; return the seconds it took."""
        started = time.monotonic()
        while True:
            states = self.states()
            if all(states.get(name) == state for name, state in expected.items()):
                return time.monotonic() - started
            if time.monotonic() - started > timeout:
                raise TimeoutError(f"lab: HAProxy states {states}, expected {expected}")
            time.sleep(0.05)

    def heal(self, timeout: float = 30.0) -> None:
        """Thaw every node, start those not running, and wait until HAProxy has them all UP."""
        for node in self.nodes:
            node.thaw()
            if not node.running:
                node.restart()  # also reaps what is left of a killed one
        self.wait_for_states({name: "UP" for name, _ in self.haproxy.backends}, timeout)
