"""The host proxy of an exec'd process: its PID stands for the guest process.

containerd's shim signals exec processes with kill(pid) and waits for that PID: so `exec` runs
(or, with --detach, forks) this proxy, which relays stdio or the pty, forwards every signal it
receives, and exits with the guest process's status. It speaks the agent's frame format with
the container's monitor over the monitor's control socket.
"""

from __future__ import annotations

import contextlib
import errno
import os
import selectors
import signal
import socket
import termios
import tty
from collections.abc import Callable
from typing import Any

from bonneville.guest import protocol
from bonneville.shim import console, unixsock
from bonneville.shim.control import Op, Request
from bonneville.spec.errors import BonnevilleError

_UNFORWARDED = {signal.SIGKILL, signal.SIGSTOP, signal.SIGCHLD, signal.SIGPIPE}


class ExecProxy:
    def __init__(
        self,
        control_path: str,
        process: dict[str, Any],
        console_socket: str | None,
        container: str = "",
    ) -> None:
        self.control_path = control_path
        self.container = container
        self.process = process
        self.console_socket = console_socket
        self.terminal = bool(process.get("terminal"))
        self.conn: socket.socket | None = None
        self.decoder = protocol.Decoder()
        self.console_fd = -1
        self.saved_tty: list[Any] | None = None
        self.pending: list[tuple[int, int, bytes]] = []

    def start(self) -> int:
        """Ask the monitor to start the process; the guest PID once it runs."""
        try:
            self.conn = unixsock.connect_unix(self.control_path, timeout=30)
        except OSError as exc:
            raise BonnevilleError(f"cannot reach the container monitor: {exc.strerror}") from exc
        request = Request(Op.EXEC, container=self.container, process=self.process)
        self.conn.sendall(request.encode())
        while True:
            data = self.conn.recv(1 << 16)
            if not data:
                raise BonnevilleError("the container monitor closed the exec connection")
            frames = self.decoder.feed(data)
            for index, (ftype, _, payload) in enumerate(frames):
                if ftype != protocol.CONTROL:
                    continue
                message = protocol.decode_control(payload)
                if message["op"] == "error":
                    raise BonnevilleError(str(message.get("error") or "exec failed"))
                if message["op"] == "started":
                    self.pending = frames[index + 1 :]
                    return int(message.get("pid") or 0)

    def _open_console(self) -> None:
        if not self.terminal:
            return
        if self.console_socket:
            size = self.process.get("consoleSize")
            rows_cols = (
                (int(size.get("height", 24)), int(size.get("width", 80)))
                if isinstance(size, dict)
                else None
            )
            self.console_fd = console.open_console(self.console_socket, rows_cols)
        elif os.isatty(0):
            self.saved_tty = termios.tcgetattr(0)
            tty.setraw(0)
            self.console_fd = 0

    def relay(self, on_ready: Callable[[], None] | None = None) -> int:
        """Relay until the guest process exits; its exit status."""
        assert self.conn is not None
        self._open_console()
        if on_ready is not None:
            on_ready()
        sig_r, sig_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(sig_w, warn_on_full_buffer=False)
        for signum in range(1, signal.NSIG):
            if signum not in _UNFORWARDED:
                with contextlib.suppress(OSError, ValueError):
                    signal.signal(signum, lambda *_: None)
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
        sel = selectors.DefaultSelector()
        sel.register(self.conn, selectors.EVENT_READ, "conn")
        sel.register(sig_r, selectors.EVENT_READ, "signal")
        in_fd = self.console_fd if self.terminal and self.console_fd >= 0 else 0
        out_fd = self.console_fd if self.console_fd > 0 else 1
        self._watch_input(sel, in_fd)
        self._send_window_size()
        try:
            status = self._handle(self.pending, out_fd)
            while status is None:
                for key, _ in sel.select():
                    if key.data == "conn":
                        data = self.conn.recv(1 << 16)
                        if not data:
                            return 137  # the monitor (so the VM) went away
                        status = self._handle(self.decoder.feed(data), out_fd)
                    elif key.data == "signal":
                        self._on_signals(sig_r)
                    elif key.data == "stdin" and not self._read_input(in_fd):
                        sel.unregister(in_fd)
                    if status is not None:
                        break
            return status
        finally:
            if self.saved_tty is not None:
                with contextlib.suppress(OSError):
                    termios.tcsetattr(0, termios.TCSADRAIN, self.saved_tty)

    def _watch_input(self, sel: selectors.BaseSelector, fd: int) -> None:
        try:
            os.set_blocking(fd, False)
            sel.register(fd, selectors.EVENT_READ, "stdin")
        except (PermissionError, OSError):
            # /dev/null or a regular file: never blocks, send it all now.
            os.set_blocking(fd, True)
            while self._read_input(fd):
                pass

    def _read_input(self, fd: int) -> bool:
        assert self.conn is not None
        try:
            data = os.read(fd, 1 << 16)
        except BlockingIOError:
            return True
        except OSError:
            data = b""
        try:
            for frame in protocol.encode_data(protocol.STDIN, 0, data):
                self.conn.sendall(frame)
        except (BrokenPipeError, ConnectionResetError):
            # The process already ended and the monitor closed its side after sending the
            # exit: its status is still waiting in our receive buffer. Input has nowhere to go.
            return False
        return bool(data)

    def _handle(self, frames: list[tuple[int, int, bytes]], out_fd: int) -> int | None:
        for ftype, _, payload in frames:
            if ftype in (protocol.STDOUT, protocol.STDERR) and payload:
                fd = out_fd if self.terminal or ftype == protocol.STDOUT else 2
                try:
                    protocol.write_all(fd, payload)
                except OSError as exc:
                    if exc.errno not in (errno.EPIPE, errno.EIO):
                        raise
            elif ftype == protocol.CONTROL:
                message = protocol.decode_control(payload)
                if message["op"] == "exit":
                    return int(message.get("status", 137))
        return None

    def _on_signals(self, sig_r: int) -> None:
        assert self.conn is not None
        try:
            data = os.read(sig_r, 1024)
        except BlockingIOError:
            return
        for signum in data:
            if signum == signal.SIGWINCH:
                self._send_window_size()
            elif signum not in _UNFORWARDED:
                self.conn.sendall(protocol.encode_control({"op": "signal", "signal": signum}))

    def _send_window_size(self) -> None:
        if not self.terminal or self.console_fd < 0 or self.conn is None:
            return
        size = console.window_size(self.console_fd)
        if size:
            self.conn.sendall(
                protocol.encode_control({"op": "resize", "rows": size[0], "cols": size[1]})
            )
