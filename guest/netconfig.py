"""The pod's network inside the guest: its NICs given the addresses, MACs and routes the
container's interfaces had on the host (docs/protocol.md, ``network``). Standard library only:
this module goes into the guest image."""

from __future__ import annotations

import contextlib
import os
import socket
import time

from bonneville.guest.common import Log, Refused, write_file
from bonneville.guest.netlink import Netlink

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


def guest_nics() -> dict[str, str]:
    """The guest's Ethernet NICs: MAC → name."""
    nics = {}
    for name in sorted(os.listdir("/sys/class/net")):
        try:
            with open(f"/sys/class/net/{name}/type") as f:
                if f.read().strip() != "1":  # ARPHRD_ETHER; lo is 772
                    continue
            with open(f"/sys/class/net/{name}/address") as f:
                nics[f.read().strip().lower()] = name
        except OSError:
            continue
    return nics


def set_ipv6(name: str, enabled: bool) -> None:
    """Turn IPv6 on or off for a NIC, ``lo``, ``all`` or ``default``, only if that changes it:
    a write to ``all`` sets every NIC (absent without IPv6: nothing to do)."""
    path = f"/proc/sys/net/ipv6/conf/{name}/disable_ipv6"
    wanted = "0" if enabled else "1"
    with contextlib.suppress(FileNotFoundError):
        with open(path) as f:
            if f.read().strip() == wanted:
                return
        write_file(path, wanted)


def configure_network(network: dict[str, Any], log: Log) -> None:
    """Give the guest the addresses and routes the container's interfaces had on the host.

    The host gave each virtio NIC its veth's MAC, in the order of ``interfaces``. A clone's NICs
    still carry its template's MACs: those are matched by order and given the container's MAC.
    Then it waits (bounded) for each NIC's carrier, which a veth has when runc's container starts.
    """
    # IPv6 as the container's namespace has it (dockerd turns it off for an IPv4 network):
    # ``all`` first, as writing it sets every NIC; each NIC below, once it has its MAC.
    for name, enabled in (network.get("ipv6") or {}).items():
        if name in ("all", "default", "lo"):
            set_ipv6(name, bool(enabled))
    nics = guest_nics()
    wanted = [str(iface.get("mac", "")).lower() for iface in network.get("interfaces") or []]
    spare = [name for mac, name in nics.items() if mac not in wanted]
    names: dict[str, str] = {}
    ready: dict[str, bool] = {}  # each NIC set up → whether it has IPv6
    with Netlink() as nl:
        nl.set_link(socket.if_nametoindex("lo"))
        for iface, mac in zip(network.get("interfaces") or [], wanted, strict=True):
            if mac in nics:
                name, new_mac = nics[mac], None
            elif spare:
                name, new_mac = spare.pop(0), mac
            else:
                raise Refused(f"no network interface for MAC {mac} in the guest")
            names[mac] = name
            index = socket.if_nametoindex(name)
            nl.set_link(index, mtu=int(iface.get("mtu") or 0) or None, mac=new_mac)
            # Its link-local address comes from the MAC it has now.
            ready[name] = bool(iface.get("ipv6", True))
            set_ipv6(name, ready[name])
            for address in iface.get("addresses") or []:
                nl.add_address(index, str(address))
        for route in network.get("routes") or []:
            dev = names.get(str(route.get("mac", "")).lower())
            metric = route.get("metric")
            nl.add_route(
                str(route.get("dst") or "default"),
                route.get("gateway"),
                socket.if_nametoindex(dev) if dev else None,
                version=int(route.get("version") or 4),
                metric=None if metric is None else int(metric),
            )
    late = await_links(ready, LINK_WAIT)
    if late:
        log("warning", f"no carrier on {', '.join(late)} after {LINK_WAIT} s: starting anyway")


# How long setup waits for a NIC's carrier (virtio-net reports it from a work queue after the
# driver loads, and the kernel's link watch may hold the news back for up to a second).
LINK_WAIT = 3.0


def _link_ready(name: str, ipv6: bool) -> bool:
    """Whether a NIC is up as a veth is when the container starts: carrier on (operstate up)
    and, with IPv6, its link-local address made (the kernel makes it once the carrier is on)."""
    try:
        with open(f"/sys/class/net/{name}/operstate") as f:
            if f.read().strip() != "up":
                return False
        if not ipv6:
            return True
        with open("/proc/net/if_inet6") as f:
            return any(
                row.split()[-1] == name and row.startswith("fe80") for row in f.read().splitlines()
            )
    except OSError:
        return False


def await_links(nics: dict[str, bool], timeout: float) -> list[str]:
    """Poll, up to ``timeout``, until every NIC (name → IPv6 on) is ready; the ones that are not."""
    deadline = time.monotonic() + timeout
    pending = dict(nics)
    while True:
        pending = {name: ipv6 for name, ipv6 in pending.items() if not _link_ready(name, ipv6)}
        if not pending or time.monotonic() >= deadline:
            return sorted(pending)
        time.sleep(0.002)
