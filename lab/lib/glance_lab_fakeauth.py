"""Paste filter for tests: pretend keystonemiddleware validated a token.

Loaded by Glance (inside its own venv, via gunicorn --pythonpath), never by glancefs.
Sets the X-Identity-Status/X-Project-Id/X-User-Id/X-Roles headers that
keystonemiddleware would set (client-supplied values win, so a test can act
as another project by sending X-Project-Id itself).  Glance's stock
ContextMiddleware ("context" filter) then builds a normal, project-scoped
RequestContext, so owner is set and tasks/import/metadefs work.
"""

from collections.abc import Callable, Iterable
from typing import Any

from oslo_config import cfg  # type: ignore[import-not-found]  # in Glance's venv

# The option keystonemiddleware's auth plugin would register: Glance reads it to proxy an import
# to the node that holds the staged data (its worker_self_reference_url), with the request's own
# token (the lab's GlanceServer sets it for this flavor).
cfg.CONF.register_opts([cfg.StrOpt("auth_url")], group="keystone_authtoken")

WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


def filter_factory(
    global_conf: dict[str, str],
    project_id: str = "glancefs-test",
    user_id: str = "glancefs-user",
    roles: str = "admin,member,reader",
    **local_conf: str,
) -> Callable[[WsgiApp], WsgiApp]:
    """Paste entry point: returns the filter wrapping Glance's pipeline."""
    defaults = {
        "HTTP_X_IDENTITY_STATUS": "Confirmed",
        "HTTP_X_PROJECT_ID": project_id,
        "HTTP_X_TENANT_ID": project_id,
        "HTTP_X_USER_ID": user_id,
        "HTTP_X_ROLES": roles,
    }

    def _filter(app: WsgiApp) -> WsgiApp:
        def middleware(
            environ: dict[str, Any], start_response: Callable[..., Any]
        ) -> Iterable[bytes]:
            if environ.get("HTTP_X_PROJECT_ID"):
                environ.setdefault("HTTP_X_TENANT_ID", environ["HTTP_X_PROJECT_ID"])
            for k, v in defaults.items():
                environ.setdefault(k, v)
            environ["HTTP_X_IDENTITY_STATUS"] = "Confirmed"
            return app(environ, start_response)

        return middleware

    return _filter
