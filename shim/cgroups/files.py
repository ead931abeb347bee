"""Reading and writing cgroup control files."""

from __future__ import annotations

import os


def write(path: str, text: str) -> None:
    """One write(2) to an existing control file (a missing one is an error, never created)."""
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def read(path: str) -> str:
    """A control file's text, stripped."""
    with open(path, encoding="ascii", errors="replace") as f:
        return f.read().strip()
