"""The ``glancefs`` command: parse options, build the client and the config, and hand over.

Conventions of the OpenStack CLIs: ``--os-*`` options with their ``OS_*`` variables, ``--debug``
for request lines (tokens redacted), ``--insecure``. Errors are one line on stderr and a non-zero
exit; Ctrl-C exits 130.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import pyfuse3
import trio

from ._client import Client
from ._exceptions import GlanceError
from ._version import __version__
from .config import ConfigError, MountConfig, View, parse_filter, parse_mount_options, parse_sort
from .mount import MountError, check_reachable, serve
from .xattrs import CONTAINER_FORMATS, DISK_FORMATS

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
    "insecure": ("insecure", True),
}
_GIVEN = (click.core.ParameterSource.COMMANDLINE, click.core.ParameterSource.ENVIRONMENT)
#: Parameters that can repeat (``-o tag=a,tag=b``).
_MULTIPLE = {"filter", "tag"}


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="glancefs")
def main() -> None:
    """Mount an OpenStack Glance image service as a filesystem."""


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
@click.option(
    "--os-image-url",
    envvar="OS_IMAGE_URL",
    metavar="URL",
    help="Glance endpoint; with --os-auth-token skips Keystone. [env: OS_IMAGE_URL]",
)
@click.option(
    "--os-auth-token",
    envvar="OS_AUTH_TOKEN",
    metavar="TOKEN",
    help="A token for --os-image-url. [env: OS_AUTH_TOKEN]",
)
@click.option(
    "--os-cacert",
    envvar="OS_CACERT",
    metavar="FILE",
    help="CA bundle to verify Glance's certificate. [env: OS_CACERT]",
)
@click.option("--os-cert", envvar="OS_CERT", metavar="FILE", help="Client certificate.")
@click.option("--os-key", envvar="OS_KEY", metavar="FILE", help="Client certificate's key.")
@click.option("--insecure", is_flag=True, help="Do not verify Glance's certificate.")
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
@click.option("--no-verify", is_flag=True, help="Do not check image data against its hash.")
@click.option("--uid", type=int, help="Owner shown for every file [default: you].")
@click.option("--gid", type=int, help="Group shown for every file [default: yours].")
@click.option("--allow-other", is_flag=True, help="Let other users use the mount.")
@click.option("--read-only", is_flag=True, help="Refuse every change (EROFS).")
@click.option("--allow-delete", is_flag=True, help="Let rm (and mv over an image) delete images.")
@click.option("--keep-failed", is_flag=True, help="Keep images whose upload failed.")
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
@click.pass_context
def mount(ctx: click.Context, /, mountpoint: Path, **params: Any) -> None:
    """Mount Glance at MOUNTPOINT (in the background unless -f)."""
    try:
        _apply_mount_options(ctx, params)
        config = _config_from(params)
    except ConfigError as error:
        raise click.UsageError(str(error)) from None
    mountpoint = mountpoint.absolute()
    options = set(pyfuse3.default_options) | {"fsname=glancefs", "subtype=glancefs"}
    if params["allow_other"]:
        options.add("allow_other")
    if params["insecure"]:
        click.echo("glancefs: warning: --insecure: Glance's certificate is not verified", err=True)

    def run(ready: Callable[[], None]) -> bool:
        return trio.run(_mount_and_serve, params, config, str(mountpoint), options, ready)

    if params["foreground"]:
        _setup_logging(params["debug"], None)
        sys.exit(_run_foreground(run))
    sys.exit(_run_background(run, params))


@main.command()
@click.argument("mountpoint", type=click.Path(exists=True, file_okay=False, path_type=Path))
def umount(mountpoint: Path) -> None:
    """Unmount a glancefs mount (the mount process then exits)."""
    command = ["fusermount3", "-u", str(mountpoint)]
    if shutil.which("fusermount3") is None:
        command = ["umount", str(mountpoint)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise click.ClickException(result.stderr.strip() or f"cannot unmount {mountpoint}")


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
        read_only=params["read_only"],
        allow_delete=params["allow_delete"],
        keep_failed=params["keep_failed"],
        default_formats=(params["disk_format"], params["container_format"]),
    )


def build_client(params: dict[str, Any]) -> Client:
    """The API client for the ``--os-*`` parameters."""
    url = params["os_image_url"]
    if not url:
        raise MountError("no Glance endpoint: set --os-image-url (OS_IMAGE_URL)")
    verify: bool | str = True
    if params["insecure"]:
        verify = False
    elif params["os_cacert"]:
        verify = params["os_cacert"]
    cert: str | tuple[str, str] | None = params["os_cert"]
    if params["os_cert"] and params["os_key"]:
        cert = (params["os_cert"], params["os_key"])
    return Client(
        url,
        params["os_auth_token"],
        timeout=params["timeout"],
        retries=params["retries"],
        verify=verify,
        cert=cert,
    )


async def _mount_and_serve(
    params: dict[str, Any],
    config: MountConfig,
    mountpoint: str,
    options: set[str],
    ready: Callable[[], None],
) -> bool:
    if not os.path.isdir(mountpoint):
        raise MountError(f"{mountpoint} is not a directory")
    if os.path.ismount(mountpoint):
        raise MountError(f"{mountpoint} is already a mount point")
    async with build_client(params) as client:
        try:
            await check_reachable(client)
        except GlanceError as error:
            endpoint = await client.auth.endpoint()
            raise MountError(f"cannot use Glance at {endpoint}: {error}") from None
        try:
            return await serve(client, config, mountpoint, options, ready)
        except RuntimeError as error:  # pyfuse3.init: /dev/fuse, permissions, options
            raise MountError(f"cannot mount {mountpoint}: {error}") from None


def _run_foreground(run: Callable[[Callable[[], None]], bool]) -> int:
    try:
        interrupted = run(lambda: None)
    except MountError as error:
        click.echo(f"glancefs: {error}", err=True)
        return 1
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    return EXIT_INTERRUPTED if interrupted else 0


def _run_background(run: Callable[[Callable[[], None]], bool], params: dict[str, Any]) -> int:
    """Fork; the parent waits until the child's mount is ready (exit 0) or failed (exit 1)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid:
        os.close(write_end)
        with os.fdopen(read_end, "rb") as pipe:
            message = pipe.read().decode(errors="replace")
        if message == "ready":
            return 0
        os.waitpid(pid, 0)
        click.echo(f"glancefs: {message or 'the mount process died'}", err=True)
        return 1
    os.close(read_end)
    os.setsid()
    log_file = (params["log_file"] or DEFAULT_LOG).expanduser()
    _setup_logging(params["debug"], log_file)
    _detach_stdio()

    pipe_open = True

    def tell_parent(message: str) -> None:
        nonlocal pipe_open
        if pipe_open:
            os.write(write_end, message.encode())
            os.close(write_end)
            pipe_open = False

    try:
        run(lambda: tell_parent("ready"))
    except MountError as error:
        log.error("%s", error)
        tell_parent(str(error))
        os._exit(1)
    except BaseException as error:
        log.exception("mount failed")
        tell_parent(f"mount failed: {error}")
        os._exit(1)
    os._exit(0)


def _detach_stdio() -> None:
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)
    os.chdir("/")


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
