"""A mount in the background: fork, and let the parent exit only once the child's mount works.

The parent waits on a pipe for the child's word: ``ready`` (the mount serves: exit 0) or the one
line saying why it could not mount (exit 1, the line on the parent's stderr). The child starts a
new session, detaches from the terminal and serves; it never returns.

Pitfall: fork before any thread or trio loop exists (the CLI calls this before ``trio.run``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import NoReturn

from .mount import MountError

__all__ = ["run_in_background"]

log = logging.getLogger("glancefs.mount")


def run_in_background(
    serve: Callable[[Callable[[], None]], object], prepare_child: Callable[[], None]
) -> None:
    """Run ``serve(ready)`` in a detached child; return in the parent once ``ready()`` was called.

    ``prepare_child`` runs first in the child, before stdio is detached (set up logging to a file
    there). Raises :class:`MountError` in the parent with the child's reason when it failed.
    """
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid:
        os.close(write_end)
        with os.fdopen(read_end, "rb") as pipe:
            message = pipe.read().decode(errors="replace")
        if message == "ready":
            return
        os.waitpid(pid, 0)
        raise MountError(message or "the mount process died")
    os.close(read_end)
    _serve_in_child(serve, prepare_child, write_end)


def _serve_in_child(
    serve: Callable[[Callable[[], None]], object],
    prepare_child: Callable[[], None],
    write_end: int,
) -> NoReturn:
    os.setsid()
    prepare_child()
    _detach_stdio()
    pipe_open = True

    def tell_parent(message: str) -> None:
        nonlocal pipe_open
        if pipe_open:
            os.write(write_end, message.encode())
            os.close(write_end)
            pipe_open = False

    try:
        serve(lambda: tell_parent("ready"))
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
