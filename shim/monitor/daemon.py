"""What makes a monitor a well-behaved long-lived process: it holds no descriptor of its
caller's but the container's stdio, logs to its own file, takes every signal through a pipe,
and gives back the memory the CLI's code left behind."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import time

from bonneville.shim import state

log = logging.getLogger("bonneville.monitor")


def open_fds() -> list[int]:
    try:
        return [int(n) for n in os.listdir("/proc/self/fd")]
    except OSError:
        return list(range(3, 1024))


def detach(state_dir: str, keep: set[int], quiet_stdio: bool) -> None:
    """Close every descriptor not in ``keep`` (0-2 stay: the container's stdio, or /dev/null
    with ``quiet_stdio``), and send our diagnostics to the container's monitor.log, never to fd
    2 (the container's stderr). (launch._fork made us a session leader already: no terminal
    signal reaches us.)"""
    logfd = os.open(
        os.path.join(state_dir, state.LOG_FILE),
        os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC,
        0o600,
    )
    if quiet_stdio:
        # The container's console is a pty; the caller's stdio must not be held open.
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        os.close(devnull)
    for fd in open_fds():
        if fd not in keep and fd not in (0, 1, 2, logfd):
            with contextlib.suppress(OSError):
                os.close(fd)
    sys.stderr = open(logfd, "w", buffering=1, closefd=True)  # noqa: SIM115
    root = logging.getLogger("bonneville")
    root.handlers.clear()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    root.propagate = False


def signal_pipe() -> int:
    """Every signal (but KILL, STOP and PIPE) written to a pipe as its number; the read end.
    Handlers do nothing else: the event loop reads the pipe."""
    sig_r, sig_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(sig_w, warn_on_full_buffer=False)
    for signum in range(1, signal.NSIG):
        if signum in (signal.SIGKILL, signal.SIGSTOP, signal.SIGPIPE):
            continue
        with contextlib.suppress(OSError, ValueError, RuntimeError):
            signal.signal(signum, lambda *_: None)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    return sig_r


def read_signals(sig_r: int) -> bytes:
    try:
        return os.read(sig_r, 1024)
    except BlockingIOError:
        return b""


def release_free_memory() -> None:
    """Give the heap pages the CLI's code left free back to the kernel: a monitor lives as long
    as its container, and its PSS is part of each container's cost (~1.4 MiB here)."""
    import gc

    from bonneville.guest import linux

    gc.collect()
    with contextlib.suppress(OSError):
        linux.malloc_trim()


class Timeline:
    """Timing lines in the monitor's log: where a create spends its time."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()

    def mark(self, phase: str) -> None:
        log.debug("%.3f s %s", time.monotonic() - self.t0, phase)


def laps(reply: dict[str, object]) -> str:
    """The agent's step timings (``timings``: [[step, seconds], …]) for a log line."""
    steps = reply.get("timings")
    if not isinstance(steps, list):
        return "no timings"
    # The guest is not trusted: only well-formed laps, names cut short, a few of them.
    return ", ".join(
        f"{str(lap[0])[:40]} {lap[1]:.3f}"
        for lap in steps[:20]
        if isinstance(lap, list) and len(lap) == 2 and isinstance(lap[1], int | float)
    )
