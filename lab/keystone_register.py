"""Register Glance and the test users in a freshly bootstrapped Keystone (idempotent).

usage: python keystone_register.py KEYSTONE_URL GLANCE_URL [SWIFT_URL]

Run as a script (stdlib only, no ``lab`` import) so it works from any interpreter;
KeystoneServer.register() runs it with the keystone venv's python.  Creates projects
service/demo/alt, users glance/demo/alt/viewer (passwords ``<name>-secret``), their roles
(viewer has only ``reader`` on demo), and the ``image`` service with public/internal/admin
endpoints at GLANCE_URL; with SWIFT_URL also the ``object-store`` service, whose endpoints are
the accounts ``SWIFT_URL/v1/AUTH_<project id>``.
"""

import json
import sys
import urllib.request
from typing import Any

ADMIN_PASSWORD = "admin-secret"

_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via a proxy


class Keystone:
    """Just enough of the identity v3 API for registration, as admin."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")
        body = {
            "auth": {
                "identity": {
                    "methods": ["password"],
                    "password": {
                        "user": {
                            "name": "admin",
                            "domain": {"id": "default"},
                            "password": ADMIN_PASSWORD,
                        }
                    },
                },
                "scope": {"project": {"name": "admin", "domain": {"id": "default"}}},
            }
        }
        with self._send("POST", "/auth/tokens", body, token=None) as resp:
            self.token: str | None = resp.headers["X-Subject-Token"]

    def _send(self, method: str, path: str, body: Any, token: str | None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method)
        req.add_header("Content-Type", "application/json")
        req.add_header("Accept", "application/json")
        if token:
            req.add_header("X-Auth-Token", token)
        return _opener.open(req, timeout=30)

    def call(self, method: str, path: str, body: Any = None) -> Any:
        """JSON request as admin; returns the decoded body (None when empty)."""
        with self._send(method, path, body, self.token) as resp:
            raw = resp.read()
        return json.loads(raw) if raw else None

    def get_or_create(self, kind: str, body: dict[str, Any], query: str) -> dict[str, Any]:
        """First ``kind`` matching ``query`` or a new one made from ``body``."""
        found: list[dict[str, Any]] = self.call("GET", f"/{kind}s?{query}")[f"{kind}s"]
        if found:
            return found[0]
        created: dict[str, Any] = self.call("POST", f"/{kind}s", {kind: body})[kind]
        return created


def add_service(ks: Keystone, kind: str, name: str, url: str) -> str:
    """The service of type ``kind`` with public, internal and admin endpoints at ``url``; its id."""
    svc = ks.get_or_create("service", {"type": kind, "name": name, "enabled": True}, f"type={kind}")
    have = {
        e["interface"] for e in ks.call("GET", f"/endpoints?service_id={svc['id']}")["endpoints"]
    }
    for iface in ("public", "internal", "admin"):
        if iface not in have:
            endpoint = {
                "service_id": svc["id"],
                "interface": iface,
                "url": url,
                "region_id": "RegionOne",
            }
            ks.call("POST", "/endpoints", {"endpoint": endpoint})
    service_id: str = svc["id"]
    return service_id


def register(keystone_url: str, glance_url: str, swift_url: str | None = None) -> dict[str, str]:
    """Create the service/demo/alt projects and users and the service endpoints; return ids."""
    ks = Keystone(keystone_url)
    roles = {r["name"]: r["id"] for r in ks.call("GET", "/roles")["roles"]}
    for role in ("admin", "member", "reader", "service"):
        if role not in roles:
            roles[role] = ks.get_or_create("role", {"name": role}, f"name={role}")["id"]
    ids: dict[str, str] = {}
    for name in ("service", "demo", "alt"):
        ids[f"project:{name}"] = ks.get_or_create(
            "project", {"name": name, "domain_id": "default"}, f"name={name}"
        )["id"]
    for name in ("glance", "demo", "alt", "viewer"):
        body = {"name": name, "password": f"{name}-secret", "domain_id": "default"}
        ids[f"user:{name}"] = ks.get_or_create("user", body, f"name={name}")["id"]
    for project, user, role in [
        ("service", "glance", "admin"),
        ("service", "glance", "service"),
        ("demo", "demo", "member"),
        ("alt", "alt", "member"),
        ("demo", "viewer", "reader"),
    ]:
        project_id, user_id = ids[f"project:{project}"], ids[f"user:{user}"]
        ks.call("PUT", f"/projects/{project_id}/users/{user_id}/roles/{roles[role]}")
    ids["service:image"] = add_service(ks, "image", "glance", glance_url)
    if swift_url:
        account = swift_url.rstrip("/") + "/v1/AUTH_%(project_id)s"
        ids["service:object-store"] = add_service(ks, "object-store", "swift", account)
    return ids


def main(argv: list[str]) -> int:
    """CLI entry: print the created ids as JSON (KeystoneServer.register parses it)."""
    if len(argv) not in (3, 4):
        print(__doc__, file=sys.stderr)
        return 2
    print(json.dumps(register(*argv[1:])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
