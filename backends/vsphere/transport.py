"""The agent channel over a network serial port: the VM connects, proves who it is, then frames.

On vSphere the VM's serial port is a `VirtualSerialPortURIBackingInfo` in client direction
(`tcp://HOST:PORT`): ESXi opens a TCP connection to the container's monitor when the VM powers
on, and the guest's UART bytes flow over it. The guest agent opens that UART in raw mode and
writes one preamble line before any frame:

    BONNEVILLE-AGENT <token>\\n

then speaks the same framed protocol as over virtio-serial (docs/protocol.md). The token is
per container (it travels in the VM's configuration, so it is not a secret from vCenter
administrators; it stops another process that reaches the port from posing as the VM). Any
connection that sends something else, or nothing in time, is dropped and the listener keeps
waiting until its deadline. The QEMU serial test (integration/test_vsphere_serial.py) uses this
same module with QEMU's `-chardev socket` standing in for ESXi.
"""

from __future__ import annotations

import contextlib
import hmac
import secrets
import selectors
import socket
import time
from dataclasses import dataclass

from bonneville.spec.errors import BackendError

PREAMBLE = b"BONNEVILLE-AGENT "
# Bytes a connection may send before its preamble line (a UART may carry line noise or a stray
# newline from the guest's tty setup) before it is dropped as not ours.
MAX_PREFIX = 4096


def new_token() -> str:
    """A per-container token: 128 bits, written as a UUID so it can also be an ext4 UUID."""
    raw = secrets.token_hex(16)
    return f"{raw[:8]}-{raw[8:12]}-{raw[12:16]}-{raw[16:20]}-{raw[20:]}"


def preamble(token: str) -> bytes:
    return PREAMBLE + token.encode() + b"\n"


@dataclass
class _Pending:
    sock: socket.socket
    peer: str
    data: bytearray


class SerialListener:
    """A TCP listener the VM's serial port connects to; yields the one verified connection."""

    def __init__(self, host: str = "0.0.0.0", port: int = 0) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.sock.bind((host, port))
            self.sock.listen(8)
        except OSError as exc:
            self.sock.close()
            raise BackendError(
                f"cannot listen for the VM's serial port on {host}:{port}: {exc.strerror}"
            ) from exc
        self.sock.setblocking(False)

    @property
    def port(self) -> int:
        port: int = self.sock.getsockname()[1]
        return port

    def uri(self, advertise_host: str) -> str:
        """The serviceURI the VM's serial port connects to."""
        host = f"[{advertise_host}]" if ":" in advertise_host else advertise_host
        return f"tcp://{host}:{self.port}"

    def accept(self, token: str, timeout: float) -> socket.socket:
        """The connection that sends ``token``'s preamble, within ``timeout`` seconds."""
        expected = preamble(token)
        deadline = time.monotonic() + timeout
        pending: dict[int, _Pending] = {}
        rejected: list[str] = []
        sel = selectors.DefaultSelector()
        sel.register(self.sock, selectors.EVENT_READ)
        try:
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    dropped = rejected + [p.peer for p in pending.values()]
                    raise BackendError(
                        f"the VM's agent did not connect to port {self.port} within "
                        f"{timeout:g} s (connections without its token: "
                        f"{', '.join(dropped) or 'none'})"
                    )
                for key, _ in sel.select(remaining):
                    if key.fileobj is self.sock:
                        self._accept_one(sel, pending)
                        continue
                    conn = pending[key.fd]
                    verdict = self._read_one(conn, expected)
                    if verdict is None:
                        continue
                    sel.unregister(conn.sock)
                    del pending[key.fd]
                    if verdict:
                        conn.sock.setblocking(True)
                        return conn.sock
                    rejected.append(conn.peer)
                    conn.sock.close()
        finally:
            for conn in pending.values():
                conn.sock.close()
            sel.close()

    def _accept_one(self, sel: selectors.BaseSelector, pending: dict[int, _Pending]) -> None:
        try:
            sock, addr = self.sock.accept()
        except (BlockingIOError, InterruptedError):
            return
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        pending[sock.fileno()] = _Pending(sock, f"{addr[0]}:{addr[1]}", bytearray())
        sel.register(sock, selectors.EVENT_READ)

    @staticmethod
    def _read_one(conn: _Pending, expected: bytes) -> bool | None:
        """Read one byte at a time (nothing past the preamble is consumed): True when the
        preamble matched, False to drop the connection, None to wait for more."""
        try:
            byte = conn.sock.recv(1)
        except BlockingIOError:
            return None
        except OSError:
            return False
        if not byte:
            return False
        conn.data += byte
        if byte != b"\n":
            return None if len(conn.data) <= MAX_PREFIX + len(expected) else False
        line_start = conn.data.rfind(PREAMBLE)
        if line_start < 0:
            return None  # noise before the preamble line
        return hmac.compare_digest(bytes(conn.data[line_start:]), expected)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()
