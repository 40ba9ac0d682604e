"""Auth and TLS end to end: a real Keystone, Glance in the keystone flavor, real mounts.

Credentials come the ways users have them (OS_* variables, clouds.yaml with OS_CLOUD, options, a
password prompt); tokens die under the mount (new fernet keys, revocation, a short lifetime) and
the mount carries on; Glance speaks HTTPS with a CA made by trustme, with and without client
certificates; no password or token shows in a --debug log or in ``ps``.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import itertools
import os
import pty
import random
import re
import select
import signal
import ssl
import subprocess
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import datetime
from pathlib import Path

import httpx
import pytest
import trio
from conftest import MountFactory
from keystoneauth1 import session as ks_session
from keystoneauth1.identity import v3
from support import GLANCEFS, GlanceAPI, Mount, base_env

import glancefs
from lab.faults import IMAGE_DATA, FaultProxy, Request
from lab.servers import USERS, GlanceServer, KeystoneServer

pytestmark = pytest.mark.keystone

MiB = 1024 * 1024
#: Keystone's fernet tokens all start so; a log line holding one has leaked a token.
FERNET = re.compile(r"gAAAAA[\w-]{20,}")


# --- servers and data ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def keystone(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KeystoneServer]:
    with KeystoneServer(tmp_path_factory.mktemp("keystone")) as server:
        yield server


@pytest.fixture(scope="module")
def glance_ks(
    keystone: KeystoneServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GlanceServer]:
    """Glance behind keystonemiddleware, registered in Keystone's catalog (unversioned URL)."""
    with GlanceServer(
        tmp_path_factory.mktemp("glance-ks"), flavor="keystone", keystone_url=keystone.url
    ) as server:
        keystone.register(server.url)
        yield server


def token_for(keystone: KeystoneServer, user: str, project: str | None = None) -> str:
    """A fresh project-scoped token, as any client would get it."""
    body = {
        "auth": {
            "identity": {
                "methods": ["password"],
                "password": {
                    "user": {"name": user, "domain": {"id": "default"}, "password": USERS[user]}
                },
            },
            "scope": {"project": {"name": project or user, "domain": {"id": "default"}}},
        }
    }
    with httpx.Client(trust_env=False, timeout=30) as http:
        response = http.post(f"{keystone.url}/auth/tokens", json=body)
    response.raise_for_status()
    return response.headers["X-Subject-Token"]


def revoke(keystone: KeystoneServer, token: str) -> None:
    """Revoke a token on the Keystone side (DELETE /v3/auth/tokens, the token revoking itself)."""
    with httpx.Client(trust_env=False, timeout=30) as http:
        response = http.delete(
            f"{keystone.url}/auth/tokens", headers={"X-Auth-Token": token, "X-Subject-Token": token}
        )
    assert response.status_code == 204, response.text


def api_as(keystone: KeystoneServer, glance: GlanceServer, user: str) -> GlanceAPI:
    return GlanceAPI(glance.url, headers={"X-Auth-Token": token_for(keystone, user)})


@pytest.fixture(scope="module")
def images(keystone: KeystoneServer, glance_ks: GlanceServer) -> dict[str, dict]:
    """A private image in each of the demo and alt projects, with data."""
    tag = uuid.uuid4().hex[:6]
    made = {}
    for user in ("demo", "alt"):
        api = api_as(keystone, glance_ks, user)
        data = random.Random(user).randbytes(300_000)
        made[user] = api.create(f"{user}-private-{tag}", data, visibility="private")
        made[user]["data"] = data
        api.close()
    return made


def demo_env(keystone: KeystoneServer, tmp_path: Path, *, password: bool = True) -> dict[str, str]:
    """What `source demo-openrc.sh` would set."""
    env = base_env(tmp_path)
    env.update(
        OS_AUTH_URL=keystone.url,
        OS_IDENTITY_API_VERSION="3",
        OS_USERNAME="demo",
        OS_PROJECT_NAME="demo",
        OS_USER_DOMAIN_NAME="Default",
        OS_PROJECT_DOMAIN_ID="default",
        OS_REGION_NAME="RegionOne",
        OS_INTERFACE="public",
    )
    if password:
        env["OS_PASSWORD"] = USERS["demo"]
    return env


def listing(mount: Mount) -> set[str]:
    return set(mount.run("ls", "-1").splitlines())


