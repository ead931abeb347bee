"""Process facts from /proc shared by the agent (guest) and the host's backends.
Standard library only: this module goes into the guest image."""

from __future__ import annotations

import os


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc's PPid fields); kernel threads hang off pid 2."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                data = f.read()
        except OSError:
            continue
        ppid = int(data[data.rindex(b")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(name))
    found: list[int] = []
    stack = [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return sorted(found)


def in_sessions(sessions: set[int]) -> list[int]:
    """Live processes whose session id is one of ``sessions`` (zombies left out): a
    container's processes where no cgroup holds them, orphans too (each container process
    leads a session of its own)."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                data = f.read()
        except OSError:
            continue
        fields = data[data.rindex(b")") + 2 :].split()
        if fields[0] != b"Z" and int(fields[3]) in sessions:
            found.append(int(name))
    return sorted(found)


def mountinfo(pid: str = "self") -> list[tuple[str, frozenset[str]]]:
    """(mount point, per-mount options) of every mount of ``pid``'s mount namespace."""
    mounts = []
    with open(f"/proc/{pid}/mountinfo", "rb") as f:
        for line in f.read().decode(errors="replace").splitlines():
            fields = line.split(" ")
            if len(fields) > 5:
                # mountinfo escapes space, tab, newline and backslash as octal.
                point = (
                    fields[4]
                    .replace("\\040", " ")
                    .replace("\\011", "\t")
                    .replace("\\012", "\n")
                    .replace("\\134", "\\")
                )
                mounts.append((point, frozenset(fields[5].split(","))))
    return mounts
