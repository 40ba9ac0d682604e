"""The glancefs(1) man page, generated from the click commands: ``python -m glancefs.manpage``.

``make install`` runs it, so the page lists exactly the options ``--help`` shows (a test checks
that too). The sections that no option tells (layout, fstab, systemd, errno table) are written
here once.
"""

from __future__ import annotations

import datetime
import sys

import click

from . import __version__
from .cli import main

__all__ = ["manpage"]

_LAYOUT = [
    ("MOUNTPOINT/", "one file per image (--sort, --filter, --tag, --limit choose which)"),
    ("by-id/", "every image you may see, named by id"),
    ("by-tag/TAG/", "images with that tag"),
    ("new/", "create files here to create images; queued images; images just uploaded"),
]

#: errno, what the user did, why glancefs refuses (SEMANTICS.md has every operation).
_ERRNOS = [
    ("ENOENT", "a name or image that does not exist (Glance 404)"),
    ("EACCES", "open of an image that is not active (killed, saving, ...); write to an image "
     "that is not queued; a token Glance refuses (401)"),
    ("EPERM", "rm without --allow-delete or of a protected image; create outside new/; mkdir, "
     "rmdir, symlink, link, mknod; setfattr of a read-only field; Glance 403"),
    ("EROFS", "any change on a read-only mount (--read-only, or credentials with only the "
     "reader role)"),
    ("EINVAL", "a write behind the data already streamed to Glance (without --spool-dir); a "
     "name Glance cannot store; a bad attribute value (Glance 400)"),
    ("EFBIG", "a read or an upload that needs more of the spool than --spool-size leaves"),
    ("EBUSY", "an open for writing of an image another process is writing"),
    ("EXDEV", "mv between directories"),
    ("EEXIST", "mv with RENAME_NOREPLACE over an existing image"),
    ("EDQUOT", "a create or an upload past one of the project's quotas (Glance's unified "
     "limits, 413): the log names the limit"),
    ("ENOSPC", "an upload over Glance's size cap or into a full store; an attribute over the "
     "property or tag quota (Glance 413)"),
    ("ENODATA", "getfattr of a missing attribute"),
    ("ENOTSUP", "extended attributes outside user."),
    ("EIO", "Glance unreachable within --timeout after --retries; a checksum mismatch of a "
     "whole read; an upload Glance refused or did not store as written"),
]  # fmt: skip

_FSTAB = "mycloud  /mnt/glance  fuse.glancefs  ro,_netdev,nofail,sort=name:asc  0 0"

_SYSTEMD = """\
systemctl enable \\-\\-now glancefs@mycloud
# runs: /usr/local/bin/glancefs mount \\-\\-foreground /mnt/glance/mycloud (OS_CLOUD=mycloud)"""