def assert_demo_view(mount: Mount, images: dict[str, dict]) -> None:
    names = listing(mount)
    assert images["demo"]["name"] in names
    assert images["alt"]["name"] not in names
    assert (mount.path / images["demo"]["name"]).read_bytes() == images["demo"]["data"]


def secrets_in(text: str, secrets: list[str]) -> list[str]:
    """The secrets (and any fernet token at all) that ``text`` holds."""
    found = [s for s in secrets if s and s in text]
    return found + FERNET.findall(text)


# --- where the credentials come from -------------------------------------------------------------


def test_mount_from_os_variables(
    keystone: KeystoneServer,
    glance_ks: GlanceServer,
    images: dict[str, dict],
    mount_glancefs: MountFactory,
    tmp_path: Path,
) -> None:
    mount = mount_glancefs(None, env=demo_env(keystone, tmp_path))
    assert_demo_view(mount, images)
    assert "OS_* variables" not in mount.log()  # nothing went wrong, nothing to explain


def test_mount_from_clouds_yaml_with_os_cloud(
    keystone: KeystoneServer,
    glance_ks: GlanceServer,
    images: dict[str, dict],
    mount_glancefs: MountFactory,
    tmp_path: Path,
) -> None:
    config = tmp_path / "clouds.yaml"
    config.write_text(
        f"""clouds:
  lab-demo:
    auth:
      auth_url: {keystone.url}
      username: demo
      project_name: demo
      user_domain_name: Default
      project_domain_name: Default
    region_name: RegionOne
    interface: public
    identity_api_version: 3
  lab-alt:
    auth:
      auth_url: {keystone.url}
      username: alt
      password: {USERS["alt"]}
      project_name: alt
      domain_id: default
"""
    )
    secure = tmp_path / "secure.yaml"  # the password apart, as recommended
    secure.write_text(f"clouds:\n  lab-demo:\n    auth:\n      password: {USERS['demo']}\n")
    env = base_env(tmp_path)
    env.update(
        OS_CLOUD="lab-demo", OS_CLIENT_CONFIG_FILE=str(config), OS_CLIENT_SECURE_FILE=str(secure)
    )
    mount = mount_glancefs(None, env=env)
    assert_demo_view(mount, images)

    # The other cloud of the same file, chosen with --os-cloud, sees the other project.
    alt = mount_glancefs(None, "--os-cloud", "lab-alt", name="alt", env=env)
    names = listing(alt)
    assert images["alt"]["name"] in names
    assert images["demo"]["name"] not in names


def test_password_is_asked_for_on_a_terminal(
    keystone: KeystoneServer, glance_ks: GlanceServer, images: dict[str, dict], tmp_path: Path
) -> None:
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    env = demo_env(keystone, tmp_path, password=False)
    pid, fd = pty.fork()
    if pid == 0:  # the child: glancefs on a terminal of its own
        try:
            os.execve(GLANCEFS, [GLANCEFS, "mount", "-f", str(mountpoint)], env)
        finally:
            os._exit(127)
    output = b""
    try:
        output += _read_until(fd, b"Password", 30)
        os.write(fd, USERS["demo"].encode() + b"\n")
        deadline = time.monotonic() + 30
        while not os.path.ismount(mountpoint):
            assert time.monotonic() < deadline, output.decode(errors="replace")
            output += _read_until(fd, None, 0.2)
        assert images["demo"]["name"] in os.listdir(mountpoint)
        assert USERS["demo"].encode() not in output  # not echoed
    finally:
        subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], check=False)
        status = _reap(pid, 20)
        os.close(fd)
    assert os.waitstatus_to_exitcode(status) == 0, output.decode(errors="replace")


