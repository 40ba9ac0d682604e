"""Credentials for a mount: ``--os-*`` options, ``OS_*`` variables and clouds.yaml, as the
OpenStack CLIs take them, turned into an :class:`~glancefs.Auth` and TLS settings.

Three ways in, decided by :func:`load`:

* ``--os-image-url`` with ``--os-auth-token`` (as python-glanceclient): that endpoint and token,
  no Keystone. ``--os-image-url`` alone, and nothing that asks for Keystone: an unauthenticated
  Glance.
* Anything else goes through Keystone with openstacksdk's config loader (``openstack.config``),
  the one the ``openstack`` CLI uses: clouds.yaml and secure.yaml from the usual places
  (``--os-cloud``/``OS_CLOUD``, or the only cloud there is), ``OS_*`` variables (an openrc file),
  vendor profiles, and the ``--os-*`` options on top, which win. It yields a keystoneauth1 session;
  the image endpoint then comes from the service catalog unless ``--os-image-url`` overrides it.

Why openstacksdk rather than keystoneauth1's loading plus our own YAML read: the semantics users
rely on (search path, secure.yaml merged in, profiles, ``project_name``/``tenant_name`` aliases,
``domain_id`` spread to user and project, ``auth_type`` chosen from what is given, region and
interface per service, ``verify``/``cacert``/``cert``/``key``) are several hundred lines there and
would drift if copied; os-client-config is now only a shim over it. The price, about 0.3 s of
import and 16 MB of memory, is paid only by mounts that use Keystone: the import happens here, on
demand.

Nothing here talks to the network: the first token is fetched when the client first asks for
headers, in a worker thread (see :class:`~glancefs.SessionAuth`). A password prompt happens here,
before the CLI forks into the background.
"""

from __future__ import annotations

import argparse
import os
import ssl
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from . import Auth, SessionAuth, TokenAuth
from .plumbing import redact, tls_context

__all__ = ["TLS", "Credentials", "CredentialsError", "hide_from_ps", "load"]

#: ``--os-*`` parameters handed to openstack.config as if parsed by the ``openstack`` CLI.
KEYSTONE_PARAMS = (
    "os_auth_url",
    "os_auth_type",
    "os_username",
    "os_user_id",
    "os_password",
    "os_token",
    "os_auth_token",
    "os_project_name",
    "os_project_id",
    "os_tenant_name",
    "os_tenant_id",
    "os_user_domain_name",
    "os_user_domain_id",
    "os_project_domain_name",
    "os_project_domain_id",
    "os_region_name",
    "os_interface",
    "os_cacert",
    "os_cert",
    "os_key",
)
#: Parameters that mean "use Keystone" even beside ``--os-image-url``.
_KEYSTONE_HINTS = (
    "os_cloud",
    "os_auth_url",
    "os_auth_type",
    "os_username",
    "os_user_id",
    "os_password",
    "os_token",
)
#: Keys of a keystoneauth1 plugin's options whose values are secret.
_SECRET_KEYS = ("password", "token", "application_credential_secret", "passcode", "secret")

Prompt = Callable[[str], str]


class CredentialsError(Exception):
    """The credentials could not be put together; the message is one line for the user."""


@dataclass(frozen=True)
class TLS:
    """How to check Glance's (and Keystone's) certificate, and which one to show.

    ``verify`` is True (the default CA bundle), False (``--insecure``) or a CA bundle's path;
    ``cert`` and ``key`` a client certificate and its key (``key`` may be inside ``cert``).
    """

    verify: bool | str = True
    cert: str | None = None
    key: str | None = None

    def ssl_context(self) -> ssl.SSLContext | bool:
        """What httpx takes as ``verify``; raises :class:`CredentialsError` on unusable files."""
        files = {"--os-cacert": self.verify, "--os-cert": self.cert, "--os-key": self.key}
        for option, path in files.items():
            if isinstance(path, str) and not os.path.isfile(path):
                raise CredentialsError(f"{option} {path}: no such file")
        try:
            return tls_context(self.verify, (self.cert, self.key) if self.cert else None)
        except (OSError, ssl.SSLError) as error:
            what = self.cert if self.cert and not isinstance(self.verify, str) else self.verify
            raise CredentialsError(f"cannot load certificates ({what}): {error}") from None


@dataclass(frozen=True)
class Credentials:
    """Where requests go and how they authenticate; ``source`` names it for messages."""

    auth: Auth
    tls: TLS
    source: str


