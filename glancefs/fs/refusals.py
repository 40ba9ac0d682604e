"""Refusals: the operations glancefs declines on purpose, each with the errno the caller gets.

Filesystem logic raises these; :mod:`glancefs.fs` is the one place that turns them (and the
client's :class:`~glancefs.GlanceError`) into ``FUSEError``. The message is the one log line that
tells the user why.
"""

from __future__ import annotations

import errno

__all__ = [
    "AccessDenied",
    "Busy",
    "CrossDevice",
    "Exists",
    "InvalidArgument",
    "LocalFailure",
    "NoAttribute",
    "NoEntry",
    "NotPermitted",
    "OutOfSpace",
    "ReadOnly",
    "Refusal",
    "TooLarge",
    "Unsupported",
]


class Refusal(Exception):
    """An operation glancefs refuses; ``errno`` is what the caller sees."""

    errno: int = errno.EIO
    #: Refusals that are part of normal use (a lookup of a missing name) are not logged.
    quiet: bool = False


class NoEntry(Refusal):
    errno = errno.ENOENT
    quiet = True


class NoAttribute(Refusal):
    errno = errno.ENODATA
    quiet = True


class ReadOnly(Refusal):
    errno = errno.EROFS


class NotPermitted(Refusal):
    errno = errno.EPERM


class AccessDenied(Refusal):
    errno = errno.EACCES


class InvalidArgument(Refusal):
    errno = errno.EINVAL


class Unsupported(Refusal):
    errno = errno.ENOTSUP


class CrossDevice(Refusal):
    errno = errno.EXDEV


class Exists(Refusal):
    errno = errno.EEXIST


class Busy(Refusal):
    errno = errno.EBUSY


class TooLarge(Refusal):
    """The data does not fit where it must be kept locally (the spool's bound)."""

    errno = errno.EFBIG


class LocalFailure(Refusal):
    """A local resource failed (the spool's filesystem: ENOSPC, EIO); the errno is the system's."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.errno = code


class OutOfSpace(Refusal):
    """A Glance quota (properties, tags, storage) is full."""

    errno = errno.ENOSPC
