"""The ``glancefs`` command: parse options, build the client and the config, and hand over.

Conventions of the OpenStack CLIs: ``--os-*`` options with their ``OS_*`` variables, ``--debug``
for request lines (tokens redacted), ``--insecure``. Errors are one line on stderr and a non-zero
exit; Ctrl-C exits 130.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import trio

from . import AuthError, CertificateError, Client, GlanceError, __version__
from .credentials import Credentials, CredentialsError, hide_from_ps
from .credentials import load as load_credentials
from .fs import control
from .fs.cache import CacheError, DataCache
from .fs.config import (
    ConfigError,
    MountConfig,
    View,
    parse_cache_options,
    parse_filter,
    parse_mount_options,
    parse_size,
    parse_sort,
)
from .fs.daemon import run_in_background
from .fs.fstab import mount_argv
from .fs.metrics import parse_address
from .fs.mount import (
    MountError,
    check_import,
    check_mountpoint,
    check_reachable,
    check_store,
    fuse_options,
    limit_to_credentials,
    notify_systemd,
    serve,
)
from .fs.status import STATUS
from .fs.xattrs import CONTAINER_FORMATS, DISK_FORMATS

log = logging.getLogger("glancefs")

EXIT_INTERRUPTED = 130
DEFAULT_LOG = Path("~/.local/state/glancefs/glancefs.log")

#: ``-o`` flags and the parameters they set.
_OPTION_FLAGS = {
    "ro": ("read_only", True),
    "read_only": ("read_only", True),
    "allow_other": ("allow_other", True),
    "debug": ("debug", True),
    "foreground": ("foreground", True),
    "no_verify": ("no_verify", True),
    "direct_io": ("direct_io", True),
    "insecure": ("insecure", True),
    "cache_dir": ("cache_dir", ""),  # -o cache_dir: the default directory
    "import": ("import_uploads", True),
}
_GIVEN = (click.core.ParameterSource.COMMANDLINE, click.core.ParameterSource.ENVIRONMENT)
#: Parameters that can repeat (``-o tag=a,tag=b``).
_MULTIPLE = {"filter", "tag"}


def _os_option(flag: str, metavar: str, help: str) -> Callable[[Any], Any]:
    """An ``--os-*`` option read from its ``OS_*`` variable too, as the OpenStack CLIs do."""
    envvar = flag.lstrip("-").replace("-", "_").upper()
    return click.option(flag, envvar=envvar, metavar=metavar, help=f"{help} [env: {envvar}]")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="glancefs")
def main() -> None:
    """Mount an OpenStack Glance image service as a filesystem."""


def run() -> None:
    """The ``glancefs`` program: the click commands, and the form mount(8) uses for fstab.

    An fstab line ``CLOUD MOUNTPOINT fuse.glancefs OPTIONS`` makes mount.fuse3 run
    ``glancefs CLOUD MOUNTPOINT -o OPTIONS``: that becomes ``glancefs mount MOUNTPOINT -o
    OPTIONS --os-cloud CLOUD`` (no ``--os-cloud`` for the source ``none``).
    """
    main(args=mount_argv(sys.argv[1:], main.commands), prog_name="glancefs")


@main.command()
@click.argument("mountpoint", type=click.Path(file_okay=False, path_type=Path))
@click.option("-f", "--foreground", is_flag=True, help="Stay in the foreground; log to stderr.")
@click.option(
    "-o",
    "options",
    multiple=True,
    metavar="OPT[,OPT...]",
    help="Mount options as mount(8) passes them: ro, allow_other, sort=..., ...",
)
@click.option("--debug", is_flag=True, help="Log one line per request (tokens redacted).")
@click.option(
    "--log-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help=f"Where a background mount logs [default: {DEFAULT_LOG}].",
)
@_os_option("--os-cloud", "NAME", "Cloud in clouds.yaml to take the credentials from.")
@_os_option("--os-auth-url", "URL", "Keystone (identity) URL.")
@_os_option(
    "--os-auth-type",
    "TYPE",
    "password, token, v3password, v3token, ... [default: from what is given]",
)
@_os_option("--os-username", "NAME", "User name.")
@_os_option("--os-user-id", "ID", "User id.")
@_os_option(
    "--os-password",
    "PASSWORD",
    "Password; better in clouds.yaml/secure.yaml or OS_PASSWORD (asked for on a terminal).",
)
@_os_option("--os-token", "TOKEN", "Keystone token for token auth.")
@_os_option("--os-project-name", "NAME", "Project to scope to.")
@_os_option("--os-project-id", "ID", "Project id to scope to.")
@_os_option("--os-tenant-name", "NAME", "Old name of --os-project-name.")
@_os_option("--os-tenant-id", "ID", "Old name of --os-project-id.")
@_os_option("--os-user-domain-name", "NAME", "Domain of the user.")
@_os_option("--os-user-domain-id", "ID", "Domain id of the user.")
@_os_option("--os-project-domain-name", "NAME", "Domain of the project.")
@_os_option("--os-project-domain-id", "ID", "Domain id of the project.")
@_os_option("--os-region-name", "REGION", "Region of the image endpoint in the catalog.")
@_os_option("--os-interface", "INTERFACE", "public, internal or admin endpoint [default: public].")
@_os_option(
    "--os-image-url",
    "URL",
    "Glance endpoint (skips the catalog); with --os-auth-token it also skips Keystone.",
)
@_os_option(
    "--os-auth-token",
    "TOKEN",
    "A token: for --os-image-url without Keystone, else for Keystone token auth.",
)
@_os_option("--os-cacert", "FILE", "CA bundle to verify Glance's and Keystone's certificates.")
@_os_option("--os-cert", "FILE", "Client certificate (PEM).")
@_os_option("--os-key", "FILE", "Client certificate's key (PEM).")
@click.option(
    "--insecure",
    is_flag=True,
    envvar="OS_INSECURE",
    help="Do not verify certificates (a warning says so). [env: OS_INSECURE]",
)
@click.option(
    "--sort",
    default="name:asc",
    show_default=True,
    metavar="KEY[:DIR],...",
    help="Order of the root directory (Glance sort keys).",
)
@click.option(
    "--filter",
    "filters",
    multiple=True,
    metavar="KEY=VALUE",
    help="Show only matching images in the root (repeatable).",
)
@click.option("--tag", "tags", multiple=True, help="Show only images with this tag (repeatable).")
@click.option("--limit", type=click.IntRange(min=1), help="Show at most N images in the root.")
@click.option(
    "--metadata-ttl",
    type=click.FloatRange(min=0),
    default=1.0,
    show_default=True,
    help="Seconds image attributes are cached.",
)
@click.option(
    "--listing-ttl",
    type=click.FloatRange(min=0),
    default=5.0,
    show_default=True,
    help="Seconds directory listings are cached.",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0.1),
    default=30.0,
    show_default=True,
    help="Seconds to wait for Glance before a request fails (EIO).",
)
@click.option(
    "--retries",
    type=click.IntRange(min=0),
    default=3,
    show_default=True,
    help="Retries of idempotent requests after a network failure.",
)
@click.option(
    "--max-connections",
    type=click.IntRange(min=1),
    default=MountConfig.max_connections,
    show_default=True,
    help="Requests to Glance in flight at once (downloads and uploads included).",
)
@click.option("--no-verify", is_flag=True, help="Do not check image data against its hash.")
@click.option(
    "--direct-io",
    is_flag=True,
    help="Serve image data past the page cache: for images read once (faster, keeps the "
    "host's memory for others); nothing is cached, mmap(MAP_SHARED) fails (ENODEV).",
)
@click.option("--uid", type=int, help="Owner shown for every file [default: you].")
@click.option("--gid", type=int, help="Group shown for every file [default: yours].")
@click.option("--allow-other", is_flag=True, help="Let other users use the mount.")
@click.option("--read-only", is_flag=True, help="Refuse every change (EROFS).")
@click.option("--allow-delete", is_flag=True, help="Let rm (and mv over an image) delete images.")
@click.option("--keep-failed", is_flag=True, help="Keep images whose upload failed.")
@click.option(
    "--store",
    metavar="ID",
    help="The store uploads and web-downloads (ln -s URL new/NAME) go to, one of those "
    "GET /v2/info/stores lists (checked at mount) [default: Glance's default store].",
)
@click.option(
    "--import",
    "import_uploads",
    is_flag=True,
    help="Upload by interoperable import: stage the data, then import it with glance-direct "
    "(the cloud's import plugins run, e.g. conversion to raw); the last close waits for the "
    "import to end. Without it, uploads import where Glance refuses them by policy.",
)
@click.option(
    "--spool-dir",
    type=click.Path(file_okay=False, exists=True, path_type=Path),
    help="The spool: where reads of images on stores without ranges (rbd, swift) keep their "
    "download, and uploads whose writer goes back (qemu-img) their data. Given, it also spools "
    "every upload from its first byte: writes at any offset, sent on close "
    "[default: $XDG_CACHE_HOME/glancefs/spool, /var/cache/glancefs/spool for root].",
)
@click.option(
    "--spool-size",
    metavar="SIZE",
    default="16G",
    show_default=True,
    help="Bound of the spool, reads and uploads together: 500M, 10G (powers of 1024). An "
    "image that does not fit is read only sequentially from its start, and a write that would "
    "make a spooled upload larger fails (EFBIG).",
)
@click.option(
    "--cache-dir",
    is_flag=False,
    flag_value="",
    metavar="[DIR]",
    help="Keep image data in a persistent cache in DIR (0700), keyed by the image hash "
    "[DIR default: $XDG_CACHE_HOME/glancefs, /var/cache/glancefs for root]. Put it after "
    "MOUNTPOINT, or give DIR: a bare --cache-dir takes the next word as DIR.",
)
@click.option(
    "--cache-size",
    metavar="SIZE",
    help="Bound of the cache: 500M, 10G (powers of 1024); least recently used out "
    "[default: 10% of the free space, with what the cache holds, at mount].",
)
@click.option(
    "--cache-fill",
    is_flag=True,
    help="Fetch an image read at random completely into the cache, then verify it.",
)
@click.option(
    "--disk-format",
    type=click.Choice(sorted(DISK_FORMATS)),
    default="raw",
    show_default=True,
    help="Disk format of uploads that content and name don't tell.",
)
@click.option(
    "--container-format",
    type=click.Choice(sorted(CONTAINER_FORMATS)),
    default="bare",
    show_default=True,
    help="Container format of such uploads.",
)
@click.option(
    "--metrics-addr",
    metavar="HOST:PORT",
    help="Serve Prometheus metrics at http://HOST:PORT/metrics (e.g. 127.0.0.1:9464).",
)
@click.pass_context
def mount(ctx: click.Context, /, mountpoint: Path, **params: Any) -> None:
    """Mount Glance at MOUNTPOINT (in the background unless -f)."""
    mountpoint = mountpoint.absolute()
    try:
        _apply_mount_options(ctx, params)
        config = _config_from(params)
        if config.cache is not None and config.cache.directory.resolve().is_relative_to(
            mountpoint.resolve()
        ):
            raise ConfigError(f"--cache-dir: {config.cache.directory} is inside the mount")
        if params["metrics_addr"] is not None:
            params["metrics_addr"] = parse_address(params["metrics_addr"])
    except ConfigError as error:
        raise click.UsageError(str(error)) from None
    options = fuse_options(allow_other=params["allow_other"])
    credentials = _credentials(params)

    def run(ready: Callable[[], None]) -> bool:
        check_mountpoint(str(mountpoint))
        return trio.run(
            _mount_and_serve, params, credentials, config, str(mountpoint), options, ready
        )

    if params["foreground"]:
        _setup_logging(params["debug"], None)
        sys.exit(_run_foreground(run))
    log_file = (params["log_file"] or DEFAULT_LOG).expanduser()
    try:
        run_in_background(run, lambda: _setup_logging(params["debug"], log_file))
    except MountError as error:
        click.echo(f"glancefs: {error}", err=True)
        sys.exit(1)
    sys.exit(0)


@main.command()
@click.argument("mountpoint", type=click.Path(file_okay=False, path_type=Path))
def umount(mountpoint: Path) -> None:
    """Unmount a glancefs mount (the mount process then exits).

    A dead mount (its process was killed: the mountpoint answers ENOTCONN) is lazily unmounted
    (fusermount3 -uz), and glancefs says so.
    """
    path = os.path.abspath(mountpoint)
    dead = control.mountpoint_errno(path) == errno.ENOTCONN
    if not dead and not mountpoint.is_dir():
        raise click.ClickException(f"{mountpoint}: no such directory")
    command = ["fusermount3", "-uz" if dead else "-u", path]
    if shutil.which("fusermount3") is None:
        command = ["umount", *(["-l"] if dead else []), path]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise click.ClickException(result.stderr.strip() or f"cannot unmount {mountpoint}")
    control.remove_stale_socket(path)
    if dead:
        click.echo(
            f"glancefs: {mountpoint} was dead (transport endpoint is not connected: its process "
            "is gone); lazily unmounted",
            err=True,
        )


@main.command()
@click.argument("mountpoints", nargs=-1, type=click.Path(path_type=Path), metavar="[MOUNTPOINT]...")
@click.option("--json", "as_json", is_flag=True, help="One JSON list of the mounts, for scripts.")
@click.option("--watch", is_flag=True, help="Redraw every --interval seconds, with progress bars.")
@click.option(
    "--interval",
    type=click.FloatRange(min=0.1),
    default=1.0,
    show_default=True,
    help="Seconds between redraws of --watch.",
)
def status(mountpoints: tuple[Path, ...], as_json: bool, watch: bool, interval: float) -> None:
    """Show what glancefs mounts are doing: endpoint, options, transfers, errors.

    Without MOUNTPOINT: every glancefs mount of this user. Exits 0 when every mount answers and
    is healthy, 1 when one is dead (ENOTCONN), unhealthy (Glance failing) or unreachable.
    """
    try:
        while True:
            probes = control.probe_mounts([str(m) for m in mountpoints])
            if as_json:
                text = json.dumps([p.as_dict() for p in probes], indent=2)
            else:
                text = "\n\n".join(p.text(bars=watch) for p in probes) or "no glancefs mounts"
            if watch:
                click.clear()
            click.echo(text)
            if not watch:
                break
            time.sleep(interval)
    except KeyboardInterrupt:
        sys.exit(EXIT_INTERRUPTED)
    sys.exit(0 if all(p.ok for p in probes) else 1)


def _apply_mount_options(ctx: click.Context, params: dict[str, Any]) -> None:
    """Fold ``-o`` options into the parameters; options given on the command line win."""
    from_o: dict[str, Any] = {}
    for text in params.pop("options"):
        for name, value in parse_mount_options(text):
            if value is None:
                target, flag = _OPTION_FLAGS.get(name, (name, True))
                from_o[target] = flag
            elif name in _MULTIPLE:
                from_o.setdefault(name + "s", []).append(value)
            else:
                from_o[name] = value
    for name, value in from_o.items():
        if name not in params:
            raise ConfigError(f"-o {name}: unknown option")
        source = ctx.get_parameter_source(name)
        if source in (
            click.core.ParameterSource.COMMANDLINE,
            click.core.ParameterSource.ENVIRONMENT,
        ):
            continue
        param = next(p for p in ctx.command.params if p.name == name)
        params[name] = (
            tuple(value) if isinstance(value, list) else param.type_cast_value(ctx, value)
        )


def _config_from(params: dict[str, Any]) -> MountConfig:
    view = View(
        sort=parse_sort(params["sort"]),
        filters=tuple(parse_filter(f) for f in params["filters"]),
        tags=tuple(params["tags"]),
        limit=params["limit"],
    )
    return MountConfig(
        view=view,
        metadata_ttl=params["metadata_ttl"],
        listing_ttl=params["listing_ttl"],
        uid=os.getuid() if params["uid"] is None else params["uid"],
        gid=os.getgid() if params["gid"] is None else params["gid"],
        verify=not params["no_verify"],
        direct_io=params["direct_io"],
        read_only=params["read_only"],
        allow_delete=params["allow_delete"],
        keep_failed=params["keep_failed"],
        store=params["store"],
        import_uploads=params["import_uploads"],
        default_formats=(params["disk_format"], params["container_format"]),
        spool_dir=params["spool_dir"],
        spool_size=parse_size(params["spool_size"], "--spool-size"),
        max_connections=params["max_connections"],
        cache=parse_cache_options(params["cache_dir"], params["cache_size"], params["cache_fill"]),
    )


def _credentials(params: dict[str, Any]) -> Credentials:
    """Credentials for the mount; secrets given as arguments are hidden from ``ps`` first."""
    given = [params[n] for n in ("os_password", "os_token", "os_auth_token") if params.get(n)]
    argv = sys.argv[1:]
    on_command_line = [secret for secret in given if any(secret in arg for arg in argv)]
    if on_command_line:
        hidden = hide_from_ps(on_command_line)
        if params.get("os_password") in on_command_line:
            click.echo(
                "glancefs: warning: a password on the command line can be seen by other users "
                f"{'until glancefs hides it' if hidden else '(ps)'} and stays in shell history; "
                "put it in clouds.yaml (secure.yaml) and use --os-cloud, or set OS_PASSWORD",
                err=True,
            )
    prompt = _ask if sys.stdin is not None and sys.stdin.isatty() else None
    try:
        credentials = load_credentials(params, prompt=prompt)
    except CredentialsError as error:
        click.echo(f"glancefs: {error}", err=True)
        sys.exit(1)
    if credentials.tls.verify is False:
        click.echo("glancefs: warning: --insecure: certificates are not verified", err=True)
    return credentials


def _ask(prompt: str) -> str:
    return str(click.prompt(prompt.strip().rstrip(":"), hide_input=True, err=True))


def build_client(credentials: Credentials, params: dict[str, Any]) -> Client:
    """The API client for the credentials and the ``--timeout``/``--retries`` parameters."""
    try:
        verify = credentials.tls.ssl_context()
    except CredentialsError as error:
        raise MountError(str(error)) from None
    return Client(
        auth=credentials.auth,
        timeout=params["timeout"],
        retries=params["retries"],
        verify=verify,
        max_connections=params["max_connections"],
        on_request=STATUS.request,
    )


async def _explain(client: Client, credentials: Credentials, error: GlanceError) -> str:
    """The one line saying why Glance could not be used, with a hint for what the user can do."""
    text = f"cannot authenticate ({credentials.source}): {error}"
    if not isinstance(error, AuthError):
        # When the catalog itself fails, the error is about Keystone.
        with contextlib.suppress(GlanceError):
            text = f"cannot use Glance at {await client.auth.endpoint()}: {error}"
    if isinstance(error, CertificateError):
        text += " (give the CA with --os-cacert, or skip the check with --insecure)"
    return text


async def _mount_and_serve(
    params: dict[str, Any],
    credentials: Credentials,
    config: MountConfig,
    mountpoint: str,
    options: set[str],
    ready: Callable[[], None],
) -> bool:
    cache = await _open_cache(config)
    try:
        async with build_client(credentials, params) as client:
            try:
                await check_reachable(client)
                config = await limit_to_credentials(client, config)
                await check_store(client, config.store)
                await check_import(client, config)
            except GlanceError as error:
                raise MountError(await _explain(client, credentials, error)) from None
            return await serve(
                client,
                config,
                mountpoint,
                options,
                ready,
                cache,
                metrics_addr=params["metrics_addr"],
            )
    finally:
        if cache is not None:
            log.info("cache %s at unmount: %s", cache.directory, cache.stats())
            cache.close()


async def _open_cache(config: MountConfig) -> DataCache | None:
    """Lock and index ``--cache-dir`` before anything else: a directory another mount uses, or
    one open to other users, fails the mount with one line (the cache must not be shared)."""
    if config.cache is None:
        return None
    try:
        return await trio.to_thread.run_sync(
            DataCache.open, config.cache.directory, config.cache.max_bytes
        )
    except CacheError as error:
        raise MountError(str(error)) from None


def _run_foreground(run: Callable[[Callable[[], None]], bool]) -> int:
    try:
        interrupted = run(notify_systemd)
    except MountError as error:
        click.echo(f"glancefs: {error}", err=True)
        return 1
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    return EXIT_INTERRUPTED if interrupted else 0


def _setup_logging(debug: bool, log_file: Path | None) -> None:
    handler: logging.Handler
    if log_file is None:
        handler = logging.StreamHandler(sys.stderr)
    else:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(log_file)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    logging.getLogger("glancefs").setLevel(logging.DEBUG if debug else logging.INFO)
    # Keystone's requests too with --debug (keystoneauth1 redacts them itself); without it, not
    # even its warnings: what matters reaches the user as glancefs's own one-line errors.
    logging.getLogger("keystoneauth").setLevel(logging.DEBUG if debug else logging.ERROR)
