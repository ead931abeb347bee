"""Process facts from /proc: a PID is only "alive" if its start time still matches."""

from __future__ import annotations

import contextlib
import os
import select
import signal
import time

from bonneville.guest.proc import descendants

__all__ = [
    "descendants",
    "is_alive",
    "kill_pinned",
    "kill_tree",
    "process_state",
    "start_time",
    "wait_fd",
]


def wait_fd(fd: int, deadline: float) -> bool:
    """Wait until ``fd`` is readable (for a pidfd: the process ended) or the deadline passes."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        if poller.poll(remaining * 1000):
            return True


def kill_pinned(pid: int, start: int | None, wait: float) -> None:
    """SIGKILL that very process (PID *and* start time) and wait up to ``wait`` for its end.

    The pidfd pins the process: once its start time is checked through it, the signal cannot
    reach another process that reused the PID in between. Gone already is fine.
    """
    if pid <= 0:
        return
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return
    try:
        if not is_alive(pid, start):
            return
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        wait_fd(pidfd, time.monotonic() + wait)
    finally:
        os.close(pidfd)


def start_time(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat (clock ticks since boot), or None if no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    fields = data[data.rindex(b")") + 2 :].split()
    return int(fields[19])


def process_state(pid: int) -> str | None:
    """The one-letter state of a process (R, S, Z…), or None if it does not exist."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return data[data.rindex(b")") + 2 :].split()[0].decode()


def is_alive(pid: int, expected_start: int | None) -> bool:
    """True if PID runs, is not a zombie, and (when known) started when we recorded it."""
    if pid <= 0:
        return False
    state = process_state(pid)
    if state is None or state in ("Z", "X"):
        return False
    return expected_start is None or start_time(pid) == expected_start


def kill_tree(pid: int, sig: int) -> None:
    """Signal PID and all its descendants (the fake agent's container processes)."""
    for target in [pid, *descendants(pid)]:
        try:
            os.kill(target, sig)
        except ProcessLookupError:
            pass
