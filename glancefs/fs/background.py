"""Background tasks of a mount (downloads, uploads, listings): they must never raise.

They run in the mount's nursery, where an escaping exception would cancel every other task and
end the mount. Each runs its work through :func:`failure_of` and keeps the error it returns for
the requests waiting on it to raise, so a failure reaches exactly the callers it concerns.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from glancefs import GlanceError

__all__ = ["failure_of"]

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
