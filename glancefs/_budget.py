"""The connection budget: how many requests to Glance one client may have in flight at once.

A Glance API node is small (a few processes, each with a few request threads behind a load
balancer). A request Glance cannot start waits in its accept queue and then times out, so a client
that opens more streams than Glance has threads does not go faster; it only turns a slow answer
into a failed one. Every request of a :class:`~glancefs.Client` therefore holds one slot of its
:class:`ConnectionBudget` from the moment it is sent until its response is read, or, for a
streamed response (``stream=True``, image data), until it is closed.

Three kinds of request share the budget, so that no kind can starve another:

* ``short``: a request whose body is read at once (metadata, listings); always served: the long
  kinds together hold at most ``total - 1`` slots (when ``total >= 2``);
* ``download``: a streamed response (image data); at most ``total - 1``;
* ``upload``: a streamed request body (an upload from the filesystem's writers); at most half the
  slots (at least one), so that readers keep the rest.

Pitfall: a holder that is idle (a paused download whose reader went away) must give its slot back
when someone waits (:attr:`ConnectionBudget.waiting`), or the budget deadlocks. Waiters are
served first come, first served among those whose kind has room.
"""

from __future__ import annotations

from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Literal

import trio

__all__ = ["ConnectionBudget", "RequestKind"]

RequestKind = Literal["short", "download", "upload"]


@dataclass(eq=False)
class _Waiter:
    kind: RequestKind
    granted: trio.Event = field(default_factory=trio.Event)


class ConnectionBudget:
    """At most ``total`` simultaneous requests, shared fairly between the kinds above."""

    def __init__(self, total: int) -> None:
        if total < 1:
            raise ValueError("a connection budget needs at least one connection")
        self.total = total
        self._held: dict[RequestKind, int] = {"short": 0, "download": 0, "upload": 0}
        self._waiters: deque[_Waiter] = deque()

    @property
    def in_use(self) -> int:
        """Slots held right now."""
        return sum(self._held.values())

    @property
    def waiting(self) -> int:
        """Requests waiting for a slot right now."""
        return len(self._waiters)

    def _fits(self, kind: RequestKind) -> bool:
        if self.in_use >= self.total:
            return False
        if kind == "short":
            return True
        long_cap = self.total - 1 if self.total >= 2 else self.total
        if self._held["download"] + self._held["upload"] >= long_cap:
            return False
        return kind == "download" or self._held["upload"] < max(1, self.total // 2)

    @asynccontextmanager
    async def slot(self, kind: RequestKind) -> AsyncIterator[None]:
        """Hold one slot for the block; waits (in turn) while the budget is full."""
        await self.acquire(kind)
        try:
            yield
        finally:
            self.release(kind)

    async def acquire(self, kind: RequestKind) -> None:
        """Take a slot of ``kind``; pair with exactly one :meth:`release`."""
        if not self._waiters and self._fits(kind):
            self._held[kind] += 1
            return
        waiter = _Waiter(kind)
        self._waiters.append(waiter)
        self._grant()  # it may fit where the waiters before it do not
        if waiter.granted.is_set():
            return
        try:
            await waiter.granted.wait()
        except BaseException:
            if waiter.granted.is_set():
                self.release(kind)  # granted while being cancelled: hand it on
            else:
                self._waiters.remove(waiter)
            raise

    def release(self, kind: RequestKind) -> None:
        """Give a slot back and grant it to the first waiters that fit."""
        self._held[kind] -= 1
        self._grant()

    def _grant(self) -> None:
        for waiter in list(self._waiters):
            if self._fits(waiter.kind):
                self._waiters.remove(waiter)
                self._held[waiter.kind] += 1
                waiter.granted.set()