def _roff(text: str) -> str:
    """Text as roff: backslashes escaped, no line starting with a control character."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\n".join("\\&" + line if line[:1] in (".", "'") else line for line in text.split("\n"))


def _tagged(term: str, text: str) -> list[str]:
    """A ``.TP`` paragraph: ``term`` in bold, ``text`` indented below it."""
    return [".TP", f"\\fB{_roff(term)}\\fR", _roff(" ".join(text.split()))]


def _paragraphs(text: str) -> list[str]:
    return [" ".join(p.split()) for p in text.split("\n\n") if p.strip()]


def _context(command: click.Command, name: str) -> click.Context:
    """A context as the command line makes it (with ``-h`` among the help options)."""
    top = click.Context(main, info_name="glancefs", **main.context_settings)
    return top if command is main else click.Context(command, info_name=name, parent=top)


def _command_section(name: str, command: click.Command) -> list[str]:
    context = _context(command, name)
    usage = " ".join(command.collect_usage_pieces(context))
    lines = [f".SS {_roff(f'{context.command_path} {usage}')}"]
    for paragraph in _paragraphs(command.help or ""):
        lines += [_roff(paragraph), ".PP"]
    return lines + _options(command, context)


def _options(command: click.Command, context: click.Context) -> list[str]:
    lines = []
    for param in command.get_params(context):
        record = param.get_help_record(context)
        if record is None or isinstance(param, click.Argument):
            continue
        options, help_text = record
        lines += _tagged(options, help_text)
    return lines


def manpage() -> str:
    """The roff source of glancefs(1)."""
    commands = sorted(main.commands.items())
    lines = [
        *_head(commands),
        ".SH OPTIONS",
        *_options(main, _context(main, "glancefs")),
        ".SH COMMANDS",
    ]
    for name, command in commands:
        lines += _command_section(name, command)
    lines += [".SH LAYOUT"]
    for path, meaning in _LAYOUT:
        lines += _tagged(path, meaning)
    lines += [
        *_fstab_and_systemd(),
        *_status_and_metrics(),
        *_errors(),
        *_exit_status_files_see_also(),
    ]
    return "\n".join(lines) + "\n"


def _head(commands: list[tuple[str, click.Command]]) -> list[str]:
    """The title, NAME, SYNOPSIS (a line per command, and the fstab form) and DESCRIPTION."""
    date = datetime.date.today().isoformat()
    lines = [
        f'.TH GLANCEFS 1 "{date}" "glancefs {__version__}" "User Commands"',
        ".SH NAME",
        "glancefs \\- mount an OpenStack Glance image service as a filesystem",
        ".SH SYNOPSIS",
    ]
    for name, command in commands:
        context = _context(command, name)
        usage = " ".join(command.collect_usage_pieces(context))
        lines += [f"\\fBglancefs {name}\\fR {_roff(usage)}", ".br"]
    return [
        *lines,
        "\\fBglancefs\\fR \\fISOURCE\\fR \\fIMOUNTPOINT\\fR \\fB\\-o\\fR \\fIOPTIONS\\fR"
        " (as mount.fuse3 runs it from /etc/fstab)",
        ".SH DESCRIPTION",
        _roff(
            "glancefs shows the images of an OpenStack Glance image service as files: ls, cp, "
            "dd, cat, rsync, qemu-img and getfattr/setfattr work on them. Reads stream image "
            "data with ranged GETs and check whole reads against the image's hash; writes into "
            "new/ create an image and stream its upload. Credentials are read as the openstack "
            "CLI reads them: clouds.yaml with --os-cloud, OS_* variables, --os-* options. Every "
            "mount option can also be given as -o name=value."
        ),
    ]


def _fstab_and_systemd() -> list[str]:
    return [
        ".SH FSTAB",
        _roff(
            "mount(8) starts glancefs through mount.fuse3, so glancefs must be on the system's "
            "PATH (make install links it into /usr/local/bin). The first field names the cloud "
            "in clouds.yaml, or none (the options then give os_image_url, os_auth_token, ...):"
        ),
        ".PP",
        ".nf",
        _roff(_FSTAB),
        ".fi",
        ".SH SYSTEMD",
        _roff(
            "The unit glancefs@.service (contrib/systemd, installed by make install) mounts the "
            "cloud named by its instance at /mnt/glance/INSTANCE, as Type=notify: the unit is "
            "active once the mount answers."
        ),
        ".PP",
        ".nf",
        _SYSTEMD,
        ".fi",
    ]


def _status_and_metrics() -> list[str]:
    return [
        ".SH STATUS AND METRICS",
        _roff(
            "glancefs status asks each mount through its control socket, a unix socket in "
            "/run/glancefs/ (root), $XDG_RUNTIME_DIR/glancefs/ or /tmp/glancefs-UID/, mode 0600 "
            "in a 0700 directory. With --metrics-addr HOST:PORT a mount serves Prometheus "
            "metrics at http://HOST:PORT/metrics, every series prefixed glancefs_: requests by "
            "method and status, retries, bytes read from Glance, served and uploaded, uploads by "
            "outcome, errors by errno, open files, streams, and the data cache's hits, misses, "
            "bytes stored, evictions, damaged blocks and size."
        ),
    ]


def _errors() -> list[str]:
    lines = [
        ".SH ERRORS",
        _roff("What a refused operation returns (SEMANTICS.md in the source has every case):"),
    ]
    for name, meaning in _ERRNOS:
        lines += _tagged(name, meaning)
    return lines


def _exit_status_files_see_also() -> list[str]:
    return [
        ".SH EXIT STATUS",
        _roff(
            "0 on success; 1 when a mount failed (one line on stderr says why), or when glancefs "
            "status finds a mount dead, unhealthy or unreachable; 2 for a usage error; 130 after "
            "Ctrl-C."
        ),
        ".SH FILES",
        ".TP",
        "\\fI~/.local/state/glancefs/glancefs.log\\fR",
        "log of a background mount (\\-\\-log\\-file)",
        ".TP",
        "\\fI~/.config/openstack/clouds.yaml\\fR, \\fI/etc/openstack/clouds.yaml\\fR",
        "clouds for \\-\\-os\\-cloud (secrets in secure.yaml)",
        ".SH SEE ALSO",
        "\\fBmount.fuse3\\fR(8), \\fBfusermount3\\fR(1), \\fBfstab\\fR(5), "
        "\\fBsystemd.mount\\fR(5)",
    ]


if __name__ == "__main__":
    sys.stdout.write(manpage())
