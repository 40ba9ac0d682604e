"""Swift all-in-one on loopback, for Glance's ``swift`` store (lab.stores).

Many production clouds keep their images in Swift, whose store, like Ceph's, answers every ranged
GET with 400.  The lab runs PyPI's ``swift`` from a cached virtualenv (lab.venvs)::

    keystone = KeystoneServer(workdir / "keystone")          # Swift's tokens come from Keystone
    swift = SwiftCluster(workdir / "swift", keystone.url)
    keystone.start(); swift.start()                           # Swift: 5 to 10 s
    keystone.register(glance_url, swift.url)                  # the object-store endpoints
    GlanceServer(..., stores=[swift])

- **Servers**: proxy, account, container and object servers on free ports of 127.0.0.1, each one
  process (``workers = 0``) in its own process group (lab.servers.ProcessGroup, with its safety
  nets), all answering ``GET /healthcheck``; logs under ``workdir/log``.
- **Rings**: one device (``d1`` under ``workdir/srv``), one replica, 2^6 partitions, made with
  ``swift-ring-builder``; storage policy 0 ``gold``.
- **Auth**: the proxy checks Keystone tokens (``authtoken`` + ``keystoneauth``, operator roles
  admin and member); accounts are created on first use.  Glance's driver always authenticates to
  Keystone v3 itself, as the ``glance`` user of project ``service`` (a reference file in
  ``workdir/etc``), and finds the proxy in Keystone's catalog: KeystoneServer.register() with
  ``swift_url`` creates those endpoints.
- Stop: SIGTERM to each server; the objects stay in ``workdir/srv`` until the caller removes it.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import pwd
import urllib.error
import urllib.request
from pathlib import Path

from lab.servers import (
    USERS,
    ProcessGroup,
    Started,
    _child_env,
    _run,
    _wait_until_ready,
    free_port,
)
from lab.venvs import ensure_swift_venv

__all__ = ["CONTAINER", "SwiftCluster"]

#: The container Glance keeps its images in.
CONTAINER = "glance"
RINGS = ("account", "container", "object")
#: eventlet pulls in dnspython, which warns about DSA on every start of every Swift command.
_QUIET = {"PYTHONWARNINGS": "ignore::DeprecationWarning"}

SWIFT_CONF = """\
[swift-hash]
swift_hash_path_prefix = glancefs-lab
swift_hash_path_suffix = glancefs-lab

[storage-policy:0]
name = gold
default = yes
"""

SERVER_DEFAULTS = """\
[DEFAULT]
bind_ip = 127.0.0.1
bind_port = {port}
workers = 0
user = {user}
swift_dir = {etc}
devices = {devices}
mount_check = false
log_name = {kind}-server
"""

BACKEND_CONF = """\
{defaults}
[pipeline:main]
pipeline = healthcheck {kind}-server

[app:{kind}-server]
use = egg:swift#{kind}

[filter:healthcheck]
use = egg:swift#healthcheck
"""

PROXY_CONF = """\
{defaults}
[pipeline:main]
pipeline = catch_errors healthcheck proxy-logging authtoken keystoneauth proxy-logging proxy-server

[app:proxy-server]
use = egg:swift#proxy
account_autocreate = true

[filter:catch_errors]
use = egg:swift#catch_errors

[filter:healthcheck]
use = egg:swift#healthcheck

[filter:proxy-logging]
use = egg:swift#proxy_logging

[filter:authtoken]
paste.filter_factory = keystonemiddleware.auth_token:filter_factory
www_authenticate_uri = {keystone}
auth_url = {keystone}
auth_type = password
project_domain_id = default
user_domain_id = default
project_name = service
username = glance
password = {password}
delay_auth_decision = true

