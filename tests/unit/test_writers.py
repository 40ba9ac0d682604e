"""Whether a writer still runs, and when it exits (glancefs.fs.writers), on real processes."""

from __future__ import annotations

import errno
import os
import subprocess

import pytest
import trio
import trio.testing

from glancefs.fs.writers import Writer


@pytest.mark.parametrize("pidfds", [True, False], ids=["pidfd", "no pidfd"])
async def test_a_writer_runs_until_it_exits(
    pidfds: bool, sleeper: subprocess.Popen[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    if not pidfds:  # a kernel without them: the writer is looked at every second instead

        def refused(pid: int, flags: int = 0) -> int:
            raise OSError(errno.ENOSYS, "pidfd_open")

        monkeypatch.setattr(os, "pidfd_open", refused)
    writer = Writer.of(sleeper.pid, inode=1)
    assert writer is not None
    assert writer.running()
    exited = trio.Event()

    async def watch() -> None:
        await writer.exited()
        exited.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch)
        await trio.testing.wait_all_tasks_blocked()
        assert not exited.is_set()
        sleeper.kill()
        await trio.to_thread.run_sync(sleeper.wait)
        await exited.wait()
    assert not writer.running()
    await writer.exited()  # gone already: at once
