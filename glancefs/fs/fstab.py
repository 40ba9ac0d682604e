"""The command line mount(8) gives glancefs for an fstab line, as the ``glancefs mount`` one.

An fstab line ``CLOUD MOUNTPOINT fuse.glancefs OPTIONS`` makes mount.fuse3 run ``glancefs CLOUD
MOUNTPOINT -o OPTIONS``. Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Collection

__all__ = ["NO_CLOUD", "mount_argv"]

#: Sources of an fstab line that name no cloud (the options or the environment then do).
NO_CLOUD = frozenset({"none", "glancefs"})


def mount_argv(args: list[str], commands: Collection[str]) -> list[str]:
    """``args`` (without the program name) as glancefs's own command line.

    ``CLOUD MOUNTPOINT [-o OPTIONS]`` becomes ``mount MOUNTPOINT [-o OPTIONS] --os-cloud CLOUD``
    (no ``--os-cloud`` for the source ``none`` or ``glancefs``). Anything that starts with one of
    ``commands`` or an option (``--help``) is left as it is.
    """
    if len(args) < 2 or args[0] in commands or args[0].startswith("-"):
        return list(args)
    source, mountpoint, *rest = args
    cloud = [] if source in NO_CLOUD else ["--os-cloud", source]
    return ["mount", mountpoint, *rest, *cloud]
