"""Background tasks of a mount (downloads, uploads, listings): they must never raise.

They run in the mount's nursery, where an escaping exception would cancel every other task and
end the mount. Each runs its work through :func:`failure_of` and keeps the error it returns for
the requests waiting on it to raise, so a failure reaches exactly the callers it concerns.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import NoReturn

from glancefs import GlanceError

__all__ = ["failure_of", "raise_again"]

log = logging.getLogger("glancefs")


async def failure_of(
    work: Callable[[], Awaitable[None]],
    what: str,
    internal: Callable[[str], GlanceError] = GlanceError,
) -> GlanceError | None:
    """Run ``work`` and return the error that ended it, or None.

    A :class:`~glancefs.GlanceError` is returned as it is. Any other exception is a bug in
    glancefs: it is logged with its traceback (the one case that earns one) and returned as
    ``internal("<what>: internal error: ...")``. Cancellation is not an error and propagates.
    """
    try:
        await work()
    except GlanceError as error:
        return error
    except Exception as error:
        log.exception("%s failed", what)
        return internal(f"{what}: internal error: {error}")
    return None


def raise_again(error: BaseException) -> NoReturn:
    """Raise a kept failure for one more caller, with a traceback of its own.

    Pitfall: every ``raise`` of an exception instance adds the frames it passes through to that
    instance's traceback. A kept failure raised for each later read or close (a corrupt image, a
    failed listing or upload) would keep every earlier caller's frames, and their locals, alive:
    the soak saw a mount grow by 450 MB over 110,000 failed reads.
    """
    raise error.with_traceback(None)
