"""The vSphere VM's own network for real, with QEMU standing in for ESXi
(integration/vsphere_qemu.py) and a network namespace for the port group.

The test makes a network namespace holding a tap (192.0.2.1/24) and busybox's udhcpd serving
it; QEMU runs there with the real boot ISO and root disk and a vmxnet3 NIC on that tap, its
serial channel to a `SerialListener` in the same namespace. The agent gets ``network`` with the
``addressing`` the backend sends (backends/vsphere/addressing.py) and must come back with the
DHCP lease, or the static address, on the NIC found by MAC, the default route and the
container's /etc/resolv.conf. Then the monitor's port relay (shim/monitor/relay.py) listens here,
in the test's own network namespace standing in for the container's, and carries a connection
to a server in the container through the VM's address, reached from the port group's
namespace standing in for the runtime's. Everything made here goes away, even on failure.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import selectors
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from bonneville.backends.vsphere.addressing import guest_addressing
from bonneville.guest import protocol
from bonneville.shim.agent_client import AgentConnection
from bonneville.shim.monitor.relay import AddressRelay
from bonneville.spec.errors import AgentError
from integration.vsphere_qemu import (
    CALL_TIMEOUT,
    Booted,
    Nic,
    VMParts,
    boot,
    create_container,
    make_vm_parts,
    run_in_container,
)

pytestmark = pytest.mark.vm

BUSYBOX = "/bin/busybox"
GATEWAY = "192.0.2.1"
SUBNET = ipaddress.IPv4Network("192.0.2.0/24")
POOL = ("192.0.2.50", "192.0.2.59")
MAC = "00:50:56:0b:0e:01"
TEMPLATE_MAC = "00:50:56:0b:0e:99"
RELAY_TIMEOUT = 30.0


@dataclass
class PortGroup:
    """The network namespace standing in for the port group: its tap and DHCP server."""

    netns: str
    tap: str
    dhcp: subprocess.Popen[bytes] | None = None
    extra: list[str] = field(default_factory=list)


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@pytest.fixture
def port_group(tmp_path: Path) -> Iterator[PortGroup]:
    for tool in ("ip",):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is missing (install.sh installs iproute2)")
    if not os.access(BUSYBOX, os.X_OK):
        pytest.fail(f"{BUSYBOX} is missing (install.sh installs busybox-static)")
    tag = f"{os.getpid() % 100000}"
    group = PortGroup(netns=f"bvvnet-{tag}", tap=f"bvvt{tag}")
    ip("netns", "add", group.netns)
    try:
        for args in (
            ("link", "set", "lo", "up"),
            ("tuntap", "add", "dev", group.tap, "mode", "tap"),
            ("addr", "add", f"{GATEWAY}/{SUBNET.prefixlen}", "dev", group.tap),
            ("link", "set", group.tap, "up"),
        ):
            ip("-n", group.netns, *args)
        yield group
    finally:
        if group.dhcp is not None:
            group.dhcp.kill()
            group.dhcp.wait()
        subprocess.run(["ip", "-n", group.netns, "link", "del", group.tap], capture_output=True)
        subprocess.run(["ip", "netns", "del", group.netns], capture_output=True)
    assert not Path(f"/run/netns/{group.netns}").exists()


def start_udhcpd(group: PortGroup, tmp_path: Path) -> None:
    conf = tmp_path / "udhcpd.conf"
    conf.write_text(
        f"start {POOL[0]}\nend {POOL[1]}\ninterface {group.tap}\n"
        f"lease_file {tmp_path / 'udhcpd.leases'}\npidfile {tmp_path / 'udhcpd.pid'}\n"
        f"option subnet {SUBNET.netmask}\noption router {GATEWAY}\n"
        "option dns 192.0.2.53\noption domain bonneville.test\noption lease 3600\n"
    )
    (tmp_path / "udhcpd.leases").touch()
    with open(tmp_path / "udhcpd.log", "wb") as out:
        group.dhcp = subprocess.Popen(
            ["ip", "netns", "exec", group.netns, BUSYBOX, "udhcpd", "-f", str(conf)],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            close_fds=True,
        )


@pytest.fixture
def vm_parts(tmp_path: Path) -> VMParts:
    return make_vm_parts(tmp_path)


def configure(vm: Booted, addressing: list[dict[str, Any]]) -> dict[str, Any]:
    """``network`` as the monitor sends it for a vSphere VM; the agent's ``addresses``."""
    reply = vm.agent.call(
        "network",
        CALL_TIMEOUT,
        network={"interfaces": [], "routes": [], "addressing": addressing, "watchPorts": True},
    )
    addresses = reply["addresses"]
    assert isinstance(addresses, list) and len(addresses) == 1
    got: dict[str, Any] = addresses[0]
    assert (got["mac"], got["mode"]) == (MAC, addressing[0]["mode"])
    return got


def container_network(agent: AgentConnection) -> tuple[str, str, str]:
    """The container's view: IPv4 addresses, routes, resolv.conf."""
    out, status = run_in_container(
        agent,
        10,
        "ip -4 -o addr show; echo ==; ip -4 route show; echo ==; cat /etc/resolv.conf",
    )
    assert status == 0, out
    addresses, routes, resolv = out.split("==\n")
    return addresses, routes, resolv


