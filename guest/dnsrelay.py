"""The guest's side of the DNS relay: it answers on the resolver addresses the container's
resolv.conf names but the VM cannot reach (docker's embedded resolver, 127.0.0.11, lives in
the container's network namespace on the host; a host-network container's may be the host's
127.0.0.53), passing each query, over UDP or TCP, to the host, which asks that resolver and
answers. Nothing else crosses: only DNS messages, only to the addresses the host set up.
Standard library only: this module goes into the guest image."""

from __future__ import annotations

import contextlib
import socket
import struct
from collections import OrderedDict

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

PORT = 53
MAX_PENDING = 256  # queries waiting for the host: the oldest are dropped beyond this
MAX_MESSAGE = 65535


class DnsRelay:
    def __init__(self, addresses: list[str]) -> None:
        self.sockets: list[socket.socket] = []  # UDP sockets and TCP listeners
        self.clients: dict[int, socket.socket] = {}  # TCP connections, by descriptor
        self.buffers: dict[int, bytearray] = {}
        # TCP clients that sent their end of file with queries still waiting: not read again,
        # closed once the last of their answers is written (a client may shut down its sending
        # side after its query, as `dig +tcp` through some resolver libraries does).
        self.half_closed: set[int] = set()
        self.pending: OrderedDict[int, tuple[socket.socket, Any]] = OrderedDict()
        self.next_id = 1
        for address in addresses:
            family = socket.AF_INET6 if ":" in address else socket.AF_INET
            udp = socket.socket(family, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            tcp = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                udp.bind((address, PORT))
                tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                tcp.bind((address, PORT))
                tcp.listen(16)
            except OSError:
                udp.close()
                tcp.close()
                raise
            for sock in (udp, tcp):
                sock.setblocking(False)
                self.sockets.append(sock)

    def fds(self) -> list[int]:
        return [s.fileno() for s in self.sockets] + [
            fd for fd in self.clients if fd not in self.half_closed
        ]

    def _waiting(self, sock: socket.socket) -> bool:
        return any(origin is sock for origin, _ in self.pending.values())

    def _queue(self, origin: socket.socket, reply_to: Any, data: bytes) -> tuple[int, bytes]:
        ident = self.next_id
        self.next_id = self.next_id % 0x7FFFFFFF + 1
        self.pending[ident] = (origin, reply_to)
        while len(self.pending) > MAX_PENDING:
            _, (dropped, _) = self.pending.popitem(last=False)
            self._close_if_done(dropped)
        return ident, data

    def on_ready(self, fd: int) -> list[tuple[int, str, bool, bytes]]:
        """Read what ``fd`` has; the queries for the host: (id, the resolver address it was
        sent to, over TCP, message)."""
        queries: list[tuple[int, str, bool, bytes]] = []
        for sock in self.sockets:
            if sock.fileno() != fd:
                continue
            if sock.type == socket.SOCK_DGRAM:
                try:
                    data, peer = sock.recvfrom(MAX_MESSAGE)
                except OSError:
                    return queries
                if data:
                    ident, message = self._queue(sock, peer, data)
                    queries.append((ident, sock.getsockname()[0], False, message))
            else:
                try:
                    conn, _ = sock.accept()
                except OSError:
                    return queries
                conn.setblocking(False)
                self.clients[conn.fileno()] = conn
                self.buffers[conn.fileno()] = bytearray()
            return queries
        client = self.clients.get(fd)
        if client is None:
            return queries
        try:
            data = client.recv(65536)
        except BlockingIOError:
            return queries
        except OSError:
            data = b""
        if not data:
            if self._waiting(client):
                self.half_closed.add(fd)  # its answers still go back, then it is closed
            else:
                self._drop(fd)
            return queries
        buf = self.buffers[fd]
        buf += data
        while len(buf) >= 2:
            (length,) = struct.unpack_from(">H", buf)
            if len(buf) < 2 + length:
                break
            ident, message = self._queue(client, None, bytes(buf[2 : 2 + length]))
            queries.append((ident, client.getsockname()[0], True, message))
            del buf[: 2 + length]
        if len(buf) > 2 * MAX_MESSAGE:
            self._drop(fd)
        return queries

    def answer(self, ident: int, data: bytes) -> None:
        """The host's answer to query ``ident``, back to whoever asked."""
        found = self.pending.pop(ident, None)
        if found is None:
            return
        sock, peer = found
        if data:
            with contextlib.suppress(OSError):
                if sock.type == socket.SOCK_DGRAM:
                    sock.sendto(data, peer)
                elif sock.fileno() in self.clients:
                    sock.setblocking(True)
                    sock.settimeout(2)
                    sock.sendall(struct.pack(">H", len(data)) + data)
                    sock.setblocking(False)
        self._close_if_done(sock)

    def _close_if_done(self, sock: socket.socket) -> None:
        """A half-closed TCP client goes once nothing it asked is waiting any more."""
        fd = sock.fileno()
        if fd in self.half_closed and self.clients.get(fd) is sock and not self._waiting(sock):
            self._drop(fd)

    def _drop(self, fd: int) -> None:
        self.half_closed.discard(fd)
        conn = self.clients.pop(fd, None)
        self.buffers.pop(fd, None)
        if conn is not None:
            conn.close()

    def close(self) -> None:
        for fd in list(self.clients):
            self._drop(fd)
        for sock in self.sockets:
            sock.close()
        self.sockets.clear()
