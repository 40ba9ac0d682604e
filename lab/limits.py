"""Keystone and a Glance that enforces Keystone's unified limits: the quotas clouds run.

Glance (23 and later) enforces four per-project limits, read from Keystone, when its
``[DEFAULT] use_keystone_limits`` is on: ``image_size_total`` and ``image_stage_total`` (MiB of
active and of staged data), ``image_count_total`` (images not deleted) and
``image_count_uploading`` (images being uploaded or staged). A request that would go over one
answers 413::

    with LimitsLab(workdir, image_count_total=2) as lab:   # about 15 s (Keystone's setup)
        project = lab.project("counted", image_count_total=1)
        project.env                  # the OS_* variables of user demo in it, for a mount
        api = lab.api(project)       # lab.glance_http's GlanceAPI with demo's token in it

- ``keystone``: lab.servers' Keystone with the usual projects and users, Glance's endpoints,
  the glance user given ``reader`` on the system (oslo.limit reads limits with a system-scoped
  token), and a registered limit (the default of every project) per resource passed in.
- ``glance``: the keystone flavor, with ``[oslo_limit]`` naming its own endpoint in Keystone
  (``endpoint_id``: the limits are those registered for that endpoint's service and region).
- :meth:`LimitsLab.project` makes a project of its own for each test (the limits count per
  project, so tests do not see each other's images), with project limits that override the
  registered ones, and user demo as a member.

Glance checks a limit when a request starts, against the usage then plus what the request
declares (``image_size_total`` adds the upload's size in whole MiB when it is sent, else
nothing): one upload of unknown size may go past ``image_size_total``, the next is refused.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import httpx

from lab.glance_http import GlanceAPI
from lab.keystone_register import Keystone
from lab.servers import USERS, GlanceServer, KeystoneServer, Started

__all__ = ["RESOURCES", "LimitsLab", "Project"]

#: Glance's unified limits (glance.quota.keystone), sizes in MiB.
RESOURCES = ("image_size_total", "image_stage_total", "image_count_total", "image_count_uploading")
_REGION = "RegionOne"


@dataclass(frozen=True)
class Project:
    """A project of :meth:`LimitsLab.project`: its name, id, and the OS_* variables that
    authenticate user demo in it (what an openrc file sets)."""

    name: str
    id: str
    env: dict[str, str]


class LimitsLab(Started):
    """Keystone and a Glance enforcing unified limits, with ``registered`` as the default limit
    of every project (a resource left out is unlimited); see the module.

    start() is all or nothing; stop() stops both.
    """

    def __init__(self, workdir: Path, **registered: int) -> None:
        unknown = set(registered) - set(RESOURCES)
        if unknown:
            raise ValueError(f"not a Glance limit: {', '.join(sorted(unknown))}")
        self.workdir = Path(workdir).resolve()
        self.registered = registered
        self.keystone = KeystoneServer(self.workdir / "keystone")
        self.glance = GlanceServer(
            self.workdir / "glance", flavor="keystone", keystone_url=self.keystone.url
        )
        self._service_id = ""

    def start(self) -> None:
        """Keystone, Glance's endpoints and the registered limits, then Glance configured with
        its endpoint's id (the port is known before Glance starts)."""
        try:
            self.keystone.start()
            ids = self.keystone.register(self.glance.url)
            self._service_id = ids["service:image"]
            admin = Keystone(self.keystone.url)
            endpoint_id = self._public_endpoint(admin)
            reader = admin.call("GET", "/roles?name=reader")["roles"][0]["id"]
            admin.call("PUT", f"/system/users/{ids['user:glance']}/roles/{reader}")
            if self.registered:
                limits = [
                    {"service_id": self._service_id, "region_id": _REGION,
                     "resource_name": name, "default_limit": value}
                    for name, value in self.registered.items()
                ]  # fmt: skip
                admin.call("POST", "/registered_limits", {"registered_limits": limits})
            self.glance.conf_overrides = {
                "DEFAULT": {"use_keystone_limits": "True"},
                "oslo_limit": {
                    "auth_url": self.keystone.url,
                    "auth_type": "password",
                    "user_domain_id": "default",
                    "username": "glance",
                    "password": USERS["glance"],
                    "system_scope": "all",
                    "endpoint_id": endpoint_id,
                    "region_name": _REGION,
                },
            }
            self.glance.start()
        except BaseException:
            self.stop()
            raise

    def _public_endpoint(self, admin: Keystone) -> str:
        endpoints = admin.call("GET", f"/endpoints?service_id={self._service_id}")["endpoints"]
        endpoint_id: str = next(e["id"] for e in endpoints if e["interface"] == "public")
        return endpoint_id

    def project(self, name: str, **limits: int) -> Project:
        """A new project ``name`` with user demo as a member and ``limits`` as its own (over the
        registered ones)."""
        unknown = set(limits) - set(RESOURCES)
        if unknown:
            raise ValueError(f"not a Glance limit: {', '.join(sorted(unknown))}")
        admin = Keystone(self.keystone.url)
        project = admin.call(
            "POST", "/projects", {"project": {"name": name, "domain_id": "default"}}
        )["project"]
        user = admin.call("GET", "/users?name=demo")["users"][0]["id"]
        member = admin.call("GET", "/roles?name=member")["roles"][0]["id"]
        admin.call("PUT", f"/projects/{project['id']}/users/{user}/roles/{member}")
        if limits:
            own = [
                {"service_id": self._service_id, "project_id": project["id"],
                 "region_id": _REGION, "resource_name": resource, "resource_limit": value}
                for resource, value in limits.items()
            ]  # fmt: skip
            admin.call("POST", "/limits", {"limits": own})
        env = {
            "OS_AUTH_URL": self.keystone.url,
            "OS_IDENTITY_API_VERSION": "3",
            "OS_USERNAME": "demo",
            "OS_PASSWORD": USERS["demo"],
            "OS_USER_DOMAIN_NAME": "Default",
            "OS_PROJECT_NAME": name,
            "OS_PROJECT_DOMAIN_ID": "default",
            "OS_REGION_NAME": _REGION,
            "OS_INTERFACE": "public",
        }
        return Project(name, project["id"], env)

    def api(self, project: Project) -> GlanceAPI:
        """Glance as user demo in ``project`` (a token scoped to it, valid for an hour)."""
        user = {"name": "demo", "domain": {"id": "default"}, "password": USERS["demo"]}
        scope = {"project": {"id": project.id}}
        body = {"auth": {"identity": {"methods": ["password"], "password": {"user": user}},
                         "scope": scope}}  # fmt: skip
        with httpx.Client(trust_env=False, timeout=30) as http:
            response = http.post(f"{self.keystone.url}/auth/tokens", json=body)
        response.raise_for_status()
        return GlanceAPI(
            self.glance.url, headers={"X-Auth-Token": response.headers["X-Subject-Token"]}
        )

    def stop(self) -> None:
        """Stop Glance and Keystone; idempotent."""
        for stop in (self.glance.stop, self.keystone.stop):
            with contextlib.suppress(Exception):
                stop()
