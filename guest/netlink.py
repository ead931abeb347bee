"""Just enough rtnetlink to configure the guest's interfaces: link up/MTU/MAC, addresses, routes.

The agent used to run busybox `ip` for each step; under TCG every fork+exec of a binary the clone
has not run yet costs a tenth of a second or more, and a container start needs several. These
are a handful of messages on one socket instead. Standard library only (it runs in the guest).
"""

from __future__ import annotations

import ipaddress
import os
import socket
import struct

NETLINK_ROUTE = 0
RTM_NEWLINK = 16
RTM_NEWADDR = 20
RTM_NEWROUTE = 24
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLM_F_EXCL = 0x200
NLM_F_CREATE = 0x400
NLMSG_ERROR = 2
IFF_UP = 0x1
IFLA_ADDRESS = 1
IFLA_MTU = 4
IFA_ADDRESS = 1
IFA_LOCAL = 2
IFA_BROADCAST = 4
IFA_F_NODAD = 0x2
RTA_DST = 1
RTA_OIF = 4
RTA_GATEWAY = 5
RTA_PRIORITY = 6
RT_TABLE_MAIN = 254
RTPROT_BOOT = 3
RT_SCOPE_UNIVERSE = 0
RT_SCOPE_LINK = 253
RTN_UNICAST = 1

_HEADER = struct.Struct("=IHHII")  # nlmsghdr: len, type, flags, seq, pid
_IFINFO = struct.Struct("=BxHiII")  # ifinfomsg: family, type, index, flags, change
_IFADDR = struct.Struct("=BBBBi")  # ifaddrmsg: family, prefixlen, flags, scope, index
_RTMSG = struct.Struct("=BBBBBBBBI")  # rtmsg: family, dst_len, src_len, tos, table, proto...


def _attr(kind: int, payload: bytes) -> bytes:
    length = 4 + len(payload)
    return struct.pack("=HH", length, kind) + payload + b"\0" * (-length % 4)


class Netlink:
    """One rtnetlink socket; every request waits for the kernel's acknowledgement."""

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_ROUTE)
        self._sock.bind((0, 0))
        self._seq = 0

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> Netlink:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _request(self, msg_type: int, flags: int, body: bytes) -> None:
        self._seq += 1
        flags |= NLM_F_REQUEST | NLM_F_ACK
        header = _HEADER.pack(_HEADER.size + len(body), msg_type, flags, self._seq, 0)
        self._sock.send(header + body)
        while True:
            data = self._sock.recv(65536)
            offset = 0
            while offset + _HEADER.size <= len(data):
                length, kind, _, seq, _ = _HEADER.unpack_from(data, offset)
                if kind == NLMSG_ERROR and seq == self._seq:
                    (error,) = struct.unpack_from("=i", data, offset + _HEADER.size)
                    if error:
                        raise OSError(-error, os.strerror(-error))
                    return
                offset += max(length, _HEADER.size) + (-length % 4)

    def set_link(
        self, index: int, *, up: bool = True, mtu: int | None = None, mac: str | None = None
    ) -> None:
        """Bring a link up, with the given MTU and MAC address."""
        body = _IFINFO.pack(socket.AF_UNSPEC, 0, index, IFF_UP if up else 0, IFF_UP)
        if mtu:
            body += _attr(IFLA_MTU, struct.pack("=I", mtu))
        if mac:
            body += _attr(IFLA_ADDRESS, bytes.fromhex(mac.replace(":", "")))
        self._request(RTM_NEWLINK, 0, body)

    def add_address(self, index: int, cidr: str) -> None:
        """An address with its prefix (the kernel adds the subnet's route), as dockerd gives a
        container's veth one: IPv4 with the subnet's broadcast address, IPv6 without duplicate
        address detection (the address is usable at once, not "tentative" for a second)."""
        iface = ipaddress.ip_interface(cidr)
        family, flags = (
            (socket.AF_INET, 0) if iface.version == 4 else (socket.AF_INET6, IFA_F_NODAD)
        )
        prefixlen = iface.network.prefixlen
        packed = iface.ip.packed
        body = _IFADDR.pack(family, prefixlen, flags, RT_SCOPE_UNIVERSE, index)
        body += _attr(IFA_LOCAL, packed) + _attr(IFA_ADDRESS, packed)
        if iface.version == 4 and prefixlen <= 30:  # a /31 or /32 has no broadcast address
            body += _attr(IFA_BROADCAST, iface.network.broadcast_address.packed)
        self._request(RTM_NEWADDR, NLM_F_CREATE | NLM_F_EXCL, body)

    def add_route(
        self,
        dst: str,
        gateway: str | None,
        index: int | None,
        *,
        version: int = 4,
        metric: int | None = None,
    ) -> None:
        """A route to ``dst`` ("default" or a CIDR) of IP ``version``, via ``gateway`` and/or out
        of ``index``, with the given ``metric`` (else the kernel's default for the family)."""
        default = "0.0.0.0/0" if version == 4 else "::/0"
        network = ipaddress.ip_network(default if dst == "default" else dst, strict=False)
        if gateway and ipaddress.ip_address(gateway).version != network.version:
            raise OSError(22, f"gateway {gateway} is not of the family of {dst}")
        family = socket.AF_INET if network.version == 4 else socket.AF_INET6
        scope = RT_SCOPE_UNIVERSE if gateway else RT_SCOPE_LINK
        body = _RTMSG.pack(
            family, network.prefixlen, 0, 0, RT_TABLE_MAIN, RTPROT_BOOT, scope, RTN_UNICAST, 0
        )
        if network.prefixlen:
            body += _attr(RTA_DST, network.network_address.packed)
        if gateway:
            body += _attr(RTA_GATEWAY, ipaddress.ip_address(gateway).packed)
        if index is not None:
            body += _attr(RTA_OIF, struct.pack("=i", index))
        if metric is not None:
            body += _attr(RTA_PRIORITY, struct.pack("=I", metric))
        self._request(RTM_NEWROUTE, NLM_F_CREATE | NLM_F_EXCL, body)
