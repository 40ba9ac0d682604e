"""Real Glance and Keystone servers on loopback, for tests, demos and benchmarks.

glancefs is a client of a real service, so its tests run against the real thing:
Glance 33 (and Keystone 30 for the keystone-auth tests) from cached venvs
(lab.venvs), served by gunicorn because Glance 33 has no standalone server.  Each
server lives in a work directory (configs, SQLite, image files, logs) and in its own
process group, so stop()/kill() reach gunicorn's workers too.  Three safety nets make
sure nothing outlives the test run: stop()/__exit__, an atexit hook, and a tiny
watchdog process that kills the group when its parent dies (even by SIGKILL, when
atexit never runs).  Servers started with ``detach=True`` (``make demo``) skip the
last two and are stopped later from their state file by stop_detached().
"""

import atexit
import configparser
import contextlib
import grp
import io
import json
import os
import pwd
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO, Literal, Protocol, Self

from lab.venvs import ensure_glance_venv, ensure_keystone_venv, file_lock

Flavor = Literal["noauth", "fakeauth", "keystone"]

LAB_DIR = Path(__file__).resolve().parent
TEMPLATES = LAB_DIR / "templates"
#: Put on gunicorn's --pythonpath: the fakeauth paste filter and the keystone WSGI shim.
LIB_DIR = LAB_DIR / "lib"
REGISTER_SCRIPT = LAB_DIR / "keystone_register.py"

READY_TIMEOUT = 60.0
STOP_TIMEOUT = 10.0
#: gunicorn's own SIGTERM grace (default 30 s): an in-flight download (a mounted
#: glancefs reading) would otherwise hold every stop() for STOP_TIMEOUT.
GRACEFUL_TIMEOUT = 3

#: Credentials created by KeystoneServer.bootstrap/register (all in domain "default").
ADMIN_PASSWORD = "admin-secret"
USERS = {
    "admin": "admin-secret",
    "glance": "glance-secret",
    "demo": "demo-secret",
    "alt": "alt-secret",
    "viewer": "viewer-secret",  # only the reader role, on project demo
}

