"""What every agent module shares: the error types, one-line wording, small file helpers.
Standard library only: this module goes into the guest image."""

from __future__ import annotations

import os
import time
from collections.abc import Callable

Log = Callable[[str, str], None]


class Refused(Exception):
    """A request that cannot be done; its message is the reply's one-line error."""


class ExecError(Exception):
    """Why a process could not be started, worded as runc words it."""


def errtext(exc: OSError) -> str:
    """An errno's text as Go (and so runc) prints it: "no such file or directory"."""
    if exc.errno:
        text = os.strerror(exc.errno)
        return text[:1].lower() + text[1:]
    return str(exc)


def one_line(text: str) -> str:
    """Replies and log lines are single lines."""
    return " ".join(text.split())


def describe(exc: BaseException) -> str:
    """An exception as one line with where it was raised (no traceback module in the guest)."""
    where = []
    tb = exc.__traceback__
    while tb is not None:
        where.append(f"{os.path.basename(tb.tb_frame.f_code.co_filename)}:{tb.tb_lineno}")
        tb = tb.tb_next
    return one_line(f"{type(exc).__name__}: {exc} (at {' > '.join(where[-4:])})")


def set_nonblocking(fd: int) -> None:
    """O_NONBLOCK on ``fd``: the loop never blocks on a child or the host."""
    os.set_blocking(fd, False)


def write_file(path: str, text: str) -> None:
    """Write ``text`` to an existing file (procfs and cgroup knobs)."""
    with open(path, "w") as f:
        f.write(text)


def read_text(path: str) -> str:
    """A small file's text, stripped."""
    with open(path) as f:
        return f.read().strip()


class Stopwatch:
    """Laps of a request's steps, returned to the host (the monitor logs them at DEBUG)."""

    def __init__(self) -> None:
        self.last = time.monotonic()
        self.laps: list[tuple[str, float]] = []

    def lap(self, name: str) -> None:
        now = time.monotonic()
        self.laps.append((name, round(now - self.last, 4)))
        self.last = now
