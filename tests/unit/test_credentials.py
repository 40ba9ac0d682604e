"""Credentials without a server: which source wins, TLS settings, errors, ps hiding, renewal."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trio

from glancefs import AuthError, SessionAuth, TokenAuth
from glancefs.credentials import TLS, CredentialsError, load

AUTH_URL = "http://keystone.invalid:5000/v3"


@pytest.fixture(autouse=True)
def no_openstack_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No OS_* variable nor a user's clouds.yaml leaks into these tests."""
    import os

    for name in list(os.environ):
        if name.startswith("OS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    monkeypatch.chdir(tmp_path)


def params(**given: Any) -> dict[str, Any]:
    return {"timeout": 5.0, **{f"os_{k}" if k != "insecure" else k: v for k, v in given.items()}}


def test_image_url_alone_is_an_unauthenticated_glance() -> None:
    credentials = load(params(image_url="http://glance:9292/v2/"))
    assert isinstance(credentials.auth, TokenAuth)
    assert trio.run(credentials.auth.headers) == {}
    assert trio.run(credentials.auth.endpoint) == "http://glance:9292"
    assert credentials.tls == TLS(True, None, None)


def test_image_url_and_token_skip_keystone_even_with_keystone_options() -> None:
    credentials = load(params(image_url="http://g", auth_token="tok-123", auth_url=AUTH_URL))
    assert isinstance(credentials.auth, TokenAuth)
    assert credentials.auth.secrets() == ["tok-123"]


def test_cli_tls_settings(tmp_path: Path) -> None:
    import trustme

    ca = tmp_path / "ca.pem"
    trustme.CA().cert_pem.write_to_path(str(ca))
    assert load(params(image_url="https://g", insecure=True)).tls.verify is False
    assert load(params(image_url="https://g", cacert=str(ca))).tls.verify == str(ca)
    with pytest.raises(CredentialsError, match=r"--os-cert /nope/c.pem: no such file"):
        load(params(image_url="https://g", cert="/nope/c.pem"))
    ca.write_text("")
    with pytest.raises(CredentialsError, match="cannot load certificates"):
        load(params(image_url="https://g", cacert=str(ca)))  # empty: no certificate in it


def test_nothing_given_says_where_credentials_come_from() -> None:
    with pytest.raises(CredentialsError, match=r"no credentials: use --os-cloud \(OS_CLOUD\)"):
        load(params())


def test_missing_options_are_named_as_options() -> None:
    with pytest.raises(CredentialsError, match=r"missing --os-auth-url \(OS_AUTH_URL\)"):
        load(params(username="demo", password="pw", project_name="demo"))


def test_password_prompt_only_with_a_terminal() -> None:
    given = params(auth_url=AUTH_URL, username="demo", project_name="demo")
    with pytest.raises(CredentialsError, match="no password"):
        load(given)
    asked: list[str] = []

    def prompt(text: str) -> str:
        asked.append(text)
        return "typed-secret"

    credentials = load(given, prompt=prompt)
    assert asked == ["Password: "]
    assert "typed-secret" in credentials.auth.secrets()
    assert credentials.source == "--os-* options"


def test_clouds_yaml_with_aliases_tls_and_secure_yaml(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("ca.pem", "client.pem", "client.key"):
        (tmp_path / name).write_text("")
    (tmp_path / "clouds.yaml").write_text(
        f"""clouds:
  mine:
    auth:
      auth_url: {AUTH_URL}
      username: demo
      tenant_name: demo-project
      domain_id: default
    region_name: RegionTwo
    image_interface: internal
    cacert: {tmp_path}/ca.pem
    cert: {tmp_path}/client.pem
    key: {tmp_path}/client.key
"""
    )
    (tmp_path / "secure.yaml").write_text("clouds:\n  mine:\n    auth:\n      password: s3cr3t\n")
    monkeypatch.setenv("OS_CLIENT_CONFIG_FILE", str(tmp_path / "clouds.yaml"))
    monkeypatch.setenv("OS_CLIENT_SECURE_FILE", str(tmp_path / "secure.yaml"))
    # Empty PEM files cannot be loaded: that is reported, naming the file.
    with pytest.raises(CredentialsError, match="cannot load certificates"):
        load(params(cloud="mine"))
    monkeypatch.setattr(TLS, "ssl_context", lambda self: True)
    credentials = load(params(cloud="mine"))
    auth = credentials.auth
    assert isinstance(auth, SessionAuth)
    assert credentials.source == "cloud 'mine'"
    assert credentials.tls == TLS(
        str(tmp_path / "ca.pem"), str(tmp_path / "client.pem"), str(tmp_path / "client.key")
    )
    assert auth._interface == "internal"
    assert auth._region_name == "RegionTwo"
    plugin = auth._session.auth
    assert (plugin._project_name, plugin._user_domain_id) == ("demo-project", "default")
    assert "s3cr3t" in auth.secrets()
    # Options win over the file, as with the openstack CLI.
    credentials = load(params(cloud="mine", interface="admin", insecure=True))
    assert credentials.tls.verify is False
    assert isinstance(credentials.auth, SessionAuth)
    assert credentials.auth._interface == "internal"  # image_interface is more specific
    credentials = load(params(cloud="mine", project_name="other"))
    assert isinstance(credentials.auth, SessionAuth)
    assert credentials.auth._session.auth._project_name == "other"


def test_unknown_cloud_and_auth_type() -> None:
    with pytest.raises(CredentialsError, match=r"clouds\.yaml: Cloud nowhere was not found"):
        load(params(cloud="nowhere"))
    with pytest.raises(CredentialsError, match="unknown auth type 'bogus'"):
        load(params(auth_url=AUTH_URL, auth_type="bogus", password="x"))


def test_hide_from_ps_rewrites_the_command_line() -> None:
    script = (
        "import sys; from glancefs.credentials import hide_from_ps; "
        "assert hide_from_ps(['hunter22']); "
        "sys.stdout.buffer.write(open('/proc/self/cmdline', 'rb').read())"
    )
    out = subprocess.run(
        [sys.executable, "-c", script, "--os-password", "hunter22", "--x=ahunter22b"],
        capture_output=True,
        check=True,
    ).stdout
    args = out.rstrip(b"\0").split(b"\0")
    assert args[-3:] == [b"--os-password", b"***", b"--x=a***b"]
    assert b"hunter22" not in out


class FakeSession:
    """Just what SessionAuth calls, counting re-authentications."""

    def __init__(self, url: str = "http://glance:9292/v2/") -> None:
        self.url = url
        self.generation = 1
        self.invalidations = 0
        self.auth = None

    def get_endpoint(self, **_: Any) -> str:
        return self.url

    def get_auth_headers(self) -> dict[str, str]:
        return {"X-Auth-Token": f"token-{self.generation}"}

    def invalidate(self) -> bool:
        self.invalidations += 1
        self.generation += 1
        return True


async def test_session_auth_strips_catalog_versions_and_renews_once() -> None:
    session = FakeSession()
    auth = SessionAuth(session, secrets=["pw"])
    assert await auth.endpoint() == "http://glance:9292"
    assert await auth.headers() == {"X-Auth-Token": "token-1"}
    # A burst of 401s for the same token: one re-authentication.
    async with trio.open_nursery() as nursery:
        for _ in range(5):
            nursery.start_soon(auth.invalidate, "token-1")
    assert session.invalidations == 1
    assert await auth.headers() == {"X-Auth-Token": "token-2"}
    assert auth.secrets() == ["pw", "token-1", "token-2"]


async def test_session_auth_turns_keystone_errors_into_one_line() -> None:
    from keystoneauth1 import exceptions as ks

    class Refusing(FakeSession):
        def get_auth_headers(self) -> dict[str, str]:
            raise ks.Unauthorized("The request you have made requires authentication.")

    with pytest.raises(AuthError, match=r"Keystone refused the credentials \(401\)"):
        await SessionAuth(Refusing()).headers()