# Runs in a separate interpreter: blocks on its stdin pipe, whose write end only the
# parent holds.  A byte means "stopped normally, just exit"; EOF means the parent died
# without stopping the server, so kill the server's whole process group, then remove
# the paths given after the group id (a throwaway database cluster) once it is gone.
_WATCHDOG = """
import os, shutil, signal, sys, time
signal.signal(signal.SIGINT, signal.SIG_IGN)
signal.signal(signal.SIGTERM, signal.SIG_IGN)
if not sys.stdin.buffer.read(1):
    pgid = int(sys.argv[1])
    deadline = time.monotonic() + 10
    try:
        os.killpg(pgid, signal.SIGKILL)
        while time.monotonic() < deadline:
            os.killpg(pgid, 0)
            time.sleep(0.05)
    except OSError:
        pass
    for path in sys.argv[2:]:
        shutil.rmtree(path, ignore_errors=True)
"""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the kernel picked it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _child_env(**extra: str) -> dict[str, str]:
    """Environment for server processes: none of glancefs's Python path, no proxies."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP")
        and k.lower() not in ("http_proxy", "https_proxy", "all_proxy")
    }
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    env.update(extra)
    return env


def _tail(path: Path, lines: int = 40) -> str:
    """Last lines of a log file, for error messages ("" if missing)."""
    try:
        return "".join(path.read_text(errors="replace").splitlines(keepends=True)[-lines:])
    except OSError:
        return ""


def _as_user(user: str) -> dict[str, Any]:
    """Popen arguments that run the child as system user ``user`` ("": as ourselves)."""
    return {"user": user, "group": user, "extra_groups": []} if user else {}


def _run(
    cmd: list[str], log: Path, env: dict[str, str], timeout: float = 300.0, user: str = ""
) -> None:
    """Run a setup command (db_sync, bootstrap...), appending its output to ``log``."""
    with log.open("a") as out:
        out.write(f"$ {' '.join(cmd)}\n")
        out.flush()
        rc = subprocess.call(
            cmd,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            timeout=timeout,
            **_as_user(user),
        )
    if rc != 0:
        raise RuntimeError(
            f"lab: {Path(cmd[0]).name} {' '.join(cmd[1:])} failed (exit {rc}):\n{_tail(log)}"
        )


def _render(template: Path, subs: dict[str, str]) -> str:
    """Template text with @NAME@ placeholders replaced."""
    text = template.read_text()
    for key, value in subs.items():
        text = text.replace(f"@{key}@", value)
    return text


def _edit_ini(
    text: str, *, remove: tuple[str, ...] = (), merge: dict[str, dict[str, str]] | None = None
) -> str:
    """Drop whole sections and merge options into an oslo.config ini text.

    configparser loses the template's comments, which is fine for generated files;
    interpolation is off because oslo values may contain '%'.
    """
    cp = configparser.RawConfigParser(interpolation=None, strict=False)
    cp.optionxform = str  # type: ignore[assignment,method-assign]  # keep option case
    cp.read_string(text)
    for section in remove:
        cp.remove_section(section)
    for section, options in (merge or {}).items():
        if section != "DEFAULT" and not cp.has_section(section):
            cp.add_section(section)
        for key, value in options.items():
            cp.set(section, key, value)
    out = io.StringIO()
    cp.write(out)
    return out.getvalue()


def _db_sync(manage: Path, tmp: Path, conf_name: str, conf_text: str, db_name: str) -> Path:
    """Create ``db_name``.sqlite in ``tmp`` with ``manage db_sync`` (the config says where)."""
    (tmp / "log").mkdir()
    conf = tmp / conf_name
    conf.write_text(conf_text)
    _run(
        [str(manage), "--config-file", str(conf), "db_sync"],
        tmp / "log" / "setup.log",
        _child_env(),
    )
    return tmp / f"{db_name}.sqlite"


def _pristine_db(venv: Path, name: str, make: Callable[[Path], Path]) -> Path:
    """A freshly migrated SQLite DB cached beside the venv, made once by ``make(tmpdir)``.

    db_sync costs 3 to 4 s per new work directory; copying its result costs nothing.
    It lives inside the venv directory so a rebuilt venv also rebuilds it.
    """
    target = venv / "lab-pristine" / name
    if target.exists():
        return target
    with file_lock(venv.parent / f"{venv.name}.pristine.lock"):
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix="pristine-", dir=target.parent))
            try:
                os.replace(make(tmp), target)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return target


def _pgroup_alive(pgid: int) -> bool:
    """True while any process of the group exists, zombies not counted.

    Killed workers are orphans that only init reaps, and an init that does not reap
    leaves zombies in the group for ever; they hold no port or file, so they do not count.
    """
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        pids = [p for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return True
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()  # after "pid (comm) "
        if len(fields) > 2 and fields[0] != "Z" and fields[2] == str(pgid):
            return True
    return False


def _wait_group_gone(pgid: int, timeout: float) -> bool:
    """Poll until the process group is empty; False on timeout."""
    deadline = time.monotonic() + timeout
    while _pgroup_alive(pgid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _wait_until_ready(
    process: "ProcessGroup", probe: Callable[[], bool], what: str, log: Path
) -> None:
    """Poll ``probe()`` until true; raise with the log's tail if the process dies or time is up."""
    deadline = time.monotonic() + READY_TIMEOUT
    while not probe():
        if not process.running:
            raise RuntimeError(f"lab: {what} exited while starting; {log}:\n{_tail(log)}")
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"lab: {what} not ready in {READY_TIMEOUT:.0f} s; {log}:\n{_tail(log)}"
            )
        time.sleep(0.05)


class _PortTaken(RuntimeError):
    """gunicorn could not bind its port."""


_LIVE: set["ProcessGroup"] = set()


@atexit.register
def _kill_leftovers() -> None:
    """Last resort: the test run is exiting with servers still up (a fixture never ran)."""
    for server in list(_LIVE):
        with contextlib.suppress(Exception):
            server.kill()


