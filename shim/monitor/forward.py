"""The host ends of the ports the guest listens on (the agent reports them as they open and
close, docs/protocol.md ``ports``), each accepted connection relayed to the guest over the agent
channel (``connect`` and a stream).

- **Host networking** (no network namespace of the container's own): a port the container
  listens on is published on the host at the same port, on the host's loopback for a guest
  loopback socket and on every address for a wildcard one, as a host-network container's is
  under runc. A port the host already uses is logged, not fatal.
- **A pod's sandbox**: containerd's CRI ``PortForward`` (`kubectl port-forward`) dials
  ``localhost:PORT`` inside the pod's network namespace, where the VM's address lives but the
  guest's loopback does not: the owner listens there on 127.0.0.1 for every port of the pod.

Nothing here opens a path from the guest to the host: connections only go host to guest.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import selectors
import socket

from bonneville.guest import protocol

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from bonneville.shim.monitor.pod import Pod

log = logging.getLogger("bonneville.monitor")

WILDCARDS = {"0.0.0.0": "127.0.0.1", "::": "::1"}
LOOPBACKS = {"127.0.0.1", "::1"}
MAX_OUTBOX = 16 << 20  # what a slow client may leave unread before its connection is dropped


class Relayed:
    """An accepted connection and the guest's bytes it has not taken yet."""

    def __init__(self, conn: socket.socket, stream: int) -> None:
        self.conn = conn
        self.stream = stream
        self.outbox = bytearray()
        self.eof_out = False  # the guest side ended: shut our writing down once out
        self.connected = False
        self.reading = True  # our client has not ended its side yet


