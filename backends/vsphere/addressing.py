"""How the container VM's NIC on the port group gets its address: DHCP, or a static address
leased from ``static_range`` (docs/backends.md, "The guest's network").

A static address must be held by one running container of this host at a time. The leases
live in the runtime's state root (``--root``, the parent of each container's directory):
``vsphere-leases.json`` maps an address to the container id and the VM token that hold it,
changed only under an exclusive ``flock`` of ``vsphere-leases.lock``. A lease is taken before
the VM is made and written to the launch journal with it, so create's cleanup, the monitor's
teardown and a later ``delete`` all release it; a lease whose container directory is gone
(its state removed without a delete) is taken back by the next allocation.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from bonneville.backends.atomicfile import atomic_write
from bonneville.spec.errors import BackendError

LEASES_FILE = "vsphere-leases.json"
LOCK_FILE = "vsphere-leases.lock"
NET_MODES = ("dhcp", "static", "none")


@dataclass(frozen=True)
class StaticRange:
    """``FIRST-LAST/PREFIX``: the addresses containers may take, in their subnet."""

    first: ipaddress.IPv4Address
    last: ipaddress.IPv4Address
    network: ipaddress.IPv4Network

    def __iter__(self) -> Iterator[ipaddress.IPv4Address]:
        for value in range(int(self.first), int(self.last) + 1):
            yield ipaddress.IPv4Address(value)

    def cidr(self, address: ipaddress.IPv4Address) -> str:
        return f"{address}/{self.network.prefixlen}"


def parse_range(text: str) -> StaticRange:
    """``192.0.2.100-192.0.2.199/24`` (or one address, ``192.0.2.100/24``); ValueError says
    what is wrong."""
    spec, slash, prefix = text.strip().partition("/")
    if not slash or not prefix.isdigit():
        raise ValueError(f"{text!r} is not FIRST-LAST/PREFIX (e.g. 192.0.2.100-192.0.2.199/24)")
    first_text, _, last_text = spec.partition("-")
    try:
        first = ipaddress.IPv4Address(first_text.strip())
        last = ipaddress.IPv4Address((last_text or first_text).strip())
        network = ipaddress.IPv4Network(f"{first}/{prefix}", strict=False)
    except ValueError as exc:
        raise ValueError(f"{text!r}: {exc}") from exc
    if last < first:
        raise ValueError(f"{text!r}: {last} comes before {first}")
    if last not in network:
        raise ValueError(f"{text!r}: {last} is not in {network}")
    if network.prefixlen <= 30:
        reserved = {network.network_address, network.broadcast_address}
        for address in (first, last):
            if address in reserved:
                raise ValueError(f"{text!r}: {address} is {network}'s network or broadcast address")
    return StaticRange(first, last, network)


def parse_ipv4(text: str, what: str) -> str:
    """An IPv4 address as given; ValueError naming ``what`` if it is not one."""
    try:
        return str(ipaddress.IPv4Address(text.strip()))
    except ValueError as exc:
        raise ValueError(f"{what} {text!r} is not an IPv4 address") from exc


@dataclass(frozen=True)
class Lease:
    """A static address held for one container (its id and VM token), in ``root``."""

    root: str
    address: str
    container: str
    token: str

    def record(self) -> dict[str, str]:
        """What the launch journal and the backend state keep to release it."""
        return {
            "root": self.root,
            "address": self.address,
            "container": self.container,
            "token": self.token,
        }


@contextlib.contextmanager
def _locked(root: str) -> Iterator[dict[str, Any]]:
    """The leases of ``root``, under the lock; changes to the dict are written back."""
    try:
        fd = os.open(os.path.join(root, LOCK_FILE), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise BackendError(f"cannot lock the static address leases in {root}: {exc}") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        path = os.path.join(root, LEASES_FILE)
        try:
            with open(path, encoding="utf-8") as f:
                leases = json.load(f)
        except FileNotFoundError:
            leases = {}
        except (OSError, ValueError) as exc:
            raise BackendError(f"cannot read the static address leases {path}: {exc}") from exc
        if not isinstance(leases, dict):
            raise BackendError(f"the static address leases {path} are not a JSON object")
        before = json.dumps(leases, sort_keys=True)
        yield leases
        if json.dumps(leases, sort_keys=True) != before:
            try:
                atomic_write(path, json.dumps(leases, sort_keys=True, indent=1).encode())
            except OSError as exc:
                raise BackendError(f"cannot write the static address leases {path}: {exc}") from exc
    finally:
        os.close(fd)


def allocate(root: str, pool: StaticRange, container: str, token: str) -> Lease:
    """The first address of ``pool`` no live container of ``root`` holds, leased to
    ``container``; BackendError when every one is taken."""
    with _locked(root) as leases:
        for address, holder in list(leases.items()):
            # A container whose state directory is gone was removed without a delete.
            owner = holder.get("container") if isinstance(holder, dict) else None
            if not isinstance(owner, str) or not os.path.isdir(os.path.join(root, owner)):
                del leases[address]
        for candidate in pool:
            if str(candidate) not in leases:
                leases[str(candidate)] = {"container": container, "token": token}
                return Lease(root, str(candidate), container, token)
    raise BackendError(
        f"no free address in vsphere.static_range {pool.first}-{pool.last}: "
        f"all {int(pool.last) - int(pool.first) + 1} are held by running containers"
    )


def release(record: Any) -> None:
    """Give a lease back (a ``Lease.record()``), if the container and token still hold it."""
    if not isinstance(record, dict):
        return
    root, address = str(record.get("root") or ""), str(record.get("address") or "")
    if not root or not address or not os.path.isdir(root):
        return
    with _locked(root) as leases:
        holder = leases.get(address)
        if holder == {"container": record.get("container"), "token": record.get("token")}:
            del leases[address]


def net_state(
    mode: str, mac: str, lease: Lease | None, addresses: list[dict[str, Any]]
) -> dict[str, Any]:
    """The backend state's record of the NIC: ``net`` (mode, MAC, the address the guest
    reported) and ``lease`` (a static address's, for whoever releases it)."""
    state: dict[str, Any] = {}
    if lease is not None:
        state["lease"] = lease.record()
    if mode != "none":
        state["net"] = {"mode": mode, "mac": mac}
        if addresses:
            state["net"]["address"] = str(addresses[0].get("address") or "")
    return state


def guest_addressing(
    mode: str,
    mac: str,
    address: str = "",
    gateway: str = "",
    dns: tuple[str, ...] = (),
) -> list[dict[str, Any]]:
    """``network.addressing`` for the agent (docs/protocol.md): the NIC by MAC and how it gets
    its address; empty without a NIC or with mode ``none``."""
    if not mac or mode == "none":
        return []
    entry: dict[str, Any] = {"mac": mac.lower(), "mode": mode}
    if mode == "static":
        entry.update(address=address, gateway=gateway, dns=list(dns))
    return [entry]