class Started:
    """A lab part used as a context manager: ``with X(...) as x`` starts it and always stops it
    (``start()`` and ``stop()`` are the part's own)."""

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class ProcessGroup(Started):
    """A server process started in its own process group, and the safety nets that stop it.

    Signals go to the whole group, so they reach every worker the server forks.  Unless
    ``detach``, the group is also killed by an atexit hook and by a watchdog process when
    the test process dies; ``cleanup`` paths are removed once the group is gone (by
    stop()/kill(), or by the watchdog).  With ``netns``, the server runs inside that network
    namespace (``ip netns exec NAME``, which execs it: the pid is the server's own).  Subclasses
    implement start() with _spawn().
    """

    _name = "process"
    #: What stop() sends to the group first (SIGKILL follows after STOP_TIMEOUT).
    _stop_signal = signal.SIGTERM

    def __init__(
        self, *, detach: bool = False, cleanup: tuple[Path, ...] = (), netns: str | None = None
    ) -> None:
        self._detach = detach
        self._cleanup = cleanup
        self.netns = netns
        self._proc: subprocess.Popen[bytes] | None = None
        self._watchdog: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        """The leader's pid (also the process group id) while running."""
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        """True while the process started by this object is alive (frozen counts as alive)."""
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        """Start the server and wait until it serves."""
        raise NotImplementedError

    def _spawn(
        self, cmd: list[str], *, env: dict[str, str], log: BinaryIO, cwd: Path, user: str = ""
    ) -> None:
        """Start ``cmd`` as the leader of a new process group (as ``user`` if given)."""
        if self.netns is not None:
            cmd = ["ip", "netns", "exec", self.netns, *cmd]
        self._proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=cwd,
            start_new_session=True,  # own process group: stop() reaches the workers
            **_as_user(user),
        )
        if not self._detach:
            _LIVE.add(self)
            self._watchdog = subprocess.Popen(
                [sys.executable, "-I", "-c", _WATCHDOG, str(self._proc.pid)]
                + [str(path) for path in self._cleanup],
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,  # out of the terminal's group: Ctrl-C must not kill it
            )

    def stop(self) -> None:
        """Send the stop signal to the group, SIGKILL it after 10 s; safe when not running."""
        proc = self._proc
        if proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, self._stop_signal)
                os.killpg(proc.pid, signal.SIGCONT)  # a frozen group must run to stop
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(STOP_TIMEOUT)  # graceful: the leader stops its workers itself
            self._kill_group(proc)
        self._forget()

    def kill(self) -> None:
        """SIGKILL the whole group at once, like a crash (data is left as is, but cleanup)."""
        proc = self._proc
        if proc is not None:
            self._kill_group(proc)
        self._forget()

    def freeze(self) -> None:
        """SIGSTOP the whole group: connections are accepted by the kernel, never answered."""
        if self._proc is not None:
            os.killpg(self._proc.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        """SIGCONT the group after freeze()."""
        if self._proc is not None:
            os.killpg(self._proc.pid, signal.SIGCONT)

    @staticmethod
    def _kill_group(proc: "subprocess.Popen[bytes]") -> None:
        """SIGKILL what is left of the group and reap the leader."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(STOP_TIMEOUT)
        _wait_group_gone(proc.pid, STOP_TIMEOUT)  # workers are reaped by init, not by us

    def _forget(self) -> None:
        """Drop the process, remove the cleanup paths, tell the watchdog to exit quietly."""
        self._proc = None
        _LIVE.discard(self)
        for path in self._cleanup:
            shutil.rmtree(path, ignore_errors=True)
        dog, self._watchdog = self._watchdog, None
        if dog is not None and dog.stdin is not None:
            with contextlib.suppress(OSError):
                dog.stdin.write(b"x")
                dog.stdin.close()
            with contextlib.suppress(subprocess.TimeoutExpired):
                dog.wait(5)


class _GunicornServer(ProcessGroup):
    """A server under gunicorn: a port on ``host`` (127.0.0.1 unless given), TLS if asked, ready
    when it answers HTTP."""

    _name = "server"
    _probe_path = "/"

    def __init__(
        self,
        workdir: Path,
        *,
        port: int | None = None,
        detach: bool = False,
        certfile: Path | None = None,
        keyfile: Path | None = None,
        ca_certs: Path | None = None,
        host: str = "127.0.0.1",
        netns: str | None = None,
    ) -> None:
        super().__init__(detach=detach, netns=netns)
        self.workdir = Path(workdir).resolve()
        self.host = host
        self._port = port or free_port()  # 0 too: gunicorn would pick one we cannot know
        self._auto_port = not port
        self._repick_port_ok = True  # until the first successful start
        self._log_offset = 0
        if (certfile is None) != (keyfile is None):
            raise ValueError("certfile and keyfile go together")
        if ca_certs is not None and certfile is None:
            raise ValueError("ca_certs (client certificates) needs certfile/keyfile")
        self._certfile = Path(certfile).resolve() if certfile else None
        self._keyfile = Path(keyfile).resolve() if keyfile else None
        self._ca_certs = Path(ca_certs).resolve() if ca_certs else None

    # -- what subclasses provide ------------------------------------------------
    def _prepare(self) -> tuple[list[str], dict[str, str]]:
        """Write configs, set up the DB; return the gunicorn command and environment."""
        raise NotImplementedError

    # -- public API ---------------------------------------------------------------
    @property
    def port(self) -> int:
        """TCP port on ``host``, known before start() and kept across restarts.

        An automatically picked port is re-picked only if someone else took it
        before the first start.
        """
        return self._port

    @property
    def scheme(self) -> str:
        """https when started with a certificate."""
        return "https" if self._certfile else "http"

    @property
    def base_url(self) -> str:
        """scheme://HOST:PORT, no path."""
        return f"{self.scheme}://{self.host}:{self._port}"

    @property
    def gunicorn_log_path(self) -> Path:
        """gunicorn's own stdout/stderr (boot errors, tracebacks while loading the app)."""
        return self.workdir / "log" / "gunicorn.log"

    def start(self) -> None:
        """Start gunicorn (no-op if already running) and wait until it answers HTTP."""
        if self.running:
            return
        for attempt in range(3):
            try:
                self._start_once()
            except _PortTaken:
                # free_port() is only a hint: someone else may bind it before gunicorn does
                if attempt == 2 or not (self._auto_port and self._repick_port_ok):
                    raise
                self._port = free_port()
            else:
                self._repick_port_ok = False  # from now on the port is part of the contract
                return

    def _start_once(self) -> None:
        """One launch of gunicorn on the current port, waiting for readiness."""
        for sub in ("etc", "log", "run", "data"):
            (self.workdir / sub).mkdir(parents=True, exist_ok=True)
        cmd, env = self._prepare()
        cmd += ["-b", f"{self.host}:{self._port}"]
        if self._certfile and self._keyfile:
            cmd += ["--certfile", str(self._certfile), "--keyfile", str(self._keyfile)]
            if self._ca_certs:
                cmd += [
                    "--ca-certs",
                    str(self._ca_certs),
                    "--cert-reqs",
                    str(int(ssl.CERT_REQUIRED)),
                ]
        with self.gunicorn_log_path.open("ab") as log:
            self._log_offset = log.tell()
            log.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} $ {' '.join(cmd)}\n".encode())
            log.flush()
            self._spawn(cmd, env=env, log=log, cwd=self.workdir)
        try:
            self._wait_ready()
        except BaseException:
            self.kill()
            raise

    def restart(self) -> None:
        """stop() then start(): same port, same data."""
        self.stop()
        self.start()

    # -- internals ------------------------------------------------------------------
    def _opener(self) -> urllib.request.OpenerDirector:
        """urllib opener for probes: no proxy, and no certificate check for our own TLS."""
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        return urllib.request.build_opener(
            urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=ctx)
        )

    def _wait_ready(self) -> None:
        """Poll the probe path until any HTTP answer; raise with the logs if gunicorn dies."""
        assert self._proc is not None
        opener = self._opener()
        deadline = time.monotonic() + READY_TIMEOUT
        url = self.base_url + self._probe_path
        while True:
            if self._proc.poll() is not None:
                with self.gunicorn_log_path.open("rb") as f:
                    f.seek(self._log_offset)
                    if b"Address already in use" in f.read():
                        raise _PortTaken(f"lab: {self._name}: port {self._port} is taken")
                raise RuntimeError(
                    f"lab: {self._name} exited with {self._proc.returncode} while starting; "
                    f"{self.gunicorn_log_path}:\n{_tail(self.gunicorn_log_path)}{self._extra_log_tail()}"
                )
            try:
                with opener.open(url, timeout=5) as resp:
                    resp.read()
                return
            except urllib.error.HTTPError:
                return  # any HTTP status means the app is loaded and serving
            except urllib.error.URLError as e:
                # With client certificates required, our probe has none: a TLS alert
                # still proves a worker with the app loaded is handling connections.
                if self._ca_certs is not None and isinstance(e.reason, ssl.SSLError):
                    return
            except (OSError, ValueError) as e:  # reset, timeout, bad status line...
                if self._ca_certs is not None and isinstance(e, ssl.SSLError):
                    return
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"lab: {self._name} did not answer {url} within {READY_TIMEOUT:.0f} s; "
                    f"{self.gunicorn_log_path}:\n{_tail(self.gunicorn_log_path)}{self._extra_log_tail()}"
                )
            time.sleep(0.1)

    def _extra_log_tail(self) -> str:
        """Server-specific log appended to start errors."""
        return ""


