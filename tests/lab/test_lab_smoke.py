"""Smoke tests of the lab harness: the real Glance/Keystone servers start, serve and stop.

If these fail, every glancefs integration test would fail too, for reasons that are
not glancefs's; they use plain urllib so they do not depend on glancefs at all.
"""

import json
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from lab.servers import USERS, GlanceServer, KeystoneServer

MIB = 1024 * 1024

# loopback only: never let an http_proxy from the environment see these requests
_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _request(
    method: str, url: str, body: bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    """Status, headers and body of one request; HTTP errors are returned, not raised."""
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with _opener.open(req, timeout=60) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def _json(
    method: str, url: str, doc: Any, headers: dict[str, str] | None = None
) -> tuple[int, Any]:
    status, _, raw = _request(
        method,
        url,
        json.dumps(doc).encode(),
        {"Content-Type": "application/json", **(headers or {})},
    )
    return status, json.loads(raw) if raw else None


def _create_upload_read(glance: GlanceServer) -> dict[str, Any]:
    """Create a raw image, upload 1 MiB, read a range back; return the final image."""
    status, image = _json(
        "POST",
        f"{glance.url}/v2/images",
        {"name": "lab-smoke", "disk_format": "raw", "container_format": "bare"},
    )
    assert status == 201, image
    assert image["status"] == "queued"
    data = os.urandom(MIB)
    status, _, body = _request(
        "PUT",
        f"{glance.url}/v2/images/{image['id']}/file",
        data,
        {"Content-Type": "application/octet-stream"},
    )
    assert status == 204, body
    assert (glance.store_dir / image["id"]).read_bytes() == data

    status, headers, body = _request(
        "GET", f"{glance.url}/v2/images/{image['id']}/file", None, {"Range": "bytes=1000-1999"}
    )
    assert status == 206
    assert body == data[1000:2000]
    assert headers["Content-Range"] == f"bytes 1000-1999/{MIB}"

    status, _, raw = _request("GET", f"{glance.url}/v2/images/{image['id']}")
    assert status == 200
    final: dict[str, Any] = json.loads(raw)
    assert final["status"] == "active"
    assert final["size"] == MIB
    return final


def test_noauth_glance(tmp_path: Path) -> None:
    with GlanceServer(tmp_path / "glance") as glance:
        assert glance.url == f"http://127.0.0.1:{glance.port}"
        image = _create_upload_read(glance)
        assert image["owner"] is None  # noauth: unauthenticated context, no project
        assert glance.sqlite_path.exists()
        assert glance.log_path.exists()
    assert not glance.running


def test_fakeauth_glance_survives_restart(tmp_path: Path) -> None:
    glance = GlanceServer(
        tmp_path / "glance",
        flavor="fakeauth",
        conf_overrides={"DEFAULT": {"image_property_quota": "5"}},
    )
    try:
        glance.start()
        image = _create_upload_read(glance)
        assert image["owner"] == "glancefs-test"
        port = glance.port
        glance.restart()
        assert glance.port == port
        status, _, raw = _request("GET", f"{glance.url}/v2/images/{image['id']}")
        assert status == 200
        assert json.loads(raw)["checksum"] == image["checksum"]
        # the override reached glance-api.conf: a sixth property is refused
        props = [{"op": "add", "path": f"/p{i}", "value": "v"} for i in range(6)]
        status, _, _ = _request(
            "PATCH",
            f"{glance.url}/v2/images/{image['id']}",
            json.dumps(props).encode(),
            {"Content-Type": "application/openstack-images-v2.1-json-patch"},
        )
        assert status == 413
    finally:
        glance.stop()
    glance.stop()  # idempotent


def _token(keystone: KeystoneServer, user: str, project: str) -> str:
    """Project-scoped token for a test user, as any client would get it."""
    body = {
        "auth": {
            "identity": {
                "methods": ["password"],
                "password": {
                    "user": {"name": user, "domain": {"id": "default"}, "password": USERS[user]}
                },
            },
            "scope": {"project": {"name": project, "domain": {"id": "default"}}},
        }
    }
    status, headers, raw = _request(
        "POST",
        f"{keystone.url}/auth/tokens",
        json.dumps(body).encode(),
        {"Content-Type": "application/json"},
    )
    assert status == 201, raw
    return headers["X-Subject-Token"]


@pytest.mark.keystone
def test_keystone_glance(tmp_path: Path) -> None:
    with KeystoneServer(tmp_path / "keystone") as keystone:
        assert keystone.url == f"http://127.0.0.1:{keystone.port}/v3"
        with GlanceServer(
            tmp_path / "glance", flavor="keystone", keystone_url=keystone.url
        ) as glance:
            ids = keystone.register(glance.url)
            token = _token(keystone, "demo", "demo")
            status, _, raw = _request(
                "GET", f"{glance.url}/v2/images", None, {"X-Auth-Token": token}
            )
            assert status == 200, raw
            status, _, _ = _request("GET", f"{glance.url}/v2/images")
            assert status == 401

            status, image = _json(
                "POST",
                f"{glance.url}/v2/images",
                {"name": "ks", "disk_format": "raw", "container_format": "bare"},
                {"X-Auth-Token": token},
            )
            assert status == 201
            assert image["owner"] == ids["project:demo"]

            keystone.rotate_keys()  # every token issued so far is now refused
            status, _, _ = _request("GET", f"{glance.url}/v2/images", None, {"X-Auth-Token": token})
            assert status == 401
            status, _, _ = _request(
                "GET",
                f"{glance.url}/v2/images",
                None,
                {"X-Auth-Token": _token(keystone, "demo", "demo")},
            )
            assert status == 200
