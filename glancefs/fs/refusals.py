"""Refusals: the operations glancefs declines on purpose, each with the errno the caller gets.

Filesystem logic raises these; :mod:`glancefs.fs` is the one place that turns them (and the
client's :class:`~glancefs.GlanceError`) into ``FUSEError``. The message is the one log line that
tells the user why.
"""

from __future__ import annotations

import errno

from glancefs import BadRequest, Forbidden, GlanceError, NotFound, OverLimit, Unauthorized

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
    "UploadAborted",
    "errno_of",
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


class UploadAborted(Refusal):
    """Every request to an upload that failed, the one that met the failure included: the abort
    logged why, in one line; the caller gets the failure's errno."""

    quiet = True

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.errno = code


def errno_of(error: Refusal | GlanceError) -> int:
    """The errno a caller gets for ``error``: a refusal's own; for Glance's answers 404 ENOENT,
    403 EPERM, 401 EACCES, 413 EDQUOT, 400 EINVAL, anything else EIO."""
    if isinstance(error, Refusal):
        return error.errno
    if isinstance(error, NotFound):
        return errno.ENOENT
    if isinstance(error, Forbidden):
        return errno.EPERM
    if isinstance(error, Unauthorized):
        return errno.EACCES
    if isinstance(error, OverLimit):
        return errno.EDQUOT
    if isinstance(error, BadRequest):
        return errno.EINVAL
    return errno.EIO