def _reap(pid: int, timeout: float) -> int:
    """Wait for a child; SIGKILL it when it does not exit in time. Returns its wait status."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        time.sleep(0.1)
    os.kill(pid, signal.SIGKILL)
    return os.waitpid(pid, 0)[1]


def _read_until(fd: int, marker: bytes | None, timeout: float) -> bytes:
    data = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.1)
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                break
            if not chunk:
                break
            data += chunk
            if marker is not None and marker in data:
                return data
    if marker is not None:
        raise AssertionError(f"no {marker!r} in {data!r}")
    return data


def test_missing_credentials_are_one_line(tmp_path: Path, keystone: KeystoneServer) -> None:
    (tmp_path / "mnt").mkdir()
    cases = {
        "no credentials": base_env(tmp_path),
        "no password": demo_env(keystone, tmp_path, password=False),
        "clouds.yaml": {**base_env(tmp_path), "OS_CLOUD": "nowhere"},
    }
    for expected, env in cases.items():
        line = _mount_fails([], env, tmp_path / "mnt")
        assert expected in line
    wrong = {**demo_env(keystone, tmp_path), "OS_PASSWORD": "wrong-password"}
    line = _mount_fails([], wrong, tmp_path / "mnt")
    assert "Keystone refused the credentials" in line
    assert "wrong-password" not in line


def _mount_fails(args: list[str], env: dict[str, str], mountpoint: Path) -> str:
    """Run a mount as users do (in the background) that must fail; return its stderr line."""
    log = mountpoint.with_name(mountpoint.name + ".log")
    result = subprocess.run(
        [GLANCEFS, "mount", "--log-file", str(log), str(mountpoint), *args],
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert not os.path.ismount(mountpoint)
    return lines[0]


# --- tokens dying under the mount --------------------------------------------------------------


def test_every_token_invalidated_while_mounted(
    keystone: KeystoneServer,
    glance_ks: GlanceServer,
    images: dict[str, dict],
    mount_glancefs: MountFactory,
    tmp_path: Path,
) -> None:
    mount = mount_glancefs(
        None,
        "--debug",
        "--listing-ttl",
        "0",
        "--metadata-ttl",
        "0",
        env=demo_env(keystone, tmp_path),
    )
    assert images["demo"]["name"] in listing(mount)
    assert mount.log().count("authenticated with Keystone") == 1

    keystone.rotate_keys()  # new fernet keys and a restart: every token is now refused

    assert images["demo"]["name"] in listing(mount)
    assert (mount.path / images["demo"]["name"]).read_bytes() == images["demo"]["data"]
    log = mount.log()
    assert "token refused (401): re-authenticating once" in log
    assert log.count("authenticated with Keystone") == 2, log
    assert not secrets_in(log, [USERS["demo"]])


async def test_client_upload_outlives_its_revoked_token(
    keystone: KeystoneServer, glance_ks: GlanceServer
) -> None:
    """An upload keeps going when its token is revoked half-way; what follows re-authenticates."""
    session = ks_session.Session(
        auth=v3.Password(
            auth_url=keystone.url,
            username="demo",
            password=USERS["demo"],
            project_name="demo",
            user_domain_id="default",
            project_domain_id="default",
        )
    )
    chunks = [random.randbytes(256 * 1024) for _ in range(8)]
    async with glancefs.Client(session=session) as client:
        # 1. revoked half-way through the upload
        image = await client.images.create(
            name=f"slow-{uuid.uuid4().hex[:6]}", disk_format="raw", container_format="bare"
        )
        token = await trio.to_thread.run_sync(session.get_token)
        assert token is not None

        async def slowly() -> AsyncIterator[bytes]:
            for i, chunk in enumerate(chunks):
                if i == 3:
                    await trio.to_thread.run_sync(revoke, keystone, token)
                    refused = await trio.to_thread.run_sync(_status_with, glance_ks, token)
                    assert refused == 401
                yield chunk
                await trio.sleep(0.3)

        await client.images.upload(image.id, slowly())
        done = await client.images.get(image.id)  # 401, a new token, the retry
        assert done.status == "active"
        assert done["checksum"] == hashlib.md5(b"".join(chunks)).hexdigest()
        assert await trio.to_thread.run_sync(session.get_token) != token

        # 2. revoked before the upload starts: a streamed body cannot be sent twice, so the
        # client checks the token first and re-authenticates then.
        image = await client.images.create(
            name=f"late-{uuid.uuid4().hex[:6]}", disk_format="raw", container_format="bare"
        )
        late_token = await trio.to_thread.run_sync(session.get_token)
        assert late_token is not None
        await trio.to_thread.run_sync(revoke, keystone, late_token)

        async def at_once() -> AsyncIterator[bytes]:
            for chunk in chunks:
                yield chunk

        await client.images.upload(image.id, at_once())
        assert (await client.images.get(image.id)).status == "active"


def _status_with(glance: GlanceServer, token: str) -> int:
    with httpx.Client(trust_env=False, timeout=30) as http:
        return http.get(f"{glance.url}/v2/images", headers={"X-Auth-Token": token}).status_code


def _feed_slowly(
    target: Path, pieces: list[bytes], pause: float, during: dict[int, Callable[[], None]]
) -> subprocess.CompletedProcess[bytes]:
    """``dd`` into ``target`` from a pipe fed one piece at a time; ``during[i]()`` runs before i."""
    dd = subprocess.Popen(
        ["dd", f"of={target}", "bs=1M", "iflag=fullblock", "status=none"],
        stdin=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert dd.stdin is not None
    for i, piece in enumerate(pieces):
        action = during.get(i)
        if action is not None:
            action()
        dd.stdin.write(piece)
        dd.stdin.flush()
        time.sleep(pause)
    dd.stdin.close()
    dd.wait(timeout=120)
    assert dd.stderr is not None
    return subprocess.CompletedProcess(dd.args, dd.returncode, b"", dd.stderr.read())


def upload_span(log: str, image_id: str) -> tuple[float, float]:
    """When the successful PUT of an image's data started and ended, from a --debug log.

    Its line carries the time the answer came and how long the request took ("... in N ms").
    """
    for line in log.splitlines():
        if f"/v2/images/{image_id}/file" in line and "PUT" in line and " 204 " in line:
            took = re.search(r" in (\d+) ms", line)
            if took:
                ended = datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
                return ended - int(took.group(1)) / 1000, ended
    raise AssertionError(f"no PUT of image {image_id} in the log:\n{log[-3000:]}")


def test_mounted_upload_outlives_invalidated_tokens(
    keystone: KeystoneServer,
    glance_ks: GlanceServer,
    mount_glancefs: MountFactory,
    tmp_path: Path,
) -> None:
    """cp-like upload from a pipe into new/ while every token is invalidated half-way."""
    mount = mount_glancefs(None, "--debug", env=demo_env(keystone, tmp_path))
    pieces = [random.randbytes(MiB) for _ in range(6)]
    name = f"piped-{uuid.uuid4().hex[:6]}.raw"
    rotation: list[float] = []

    def rotate() -> None:
        rotation.append(time.time())
        keystone.rotate_keys()
        rotation.append(time.time())

    result = _feed_slowly(mount.path / "new" / name, pieces, 0.5, {3: rotate})
    assert result.returncode == 0, result.stderr
    api = api_as(keystone, glance_ks, "demo")
    [image] = api.list(name=name)
    assert image["status"] == "active"
    assert image["os_hash_value"] == hashlib.sha512(b"".join(pieces)).hexdigest()
    api.close()
    log = mount.log()
    # The upload started with a token from before the new keys and ended after them; what came
    # after it was refused once and re-authenticated.
    started, ended = upload_span(log, image["id"])
    assert started < rotation[0]
    assert ended > rotation[1]
    assert "token refused (401): re-authenticating once" in log
    assert log.count("authenticated with Keystone") >= 2
    assert not secrets_in(log, [USERS["demo"]])


def test_mounted_upload_outlives_its_revoked_token(
    keystone: KeystoneServer,
    glance_ks: GlanceServer,
    mount_glancefs: MountFactory,
    tmp_path: Path,
) -> None:
    """The very token of an upload in flight is revoked: the upload ends active and verified.

    A rule-less fault proxy in front of Glance sees the PUT's token (the test has no other way
    to know the mount's token) so that exactly that one can be revoked half-way.
    """
    put_tokens: list[str] = []

    def note_token(request: Request) -> bool:
        put_tokens.append(request.header("X-Auth-Token") or "")
        return False  # no fault: only looking

    with FaultProxy(glance_ks.url) as proxy:
        proxy.fail(method="PUT", path=IMAGE_DATA, where=note_token)
        mount = mount_glancefs(proxy.url, "--debug", env=demo_env(keystone, tmp_path))
        pieces = [random.randbytes(MiB) for _ in range(6)]
        name = f"revoked-{uuid.uuid4().hex[:6]}.raw"

        def revoke_the_uploads_token() -> None:
            [token] = put_tokens  # the PUT is under way
            revoke(keystone, token)
            assert _status_with(glance_ks, token) == 401

        result = _feed_slowly(mount.path / "new" / name, pieces, 0.5, {3: revoke_the_uploads_token})
        assert result.returncode == 0, result.stderr
    api = api_as(keystone, glance_ks, "demo")
    [image] = api.list(name=name)
    api.close()
    assert image["status"] == "active"
    assert image["size"] == 6 * MiB
    assert image["os_hash_value"] == hashlib.sha512(b"".join(pieces)).hexdigest()
    log = mount.log()
    assert "token refused (401): re-authenticating once" in log  # the verification after it
    assert not secrets_in(log, [USERS["demo"], *put_tokens])


def test_mounted_upload_longer_than_token_lifetime(
    mount_glancefs: MountFactory, tmp_path: Path
) -> None:
    """Keystone issues tokens for 30 s; a 40 s upload from a pipe still succeeds.

    (keystoneauth1 renews tokens that have under 120 s left before every request, so with such a
    lifetime every request gets a fresh token, and the upload's own token dies under it.)
    """
    with (
        KeystoneServer(tmp_path / "keystone", token_expiration=30) as keystone,
        GlanceServer(tmp_path / "glance", flavor="keystone", keystone_url=keystone.url) as glance,
    ):
        keystone.register(glance.url)
        mount = mount_glancefs(None, "--debug", env=demo_env(keystone, tmp_path))
        pieces = [random.randbytes(MiB // 2) for _ in range(20)]
        name = f"long-{uuid.uuid4().hex[:6]}.raw"
        started = time.monotonic()
        result = _feed_slowly(mount.path / "new" / name, pieces, 2.0, {})
        assert time.monotonic() - started > 35
        assert result.returncode == 0, result.stderr
        api = api_as(keystone, glance, "demo")
        [image] = api.list(name=name)
        api.close()
        assert image["status"] == "active"
        assert image["os_hash_value"] == hashlib.sha512(b"".join(pieces)).hexdigest()
        mount.stop()
        # The PUT took longer than any token lives.
        started, ended = upload_span(mount.log(), image["id"])
        assert ended - started > 30


# --- TLS -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A CA (trustme), a server certificate for 127.0.0.1 and a client certificate."""
    import trustme

    where = tmp_path_factory.mktemp("pki")
    ca = trustme.CA()
    files = {name: where / f"{name}.pem" for name in ("ca", "server", "server-key", "client")}
    files["client-key"] = where / "client-key.pem"
    ca.cert_pem.write_to_path(str(files["ca"]))
    server = ca.issue_cert("127.0.0.1", "localhost")
    client = ca.issue_cert("glancefs-client.example")
    for cert, chain, key in (
        (server, files["server"], files["server-key"]),
        (client, files["client"], files["client-key"]),
    ):
        for i, blob in enumerate(cert.cert_chain_pems):
            blob.write_to_path(str(chain), append=i > 0)
        cert.private_key_pem.write_to_path(str(key))
    return files


@pytest.fixture(scope="module")
def glance_https(
    keystone: KeystoneServer,
    glance_ks: GlanceServer,  # for the users and projects it registers
    pki: dict[str, Path],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[GlanceServer]:
    """Glance over HTTPS, behind Keystone (reached with --os-image-url, no catalog entry)."""
    with GlanceServer(
        tmp_path_factory.mktemp("glance-https"),
        flavor="keystone",
        keystone_url=keystone.url,
        certfile=pki["server"],
        keyfile=pki["server-key"],
    ) as server:
        yield server


@pytest.fixture(scope="module")
def glance_mtls(
    pki: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GlanceServer]:
    """Glance over HTTPS that demands a client certificate signed by the CA (no Keystone)."""
    with GlanceServer(
        tmp_path_factory.mktemp("glance-mtls"),
        certfile=pki["server"],
        keyfile=pki["server-key"],
        ca_certs=pki["ca"],
    ) as server:
        yield server


def create_image(http: httpx.Client, name: str, data: bytes) -> dict:
    """A raw image with data, through an httpx client set up for the server's TLS."""
    response = http.post(
        "/v2/images", json={"name": name, "disk_format": "raw", "container_format": "bare"}
    )
    response.raise_for_status()
    image: dict = response.json()
    http.put(
        f"/v2/images/{image['id']}/file",
        content=data,
        headers={"Content-Type": "application/octet-stream"},
    ).raise_for_status()
    return image


def test_https_with_cacert(
    keystone: KeystoneServer,
    glance_https: GlanceServer,
    pki: dict[str, Path],
    mount_glancefs: MountFactory,
    tmp_path: Path,
) -> None:
    assert glance_https.url.startswith("https://")
    with httpx.Client(
        base_url=glance_https.url,
        verify=ssl.create_default_context(cafile=pki["ca"]),
        headers={"X-Auth-Token": token_for(keystone, "demo")},
        trust_env=False,
        timeout=60,
    ) as http:
        image = create_image(http, f"tls-{uuid.uuid4().hex[:6]}", b"over tls" * 1000)
    env = demo_env(keystone, tmp_path)
    # From the command line...
    mount = mount_glancefs(glance_https.url, "--os-cacert", str(pki["ca"]), env=env)
    assert (mount.path / image["name"]).read_bytes() == b"over tls" * 1000
    assert "warning" not in mount.log()
    # ... and from OS_CACERT.
    mount = mount_glancefs(glance_https.url, name="env", env={**env, "OS_CACERT": str(pki["ca"])})
    assert image["name"] in listing(mount)


def test_https_without_the_ca_fails_in_one_line(
    keystone: KeystoneServer, glance_https: GlanceServer, tmp_path: Path
) -> None:
    (tmp_path / "mnt").mkdir()
    env = demo_env(keystone, tmp_path)
    line = _mount_fails(["--os-image-url", glance_https.url], env, tmp_path / "mnt")
    assert "certificate" in line, line
    assert "CERTIFICATE_VERIFY_FAILED" in line, line
    assert "--os-cacert" in line


def test_https_insecure_works_and_warns(
    keystone: KeystoneServer,
    glance_https: GlanceServer,
    images: dict[str, dict],
    mount_glancefs: MountFactory,
    tmp_path: Path,
) -> None:
    mount = mount_glancefs(glance_https.url, "--insecure", env=demo_env(keystone, tmp_path))
    listing(mount)
    assert "warning: --insecure: certificates are not verified" in mount.log()


def test_client_certificate(
    glance_mtls: GlanceServer, pki: dict[str, Path], mount_glancefs: MountFactory, tmp_path: Path
) -> None:
    ca = str(pki["ca"])
    cert = (str(pki["client"]), str(pki["client-key"]))
    context = ssl.create_default_context(cafile=ca)
    context.load_cert_chain(*cert)
    with httpx.Client(base_url=glance_mtls.url, verify=context, trust_env=False) as http:
        image = create_image(http, f"mtls-{uuid.uuid4().hex[:6]}", b"mutual" * 100)
    env = base_env(tmp_path)
    mount = mount_glancefs(
        glance_mtls.url,
        "--os-cacert",
        ca,
        "--os-cert",
        cert[0],
        "--os-key",
        cert[1],
        env=env,
    )
    assert (mount.path / image["name"]).read_bytes() == b"mutual" * 100
    # Without a certificate the server hangs up: one line, no traceback.
    (tmp_path / "bare").mkdir()
    line = _mount_fails(
        ["--os-image-url", glance_mtls.url, "--os-cacert", ca], env, tmp_path / "bare"
    )
    assert line.startswith(f"glancefs: cannot use Glance at {glance_mtls.url}")


async def test_large_data_over_tls(glance_mtls: GlanceServer, pki: dict[str, Path]) -> None:
    # From 4 MiB on, image data is read straight from the connection's stream, here TLS.
    ca = str(pki["ca"])
    cert = (str(pki["client"]), str(pki["client-key"]))
    context = ssl.create_default_context(cafile=ca)
    context.load_cert_chain(*cert)
    data = random.Random(5).randbytes(9 * MiB + 7)
    with httpx.Client(base_url=glance_mtls.url, verify=context, trust_env=False) as http:
        image = create_image(http, f"mtls-big-{uuid.uuid4().hex[:6]}", data)
    # The documented form: a CA bundle's path and a (cert, key) pair.
    async with glancefs.Client(endpoint=glance_mtls.url, verify=ca, cert=cert) as client:
        for offset in (0, MiB + 3):
            read = [chunk async for chunk in client.images.data(image["id"], offset=offset)]
            assert b"".join(read) == data[offset:]
            # Gathered from TLS records into chunks that end where the image's MiBs end (after
            # what the HTTP parser had read with the headers).
            ends = list(itertools.accumulate(len(chunk) for chunk in read[:-1]))
            assert [(offset + end) % MiB for end in ends[1:]] == [0] * (len(ends) - 1)
        assert (await client.images.get(image["id"])).size == len(data)


# --- secrets -------------------------------------------------------------------------------------


def test_debug_logs_hold_no_secret(
    keystone: KeystoneServer,
    glance_ks: GlanceServer,
    images: dict[str, dict],
    mount_glancefs: MountFactory,
    tmp_path: Path,
) -> None:
    """Password, token auth and a bare token, each with --debug, through 200s and 401s."""
    known = token_for(keystone, "demo")  # a token we know the value of
    env = demo_env(keystone, tmp_path, password=False)
    name = images["demo"]["name"]
    password = mount_glancefs(
        None,
        "--debug",
        "--os-password",
        USERS["demo"],
        "--listing-ttl",
        "0",
        name="password",
        env=env,
    )
    token_auth = mount_glancefs(
        None,
        "--debug",
        "--os-auth-type",
        "v3token",
        "--os-token",
        known,
        "--listing-ttl",
        "0",
        name="token-auth",
        env=env,
    )
    bare = mount_glancefs(
        glance_ks.url,
        "--debug",
        "--os-auth-token",
        known,
        "--listing-ttl",
        "0",
        name="bare",
        env=base_env(tmp_path),
    )
    for mount in (password, token_auth, bare):
        assert name in listing(mount)
        assert (mount.path / name).read_bytes() == images["demo"]["data"]
        (mount.path / "new" / f"up-{uuid.uuid4().hex[:6]}.raw").write_bytes(os.urandom(100_000))
        # and nothing of it on the command line as ps shows it
        assert mount.proc is not None
        ps = subprocess.run(
            ["ps", "-ww", "-o", "args=", "-p", str(mount.proc.pid)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert "--os-" in ps, ps
        assert not secrets_in(ps, [USERS["demo"], known]), ps

    revoke(keystone, known)  # the bare mount's requests are now refused: error paths get logged
    listing(password)
    bare.run("ls", check=False)
    for mount in (password, token_auth, bare):
        mount.stop()
        log = mount.log()
        assert "curl -g -i" in log
        assert "X-Auth-Token: {SHA256}" in log
        assert not secrets_in(log, [USERS["demo"], known]), mount.path.name
    assert "can be seen by other users" in password.log()  # the warning about --os-password


def test_ps_does_not_show_the_password(
    keystone: KeystoneServer,
    glance_ks: GlanceServer,
    images: dict[str, dict],
    mount_glancefs: MountFactory,
    tmp_path: Path,
) -> None:
    env = demo_env(keystone, tmp_path, password=False)
    mount = mount_glancefs(None, f"--os-password={USERS['demo']}", env=env)
    assert images["demo"]["name"] in listing(mount)
    everything = subprocess.run(
        ["ps", "-eww", "-o", "pid=,args="], capture_output=True, text=True, check=True
    ).stdout
    assert mount.proc is not None
    ours = [line for line in everything.splitlines() if line.split()[0] == str(mount.proc.pid)]
    assert ours, ours
    assert "--os-password=***" in ours[0], ours
    assert USERS["demo"] not in everything
    cmdline = Path(f"/proc/{mount.proc.pid}/cmdline").read_bytes()
    assert USERS["demo"].encode() not in cmdline


# --- who may enter -------------------------------------------------------------------------------


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory other users can reach (pytest's tmp_path is private to its owner)."""
    path = Path(tempfile.mkdtemp(prefix="glancefs-shared-"))
    path.chmod(0o755)
    yield path
    for child in path.iterdir():
        if not os.path.ismount(child):  # never remove anything through a mount
            with contextlib.suppress(OSError):
                child.rmdir()
    with contextlib.suppress(OSError):
        path.rmdir()


def _as_nobody(*command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", *command],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")
def test_other_users_need_allow_other(
    keystone: KeystoneServer,
    glance_ks: GlanceServer,
    images: dict[str, dict],
    shared_dir: Path,  # before mount_glancefs: removed after the mounts are gone
    mount_glancefs: MountFactory,
    tmp_path: Path,
) -> None:
    env = demo_env(keystone, tmp_path)
    name = images["demo"]["name"]
    private = mount_glancefs(None, name="private", env=env, path=shared_dir / "private")
    refused = _as_nobody("ls", str(private.path))
    assert refused.returncode != 0
    assert "Permission denied" in refused.stderr
    assert name in listing(private)  # the owner still can

    shared = mount_glancefs(
        None, "--allow-other", name="shared", env=env, path=shared_dir / "shared"
    )
    seen = _as_nobody("ls", "-l", str(shared.path))
    assert seen.returncode == 0, seen.stderr
    assert name in seen.stdout, seen.stderr
    read = _as_nobody("sha256sum", str(shared.path / name))
    assert read.stdout.split()[0] == hashlib.sha256(images["demo"]["data"]).hexdigest()
    # What the modes show is what the kernel enforces: others may read, not write.
    write = _as_nobody("touch", str(shared.path / "new" / "intruder.raw"))
    assert write.returncode != 0
    assert "Permission denied" in write.stderr
    assert images["alt"]["name"] not in seen.stdout  # and only what the credentials see


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")
def test_reader_role_mounts_read_only(
    keystone: KeystoneServer,
    glance_ks: GlanceServer,
    images: dict[str, dict],
    shared_dir: Path,  # before mount_glancefs: removed after the mounts are gone
    mount_glancefs: MountFactory,
    tmp_path: Path,
) -> None:
    """Credentials with only the reader role: modes and errors say what Glance would say.

    Glance's default policy lets a reader list images and read their metadata, but neither
    change anything nor download data (``download_image`` wants ``member``).
    """
    demo = api_as(keystone, glance_ks, "demo")
    queued = demo.create(f"queued-{uuid.uuid4().hex[:6]}", visibility="private")
    demo.close()
    env = demo_env(keystone, tmp_path, password=False)
    env.update(OS_USERNAME="viewer", OS_PASSWORD=USERS["viewer"])
    mount = mount_glancefs(
        None, "--allow-other", name="viewer", env=env, path=shared_dir / "viewer"
    )
    assert "credentials have only the reader role: mounting read-only" in mount.log()
    new, queued_path = mount.path / "new", mount.path / queued["name"]
    active = mount.path / images["demo"]["name"]
    source = shared_dir / "upload.raw"  # readable by nobody too
    source.write_bytes(b"never uploaded")
    source.chmod(0o644)
    try:
        # As root (the mounting user).
        assert os.stat(new).st_mode & 0o777 == 0o555
        assert os.stat(queued_path).st_mode & 0o777 == 0o444
        assert os.stat(active).st_mode & 0o777 == 0o444
        copy = subprocess.run(
            ["cp", str(source), str(new / "refused.raw")], capture_output=True, text=True
        )
        assert copy.returncode != 0, copy.stderr
        assert "Read-only file system" in copy.stderr, copy.stderr
        with pytest.raises(OSError) as refused:
            os.open(queued_path, os.O_WRONLY)
        assert refused.value.errno == errno.EROFS
        assert os.getxattr(active, "user.status") == b"active"
        with pytest.raises(OSError) as forbidden:
            active.read_bytes()
        assert forbidden.value.errno == errno.EPERM  # Glance's 403 on download
        # As another user: the same modes; the kernel refuses the write (the mount is ro).
        modes = _as_nobody("stat", "-c", "%a", str(new), str(queued_path), str(active))
        assert modes.stdout.split() == ["555", "444", "444"], modes.stderr
        copy = _as_nobody("cp", str(source), str(new / "refused.raw"))
        assert copy.returncode != 0, copy.stderr
        assert "Read-only file system" in copy.stderr, copy.stderr
        seen = _as_nobody("ls", str(mount.path))
        assert seen.returncode == 0, seen.stderr
        assert images["demo"]["name"] in seen.stdout, seen.stderr
        status = _as_nobody("getfattr", "--only-values", "-n", "user.status", str(active))
        assert status.returncode == 0, status.stderr
        assert status.stdout == "active", status.stderr
        read = _as_nobody("cat", str(active))
        assert read.returncode != 0, read.stderr
        assert "Operation not permitted" in read.stderr, read.stderr
    finally:
        source.unlink()
    assert "refused.raw" not in {*os.listdir(mount.path), *os.listdir(new)}


def test_mount_ends_cleanly_on_sigterm(
    keystone: KeystoneServer,
    glance_ks: GlanceServer,
    mount_glancefs: MountFactory,
    tmp_path: Path,
) -> None:
    """A Keystone-backed mount stops like any other (its worker threads do not hold it up)."""
    mount = mount_glancefs(None, env=demo_env(keystone, tmp_path))
    listing(mount)
    assert mount.proc is not None
    mount.proc.send_signal(signal.SIGTERM)
    assert mount.proc.wait(timeout=30) == 0
    assert not os.path.ismount(mount.path)