def test_dhcp_address_route_resolv_conf_and_a_relayed_port(
    tmp_path: Path, vm_parts: VMParts, port_group: PortGroup
) -> None:
    with boot(tmp_path, vm_parts, Nic(port_group.tap, MAC), port_group.netns) as vm:
        create_container(vm.agent, "dhcp")
        # No DHCP server yet: the request fails with one line, and may be made again.
        with pytest.raises(AgentError, match=r"no DHCP lease on eth0 within 3 s"):
            configure(vm, [{**guest_addressing("dhcp", MAC)[0], "timeout": 3}])
        start_udhcpd(port_group, tmp_path)
        got = configure(vm, guest_addressing("dhcp", MAC))
        address = ipaddress.IPv4Interface(got["address"])
        assert address.network == SUBNET
        assert POOL[0] <= str(address.ip) <= POOL[1], got
        assert (got["gateway"], got["dns"], got["domain"]) == (
            GATEWAY,
            ["192.0.2.53"],
            "bonneville.test",
        )
        addresses, routes, resolv = container_network(vm.agent)
        assert f"inet {address.with_prefixlen} " in addresses, addresses
        assert f"default via {GATEWAY} dev {got['interface']}" in routes, routes
        assert "nameserver 192.0.2.53\n" in resolv and "search bonneville.test\n" in resolv
        relay_a_connection(vm, str(address.ip), port_group.netns)


def test_static_address_route_and_resolv_conf(
    tmp_path: Path, vm_parts: VMParts, port_group: PortGroup
) -> None:
    # The NIC still has another MAC, as an instant clone's has its template's: the agent
    # gives it the one vSphere assigned before addressing it.
    with boot(tmp_path, vm_parts, Nic(port_group.tap, TEMPLATE_MAC), port_group.netns) as vm:
        create_container(vm.agent, "static")
        addressing = guest_addressing(
            "static", MAC, "192.0.2.77/24", GATEWAY, ("192.0.2.54", "192.0.2.55")
        )
        got = configure(vm, addressing)
        assert got["address"] == "192.0.2.77/24"
        addresses, routes, resolv = container_network(vm.agent)
        assert "inet 192.0.2.77/24 " in addresses, addresses
        link, _ = run_in_container(vm.agent, 11, f"ip -o link show dev {got['interface']}")
        assert f"link/ether {MAC} " in link, link
        assert f"default via {GATEWAY} dev {got['interface']}" in routes, routes
        assert "nameserver 192.0.2.54\nnameserver 192.0.2.55\n" in resolv, resolv
        # The port group reaches the VM at its address.
        ping = subprocess.run(
            [
                *("ip", "netns", "exec", port_group.netns),
                BUSYBOX,
                "ping",
                "-c1",
                "-W20",
                "192.0.2.77",
            ],
            capture_output=True,
            text=True,
        )
        assert ping.returncode == 0, ping.stdout + ping.stderr


# ---- the port relay ----------------------------------------------------------------------------


class RelayPod:
    """What AddressRelay uses of the monitor's Pod: its selector and the VM's address and
    runtime network namespace."""

    def __init__(self, address: str, netns_fd: int) -> None:
        self.selector = selectors.DefaultSelector()

        class VMSide:
            guest_address = address
            runtime_netns_fd = netns_fd

        self.vm = VMSide()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def relay_a_connection(vm: Booted, address: str, netns: str) -> None:
    """A server in the container, published by the relay here, answers a client here."""
    port = free_port()
    out, status = run_in_container(
        vm.agent,
        12,
        "mkdir -p /www && echo 'hello through the relay' > /www/index.html"
        f" && httpd -p {port} -h /www && echo started",
    )
    assert status == 0 and "started" in out, out
    netns_fd = os.open(f"/run/netns/{netns}", os.O_RDONLY | os.O_CLOEXEC)
    pod = RelayPod(address, netns_fd)
    relay = AddressRelay(pod)  # type: ignore[arg-type]
    answer: list[bytes] = []
    client_error: list[BaseException] = []
    published = threading.Event()

    def client() -> None:
        try:
            if not published.wait(RELAY_TIMEOUT):
                return
            with socket.create_connection(("127.0.0.1", port), timeout=RELAY_TIMEOUT) as sock:
                sock.sendall(b"GET /index.html HTTP/1.0\r\n\r\n")
                sock.shutdown(socket.SHUT_WR)
                data = b""
                while chunk := sock.recv(4096):
                    data += chunk
                answer.append(data)
        except BaseException as exc:
            client_error.append(exc)

    thread = threading.Thread(target=client)
    thread.start()
    try:
        pod.selector.register(vm.agent.sock, selectors.EVENT_READ, "agent")
        frames = vm.agent.take_backlog()
        deadline = time.monotonic() + RELAY_TIMEOUT
        while thread.is_alive() and time.monotonic() < deadline:
            for ftype, _stream, payload in frames:
                if ftype == protocol.CONTROL:
                    message = protocol.decode_control(payload)
                    if message.get("op") == "ports":
                        relay.on_ports(message.get("tcp"))
                        if ("0.0.0.0", port) in relay.listeners:
                            published.set()
            frames = []
            for key, events in pod.selector.select(0.2):
                what = key.data
                if what == "agent":
                    frames = vm.agent.receive()
                    assert not vm.agent.closed
                elif what[0] == "listener":
                    relay.on_accept(what[1])
                elif what[0] == "relayed":
                    relay.on_ready(what[1], events)
        assert published.is_set(), f"port {port} was never published by the relay"
    finally:
        published.set()
        thread.join(RELAY_TIMEOUT)
        relay.close()
        pod.selector.close()
        os.close(netns_fd)
    assert not client_error, client_error
    assert answer and answer[0].startswith(b"HTTP/1.") and b"hello through the relay" in answer[0]
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
        raise AssertionError("the relay's listener outlived it")
