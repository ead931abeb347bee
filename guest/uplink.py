"""NICs on a network of the backend's own (vSphere's port group), not mirrors of the container's
host-side interfaces: the guest addresses them itself (docs/protocol.md, ``network.addressing``).

- ``dhcp``: busybox's ``udhcpc`` on the NIC (found by MAC), left running to renew the lease. Its
  event script (``SCRIPT``, written to /run at first use) puts the lease's address and default
  route on the NIC and records the lease in ``/run/bonneville/dhcp-NIC``, which the agent waits
  for (bounded).
- ``static``: the address and default route through netlink.

Then each container's ``/etc/resolv.conf`` names the DNS servers (written from a child chrooted
into the container's root, so the container's own symlinks resolve inside it), and the reply
tells the host what each NIC got. Standard library only: this module goes into the guest image.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import socket
import stat
import time

from bonneville.guest.common import Log, Refused, errtext
from bonneville.guest.netconfig import guest_nics
from bonneville.guest.netlink import Netlink

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

BUSYBOX = "/bin/busybox"
RUN_DIR = "/run/bonneville"
SCRIPT = RUN_DIR + "/udhcpc.script"
DHCP_TIMEOUT = 30.0  # seconds for the first lease: create fails without one
POLL = 0.01

# udhcpc runs this on each event with the lease in its environment ($ip, $mask, $router, $dns,
# $domain). The lease file is written last, once the NIC has the address.
UDHCPC_SCRIPT = """#!/bin/sh
# Written by the Bonneville agent (guest/uplink.py): udhcpc's events for $interface.
lease=/run/bonneville/dhcp-$interface
fail() {
	printf 'error=%s\\n' "$*" >"$lease.new" && mv -f "$lease.new" "$lease"
	exit 1
}
case "$1" in
deconfig)
	ip -4 addr flush dev "$interface"
	ip link set dev "$interface" up
	;;
bound | renew)
	[ -n "$mask" ] || mask=32
	if ! ip -4 addr show dev "$interface" | grep -q "inet $ip/$mask "; then
		ip -4 addr flush dev "$interface"
		ip addr add "$ip/$mask" broadcast + dev "$interface" || fail "ip addr add $ip/$mask failed"
	fi
	for gateway in $router; do
		ip route replace default via "$gateway" dev "$interface" && break
	done
	printf 'ip=%s\\nmask=%s\\nrouter=%s\\ndns=%s\\ndomain=%s\\n' \\
		"$ip" "$mask" "$router" "$dns" "$domain" >"$lease.new" && mv -f "$lease.new" "$lease"
	;;
esac
exit 0
"""


def address_nics(
    addressing: list[Any], roots: list[int], log: Log, taken: tuple[str, ...] = ()
) -> list[dict[str, Any]]:
    """Address each NIC of ``addressing``; ``roots``: the init PIDs of the containers whose
    /etc/resolv.conf gets the DNS servers; ``taken``: MACs of NICs ``interfaces`` configures.
    What each NIC got, for the reply.

    A NIC is found by its MAC. A clone of a running VM (an instant clone) may still carry its
    template's MAC: failing a match, a NIC that nothing else claims is given the MAC."""
    if not all(isinstance(entry, dict) for entry in addressing):
        raise Refused("network: addressing entries must be objects")
    nics = guest_nics()
    wanted = {str(entry.get("mac", "")).lower() for entry in addressing} | set(taken)
    spare = [name for mac, name in nics.items() if mac not in wanted]
    results = []
    for entry in addressing:
        mac = str(entry.get("mac", "")).lower()
        name = nics.get(mac)
        if name is None:
            if not spare:
                raise Refused(f"no network interface for MAC {mac} in the guest")
            name = spare.pop(0)
            with Netlink() as nl:
                nl.set_link(socket.if_nametoindex(name), mac=mac)
        mode = entry.get("mode")
        if mode == "dhcp":
            got = dhcp(name, float(entry.get("timeout") or DHCP_TIMEOUT))
        elif mode == "static":
            got = static(name, entry)
        else:
            raise Refused(f"network: unknown addressing mode {mode!r}")
        got.update(mac=mac, interface=name, mode=mode)
        log("info", f"{name} ({mac}): {got['address']} by {mode}")
        if got["dns"]:
            text = resolv_conf(got["dns"], got.get("domain", ""), f"{mode} on {name}")
            for pid in roots:
                try:
                    write_resolv_conf(pid, text)
                except OSError as exc:
                    log("warning", f"cannot write /etc/resolv.conf of a container: {errtext(exc)}")
        results.append(got)
    return results


