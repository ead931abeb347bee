"""The container's network namespace, handed to its VM.

dockerd (through its prestart hook) or CNI puts a veth with the container's addresses into the
namespace the monitor sits in. The VM must own that address: for each such interface we create
a tap, mirror every frame between veth and tap with tc (ingress redirect both ways), and give
the guest NIC the veth's MAC, addresses and routes.
"""

from __future__ import annotations

import json
import logging
import subprocess
from dataclasses import dataclass, field

from bonneville.backends import links
from bonneville.backends.libvirt import hostnet
from bonneville.spec.errors import BonnevilleError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Collection
    from typing import Any

log = logging.getLogger("bonneville")

CONTAINER_LINK_KINDS = frozenset({"veth", "macvlan", "ipvlan", "macvtap"})
TAP_PREFIX = "bvtap"
_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"}


@dataclass
class Interface:
    name: str
    mac: str
    mtu: int
    addresses: list[str] = field(default_factory=list)
    tap: str = ""
    ipv6: bool = True  # dockerd turns IPv6 off in the namespace unless the network has it


def _ip(*args: str) -> Any:
    result = subprocess.run(
        ["ip", *args], capture_output=True, text=True, env=_ENV, close_fds=True, check=False
    )
    if result.returncode != 0:
        raise BonnevilleError(f"ip {' '.join(args)}: {result.stderr.strip()}")
    return json.loads(result.stdout) if "-j" in args and result.stdout.strip() else None


def discover(own_taps: Collection[str] = ()) -> tuple[list[Interface], list[dict[str, Any]]]:
    """The namespace's interfaces (not lo) with their addresses (IPv4, and IPv6 but link-local),
    and its routes (IPv4, and IPv6 where it is on).

    A tap of ours other than ``own_taps`` means the namespace was a container VM's: one that
    a VM holds open (its carrier is up) fails, as its interfaces are that container's (docker's
    `--network container:…`; a VM cannot share another's network stack); one nobody holds,
    left by a create that was killed, is deleted.
    """
    interfaces = []
    stale = []
    for link in _ip("-j", "-d", "addr", "show"):
        kind = (link.get("linkinfo") or {}).get("info_kind")
        name = link.get("ifname", "")
        held = _held_by_a_vm(name, kind, "LOWER_UP" in link.get("flags", ()))
        if held is not None and name not in own_taps:
            if held:
                raise BonnevilleError(
                    f"the container's network namespace is another container VM's (its NIC"
                    f" {name} is in use): containers cannot share a network namespace"
                    " (docker --network container:…)"
                )
            stale.append(name)
            continue
        # Only what container networking hands a namespace: a physical NIC, an ifb or our own
        # taps must never be taken over (were we ever in the host's namespace by mistake).
        if link.get("link_type") != "ether" or kind not in CONTAINER_LINK_KINDS:
            continue
        # Link-local (IPv6 "link" scope) addresses are the guest kernel's to make from the MAC.
        addresses = [
            f"{a['local']}/{a['prefixlen']}"
            for a in link.get("addr_info", [])
            if a.get("family") in ("inet", "inet6") and a.get("scope") == "global"
        ]
        interfaces.append(
            Interface(
                link["ifname"],
                link["address"].lower(),
                int(link.get("mtu", 1500)),
                addresses,
                ipv6=ipv6_enabled(link["ifname"]),
            )
        )
    if stale:
        log.info("deleting taps no VM holds, left by an earlier create: %s", " ".join(stale))
        remove_taps(stale)
    routes = []
    by_name = {i.name: i for i in interfaces}
    # IPv6 routes only where IPv6 is on (dockerd's IPv4 networks turn it off): one `ip` less.
    for version in (4, 6) if any(i.ipv6 for i in interfaces) else (4,):
        for route in _ip("-j", f"-{version}", "route", "show") or []:
            iface = by_name.get(route.get("dev", ""))
            if iface is None or route.get("protocol") == "kernel":
                continue  # routes of the interfaces' own subnets come with their addresses
            if route.get("type", "unicast") != "unicast":
                continue  # multicast, blackhole…: not routes dockerd gives a container
            entry = {
                "dst": route.get("dst", "default"),
                "gateway": route.get("gateway"),
                "mac": iface.mac,
                "version": version,
            }
            if "metric" in route:
                entry["metric"] = int(route["metric"])
            routes.append(entry)
    return interfaces, routes


def _held_by_a_vm(name: str, kind: str | None, carrier: bool) -> bool | None:
    """For a link that is a container VM's NIC path: whether a VM holds it. None for others.

    Our taps (bvtap<N>) are held while a QEMU has them open: the kernel turns their carrier on
    (LOWER_UP; the operstate follows only later, through the kernel's link watch).
    The libvirt backend's veth end in the namespace (bv<key>c<N>, backends/libvirt/hostnet.py)
    has a pair in the host's namespace: held as long as it exists.
    """
    if kind == "tun" and name.startswith(TAP_PREFIX):
        return carrier
    if kind == "veth" and hostnet.OUR_LINK.match(name) and name[10] == "c":
        return True
    return None