class GlanceStore(Protocol):
    """A store a GlanceServer offers beside its file store ``fs`` (lab.ceph, lab.swift)."""

    #: Its name in ``enabled_backends``, in the X-Image-Meta-Store header and in an image's
    #: ``stores``.
    store_id: str
    #: The glance_store driver: ``rbd``, ``swift``.
    driver: str

    def glance_options(self) -> dict[str, str]:
        """The options of the store's section in glance-api.conf."""
        ...

    def glance_pythonpath(self, venv: Path) -> list[Path]:
        """Directories the driver needs on the PYTHONPATH of Glance's ``venv`` (modules PyPI
        lacks)."""
        ...


class GlanceServer(_GunicornServer):
    """Glance API (v2) on 127.0.0.1 with a SQLite DB and one file store, in ``workdir``.

    Flavors: ``noauth`` (every request is admin, owner null), ``fakeauth`` (identity
    headers of project ``glancefs-test`` injected, a request may send its own
    X-Project-Id/X-Roles), ``keystone`` (real keystonemiddleware against
    ``keystone_url``).  Image data files are ``store_dir / <image id>``.

    Several servers can share one catalog (lab.production): ``database_url`` (an
    SQLAlchemy URL) replaces the SQLite, and the caller runs db_sync() once for all of
    them; ``store_dir`` replaces the file store in ``workdir``.

    ``stores`` (lab.ceph's CephCluster, lab.swift's SwiftCluster) are offered beside the
    file store; ``default_store`` names the one an upload goes to unless its PUT names
    another in ``X-Image-Meta-Store``.

    ``host`` and ``netns`` put it on another address, inside a network namespace (the
    benchmark's rate-limited link, bench.netns).
    """

    _name = "glance"
    _probe_path = "/versions"

    def __init__(
        self,
        workdir: Path,
        *,
        flavor: Flavor = "noauth",
        port: int | None = None,
        conf_overrides: dict[str, dict[str, str]] | None = None,
        keystone_url: str | None = None,
        certfile: Path | None = None,
        keyfile: Path | None = None,
        ca_certs: Path | None = None,
        detach: bool = False,
        venv: Path | None = None,
        database_url: str | None = None,
        store_dir: Path | None = None,
        threads: int = 8,
        stores: Sequence[GlanceStore] = (),
        default_store: str = "fs",
        policy: Mapping[str, str] | None = None,
        host: str = "127.0.0.1",
        netns: str | None = None,
    ) -> None:
        super().__init__(
            workdir, port=port, detach=detach, certfile=certfile, keyfile=keyfile,
            ca_certs=ca_certs, host=host, netns=netns,
        )  # fmt: skip
        self.database_url = database_url
        self._store_dir = Path(store_dir).resolve() if store_dir else None
        self.stores = tuple(stores)
        if default_store not in ("fs", *(store.store_id for store in self.stores)):
            raise ValueError(f"default_store {default_store!r} is not one of the stores")
        self.default_store = default_store
        #: gunicorn request threads: how many requests this Glance serves at once.
        self.threads = threads
        if flavor not in ("noauth", "fakeauth", "keystone"):
            raise ValueError(f"unknown flavor {flavor!r}")
        if flavor == "keystone" and not keystone_url:
            raise ValueError("flavor='keystone' needs keystone_url")
        self.flavor: Flavor = flavor
        self.conf_overrides = conf_overrides or {}
        #: oslo.policy rules added to the flavor's (``{"upload_image": "!"}``: only import).
        self.policy = dict(policy or {})
        self.keystone_url = keystone_url
        self._venv = venv

    @property
    def url(self) -> str:
        """Glance endpoint, e.g. http://127.0.0.1:PORT (images are under /v2/images)."""
        return self.base_url

    @property
    def etc_dir(self) -> Path:
        """Directory with the generated glance-api.conf (OS_GLANCE_CONFIG_DIR)."""
        return self.workdir / "etc" / "glance"

    @property
    def store_dir(self) -> Path:
        """The file store: each active image's data is the file named by its id."""
        return self._store_dir or self.workdir / "data" / "images"

    @property
    def sqlite_path(self) -> Path:
        """Glance's database (for scale fixtures that insert rows directly); unused with
        database_url."""
        return self.workdir / "glance.sqlite"

    @property
    def log_path(self) -> Path:
        """glance-api.log (Glance's own log; gunicorn's is gunicorn_log_path)."""
        return self.workdir / "log" / "glance-api.log"

    def _render_conf(self, lab: Path, *, overrides: bool = True) -> str:
        """glance-api.conf for this flavor, this server's stores and conf_overrides merged last
        (neither with ``overrides=False``: the pristine database's config, shared by all)."""
        text = _render(
            TEMPLATES / "glance" / "glance-api.conf",
            {"LAB": str(lab), "GLANCE_PORT": str(self._port)},
        )
        merge: dict[str, dict[str, str]] = {"DEFAULT": {"worker_self_reference_url": self.base_url}}
        if self.database_url:
            merge["database"] = {"connection": self.database_url}
        if self._store_dir:
            merge["fs"] = {"filesystem_store_datadir": f"{self._store_dir}/"}
        if overrides and self.stores:
            backends = ["fs:file", *(f"{store.store_id}:{store.driver}" for store in self.stores)]
            merge["DEFAULT"]["enabled_backends"] = ", ".join(backends)
            merge["glance_store"] = {"default_backend": self.default_store}
            for store in self.stores:
                merge[store.store_id] = store.glance_options()
        remove: tuple[str, ...] = ()
        if self.flavor == "fakeauth":
            merge["paste_deploy"] = {"flavor": "fakeauth"}
            # Only read by an import proxied to another node, which calls that node directly.
            merge["keystone_authtoken"] = {"auth_url": self.base_url}
            remove = ("oslo_policy",)
        elif self.flavor == "keystone":
            assert self.keystone_url is not None
            merge["paste_deploy"] = {"flavor": "keystone"}
            merge["keystone_authtoken"] = {
                "www_authenticate_uri": self.keystone_url,
                "auth_url": self.keystone_url,
                "auth_type": "password",
                "project_name": "service",
                "username": "glance",
                "password": USERS["glance"],
                "user_domain_id": "default",
                "project_domain_id": "default",
                "region_name": "RegionOne",
                "token_cache_time": "-1",  # a revoked token is refused at once
            }
            remove = ("oslo_policy",)
        if overrides and self.policy:
            remove = tuple(section for section in remove if section != "oslo_policy")
            merge["oslo_policy"] = {"policy_file": str(self.etc_dir / "policy.yaml")}
        for section, options in (self.conf_overrides if overrides else {}).items():
            merge.setdefault(section, {}).update(options)
        return _edit_ini(text, remove=remove, merge=merge)

    def _make_pristine_db(self, venv: Path, tmp: Path) -> Path:
        """Run db_sync against an empty SQLite in ``tmp``."""
        conf = self._render_conf(tmp, overrides=False)  # shared by all workdirs
        return _db_sync(venv / "bin" / "glance-manage", tmp, "glance-api.conf", conf, "glance")

    def _write_config(self) -> None:
        """Create the work directory's layout and Glance's config files in etc_dir."""
        etc = self.etc_dir
        etc.mkdir(parents=True, exist_ok=True)
        for sub in ("images", "staging", "tasks", "cache"):
            (self.workdir / "data" / sub).mkdir(parents=True, exist_ok=True)
        self.store_dir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "run" / "locks").mkdir(parents=True, exist_ok=True)
        (self.workdir / "log").mkdir(parents=True, exist_ok=True)
        subs = {"LAB": str(self.workdir), "GLANCE_PORT": str(self._port)}
        (etc / "glance-api-paste.ini").write_text(
            _render(TEMPLATES / "glance" / "glance-api-paste.ini", subs)
        )
        (etc / "policy-noauth.yaml").write_text(
            _render(TEMPLATES / "glance" / "policy-noauth.yaml", subs)
        )
        if self.policy:
            # The flavor's rules (noauth: everyone is admin), then the added ones.
            base = _render(TEMPLATES / "glance" / "policy-noauth.yaml", subs)
            added = "".join(f"{json.dumps(rule)}: {json.dumps(check)}\n"
                            for rule, check in self.policy.items())  # fmt: skip
            (etc / "policy.yaml").write_text((base if self.flavor == "noauth" else "") + added)
        (etc / "glance-api.conf").write_text(self._render_conf(self.workdir))

    def db_sync(self) -> None:
        """Create (or upgrade) Glance's schema in ``database_url`` with glance-manage db_sync.

        Only for an external database, which start() never migrates: run it once, from one
        of the servers sharing the database, before they start.
        """
        if not self.database_url:
            raise ValueError("db_sync() is for an external database_url; start() sets up SQLite")
        venv = self._venv or ensure_glance_venv()
        self._write_config()
        conf = self.etc_dir / "glance-api.conf"
        cmd = [str(venv / "bin" / "glance-manage"), "--config-file", str(conf), "db_sync"]
        _run(cmd, self.workdir / "log" / "setup.log", _child_env())

    def _prepare(self) -> tuple[list[str], dict[str, str]]:
        venv = self._venv or ensure_glance_venv()
        etc = self.etc_dir
        self._write_config()
        synced = self.workdir / "run" / "db-synced"
        if not synced.exists() and not self.database_url:
            # = glance-manage db_sync, done once per venv and copied (saves ~3.5 s per workdir)
            pristine = _pristine_db(
                venv, "glance.sqlite", lambda tmp: self._make_pristine_db(venv, tmp)
            )
            shutil.copyfile(pristine, self.sqlite_path)
            synced.write_text("")
        cmd = [
            str(venv / "bin" / "gunicorn"),
            "-k", "gthread", "-w", "1", "--threads", str(self.threads), "--timeout", "600",
            "--no-control-socket", "--graceful-timeout", str(GRACEFUL_TIMEOUT),
            "--pythonpath", str(LIB_DIR),
            "glance.wsgi.api:application",
        ]  # fmt: skip
        env = _child_env(OS_GLANCE_CONFIG_DIR=str(etc))
        pythonpath = [str(path) for store in self.stores for path in store.glance_pythonpath(venv)]
        if pythonpath:
            env["PYTHONPATH"] = os.pathsep.join(pythonpath)
        return cmd, env

    def _extra_log_tail(self) -> str:
        return f"\n{self.log_path}:\n{_tail(self.log_path)}"

    def state(self) -> dict[str, object]:
        """What `python -m lab glance-start` writes to glance.json."""
        return {
            "url": self.url,
            "pid": self.pid,
            "pgid": self.pid,
            "flavor": self.flavor,
            "workdir": str(self.workdir),
            "store_dir": str(self.store_dir),
            "log": str(self.log_path),
        }