def load(params: Mapping[str, Any], *, prompt: Prompt | None = None) -> Credentials:
    """Credentials from the CLI's parameters (click has already folded ``OS_*`` into them).

    ``prompt`` asks for a missing password (``None``: no terminal, a missing password is an
    error). Raises :class:`CredentialsError`.
    """
    image_url = params.get("os_image_url")
    wants_keystone = any(params.get(name) for name in _KEYSTONE_HINTS)
    if image_url and (params.get("os_auth_token") or not wants_keystone):
        tls = _cli_tls(params)
        tls.ssl_context()  # unusable certificate files fail now, in one line
        token = params.get("os_auth_token") or None
        source = "--os-image-url and --os-auth-token" if token else "--os-image-url"
        return Credentials(TokenAuth(image_url, token), tls, source)
    return _keystone(params, prompt, wants_keystone)


def _cli_tls(params: Mapping[str, Any]) -> TLS:
    verify: bool | str = True
    if params.get("insecure"):
        verify = False
    elif params.get("os_cacert"):
        verify = os.path.expanduser(params["os_cacert"])
    cert, key = params.get("os_cert"), params.get("os_key")
    return TLS(
        verify,
        os.path.expanduser(cert) if cert else None,
        os.path.expanduser(key) if key else None,
    )


class _NoTerminal(Exception):
    """A password is needed and there is nobody to ask."""


def _keystone(params: Mapping[str, Any], prompt: Prompt | None, hinted: bool) -> Credentials:
    given = {name: params[name] for name in KEYSTONE_PARAMS if params.get(name)}
    if params.get("insecure"):
        given["insecure"] = True
        given.pop("os_cacert", None)  # else openstack.config warns that it is ignored
    secrets = [
        str(v) for k, v in given.items() if k in ("os_password", "os_token", "os_auth_token")
    ]
    cloud = params.get("os_cloud") or None
    config, region, session, (verify, cert) = _open_cloud(
        cloud, hinted, given, _asker(prompt), secrets
    )
    auth_options = region.config.get("auth") or {}
    secrets += [str(v) for k, v in auth_options.items() if k in _SECRET_KEYS and v]
    if session.timeout is None:
        session.timeout = float(params.get("timeout") or 30.0)
    if isinstance(cert, tuple):
        tls = TLS(verify if verify is not None else True, cert[0], cert[1])
    else:
        tls = TLS(verify if verify is not None else True, cert)
    tls.ssl_context()
    interface = region.get_interface("image") or "public"
    auth = SessionAuth(
        session,
        interface=interface,
        region_name=region.get_region_name("image") or None,
        endpoint_override=params.get("os_image_url") or region.get_endpoint("image"),
        secrets=secrets,
    )
    return Credentials(auth, tls, _source(cloud, region, config))


def _asker(ask_user: Prompt | None) -> Callable[..., str]:
    """openstack.config's ``pw_func``: asks ``ask_user`` (None: raises :class:`_NoTerminal`)."""

    def ask(prompt: str | None = None) -> str:  # the name is openstack.config's
        if ask_user is None:
            raise _NoTerminal(prompt)
        return ask_user(prompt or "Password: ")

    return ask


def _open_cloud(
    cloud: str | None,
    hinted: bool,
    given: dict[str, Any],
    ask: Callable[..., str],
    secrets: list[str],
) -> tuple[Any, Any, Any, tuple[Any, Any]]:
    """:func:`_load_cloud`, and the cloud region's TLS arguments for requests, with every error
    of openstacksdk and keystoneauth1 as one :class:`CredentialsError` line without ``secrets``."""
    from keystoneauth1 import exceptions as ks_exceptions
    from openstack import exceptions as sdk_exceptions

    try:
        with warnings.catch_warnings():
            # openstacksdk's deprecation notes (metrics backends...) are nothing the user did
            warnings.simplefilter("ignore")
            config, region, session = _load_cloud(cloud, hinted, given, ask)
            return config, region, session, region.get_requests_verify_args()
    except CredentialsError:
        raise
    except _NoTerminal:
        raise CredentialsError(
            "no password: put it in clouds.yaml (or secure.yaml) or OS_PASSWORD, "
            "or run glancefs on a terminal to be asked for it"
        ) from None
    except ks_exceptions.MissingRequiredOptions as error:
        names = ", ".join(_option_name(opt.dest or opt.name) for opt in error.options)
        raise CredentialsError(f"incomplete credentials{_where(cloud)}: missing {names}") from None
    except ks_exceptions.NoMatchingPlugin as error:
        raise CredentialsError(f"unknown auth type {error.name!r}") from None
    except sdk_exceptions.ConfigException as error:
        raise CredentialsError("clouds.yaml: " + redact(str(error), secrets)) from None
    except (ks_exceptions.ClientException, ValueError) as error:
        raise CredentialsError(redact(str(error), secrets)) from None


