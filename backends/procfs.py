"""Process facts from /proc: a PID is only "alive" if its start time still matches."""

from __future__ import annotations

import os

from bonneville.guest.proc import descendants

__all__ = ["descendants", "is_alive", "kill_tree", "process_state", "start_time"]


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