def wire(interfaces: list[Interface]) -> None:
    """A tap per interface, frames mirrored both ways (the tap is what QEMU opens)."""
    mirror(interfaces, make_taps(len(interfaces)))


def make_taps(count: int) -> list[str]:
    """``count`` taps (bvtap0…), up, not yet connected to anything. On failure, those it made
    are deleted again, never one of the same name that was there before."""
    taps = [f"{TAP_PREFIX}{index}" for index in range(count)]
    commands = [f"{verb} {tap}" for tap in taps for verb in _TAP_VERBS]
    result = links.run_batch("ip", commands, None)
    if result.returncode != 0:
        # ip stops at the first line that fails and names it ("Command failed -:N"): the taps
        # added on lines before it are ours.
        _, found, rest = result.stderr.partition("Command failed -:")
        failed = int(rest.split()[0]) if found and rest.split()[0].isdigit() else 0
        remove_taps([tap for i, tap in enumerate(taps) if i * len(_TAP_VERBS) + 1 < failed])
        raise links.batch_error("ip", result)
    return taps


_TAP_VERBS = ("tuntap add mode tap dev", "link set up dev")


def remove_taps(taps: list[str]) -> None:
    """Delete our taps (their tc filters go with them); missing ones are fine."""
    links.delete_links(taps)


def random_mac() -> str:
    """A locally administered unicast MAC of our own (host networking's NIC)."""
    import os

    octets = bytearray(os.urandom(6))
    octets[0] = (octets[0] & 0xFC) | 0x02
    return ":".join(f"{b:02x}" for b in octets)


def placeholder_mac(index: int) -> str:
    """A MAC for NIC ``index`` before the interface it will carry is known (the agent gives the
    guest NIC the interface's MAC at setup, as it does for a clone)."""
    return f"02:42:00:00:00:{index + 1:02x}"


def mirror(interfaces: list[Interface], taps: list[str]) -> None:
    """Tie each interface to its tap: the tap takes its MTU, frames are mirrored both ways
    (tc ingress redirects). One `ip` and one `tc` process for all of it: each process start
    is milliseconds of the container's create."""
    pairs = list(zip(interfaces, taps, strict=True))
    if not pairs:
        return
    for iface, tap in pairs:
        iface.tap = tap
    links.batch("ip", [f"link set dev {tap} mtu {iface.mtu}" for iface, tap in pairs])
    commands = [line for iface, tap in pairs for line in links.mirror_commands(iface.name, tap)]
    try:
        links.batch("tc", commands)
    except BonnevilleError as exc:
        if not any(sign in str(exc) for sign in _QDISC_EXISTS):
            raise
        # An ingress qdisc was there already: an earlier VM's, in a namespace the caller keeps
        # (discover() made sure no VM holds it now). Its redirects lead nowhere: start afresh.
        log.info("replacing the ingress redirects an earlier VM left: %s", exc)
        names = [name for iface, tap in pairs for name in (iface.name, tap)]
        links.run_batch("tc", [f"qdisc del dev {name} ingress" for name in names], None, force=True)
        links.batch("tc", commands)


# How `tc qdisc add` says the qdisc exists (with the kernel's extended ack, and without).
_QDISC_EXISTS = ("Exclusivity flag on", "File exists")


def ipv6_enabled(link: str) -> bool:
    """Whether ``link``, in our network namespace, has IPv6 (``disable_ipv6`` is 0)."""
    try:
        with open(f"/proc/sys/net/ipv6/conf/{link}/disable_ipv6", encoding="ascii") as f:
            return f.read().strip() == "0"
    except OSError:  # no such link, or no IPv6 in this kernel
        return False


def guest_config(
    interfaces: list[Interface],
    routes: list[dict[str, Any]],
    ipv6: dict[str, bool] | None = None,
) -> dict[str, Any]:
    """The guest's side of the network: each NIC as its interface (MAC, MTU, addresses, IPv6 on
    or off), the routes, and IPv6 on or off for ``all``, ``default`` and ``lo``:
    the namespace as runc's container would have it (see :data:`IPV6_SETTINGS`)."""
    return {
        "interfaces": [
            {"mac": i.mac, "mtu": i.mtu, "addresses": i.addresses, "ipv6": i.ipv6}
            for i in interfaces
        ],
        "routes": routes,
        "ipv6": dict(ipv6 or {}),
    }


# The namespace-wide IPv6 switches dockerd sets (all of them off for a network without IPv6).
IPV6_SETTINGS = ("all", "default", "lo")
