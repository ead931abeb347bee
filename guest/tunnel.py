"""A TCP connection the host asked for (``connect``), relayed over the channel as a stream: the
host's end is a listener of the monitor (a pod's port-forward in its network namespace, or a
host-network container's port on the host). Standard library only: this module goes into the
guest image."""

from __future__ import annotations

import contextlib
import socket

from bonneville.guest.common import Refused, errtext

CONNECT_TIMEOUT = 5.0


def connect(address: str, port: int) -> socket.socket:
    """A non-blocking connection to a port the guest listens on."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.settimeout(CONNECT_TIMEOUT)
    try:
        sock.connect((address, port))
    except OSError as exc:
        sock.close()
        raise Refused(f"connect to {address} port {port}: {errtext(exc)}") from exc
    sock.setblocking(False)
    return sock


class Tunnel:
    """One relayed connection: what the guest side sent waits in nothing (it goes out at once
    as frames); what the host sent waits in ``pending`` until the socket takes it."""

    def __init__(self, ident: int, sock: socket.socket) -> None:
        self.id = ident
        self.sock = sock
        self.pending = bytearray()
        self.reading = True  # the guest side has not sent end of file yet
        self.writing = True  # the host side has not sent end of file yet
        self.host_eof = False  # end of file from the host, sent once ``pending`` is out

    def fileno(self) -> int:
        return self.sock.fileno()

    def read(self) -> bytes | None:
        """What the guest side sent (b"": end of file); None if nothing now."""
        try:
            data = self.sock.recv(65536)
        except BlockingIOError:
            return None
        except OSError:
            data = b""
        if not data:
            self.reading = False
        return data

    def feed(self, data: bytes) -> None:
        """Host bytes for the guest side; empty means end of file."""
        if not data:
            self.host_eof = True
        else:
            self.pending += data
        self.flush()

    def flush(self) -> None:
        while self.pending and self.writing:
            try:
                sent = self.sock.send(self.pending)
            except BlockingIOError:
                return
            except OSError:
                self.writing = False
                self.pending.clear()
                return
            del self.pending[:sent]
        if self.host_eof and not self.pending and self.writing:
            self.writing = False
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_WR)

    @property
    def done(self) -> bool:
        return not self.reading and not self.writing

    def close(self) -> None:
        self.reading = self.writing = False
        self.sock.close()