def static(name: str, entry: dict[str, Any]) -> dict[str, Any]:
    """The given address and default route on NIC ``name``."""
    address = str(entry.get("address") or "")
    gateway = str(entry.get("gateway") or "")
    index = socket.if_nametoindex(name)
    with Netlink() as nl:
        nl.set_link(index)
        nl.add_address(index, address)
        if gateway:
            nl.add_route("default", gateway, index)
    dns = [str(server) for server in entry.get("dns") or []]
    return {"address": address, "gateway": gateway, "dns": dns}


def dhcp(name: str, timeout: float) -> dict[str, Any]:
    """A lease for NIC ``name`` from udhcpc, which keeps running to renew it."""
    os.makedirs(RUN_DIR, exist_ok=True)
    with open(SCRIPT, "w") as f:
        f.write(UDHCPC_SCRIPT)
    os.chmod(SCRIPT, 0o755)
    lease_path = f"{RUN_DIR}/dhcp-{name}"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(lease_path)
    pid = _spawn_udhcpc(name)
    deadline = time.monotonic() + timeout
    while not os.path.exists(lease_path):
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            raise Refused(f"udhcpc on {name} ended with status {os.waitstatus_to_exitcode(status)}")
        if time.monotonic() >= deadline:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            raise Refused(f"no DHCP lease on {name} within {timeout:.0f} s")
        time.sleep(POLL)
    lease = parse_lease(_read(lease_path))
    if lease.get("error"):
        raise Refused(f"DHCP on {name}: {lease['error']}")
    routers = lease.get("router", "").split()
    return {
        "address": f"{lease.get('ip', '')}/{lease.get('mask') or 32}",
        "gateway": routers[0] if routers else "",
        "dns": lease.get("dns", "").split(),
        "domain": lease.get("domain", ""),
    }


def _spawn_udhcpc(name: str) -> int:
    """udhcpc in the foreground (the agent reaps it), its output on the console."""
    argv = ["udhcpc", "-f", "-i", name, "-s", SCRIPT, "-t", "5", "-T", "2", "-A", "2"]
    try:
        out = os.open("/dev/console", os.O_WRONLY | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError:
        out = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
    try:
        return os.posix_spawn(
            BUSYBOX,
            argv,
            {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
            file_actions=[
                (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                (os.POSIX_SPAWN_DUP2, out, 1),
                (os.POSIX_SPAWN_DUP2, out, 2),
            ],
            setsid=True,
            setsigdef=(signal.SIGPIPE, signal.SIGINT, signal.SIGTERM, signal.SIGCHLD),
        )
    finally:
        os.close(out)


def parse_lease(text: str) -> dict[str, str]:
    """The ``key=value`` lines the event script records."""
    lease = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            lease[key.strip()] = value.strip()
    return lease


def resolv_conf(servers: list[str], domain: str, source: str) -> str:
    lines = [f"# written by bonneville from {source}"]
    if domain:
        lines.append(f"search {domain}")
    lines += [f"nameserver {server}" for server in servers]
    return "\n".join(lines) + "\n"


def write_resolv_conf(pid: int, text: str) -> None:
    """Write /etc/resolv.conf in place (it may be a bind-mounted file) in the root of process
    ``pid``, from a child chrooted there: a symlink in the container resolves inside it."""
    child = os.fork()
    if child == 0:
        code = 1
        try:
            os.chroot(f"/proc/{pid}/root")
            os.chdir("/")
            # O_NONBLOCK: a FIFO planted there fails instead of hanging the agent.
            flags = os.O_WRONLY | os.O_CREAT | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC
            fd = os.open("/etc/resolv.conf", flags, 0o644)
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise OSError(errno.EINVAL, "not a regular file")
            os.ftruncate(fd, 0)
            data = text.encode()
            while data:
                data = data[os.write(fd, data) :]
            code = 0
        except OSError as exc:
            code = exc.errno or 1
        finally:
            os._exit(code)
    _, status = os.waitpid(child, 0)
    code = os.waitstatus_to_exitcode(status)
    if code:
        raise OSError(code, os.strerror(code) if code > 0 else f"killed by signal {-code}")


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()
