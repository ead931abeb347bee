"""The TCP ports the guest listens on, read from /proc/net/tcp{,6}: the host publishes them
(host networking) or forwards to them (a pod's port-forward) as they open and close.
Standard library only: this module goes into the guest image."""

from __future__ import annotations

import socket
import struct

LISTEN = "0A"
INTERVAL = 0.5  # seconds between looks: a server's port is published within this


def _address(hex_addr: str, family: int) -> str:
    raw = bytes.fromhex(hex_addr)
    if family == socket.AF_INET:
        return socket.inet_ntop(family, struct.pack("<I", struct.unpack(">I", raw)[0]))
    # /proc prints an IPv6 address as four host-order 32-bit words.
    words = [raw[i : i + 4][::-1] for i in range(0, 16, 4)]
    return socket.inet_ntop(family, b"".join(words))


def parse(text: str, family: int) -> set[tuple[str, int]]:
    """(address, port) of the listening sockets in a /proc/net/tcp{,6} table."""
    found = set()
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 4 or fields[3] != LISTEN:
            continue
        addr, _, port = fields[1].partition(":")
        try:
            found.add((_address(addr, family), int(port, 16)))
        except (ValueError, OSError):
            continue
    return found


def listening() -> set[tuple[str, int]]:
    """Every listening TCP socket of the VM's network namespace."""
    found: set[tuple[str, int]] = set()
    for path, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        try:
            with open(path) as f:
                found |= parse(f.read(), family)
        except OSError:
            continue
    return found
