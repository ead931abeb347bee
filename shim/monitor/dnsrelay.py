"""The host's side of the DNS relay (guest/dnsrelay.py): the container's resolv.conf names a
resolver on a loopback address of its network namespace (docker's embedded one, 127.0.0.11, on
a user network; a host-network container's 127.0.0.53), which the VM cannot reach. The agent
answers there and passes each query up; the owner monitor, which sits in that namespace, asks
the resolver and passes the answer down.

Only DNS messages, only to port 53 of the loopback resolvers the container's resolv.conf named
when it was created: the relay is no path from the guest to anything else on the host. Each
query runs in a short-lived thread (a resolver may take seconds), bounded in number.
"""

from __future__ import annotations

import base64
import contextlib
import ipaddress
import logging
import os
import queue
import socket
import struct
import threading

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from bonneville.spec.config import Bundle

log = logging.getLogger("bonneville.monitor")

PORT = 53
TIMEOUT = 5.0
MAX_IN_FLIGHT = 32
MAX_MESSAGE = 65535


def loopback_resolvers(bundle: Bundle) -> list[str]:
    """The loopback nameservers of the container's resolv.conf (the bind mount docker and
    containerd give it, else the rootfs's own)."""
    path = os.path.join(bundle.rootfs, "etc/resolv.conf")
    for m in bundle.spec.mounts:
        if m.is_bind and os.path.normpath(m.destination) == "/etc/resolv.conf":
            path = m.source if os.path.isabs(m.source) else os.path.join(bundle.path, m.source)
    try:
        with open(path) as f:
            text = f.read(1 << 16)
    except OSError:
        return []
    found = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 2 and fields[0] == "nameserver":
            try:
                address = ipaddress.ip_address(fields[1].split("%")[0])
            except ValueError:
                continue
            if address.is_loopback and str(address) not in found:
                found.append(str(address))
    return found


class DnsRelay:
    def __init__(self, resolvers: list[str]) -> None:
        self.resolvers = set(resolvers)
        self.answers: queue.SimpleQueue[tuple[int, bytes]] = queue.SimpleQueue()
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.in_flight = 0
        self.lock = threading.Lock()

    def query(self, message: dict[str, Any]) -> None:
        """A query the agent passed up: ask its resolver in a thread of its own."""
        to = message.get("to")
        ident = message.get("id")
        if to not in self.resolvers or not isinstance(ident, int):
            return  # only the resolvers the container was given
        try:
            data = base64.b64decode(str(message.get("data") or ""), validate=True)
        except ValueError:
            return
        if not data or len(data) > MAX_MESSAGE:
            return
        with self.lock:
            if self.in_flight >= MAX_IN_FLIGHT:
                return  # the client retries, as after a lost datagram
            self.in_flight += 1
        args = (ident, str(to), bool(message.get("tcp")), data)
        threading.Thread(target=self._ask, args=args, daemon=True).start()

    def _ask(self, ident: int, to: str, tcp: bool, data: bytes) -> None:
        family = socket.AF_INET6 if ":" in to else socket.AF_INET
        answer = b""
        try:
            with socket.socket(family, socket.SOCK_STREAM if tcp else socket.SOCK_DGRAM) as s:
                s.settimeout(TIMEOUT)
                s.connect((to, PORT))
                if tcp:
                    s.sendall(struct.pack(">H", len(data)) + data)
                    answer = _read_tcp_answer(s)
                else:
                    s.send(data)
                    answer = s.recv(MAX_MESSAGE)
        except OSError as exc:
            log.debug("DNS query to %s failed: %s", to, exc)
        finally:
            with self.lock:
                self.in_flight -= 1
        if answer:
            self.answers.put((ident, answer))
            with contextlib.suppress(OSError):
                os.write(self.wake_w, b"x")

    def take_answers(self) -> list[tuple[int, bytes]]:
        """The answers that came in (the event loop calls this when wake_r is readable)."""
        with contextlib.suppress(OSError):
            while os.read(self.wake_r, 512):
                pass
        found = []
        while True:
            try:
                found.append(self.answers.get_nowait())
            except queue.Empty:
                return found

    def close(self) -> None:
        for fd in (self.wake_r, self.wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)


def _read_tcp_answer(sock: socket.socket) -> bytes:
    buf = b""
    while len(buf) < 2:
        chunk = sock.recv(2 - len(buf))
        if not chunk:
            return b""
        buf += chunk
    (length,) = struct.unpack(">H", buf)
    body = b""
    while len(body) < length:
        chunk = sock.recv(length - len(body))
        if not chunk:
            return b""
        body += chunk
    return body