def _source(cloud: str | None, region: Any, config: Any) -> str:
    """Where the credentials came from, as messages name them (:attr:`Credentials.source`)."""
    if cloud:
        return f"cloud {cloud!r}"
    if region.name == config.envvar_key:
        return "OS_* variables"
    if region.name and region.name != "defaults":
        return f"cloud {region.name!r}"
    return "--os-* options"


def _load_cloud(
    cloud: str | None, hinted: bool, given: dict[str, Any], ask: Any
) -> tuple[Any, Any, Any]:
    """openstack.config's view of the cloud: (config, cloud region, keystoneauth1 session)."""
    from openstack.config.loader import OpenStackConfig

    from . import __version__

    class Config(OpenStackConfig):
        def auth_config_hook(self, config: dict[str, Any]) -> dict[str, Any]:
            return _only_plugin_options(config)

    config = Config(pw_func=ask, app_name="glancefs", app_version=__version__)
    if cloud is None and not hinted and config.default_cloud == "defaults":
        raise CredentialsError(
            "no credentials: use --os-cloud (OS_CLOUD) with a clouds.yaml, OS_* variables "
            "(an openrc file), or --os-image-url"
        )
    region = config.get_one(cloud=cloud, argparse=argparse.Namespace(**given))
    return config, region, region.get_session()


def _only_plugin_options(config: dict[str, Any]) -> dict[str, Any]:
    """Drop auth settings the chosen plugin does not take.

    An openrc sets ``OS_USER_DOMAIN_NAME`` for password auth; with ``--os-auth-type v3token`` it
    must not reach the token plugin, which would refuse it (TypeError).
    """
    from keystoneauth1 import exceptions, loading

    auth_type = config.get("auth_type")
    if not auth_type or not isinstance(config.get("auth"), dict):
        return config
    try:
        options = loading.get_plugin_loader(auth_type).get_options()
    except exceptions.NoMatchingPlugin:
        return config  # reported by openstack.config right after
    names = {o.dest for o in options} | {d.dest for o in options for d in o.deprecated}
    config["auth"] = {k: v for k, v in config["auth"].items() if k in names}
    return config


def _option_name(dest: str) -> str:
    name = dest.replace("_", "-")
    return f"--os-{name} (OS_{name.replace('-', '_').upper()})"


def _where(cloud: str | None) -> str:
    return f" for cloud {cloud!r}" if cloud else ""


def hide_from_ps(secrets: Iterable[str]) -> bool:
    """Replace each secret in this process's command line, as ``ps`` shows it, by ``***``.

    The kernel serves ``/proc/PID/cmdline`` from the process's own memory (the argument area
    between ``arg_start`` and ``arg_end`` of ``/proc/self/stat``), and a process may write its own
    memory through ``/proc/self/mem``: the arguments are rewritten in place, NUL-padded, so neither
    the secret nor its length shows. No re-exec (which would cost a second interpreter start and
    put the secret into the environment instead) and no C extension. ``sys.argv`` is a copy and
    is not affected. The secret is visible from the exec until this runs (a fraction of a second),
    which is why the CLI warns about passwords on the command line. Returns False when it could
    not be done (no procfs, or writing one's memory is forbidden).
    """
    wanted = [s.encode() for s in secrets if s]
    if not wanted:
        return True
    try:
        with open("/proc/self/stat", "rb") as f:
            stat = f.read()
        fields = stat[stat.rfind(b")") + 2 :].split()
        start, end = int(fields[45]), int(fields[46])  # fields 48 and 49: arg_start, arg_end
        with open("/proc/self/mem", "r+b", buffering=0) as mem:
            mem.seek(start)
            area = mem.read(end - start)
            args = area.rstrip(b"\0").split(b"\0")
            for i, arg in enumerate(args):
                for secret in wanted:
                    arg = arg.replace(secret, b"***")
                args[i] = arg
            new = b"\0".join(args)
            if new == area.rstrip(b"\0"):
                return True
            new += b"\0" * (len(area) - len(new))
            mem.seek(start)
            mem.write(new)
    except (OSError, ValueError, IndexError):
        return False
    return True
