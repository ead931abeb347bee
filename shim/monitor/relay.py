"""Ports of a VM that sits on a network of its backend's own (vSphere's port group) instead of
behind the container's network namespace: relayed from that namespace to the VM's address.

Under Docker a published port is an iptables DNAT to the container's address in its network
namespace, where the monitor lives; runc's container answers there itself. Here the monitor
listens on the namespace's every address (0.0.0.0) at each TCP port the guest listens on (the
agent reports them, docs/protocol.md ``ports``: wildcard sockets and those on the VM's own
address; loopback-only ones are not reachable over the NIC) and connects each accepted
connection to VM_ADDRESS:PORT from the runtime's own network namespace, where the port group is
routed. Ports follow the guest as servers open and close them, as they would under runc: the
OCI config carries no list of published ports. TCP only; IPv4 only.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import selectors
import socket
import threading

from bonneville.shim import hostns
from bonneville.shim.monitor.forward import MAX_OUTBOX, WILDCARDS, Forwarder

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from bonneville.shim.monitor.pod import Pod

log = logging.getLogger("bonneville.monitor")


class Side:
    """One socket of a relayed connection and the bytes waiting to go out of it."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.outbox = bytearray()
        self.reading = True  # its peer has not ended its side yet
        self.eof_out = False  # the other side ended: shut our writing down once out


class Pair:
    def __init__(self, ident: int, client: socket.socket, upstream: socket.socket) -> None:
        self.id = ident
        self.client = Side(client)
        self.upstream = Side(upstream)
        self.connected = False  # the connection to the VM is made


class AddressRelay(Forwarder):
    """Listeners in the container's namespace; connections to the guest's address."""

    def __init__(self, pod: Pod) -> None:
        super().__init__(pod, on_host=False)
        self.pairs: dict[int, Pair] = {}
        self.next_id = 1

    def _ours(self, address: str, port: int) -> tuple[str, int]:
        return ("0.0.0.0", port)

    def on_ports(self, listening: Any) -> None:
        target = self.pod.vm.guest_address
        wanted = []
        for entry in listening if isinstance(listening, list) and target else []:
            if isinstance(entry, list) and len(entry) == 2 and entry[0] in (*WILDCARDS, target):
                wanted.append([target, entry[1]])
        super().on_ports(wanted)

    def on_accept(self, ours: tuple[str, int]) -> None:
        sock = self.listeners.get(ours)
        if sock is None:
            return
        try:
            conn, _ = sock.accept()
        except OSError:
            return
        conn.setblocking(False)
        address, port = self.guest[ours]
        try:
            upstream = _socket_in(self.pod.vm.runtime_netns_fd)
        except OSError as exc:
            log.warning("port %d: cannot relay a connection: %s", port, exc)
            conn.close()
            return
        err = upstream.connect_ex((address, port))
        if err not in (0, errno.EINPROGRESS):
            log.info("connection to %s port %d failed: %s", address, port, errno.errorcode[err])
            conn.close()
            upstream.close()
            return
        pair = Pair(self.next_id, conn, upstream)
        self.next_id += 1
        self.pairs[pair.id] = pair
        self._arm(pair)

    def on_ready(self, stream: int, events: int) -> None:
        """``stream``: a pair's id for its client's socket, its negation for the VM's."""
        pair = self.pairs.get(abs(stream))
        if pair is None:
            return
        side, other = (pair.client, pair.upstream) if stream > 0 else (pair.upstream, pair.client)
        if stream < 0 and not pair.connected and events & selectors.EVENT_WRITE:
            err = side.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                log.info("connection to the guest's port failed: %s", errno.errorcode.get(err))
                self._close(pair)
                return
            pair.connected = True
        try:
            if events & selectors.EVENT_WRITE:
                self._send(side)
            if events & selectors.EVENT_READ:
                try:
                    data = side.sock.recv(1 << 16)
                except BlockingIOError:
                    data = None
                if data is not None:
                    if data:
                        other.outbox += data
                    else:
                        side.reading = False
                        other.eof_out = True
                    if pair.connected or other is pair.client:
                        self._send(other)
        except OSError:
            self._close(pair)  # a reset either way ends both
            return
        if not (side.reading or other.reading or side.outbox or other.outbox):
            self._close(pair)
            return
        self._arm(pair)

    def _send(self, side: Side) -> None:
        while side.outbox:
            try:
                sent = side.sock.send(side.outbox)
            except BlockingIOError:
                return
            del side.outbox[:sent]
        if side.eof_out:
            side.eof_out = False
            with contextlib.suppress(OSError):
                side.sock.shutdown(socket.SHUT_WR)

    def _arm(self, pair: Pair) -> None:
        """Watch each socket for what it can do now: read while its peer's outbox has room
        (the client's bytes wait for the connection), write while it has bytes or connects."""
        for ident, side, other in (
            (pair.id, pair.client, pair.upstream),
            (-pair.id, pair.upstream, pair.client),
        ):
            events = 0
            room = len(other.outbox) < MAX_OUTBOX
            if side.reading and room and (pair.connected or side is pair.client):
                events |= selectors.EVENT_READ
            if side.outbox or (side is pair.upstream and not pair.connected):
                events |= selectors.EVENT_WRITE
            key = ("relayed", ident)
            try:
                if events:
                    self.pod.selector.modify(side.sock, events, key)
                else:
                    self.pod.selector.unregister(side.sock)
            except KeyError:
                if events:
                    self.pod.selector.register(side.sock, events, key)

    def _close(self, pair: Pair) -> None:
        self.pairs.pop(pair.id, None)
        for side in (pair.client, pair.upstream):
            with contextlib.suppress(KeyError, ValueError):
                self.pod.selector.unregister(side.sock)
            side.sock.close()

    def close(self) -> None:
        for pair in list(self.pairs.values()):
            self._close(pair)
        super().close()


def _socket_in(netns_fd: int) -> socket.socket:
    """A non-blocking TCP socket of the network namespace ``netns_fd`` (-1: ours): made by a
    thread that entered it (setns is per thread; a socket keeps the namespace it was made in)."""
    if netns_fd < 0:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.setblocking(False)
        return sock
    made: list[socket.socket] = []
    failed: list[BaseException] = []

    def make() -> None:
        try:
            hostns.setns(f"/proc/self/fd/{netns_fd}", hostns.CLONE_NEWNET)
            made.append(socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_CLOEXEC))
        except BaseException as exc:
            failed.append(exc)

    thread = threading.Thread(target=make, name="relay-netns")
    thread.start()
    thread.join()
    if failed:
        raise OSError(errno.EIO, str(failed[0]))
    made[0].setblocking(False)
    return made[0]
