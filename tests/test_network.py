"""The monitor's side of container networking (shim/network.py), in a private network namespace:
taps made in one `ip` batch, mirrored to the container's veth in one `tc` batch, removed."""

from __future__ import annotations

import shutil

import pytest

from tests.support import in_private_netns

pytestmark = pytest.mark.skipif(shutil.which("unshare") is None, reason="needs util-linux")

SCRIPT = r"""
import json, subprocess
from bonneville.shim import network
from bonneville.spec.errors import BonnevilleError

def sh(cmd):
    return subprocess.run(cmd, shell=True, check=True, capture_output=True, text=True).stdout

sh("ip link add eth0 mtu 1400 type veth peer name peer0; ip addr add 172.30.5.9/24 dev eth0;"
   " ip link set eth0 up; ip route add default via 172.30.5.1")
# As dockerd leaves a namespace whose network has no IPv6 (on eth0, not on peer0).
sh("echo 1 > /proc/sys/net/ipv6/conf/eth0/disable_ipv6")
# And a network with IPv6 on peer0: an address (dockerd's, without DAD), its link-local one
# (the guest kernel makes its own), a default route.
sh("ip addr add fd00:b0::9/64 dev peer0 nodad; ip link set peer0 up;"
   " ip -6 route add default via fd00:b0::1 dev peer0")
interfaces, routes = network.discover()
guest = network.guest_config(
    interfaces, routes, {n: network.ipv6_enabled(n) for n in network.IPV6_SETTINGS})
taps = network.make_taps(len(interfaces))
network.mirror(interfaces, taps)
links = {l["ifname"]: l for l in json.loads(sh("ip -j link show"))}
eth0 = next(i for i in interfaces if i.name == "eth0")
filters = {dev: sh(f"tc filter show dev {dev} ingress") for dev in ("eth0", eth0.tap)}
try:
    network.make_taps(1)  # bvtap0 exists: the batch fails
    error = None
except BonnevilleError as exc:
    error = str(exc)
network.remove_taps([*taps, "bvtap9"])
after = [l["ifname"] for l in json.loads(sh("ip -j link show"))]
print(json.dumps({
    "interfaces": [(i.name, i.mtu, i.tap, i.addresses) for i in interfaces],
    "routes": routes, "tap": links[eth0.tap], "filters": filters, "error": error,
    "after": after, "guest": guest,
}))
"""


def test_taps_are_made_mirrored_and_removed_in_a_private_netns() -> None:
    data = in_private_netns(SCRIPT)
    # The peer end has no address but is a veth too: both are container interfaces.
    by_name = {name: (mtu, tap, addresses) for name, mtu, tap, addresses in data["interfaces"]}
    assert set(by_name) == {"eth0", "peer0"}
    mtu, tap, addresses = by_name["eth0"]
    assert (mtu, addresses) == (1400, ["172.30.5.9/24"])
    assert by_name["peer0"][2] == ["fd00:b0::9/64"]
    macs = {i["mac"]: i["ipv6"] for i in data["guest"]["interfaces"]}
    eth0_mac, peer0_mac = sorted(macs, key=macs.__getitem__)  # eth0 has IPv6 off
    assert sorted(data["routes"], key=lambda route: route["version"]) == [
        {"dst": "default", "gateway": "172.30.5.1", "mac": eth0_mac, "version": 4},
        {"dst": "default", "gateway": "fd00:b0::1", "mac": peer0_mac, "version": 6, "metric": 1024},
    ]
    assert data["tap"]["mtu"] == 1400 and "UP" in data["tap"]["flags"]
    assert "mirred" in data["filters"]["eth0"] and tap in data["filters"]["eth0"]
    assert "mirred" in data["filters"][tap] and "eth0" in data["filters"][tap]
    assert data["error"].startswith("ip: ") and "\n" not in data["error"]
    assert not [name for name in data["after"] if name.startswith("bvtap")]
    assert "eth0" in data["after"]
    # The guest gets IPv6 as the namespace has it, per interface and on lo.
    ipv6 = {i["mac"]: i["ipv6"] for i in data["guest"]["interfaces"]}
    assert sorted(ipv6.values()) == [False, True]
    assert data["guest"]["ipv6"] == {"all": True, "default": True, "lo": True}


SHARED_SCRIPT = r"""
import fcntl, json, os, struct, subprocess
from bonneville.shim import network
from bonneville.spec.errors import BonnevilleError

def sh(cmd):
    return subprocess.run(cmd, shell=True, check=True, capture_output=True, text=True).stdout

def links():
    return sorted(l["ifname"] for l in json.loads(sh("ip -j link show")))

def attempt(action):
    try:
        action()
    except BonnevilleError as exc:
        return str(exc)
    return None

sh("ip link add eth0 type veth peer name peer0; ip link set eth0 up")
out = {}
# A tap of that name made by someone else: make_taps fails, deletes its own, keeps that one.
sh("ip tuntap add mode tap dev bvtap1")
out["make_error"] = attempt(lambda: network.make_taps(3))
out["after_make"] = links()
# bvtap1 held open, as a container VM's QEMU holds its NIC: the namespace is that container's.
tun = os.open("/dev/net/tun", os.O_RDWR)
fcntl.ioctl(tun, 0x400454CA, struct.pack("16sH", b"bvtap1", 0x0002 | 0x1000))  # TUNSETIFF
sh("ip link set up dev bvtap1")
out["in_use_error"] = attempt(network.discover)
out["own"] = [i.name for i in network.discover(own_taps=["bvtap1"])[0]]
out["after_in_use"] = links()
# Let go (the VM is gone, its create killed before anyone deleted the tap): stale, deleted.
os.close(tun)
out["stale"] = [i.name for i in network.discover()[0]]
out["after_stale"] = links()
print(json.dumps(out))
"""


def test_a_namespace_another_vm_holds_is_refused_and_stale_taps_go() -> None:
    """docker's `--network container:A` hands a second VM the namespace of A's: its taps and its
    veth must stay A's, and create must say why it fails. A tap nobody holds is a leftover."""
    data = in_private_netns(SHARED_SCRIPT)
    assert data["make_error"].startswith("ip: ") and "\n" not in data["make_error"]
    assert data["after_make"] == ["bvtap1", "eth0", "lo", "peer0"]
    assert data["in_use_error"] == (
        "the container's network namespace is another container VM's (its NIC bvtap1 is in"
        " use): containers cannot share a network namespace (docker --network container:…)"
    )
    assert data["after_in_use"] == ["bvtap1", "eth0", "lo", "peer0"]
    assert sorted(data["own"]) == ["eth0", "peer0"]
    assert sorted(data["stale"]) == ["eth0", "peer0"]
    assert data["after_stale"] == ["eth0", "lo", "peer0"]


@pytest.mark.parametrize(
    ("name", "kind", "carrier", "held"),
    [
        ("bvtap0", "tun", True, True),  # a QEMU has it open
        ("bvtap3", "tun", False, False),  # nobody has: a leftover
        ("bv0123abcdc0", "veth", True, True),  # the libvirt backend's end in the namespace
        ("bv0123abcdc12", "veth", False, True),
        ("bv0123abcdh0", "veth", True, None),  # a host-side name: not expected here, not ours
        ("bv0123abcXc0", "veth", True, None),
        ("eth0", "veth", True, None),
        ("bvtap0", "veth", True, None),
    ],
)
def test_which_links_are_a_vms(name: str, kind: str, carrier: bool, held: bool | None) -> None:
    from bonneville.shim import network

    assert network._held_by_a_vm(name, kind, carrier) is held
