"""Is the process that writes an upload closing it on purpose, or dying?

An upload must become an active image only when its writer closes it deliberately: a ``cp`` killed
by Ctrl-C must not leave a truncated image that boots into garbage. FUSE does not tell: ``flush``
carries no request context, and the kernel sends the same FLUSH for a ``close()`` and for the
descriptors a dying process drops. Linux shows it in ``/proc/<pid>/stat``, though: the exiting
task has ``PF_EXITING`` (field 9, bit 0x4) set and its wait status in ``exit_code`` (field 52: the
signal in the low 7 bits, the exit status in bits 8..15) while its descriptors are closed, so a
flush that arrives while the opener is exiting by a signal (or with a non-zero status) is not a
deliberate close.

Every close sends a FLUSH, also a close by another process that shares the descriptor: a forked
child that execs drops its copy (close-on-exec), and a writer that runs ``subprocess`` would have
its upload finalized in mid-stream. So a flush is the writer's last close only when the writer no
longer holds a descriptor open for writing on the file, which ``/proc/<pid>/fdinfo/*`` shows
(``ino:`` and ``flags:``; the kernel removes a descriptor from the table before it flushes it).

What cannot be told (documented in SEMANTICS.md): a writer that handles the signal and closes
its output itself before dying (GNU ``dd`` does that for SIGINT); a pipeline whose source died
while the writer ends normally (``tee`` sees a short input and exits 0); a descriptor passed to
another process (fork, SCM_RIGHTS) that goes on writing after the opener closed its own;
``exit_code`` and ``fdinfo`` of another user's process, which only a privileged mount may read.

A writer may also close the file before it is done and open it again (``qemu-img`` creates its
output, closes it, and reopens it for the data): :meth:`Writer.running` tells whether it still
runs, and :meth:`Writer.exited` waits for its end (a pidfd, which becomes readable when the
process exits; it does not tell the exit status of a process that is not our child).

Reads ``/proc`` and waits on pidfds: no other I/O.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from pathlib import Path

import trio

__all__ = ["Writer"]

_PF_EXITING = 0x4
# Positions in the fields after the command name's closing parenthesis (field 3 is index 0).
_FLAGS = 9 - 3
_START_TIME = 22 - 3
_EXIT_CODE = 52 - 3


def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name may hold spaces and parentheses: it ends at the last ')'.
    return text[text.rfind(")") + 2 :].split()


def _thread_group(tid: int) -> int:
    """The process a thread belongs to (the thread itself when it cannot be read)."""
    try:
        for line in Path(f"/proc/{tid}/status").read_text().splitlines():
            if line.startswith("Tgid:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return tid


@dataclass(frozen=True)
class Writer:
    """The process that opened an upload (``ctx.pid`` of open/create is the calling *thread*).

    The thread group is what is judged: the opening thread may be gone by the time the file is
    closed (threads of a dying process are reaped one by one), the group leader's entry stays
    until the whole process is reaped. ``started`` tells a reused pid apart.
    """

    process: int
    started: str
    #: The inode number of the file it writes (as ``st_ino`` and fdinfo show it).
    inode: int

    @classmethod
    def of(cls, tid: int, inode: int) -> Writer | None:
        """The writer behind thread ``tid``; None when it cannot be read (then nothing is
        judged: uploads finalize on close, as they would without this check)."""
        if tid <= 0:
            return None
        process = _thread_group(tid)
        fields = _stat_fields(process)
        if fields is None or len(fields) <= _START_TIME:
            return None
        return cls(process, fields[_START_TIME], inode)

    def still_writing(self) -> bool:
        """Whether the writer still holds a descriptor open for writing on the file (then a
        flush is some other close: a dup, or a child's copy)."""
        try:
            descriptors = os.listdir(f"/proc/{self.process}/fdinfo")
        except OSError:
            return False
        for descriptor in descriptors:
            try:
                info = Path(f"/proc/{self.process}/fdinfo/{descriptor}").read_text()
            except OSError:
                continue  # closed meanwhile
            fields = dict(line.split(":\t", 1) for line in info.splitlines() if ":\t" in line)
            writable = int(fields.get("flags", "0"), 8) & (os.O_WRONLY | os.O_RDWR)
            if writable and fields.get("ino", "").strip() == str(self.inode):
                return True
        return False

    def running(self) -> bool:
        """Whether the writer still runs: not gone, not exiting."""
        fields = _stat_fields(self.process)
        if fields is None or len(fields) <= _START_TIME or fields[_START_TIME] != self.started:
            return False
        return not int(fields[_FLAGS]) & _PF_EXITING

    async def exited(self) -> None:
        """Return once the writer has exited (at once if it is gone already)."""
        try:
            pidfd = os.pidfd_open(self.process)
        except ProcessLookupError:
            return
        try:
            if self.running():  # the pid is still the writer's (not reused) and it runs
                await trio.lowlevel.wait_readable(pidfd)
        finally:
            os.close(pidfd)

    def interruption(self) -> str | None:
        """Why a close by this writer now is not deliberate, or None when it is.

        None while the process runs, or exits with status 0 (a normal exit that leaves the
        closing to the kernel, as a Python script may do). A reason when it is exiting by a
        signal or with a non-zero status, or is gone without having closed normally.
        """
        fields = _stat_fields(self.process)
        if fields is None or len(fields) <= _EXIT_CODE or fields[_START_TIME] != self.started:
            return f"its writer (pid {self.process}) is gone"
        if not int(fields[_FLAGS]) & _PF_EXITING:
            return None
        status = int(fields[_EXIT_CODE])
        if status & 0x7F:
            number = status & 0x7F
            try:
                name = signal.Signals(number).name
            except ValueError:
                name = f"signal {number}"
            return f"its writer (pid {self.process}) was killed by {name}"
        if status >> 8:
            return f"its writer (pid {self.process}) is exiting with status {status >> 8}"
        return None
