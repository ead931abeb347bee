"""The caller's side of a container terminal: runc's --console-socket handshake and window size.

The guest owns the real pty (its line discipline, its /dev/pts/N); on the host we hold a raw pty
whose master goes to the caller, so bytes pass through untouched and resizes reach us.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import struct
import termios
import tty

from bonneville.shim import unixsock
from bonneville.spec.errors import BonnevilleError


def open_console(console_socket: str, size: tuple[int, int] | None) -> int:
    """Send a new pty's master over ``console_socket``; return the raw slave, which becomes our
    controlling terminal (so SIGWINCH tells us when the caller resizes)."""
    master, slave = os.openpty()
    try:
        tty.setraw(slave)
        if size:
            fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", size[0], size[1], 0, 0))
        with contextlib.suppress(OSError):
            os.setsid()  # fails harmlessly where we already lead a session
        with contextlib.suppress(OSError):
            fcntl.ioctl(slave, termios.TIOCSCTTY, 0)
        try:
            sock = unixsock.connect_unix(console_socket, timeout=10)
        except OSError as exc:
            raise BonnevilleError(
                f"cannot connect to console socket {console_socket}: {exc.strerror}"
            ) from exc
        with sock:
            socket.send_fds(sock, [b"/dev/ptmx"], [master])
    except BaseException:
        os.close(slave)
        raise
    finally:
        os.close(master)
    return slave


def window_size(fd: int) -> tuple[int, int] | None:
    """(rows, cols) of the terminal on ``fd``, or None if it has none."""
    try:
        packed = fcntl.ioctl(fd, termios.TIOCGWINSZ, b"\0" * 8)
    except OSError:
        return None
    rows, cols, _, _ = struct.unpack("HHHH", packed)
    return (rows, cols) if rows and cols else None