[filter:keystoneauth]
use = egg:swift#keystoneauth
operator_roles = admin, member
"""

#: glance_store's swift reference file: who Glance is in Keystone.
GLANCE_REFERENCE = """\
[ref1]
auth_version = 3
auth_address = {keystone}
user = service:glance
key = {password}
project_domain_id = default
user_domain_id = default
"""


class _SwiftServer(ProcessGroup):
    """One Swift server (``swift-<kind>-server CONF``) in the foreground, logging to a file."""

    def __init__(self, kind: str, port: int, workdir: Path) -> None:
        super().__init__()
        self._name = f"swift-{kind}-server"
        self.kind = kind
        self.port = port
        self.workdir = workdir

    @property
    def conf_path(self) -> Path:
        return self.workdir / "etc" / f"{self.kind}-server.conf"

    @property
    def log_path(self) -> Path:
        return self.workdir / "log" / f"{self.kind}-server.log"

    def start(self) -> None:
        """Start the server (its cluster waits for it)."""
        if self.running:
            return
        command = [str(ensure_swift_venv() / "bin" / self._name), str(self.conf_path), "--verbose"]
        with self.log_path.open("ab") as log:
            self._spawn(command, env=_child_env(**_QUIET), log=log, cwd=self.workdir)

    def healthy(self) -> bool:
        """True once it answers GET /healthcheck."""
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(f"http://127.0.0.1:{self.port}/healthcheck", timeout=5) as answer:
                return bool(answer.status == 200)
        except (urllib.error.URLError, OSError):
            return False


class SwiftCluster(Started):
    """Swift's four servers on 127.0.0.1 with one replica and Keystone auth; see the module.

    ``keystone_url`` is the identity endpoint (KeystoneServer.url) whose ``glance`` user the proxy
    and Glance authenticate as.  A GlanceStore (lab.servers): ``GlanceServer(...,
    stores=[cluster])`` offers it as ``swift``.  start() is all or nothing; stop() stops them all.
    """

    store_id = "swift"
    driver = "swift"

    def __init__(self, workdir: Path, keystone_url: str) -> None:
        self.workdir = Path(workdir).resolve()
        self.keystone_url = keystone_url
        self.servers = {kind: _SwiftServer(kind, free_port(), self.workdir) for kind in
                        ("proxy", *RINGS)}  # fmt: skip

    @property
    def url(self) -> str:
        """The proxy, http://127.0.0.1:PORT (accounts are under /v1/AUTH_<project id>)."""
        return f"http://127.0.0.1:{self.servers['proxy'].port}"

    @property
    def etc_dir(self) -> Path:
        """swift.conf, the rings, the servers' configs and Glance's reference file."""
        return self.workdir / "etc"

    @property
    def devices(self) -> Path:
        """The servers' ``devices``: ``d1`` in it holds every account, container and object."""
        return self.workdir / "srv"

    @property
    def running(self) -> bool:
        """True while every server runs."""
        return all(server.running for server in self.servers.values())

    def start(self) -> None:
        """Configs and rings, then the four servers, each answering its health check."""
        if self.running:
            return
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> None:
        for directory in (self.etc_dir, self.devices / "d1", self.workdir / "log"):
            directory.mkdir(parents=True, exist_ok=True)
        self._write_configs()
        with concurrent.futures.ThreadPoolExecutor(len(RINGS)) as pool:
            for built in [pool.submit(self._build_ring, kind) for kind in RINGS]:
                built.result()
        for server in self.servers.values():
            server.start()
        for server in self.servers.values():
            _wait_until_ready(server, server.healthy, server._name, server.log_path)

    def _write_configs(self) -> None:
        (self.etc_dir / "swift.conf").write_text(SWIFT_CONF)
        user = pwd.getpwuid(os.getuid()).pw_name  # else Swift looks for a user "swift"
        for kind, server in self.servers.items():
            defaults = SERVER_DEFAULTS.format(
                port=server.port, user=user, etc=self.etc_dir, devices=self.devices, kind=kind
            )
            template = PROXY_CONF if kind == "proxy" else BACKEND_CONF
            server.conf_path.write_text(
                template.format(
                    defaults=defaults,
                    kind=kind,
                    keystone=self.keystone_url,
                    password=USERS["glance"],
                )
            )
        self.reference_path.write_text(
            GLANCE_REFERENCE.format(keystone=self.keystone_url, password=USERS["glance"])
        )

    def _build_ring(self, kind: str) -> None:
        """``swift-ring-builder``: a ring of the one device, served on ``kind``'s port."""
        # the ring (<kind>.ring.gz) is written beside the builder file
        builder = [
            str(ensure_swift_venv() / "bin" / "swift-ring-builder"),
            str(self.etc_dir / f"{kind}.builder"),
        ]
        device = f"r1z1-127.0.0.1:{self.servers[kind].port}/d1"
        log = self.workdir / "log" / f"ring-{kind}.log"
        for step in (["create", "6", "1", "1"], ["add", device, "1"], ["rebalance"]):
            _run([*builder, *step], log, _child_env(**_QUIET), timeout=120)

    def stop(self) -> None:
        """Stop every server; idempotent."""
        for server in self.servers.values():
            with contextlib.suppress(Exception):
                server.stop()

    @property
    def reference_path(self) -> Path:
        """glance_store's reference file (``swift_store_config_file``)."""
        return self.etc_dir / "glance-swift.conf"

    # -- GlanceStore ----------------------------------------------------------------------------
    def glance_options(self) -> dict[str, str]:
        return {
            "swift_store_config_file": str(self.reference_path),
            "default_swift_reference": "ref1",
            "swift_store_container": CONTAINER,
            "swift_store_create_container_on_put": "true",
            "swift_store_region": "RegionOne",
        }

    def glance_pythonpath(self, venv: Path) -> list[Path]:
        return []  # python-swiftclient is in Glance's virtualenv (lab.venvs)
