"""The vSphere VM's own network, without a server: the addressing settings, static_range
parsing, the address leases under the state root, the ``network.addressing`` message, and the
guest's pure helpers (lease records, resolv.conf). The guest side for real is
integration/test_vsphere_net.py."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import multiprocessing.queues
import os
import re
from pathlib import Path

import pytest

from bonneville.backends.vsphere import addressing
from bonneville.backends.vsphere import config as vconfig
from bonneville.guest import uplink
from bonneville.spec.errors import BackendError, ConfigError

BASE = 'url = "https://x/sdk"\nusername = "u"\n'


def load(tmp_path: Path, body: str, **env: str) -> vconfig.VSphereSettings:
    # A file name per load: spec.settings caches each file's contents by its path.
    cfg_file = tmp_path / f"config-{len(list(tmp_path.iterdir()))}.toml"
    cfg_file.write_text("[vsphere]\n" + BASE + body)
    return vconfig.load(
        {"BONNEVILLE_CONFIG": str(cfg_file), "BONNEVILLE_VSPHERE_PASSWORD": "p", **env}
    )


# ---- settings ------------------------------------------------------------------------------


def test_dhcp_is_the_default_with_a_network_and_none_without(tmp_path: Path) -> None:
    assert load(tmp_path, 'network = "VM Network"\n').net_mode == "dhcp"
    assert load(tmp_path, "").net_mode == "none"


def test_static_settings_from_file_and_environment(tmp_path: Path) -> None:
    cfg = load(
        tmp_path,
        'network = "VM Network"\nnet_mode = "static"\n'
        'static_range = "192.0.2.100-192.0.2.199/24"\ngateway = "192.0.2.1"\n'
        'dns = ["192.0.2.53", "198.51.100.53"]\n',
    )
    assert (cfg.net_mode, cfg.static_range, cfg.gateway) == (
        "static",
        "192.0.2.100-192.0.2.199/24",
        "192.0.2.1",
    )
    assert cfg.dns == ("192.0.2.53", "198.51.100.53")
    # The environment's list is a comma- or space-separated string.
    cfg = load(
        tmp_path,
        'network = "VM Network"\n',
        BONNEVILLE_VSPHERE_NET_MODE="static",
        BONNEVILLE_VSPHERE_STATIC_RANGE="10.0.0.5/24",
        BONNEVILLE_VSPHERE_DNS="10.0.0.53, 10.0.0.54",
    )
    assert (cfg.static_range, cfg.gateway, cfg.dns) == (
        "10.0.0.5/24",
        "",
        ("10.0.0.53", "10.0.0.54"),
    )


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            'network = "N"\nnet_mode = "bootp"\n',
            "vsphere.net_mode must be one of dhcp, static, none",
        ),
        ('net_mode = "dhcp"\n', "vsphere.net_mode dhcp needs vsphere.network"),
        (
            'network = "N"\nnet_mode = "static"\n',
            "vsphere.net_mode static needs vsphere.static_range",
        ),
        (
            'network = "N"\nnet_mode = "static"\nstatic_range = "192.0.2.10-192.0.2.5/24"\n',
            "vsphere.static_range '192.0.2.10-192.0.2.5/24': 192.0.2.5 comes before 192.0.2.10",
        ),
        (
            'network = "N"\nnet_mode = "static"\nstatic_range = "192.0.2.10-192.0.3.5/24"\n',
            "192.0.3.5 is not in 192.0.2.0/24",
        ),
        (
            'network = "N"\nnet_mode = "static"\nstatic_range = "192.0.2.10-192.0.2.20"\n',
            "is not FIRST-LAST/PREFIX",
        ),
        (
            'network = "N"\nnet_mode = "static"\nstatic_range = "192.0.2.x/24"\n',
            "vsphere.static_range '192.0.2.x/24'",
        ),
        (
            'network = "N"\nnet_mode = "static"\nstatic_range = "192.0.2.0-192.0.2.9/24"\n',
            "192.0.2.0 is 192.0.2.0/24's network or broadcast address",
        ),
        (
            'network = "N"\nnet_mode = "static"\nstatic_range = "192.0.2.5/24"\n'
            'gateway = "198.51.100.1"\n',
            "vsphere.gateway 198.51.100.1 is not in 192.0.2.0/24",
        ),
        (
            'network = "N"\nnet_mode = "static"\nstatic_range = "192.0.2.5/24"\n'
            'dns = ["dns.example"]\n',
            "vsphere.dns entry 'dns.example' is not an IPv4 address",
        ),
        ('network = "N"\nnet_mode = "static"\nstatic_range = "192.0.2.5/24"\ndns = 5\n', "a list"),
        ('network = "N"\ngateway = "192.0.2.1"\n', 'are for vsphere.net_mode = "static"'),
    ],
)
def test_addressing_settings_errors(tmp_path: Path, body: str, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)) as caught:
        load(tmp_path, body)
    assert "\n" not in str(caught.value)


def test_a_bad_range_fails_the_backends_preflight(tmp_path: Path) -> None:
    """create asks preflight() before it makes anything: the state root stays empty."""
    from bonneville.backends.vsphere.backend import VSphereBackend

    cfg_file = tmp_path / "config.toml"
    cfg_file.write_text(
        "[vsphere]\n" + BASE + 'network = "N"\nnet_mode = "static"\nstatic_range = "nope"\n'
    )
    os.environ["BONNEVILLE_CONFIG"] = str(cfg_file)
    os.environ["BONNEVILLE_VSPHERE_PASSWORD"] = "p"
    try:
        with pytest.raises(ConfigError, match=re.escape("vsphere.static_range 'nope'")):
            VSphereBackend().preflight()
    finally:
        del os.environ["BONNEVILLE_CONFIG"], os.environ["BONNEVILLE_VSPHERE_PASSWORD"]


# ---- static_range ----------------------------------------------------------------------------


def test_range_parsing() -> None:
    pool = addressing.parse_range(" 192.0.2.100-192.0.2.102/24 ")
    assert [str(a) for a in pool] == ["192.0.2.100", "192.0.2.101", "192.0.2.102"]
    assert str(pool.network) == "192.0.2.0/24"
    assert pool.cidr(pool.first) == "192.0.2.100/24"
    single = addressing.parse_range("10.1.2.3/8")
    assert [str(a) for a in single] == ["10.1.2.3"]
    # A /31 (point-to-point) has no network or broadcast address to avoid.
    assert len(list(addressing.parse_range("192.0.2.0-192.0.2.1/31"))) == 2


# ---- leases ------------------------------------------------------------------------------------


def live(root: Path, *ids: str) -> None:
    for ident in ids:
        (root / ident).mkdir()


def test_leases_are_unique_and_released(tmp_path: Path) -> None:
    pool = addressing.parse_range("192.0.2.10-192.0.2.11/24")
    live(tmp_path, "a", "b", "c")
    a = addressing.allocate(str(tmp_path), pool, "a", "tok-a")
    b = addressing.allocate(str(tmp_path), pool, "b", "tok-b")
    assert (a.address, b.address) == ("192.0.2.10", "192.0.2.11")
    with pytest.raises(BackendError, match=r"no free address in vsphere\.static_range"):
        addressing.allocate(str(tmp_path), pool, "c", "tok-c")
    # Only the holder's own record releases it (a stale record of a reused id does not).
    addressing.release({**a.record(), "token": "another"})
    with pytest.raises(BackendError):
        addressing.allocate(str(tmp_path), pool, "c", "tok-c")
    addressing.release(a.record())
    addressing.release(a.record())  # twice: nothing more happens
    assert addressing.allocate(str(tmp_path), pool, "c", "tok-c").address == "192.0.2.10"
    leases = json.loads((tmp_path / addressing.LEASES_FILE).read_text())
    assert leases == {
        "192.0.2.10": {"container": "c", "token": "tok-c"},
        "192.0.2.11": {"container": "b", "token": "tok-b"},
    }


def test_a_lease_of_a_container_whose_state_is_gone_is_taken_back(tmp_path: Path) -> None:
    pool = addressing.parse_range("192.0.2.10/24")
    live(tmp_path, "gone", "new")
    addressing.allocate(str(tmp_path), pool, "gone", "t1")
    (tmp_path / "gone").rmdir()  # removed without a delete (no release)
    assert addressing.allocate(str(tmp_path), pool, "new", "t2").address == "192.0.2.10"


def test_release_of_nothing_or_of_a_vanished_root_is_harmless(tmp_path: Path) -> None:
    addressing.release(None)
    addressing.release({})
    addressing.release({"root": str(tmp_path / "gone"), "address": "192.0.2.1"})
    assert not (tmp_path / "gone").exists()


def _take(root: str, ident: str, queue: multiprocessing.Queue[str]) -> None:
    pool = addressing.parse_range("192.0.2.10-192.0.2.29/24")
    queue.put(addressing.allocate(root, pool, ident, "t-" + ident).address)


def test_concurrent_allocations_never_share_an_address(tmp_path: Path) -> None:
    ids = [f"c{i}" for i in range(12)]
    live(tmp_path, *ids)
    ctx = multiprocessing.get_context("fork")
    queue: multiprocessing.Queue[str] = ctx.Queue()
    procs = [ctx.Process(target=_take, args=(str(tmp_path), i, queue)) for i in ids]
    for proc in procs:
        proc.start()
    got = [queue.get(timeout=30) for _ in ids]
    for proc in procs:
        proc.join(timeout=30)
        assert proc.exitcode == 0
    assert len(set(got)) == len(ids)


# ---- the agent's message -------------------------------------------------------------------


def test_guest_addressing_message() -> None:
    assert addressing.guest_addressing("dhcp", "00:50:56:AB:CD:EF") == [
        {"mac": "00:50:56:ab:cd:ef", "mode": "dhcp"}
    ]
    assert addressing.guest_addressing(
        "static", "00:50:56:ab:cd:ef", "192.0.2.100/24", "192.0.2.1", ("192.0.2.53",)
    ) == [
        {
            "mac": "00:50:56:ab:cd:ef",
            "mode": "static",
            "address": "192.0.2.100/24",
            "gateway": "192.0.2.1",
            "dns": ["192.0.2.53"],
        }
    ]
    assert addressing.guest_addressing("none", "00:50:56:ab:cd:ef") == []
    assert addressing.guest_addressing("dhcp", "") == []  # no NIC on the VM


# ---- the guest's helpers -------------------------------------------------------------------


def test_lease_record_and_resolv_conf() -> None:
    lease = uplink.parse_lease(
        "ip=192.0.2.57\nmask=24\nrouter=192.0.2.1 192.0.2.2\ndns=192.0.2.53\ndomain=example\n"
    )
    assert lease == {
        "ip": "192.0.2.57",
        "mask": "24",
        "router": "192.0.2.1 192.0.2.2",
        "dns": "192.0.2.53",
        "domain": "example",
    }
    assert uplink.resolv_conf(["192.0.2.53", "192.0.2.54"], "example", "dhcp on eth0") == (
        "# written by bonneville from dhcp on eth0\nsearch example\n"
        "nameserver 192.0.2.53\nnameserver 192.0.2.54\n"
    )


def test_leases_in_an_unwritable_root_fail_with_one_line(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-root"
    with pytest.raises(BackendError, match="cannot lock the static address leases") as caught:
        addressing.allocate(str(missing), addressing.parse_range("192.0.2.10/24"), "a", "t")
    assert "\n" not in str(caught.value)


def test_backend_state_records_mode_mac_address_and_lease(tmp_path: Path) -> None:
    lease = addressing.Lease(str(tmp_path), "192.0.2.10", "c1", "tok")
    got = [{"address": "192.0.2.10/24", "interface": "eth0"}]
    assert addressing.net_state("static", "00:50:56:00:00:01", lease, got) == {
        "lease": {
            "root": str(tmp_path),
            "address": "192.0.2.10",
            "container": "c1",
            "token": "tok",
        },
        "net": {"mode": "static", "mac": "00:50:56:00:00:01", "address": "192.0.2.10/24"},
    }
    assert addressing.net_state("dhcp", "00:50:56:00:00:01", None, []) == {
        "net": {"mode": "dhcp", "mac": "00:50:56:00:00:01"}
    }
    assert addressing.net_state("none", "", None, []) == {}


# ---- the monitor's side ------------------------------------------------------------------------


class AddressedVM:
    """A backend VM on a network of its own, as PodVM sees it."""

    def __init__(self) -> None:
        self.got: list[dict[str, object]] = []

    def guest_addressing(self) -> list[dict[str, object]]:
        return addressing.guest_addressing("dhcp", "00:50:56:00:00:01")

    def addressed(self, addresses: list[dict[str, object]]) -> None:
        self.got = addresses


def test_the_monitor_sends_the_addressing_and_notes_what_the_guest_got(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from types import SimpleNamespace

    from bonneville.shim.monitor.daemon import Timeline
    from bonneville.shim.monitor.vm import PodVM

    pod_vm = PodVM(SimpleNamespace(host_network=False), Timeline())  # type: ignore[arg-type]
    vm = AddressedVM()
    pod_vm.vm = vm  # type: ignore[assignment]
    request = pod_vm.network_request()
    assert request["addressing"] == [{"mac": "00:50:56:00:00:01", "mode": "dhcp"}]
    assert request["interfaces"] == []
    entry = {
        "mac": "00:50:56:00:00:01",
        "interface": "eth0",
        "mode": "dhcp",
        "address": "192.0.2.57/24",
        "gateway": "192.0.2.1",
        "dns": ["192.0.2.53"],
    }
    with caplog.at_level("INFO", logger="bonneville.monitor"):
        pod_vm.addressed({"timings": [], "addresses": [entry, "junk"]})
    assert vm.got == [entry]
    assert pod_vm.guest_address == "192.0.2.57"
    assert (
        "guest NIC eth0 (00:50:56:00:00:01): 192.0.2.57/24 by dhcp, gateway 192.0.2.1,"
        " DNS 192.0.2.53" in caplog.text
    )
    # A guest that reports nothing (host mode) leaves no address to relay to.
    silent = PodVM(SimpleNamespace(host_network=False), Timeline())  # type: ignore[arg-type]
    silent.vm = AddressedVM()  # type: ignore[assignment]
    silent.addressed({"timings": []})
    assert silent.guest_address == ""


# ---- the port relay (shim/monitor/relay.py), in private network namespaces ---------------------


def relayed_to_the_guest_address() -> dict[str, object]:
    """Run in a private network namespace standing for the container's; a thread makes another
    for the runtime's, where the "guest" listens on 127.0.0.2 (the VM's address)."""
    import ctypes
    import selectors
    import socket
    import threading
    import time

    from bonneville.guest.netlink import Netlink
    from bonneville.shim.monitor.relay import AddressRelay

    def lo_up() -> None:
        with Netlink() as nl:
            nl.set_link(socket.if_nametoindex("lo"))

    lo_up()
    made: list[object] = []
    payload = os.urandom(4 << 20)

    def guest() -> None:
        if ctypes.CDLL(None, use_errno=True).unshare(0x40000000) != 0:  # CLONE_NEWNET
            raise OSError(ctypes.get_errno(), "unshare")
        lo_up()
        server = socket.create_server(("127.0.0.2", 0))
        made.extend([os.open("/proc/thread-self/ns/net", os.O_RDONLY), server])
        conn, _ = server.accept()
        with conn:
            while data := conn.recv(1 << 16):
                conn.sendall(data)  # an echo, half-closed when the client's side ends

    thread = threading.Thread(target=guest, daemon=True)
    thread.start()
    while len(made) < 2:
        time.sleep(0.01)
    netns_fd, server = made
    assert isinstance(netns_fd, int) and isinstance(server, socket.socket)
    port = server.getsockname()[1]

    class VMSide:
        guest_address = "127.0.0.2"
        runtime_netns_fd = netns_fd

    class Pod:
        selector = selectors.DefaultSelector()
        vm = VMSide()

    relay = AddressRelay(Pod())  # type: ignore[arg-type]
    relay.on_ports(
        [
            ["0.0.0.0", port],  # a wildcard socket: relayed
            ["127.0.0.1", port + 1],  # loopback only: not reachable over the NIC
            ["10.9.9.9", port + 2],  # another address: neither
            ["127.0.0.2", port + 3],  # the VM's own address (nothing listens: refused)
            "junk",
        ]
    )
    out: dict[str, object] = {"listeners": sorted(f"{a}:{p - port}" for a, p in relay.listeners)}
    echoed: list[bytes] = []

    def client() -> None:
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sender = threading.Thread(target=lambda: (sock.sendall(payload), sock.shutdown(1)))
            sender.start()
            data = bytearray()
            while chunk := sock.recv(1 << 16):
                data += chunk
            sender.join()
            echoed.append(bytes(data))
        with socket.create_connection(("127.0.0.1", port + 3)) as sock:
            echoed.append(sock.recv(10))  # the relay closes it: the guest refused

    user = threading.Thread(target=client)
    user.start()
    deadline = time.monotonic() + 30
    while user.is_alive() and time.monotonic() < deadline:
        for key, events in Pod.selector.select(0.1):
            kind, what = key.data
            if kind == "listener":
                relay.on_accept(what)
            else:
                relay.on_ready(what, events)
    user.join(1)
    out["echoed"] = [hashlib.sha256(e).hexdigest() for e in echoed]
    out["sent"] = hashlib.sha256(payload).hexdigest()
    out["pairs_left"] = len(relay.pairs)
    relay.on_ports([])
    out["after_withdrawal"] = len(relay.listeners)
    relay.close()
    return out


def test_the_relay_carries_connections_to_the_guest_address_from_the_runtime_netns() -> None:
    from tests.support import in_private_netns

    out = in_private_netns(
        "import json\nfrom tests.test_vsphere_net import relayed_to_the_guest_address\n"
        "print(json.dumps(relayed_to_the_guest_address()))"
    )
    assert out["listeners"] == ["0.0.0.0:0", "0.0.0.0:3"]
    assert out["echoed"] == [out["sent"], hashlib.sha256(b"").hexdigest()]
    assert out["pairs_left"] == 0
    assert out["after_withdrawal"] == 0


def test_a_template_per_port_group(tmp_path: Path) -> None:
    """Clones keep their template's NIC: a template made without the network (or another)
    must not serve a config that names one."""
    from bonneville.backends.vsphere.template import template_name

    none = template_name(load(tmp_path, ""), "k")
    ours = template_name(load(tmp_path, 'network = "VM Network"\n'), "k")
    other = template_name(load(tmp_path, 'network = "DMZ"\n'), "k")
    assert none == "bonneville-template-k"
    assert ours.startswith("bonneville-template-k-net") and len({none, ours, other}) == 3