class Forwarder:
    def __init__(self, pod: Pod, on_host: bool) -> None:
        self.pod = pod
        self.on_host = on_host
        self.listeners: dict[tuple[str, int], socket.socket] = {}  # our address → listener
        self.guest: dict[tuple[str, int], tuple[str, int]] = {}  # our address → guest's
        self.relayed: dict[int, Relayed] = {}
        self.refused: set[tuple[str, int]] = set()

    @property
    def streams(self) -> set[int]:
        return set(self.relayed)

    def _ours(self, address: str, port: int) -> tuple[str, int]:
        """Where we listen for a guest socket at ``address``."""
        if not self.on_host:
            return ("127.0.0.1", port)  # CRI's port-forward dials localhost in the netns
        if address in WILDCARDS or address in LOOPBACKS:
            return (address, port)
        return ("0.0.0.0", port)  # a guest address the host does not have: every address

    def on_ports(self, listening: Any) -> None:
        """The guest's listening TCP sockets now: listen for the new ones, drop the gone."""
        wanted: dict[tuple[str, int], tuple[str, int]] = {}
        for entry in listening if isinstance(listening, list) else []:
            if not (isinstance(entry, list) and len(entry) == 2):
                continue
            address, port = str(entry[0]), entry[1]
            if not isinstance(port, int) or not 0 < port < 65536:
                continue
            ours = self._ours(address, port)
            connect = WILDCARDS.get(address, address)
            wanted.setdefault(ours, (connect, port))
        for address, port in list(wanted):
            # A wildcard IPv6 listener takes IPv4 too (as the guest's usually does).
            if address == "0.0.0.0" and ("::", port) in wanted:
                del wanted[(address, port)]
        for ours in [k for k in self.listeners if k not in wanted]:
            sock = self.listeners.pop(ours)
            self.guest.pop(ours, None)
            with contextlib.suppress(KeyError, ValueError):
                self.pod.selector.unregister(sock)
            sock.close()
            log.info("port %s withdrawn", _name(ours))
        self.refused &= set(wanted)
        for ours, target in wanted.items():
            if ours in self.listeners or ours in self.refused:
                continue
            try:
                sock = _listen(*ours)
            except OSError as exc:
                self.refused.add(ours)
                log.warning(
                    "port %s is not published: %s",
                    _name(ours),
                    "it is in use on the host" if exc.errno == errno.EADDRINUSE else exc.strerror,
                )
                continue
            self.listeners[ours] = sock
            self.guest[ours] = target
            self.pod.selector.register(sock, selectors.EVENT_READ, ("listener", ours))
            log.info("port %s published", _name(ours))

    def on_accept(self, ours: tuple[str, int]) -> None:
        sock = self.listeners.get(ours)
        if sock is None:
            return
        try:
            conn, _ = sock.accept()
        except OSError:
            return
        conn.setblocking(False)
        stream = self.pod.members.new_stream()
        relayed = Relayed(conn, stream)
        self.relayed[stream] = relayed
        address, port = self.guest[ours]

        def connected(result: dict[str, Any]) -> None:
            if stream not in self.relayed:
                return
            if not result.get("ok"):
                log.info(
                    "connection to port %d refused in the guest: %s", port, result.get("error")
                )
                self._drop(relayed)
                return
            relayed.connected = True
            self._watch(relayed)

        self.pod.agent.request("connect", connected, id=stream, port=port, address=address)

    def on_ready(self, stream: int, events: int) -> None:
        relayed = self.relayed.get(stream)
        if relayed is None:
            return
        if events & selectors.EVENT_WRITE:
            self._flush(relayed)
        if events & selectors.EVENT_READ:
            try:
                data = relayed.conn.recv(1 << 16)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            self.pod.agent.send_data(protocol.STDIN, stream, data)
            if not data:
                relayed.reading = False
                self._watch(relayed)

    def on_output(self, stream: int, data: bytes) -> None:
        """The guest side's bytes (empty: it ended) for our connection."""
        relayed = self.relayed.get(stream)
        if relayed is None:
            return
        if not data:
            relayed.eof_out = True
        relayed.outbox += data
        if len(relayed.outbox) > MAX_OUTBOX:
            log.warning("port-forward connection dropped: its client does not read")
            self._drop(relayed)
            return
        self._flush(relayed)

    def on_closed(self, stream: int) -> None:
        """The guest closed its end for good."""
        relayed = self.relayed.get(stream)
        if relayed is not None:
            self._flush(relayed)
            self._drop(relayed)

    def _flush(self, relayed: Relayed) -> None:
        while relayed.outbox:
            try:
                sent = relayed.conn.send(relayed.outbox)
            except BlockingIOError:
                break
            except OSError:
                relayed.outbox.clear()
                break
            del relayed.outbox[:sent]
        if relayed.eof_out and not relayed.outbox:
            with contextlib.suppress(OSError):
                relayed.conn.shutdown(socket.SHUT_WR)
        if relayed.connected:
            self._watch(relayed)

    def _watch(self, relayed: Relayed) -> None:
        events = (selectors.EVENT_READ if relayed.reading else 0) | (
            selectors.EVENT_WRITE if relayed.outbox else 0
        )
        key = ("relayed", relayed.stream)
        try:
            if events:
                self.pod.selector.modify(relayed.conn, events, key)
            else:
                self.pod.selector.unregister(relayed.conn)
        except KeyError:
            if events:
                self.pod.selector.register(relayed.conn, events, key)

    def _drop(self, relayed: Relayed) -> None:
        self.relayed.pop(relayed.stream, None)
        with contextlib.suppress(KeyError, ValueError):
            self.pod.selector.unregister(relayed.conn)
        relayed.conn.close()

    def close(self) -> None:
        for relayed in list(self.relayed.values()):
            self._drop(relayed)
        for sock in self.listeners.values():
            with contextlib.suppress(KeyError, ValueError):
                self.pod.selector.unregister(sock)
            sock.close()
        self.listeners.clear()


def _listen(address: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(address != "::"))
        sock.bind((address, port))
        sock.listen(64)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


def _name(address: tuple[str, int]) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