class KeystoneServer(_GunicornServer):
    """Keystone (identity v3) on 127.0.0.1 with SQLite and fernet tokens, in ``workdir``.

    start() bootstraps admin/admin-secret the first time; register(glance_url) then
    adds projects service/demo/alt, users glance/demo/alt (``<name>-secret``) and the
    image endpoints, which the ``keystone`` GlanceServer flavor needs.
    """

    _name = "keystone"
    _probe_path = "/v3"

    def __init__(
        self,
        workdir: Path,
        *,
        port: int | None = None,
        token_expiration: int = 3600,
        detach: bool = False,
        venv: Path | None = None,
    ) -> None:
        super().__init__(workdir, port=port, detach=detach)
        self.token_expiration = token_expiration
        self._venv = venv

    @property
    def url(self) -> str:
        """Identity endpoint, http://127.0.0.1:PORT/v3 (what auth_url should be)."""
        return self.base_url + "/v3"

    @property
    def conf_path(self) -> Path:
        """Generated keystone.conf."""
        return self.workdir / "etc" / "keystone" / "keystone.conf"

    @property
    def log_path(self) -> Path:
        """keystone.log."""
        return self.workdir / "log" / "keystone.log"

    def _manage(self, venv: Path, *args: str, conf: Path | None = None) -> None:
        """keystone-manage with our config file (output to log/setup.log)."""
        cmd = [
            str(venv / "bin" / "keystone-manage"),
            "--config-file",
            str(conf or self.conf_path),
            *args,
        ]
        _run(cmd, self.workdir / "log" / "setup.log", _child_env())

    def _owner_args(self) -> list[str]:
        """fernet/credential key owner: whoever runs the tests (root in CI)."""
        return [
            "--keystone-user", pwd.getpwuid(os.getuid()).pw_name,
            "--keystone-group", grp.getgrgid(os.getgid()).gr_name,
        ]  # fmt: skip

    def _render_conf(self, lab: Path) -> str:
        text = _render(TEMPLATES / "keystone" / "keystone.conf", {"LAB": str(lab)})
        return _edit_ini(text, merge={"token": {"expiration": str(self.token_expiration)}})

    def _make_pristine_db(self, venv: Path, tmp: Path) -> Path:
        """keystone-manage db_sync against an empty SQLite in ``tmp``."""
        conf = self._render_conf(tmp)
        return _db_sync(venv / "bin" / "keystone-manage", tmp, "keystone.conf", conf, "keystone")

    def _prepare(self) -> tuple[list[str], dict[str, str]]:
        venv = self._venv or ensure_keystone_venv()
        self.conf_path.parent.mkdir(parents=True, exist_ok=True)
        (self.workdir / "run" / "locks").mkdir(parents=True, exist_ok=True)
        self.conf_path.write_text(self._render_conf(self.workdir))
        initialized = self.workdir / "run" / "initialized"
        if not initialized.exists():
            # = keystone-manage db_sync, done once per venv and copied
            pristine = _pristine_db(
                venv, "keystone.sqlite", lambda tmp: self._make_pristine_db(venv, tmp)
            )
            shutil.copyfile(pristine, self.workdir / "keystone.sqlite")
            self._fresh_fernet_keys(venv)
            self._manage(venv, "credential_setup", *self._owner_args())
            initialized.write_text("")
        bootstrapped = self.workdir / "run" / "bootstrapped"  # holds the catalog URL
        if not bootstrapped.exists() or bootstrapped.read_text() != self.url:
            # first start, or a new port: bootstrap (re)writes the identity endpoints
            self._manage(
                venv, "bootstrap",
                "--bootstrap-password", ADMIN_PASSWORD,
                "--bootstrap-username", "admin",
                "--bootstrap-project-name", "admin",
                "--bootstrap-role-name", "admin",
                "--bootstrap-service-name", "keystone",
                "--bootstrap-region-id", "RegionOne",
                "--bootstrap-public-url", self.url,
                "--bootstrap-internal-url", self.url,
                "--bootstrap-admin-url", self.url,
            )  # fmt: skip
            bootstrapped.write_text(self.url)
        cmd = [
            str(venv / "bin" / "gunicorn"),
            "-k", "gthread", "-w", "1", "--threads", "8", "--timeout", "600", "--no-control-socket",
            "--graceful-timeout", str(GRACEFUL_TIMEOUT),
            "--pythonpath", str(LIB_DIR),
            "keystone_wsgi:application",
        ]  # fmt: skip
        return cmd, _child_env(OS_KEYSTONE_CONFIG_DIR=str(self.conf_path.parent))

    def _fresh_fernet_keys(self, venv: Path) -> None:
        """New fernet key repository: every token issued before is now undecryptable."""
        shutil.rmtree(self.workdir / "etc" / "keystone" / "fernet-keys", ignore_errors=True)
        self._manage(venv, "fernet_setup", *self._owner_args())

    def register(self, glance_url: str, swift_url: str | None = None) -> dict[str, str]:
        """Create service/demo/alt projects, users, roles and the image endpoints, and with
        ``swift_url`` (lab.swift's proxy) the object-store endpoints (idempotent).

        Returns ids keyed like "project:demo", "user:alt", "service:image".
        """
        venv = self._venv or ensure_keystone_venv()
        urls = [glance_url, swift_url] if swift_url else [glance_url]
        out = subprocess.run(
            [str(venv / "bin" / "python"), str(REGISTER_SCRIPT), self.url, *urls],
            capture_output=True, text=True, env=_child_env(), timeout=120, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        if out.returncode != 0:
            raise RuntimeError(
                f"lab: keystone register failed (exit {out.returncode}):\n{out.stderr[-4000:]}"
            )
        ids: dict[str, str] = json.loads(out.stdout.strip().splitlines()[-1])
        return ids

    def rotate_keys(self) -> None:
        """Invalidate every token issued so far: new fernet keys, then restart.

        The restart also empties Keystone's in-process token cache, which would
        otherwise keep validating old tokens.
        """
        was_running = self.running
        self.stop()
        self._fresh_fernet_keys(self._venv or ensure_keystone_venv())
        if was_running:
            self.start()

    def _extra_log_tail(self) -> str:
        return f"\n{self.log_path}:\n{_tail(self.log_path)}"


def stop_detached(state_file: Path, timeout: float = STOP_TIMEOUT) -> bool:
    """Stop a server started with detach=True, from the JSON state file it left.

    Idempotent: returns False when nothing was running (no file, or the process is
    gone or is no longer our gunicorn), True when a server was stopped.  The file is
    removed either way.
    """
    try:
        state = json.loads(Path(state_file).read_text())
        pid, pgid = int(state["pid"]), int(state["pgid"])
    except (OSError, ValueError, KeyError, TypeError):
        return False
    stopped = False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        ours = b"gunicorn" in cmdline and os.getpgid(pid) == pgid
    except OSError:
        ours = False
    if ours:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGTERM)
        if not _wait_group_gone(pgid, timeout):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
            _wait_group_gone(pgid, timeout)
        stopped = True
    with contextlib.suppress(OSError):
        Path(state_file).unlink()
    return stopped
