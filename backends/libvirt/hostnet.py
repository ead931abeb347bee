"""The container's NIC for a QEMU that libvirtd runs in the host's network namespace.

Under ``qemu:///system`` QEMU is forked by libvirtd, outside the container's network namespace,
so it cannot open the tap the monitor made there (``shim/network.py``). For each NIC we build a
path out of the namespace instead:

    container netns:  veth (dockerd's) ⇄ tc mirred ⇄ bv<key>c<N> ═╗ veth pair
    host netns:                        bv<key>t<N> ⇄ tc mirred ⇄ bv<key>h<N> ═╝
                      (tap QEMU uses)

The monitor's own tap is deleted (with its tc filters) and the container veth's ingress is
redirected to the pair instead. Every name we create in the host carries this VM's random key:
it cannot collide with another container's, and teardown deletes exactly those names (deleting
a veth end deletes the pair), never another interface. Nothing here touches a link we did not
create except the container veth's ingress qdisc, which the monitor created in the first place.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
from dataclasses import replace

from bonneville.backends import links
from bonneville.backends.base import USER_NIC, VMConfig
from bonneville.spec.errors import BackendError

log = logging.getLogger(__name__)

_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"}
# The names we create (link_names), in the host and in the container's namespace: bv + 8 hex
# of the VM's key + role (c: its end in the container's namespace; h, t: the host's) + NIC
# index. The monitor (shim/network.py) knows a container's namespace by its c end.
OUR_LINK = re.compile(r"^bv[0-9a-f]{8}[cht][0-9]{1,2}$")
DAEMON_PIDFILES = ("/run/libvirtd.pid", "/run/virtqemud.pid")


def host_netns() -> str:
    """The network namespace libvirtd forks QEMU into (PID 1's if the daemon is not found)."""
    for pidfile in DAEMON_PIDFILES:
        try:
            with open(pidfile, encoding="ascii") as f:
                pid = int(f.read().strip())
        except (OSError, ValueError):
            continue
        path = f"/proc/{pid}/ns/net"
        if os.path.exists(path):
            return path
    return "/proc/1/ns/net"


def _removal_netns() -> str | None:
    """Where to delete our host links: :func:`host_netns` if we may enter it, else our own
    namespace (``None``). With libvirtd stopped and PID 1's namespace closed to us (a PID 1 in
    a sandbox, a hardened /proc), ``delete`` still runs where its caller (dockerd, containerd,
    the operator) does: the host's."""
    path = host_netns()
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        log.debug("cannot enter %s (%s): deleting host links in our own namespace", path, exc)
        return None
    try:
        if os.fstat(fd).st_ino == os.stat("/proc/self/ns/net").st_ino:
            return None  # already there: no nsenter needed
    finally:
        os.close(fd)
    return path


def _run(argv: list[str], netns: str | None = None) -> str:
    if netns is not None:
        argv = ["nsenter", f"--net={netns}", *argv]
    result = subprocess.run(
        argv, capture_output=True, text=True, env=_ENV, close_fds=True, check=False
    )
    if result.returncode != 0:
        raise BackendError(f"{' '.join(argv)}: {result.stderr.strip()}")
    return result.stdout


def _mirror(a: str, b: str, netns: str | None) -> None:
    """Every frame arriving on ``a`` leaves through ``b`` and back (as the monitor's taps)."""
    links.batch("tc", links.mirror_commands(a, b), netns)


def _redirect_source(tap: str) -> str:
    """The container interface whose frames the monitor mirrors into ``tap``."""
    shown = _run(["tc", "-j", "filter", "show", "dev", tap, "ingress"])
    for entry in json.loads(shown or "[]"):
        for action in (entry.get("options") or {}).get("actions", []):
            if action.get("kind") == "mirred" and action.get("to_dev"):
                return str(action["to_dev"])
    raise BackendError(f"cannot find the container interface behind {tap}")


def _mtu(link: str) -> int:
    data = json.loads(_run(["ip", "-j", "link", "show", "dev", link]))
    return int(data[0].get("mtu", 1500))


def link_names(key: str, index: int) -> tuple[str, str, str]:
    """(container end, host end, host tap) for NIC ``index`` of the VM with ``key``."""
    prefix = f"bv{key[:8]}"
    return f"{prefix}c{index}", f"{prefix}h{index}", f"{prefix}t{index}"


def host_links(key: str, nics: tuple[tuple[str, str], ...]) -> list[str]:
    """The host-side names ``wire`` creates for these NICs (to journal before it does); a
    user-mode NIC (host networking) needs none."""
    return [
        name
        for index, (tap, _) in enumerate(nics)
        if tap != USER_NIC
        for name in link_names(key, index)[1:]
    ]


def wire(config: VMConfig, key: str) -> VMConfig:
    """Build each NIC's path into the host; ``config`` for a QEMU there (its taps renamed).

    Called in the monitor, inside the container's network namespace. Undo a failure half-way
    with ``remove(host_links(key, config.nics))``: it skips names that do not exist.
    """
    host = host_netns()
    nics = []
    for index, (tap, mac) in enumerate(config.nics):
        if tap == USER_NIC:
            nics.append((tap, mac))  # libvirt's own user-mode stack: nothing to wire
            continue
        inner, outer, host_tap = link_names(key, index)
        for name in (inner, outer, host_tap):
            if not OUR_LINK.match(name):
                raise BackendError(f"refusing to create link {name!r}")
        container_if = _redirect_source(tap)
        mtu = _mtu(tap)
        # Replace the monitor's tap (QEMU cannot reach it) by the veth pair's inner end.
        _run(["ip", "link", "del", "dev", tap])
        _run(["tc", "qdisc", "del", "dev", container_if, "ingress"])
        _run(["ip", "link", "add", inner, "mtu", str(mtu), "type", "veth", "peer", "name", outer])
        _run(["ip", "link", "set", "dev", outer, "netns", host])
        _run(["ip", "link", "set", "dev", inner, "up"])
        _mirror(container_if, inner, None)
        _run(["ip", "tuntap", "add", "dev", host_tap, "mode", "tap"], host)
        _run(["ip", "link", "set", "dev", host_tap, "mtu", str(mtu), "up"], host)
        _run(["ip", "link", "set", "dev", outer, "up"], host)
        _mirror(outer, host_tap, host)
        nics.append((host_tap, mac))
    return replace(config, nics=tuple(nics))


def remove(names: list[str]) -> None:
    """Delete our host-side links (only names of our own pattern); missing ones are fine.

    One `ip` process for all, the taps first: a caller killed part-way (go-runc kills the
    runtime when its context ends, e.g. when a `docker run` client goes away) then leaves at
    most a veth end, which goes with the container's namespace; a tap would stay for good.
    """
    # The role letter follows "bv" and the key's 8 hex digits.
    ours = sorted((n for n in names if OUR_LINK.match(n)), key=lambda n: n[10] != "t")
    if not ours:
        return
    # A name that is absent (never made, or the pair's other end took it along) is fine;
    # anything else is a leak someone must hear about.
    problems = links.delete_links(ours, _removal_netns())
    if problems:
        log.warning("cannot delete host links %s: %s", " ".join(ours), "; ".join(problems))
