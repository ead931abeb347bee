"""The agent's rtnetlink client, run for real in a private network namespace on the host."""

from __future__ import annotations

import shutil

import pytest

from tests.support import in_private_netns

SCRIPT = r"""
import json, socket, subprocess
from bonneville.guest.netlink import Netlink
subprocess.run(["ip", "link", "add", "d0", "type", "veth", "peer", "name", "d1"], check=True)
index = socket.if_nametoindex("d0")
with Netlink() as nl:
    nl.set_link(socket.if_nametoindex("lo"))
    nl.set_link(index, mtu=1400, mac="02:42:ac:11:00:09")
    nl.add_address(index, "172.30.5.9/24")
    nl.add_route("default", "172.30.5.1", index)
    nl.add_route("10.9.0.0/16", "172.30.5.254", None)
    try:
        nl.add_address(index, "172.30.5.9/24")
    except OSError as exc:
        duplicate = exc.errno
def ip(*args):
    return json.loads(subprocess.run(["ip", "-j", *args], capture_output=True, check=True).stdout)
print(json.dumps({"links": ip("addr", "show"), "routes": ip("-4", "route", "show"),
                  "duplicate": duplicate}))
"""


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs util-linux unshare")
def test_links_addresses_and_routes_in_a_private_netns() -> None:
    data = in_private_netns(SCRIPT)
    links = {link["ifname"]: link for link in data["links"]}
    assert "UP" in links["lo"]["flags"]
    d0 = links["d0"]
    assert (d0["mtu"], d0["address"]) == (1400, "02:42:ac:11:00:09")
    assert "UP" in d0["flags"]
    assert [(a["local"], a["prefixlen"]) for a in d0["addr_info"] if a["family"] == "inet"] == [
        ("172.30.5.9", 24)
    ]
    routes = {(r["dst"], r.get("gateway"), r.get("dev")) for r in data["routes"]}
    assert ("default", "172.30.5.1", "d0") in routes
    assert ("10.9.0.0/16", "172.30.5.254", "d0") in routes
    assert data["duplicate"] == 17  # EEXIST: kernel errors come back as OSError


CONFIGURE = r"""
import json, subprocess, threading
from bonneville.guest import netconfig as agent
def sh(cmd):
    return subprocess.run(cmd, shell=True, check=True, capture_output=True, text=True).stdout
# d1 stays down a while: d0 has no carrier until then, as a NIC whose driver has just loaded.
sh("ip link add d0 type veth peer name d1; ip link add e0 type veth peer name e1")
threading.Timer(0.3, sh, ["ip link set d1 up"]).start()
logged = []
mac = "02:42:ac:11:00:09"
agent.configure_network({
    "interfaces": [{"mac": mac, "mtu": 1400, "addresses": ["172.30.5.9/24", "fd00:b0::9/64"],
                    "ipv6": True}],
    "routes": [{"dst": "default", "gateway": "172.30.5.1", "mac": mac},
               {"dst": "default", "gateway": "fd00:b0::1", "mac": mac, "version": 6,
                "metric": 1024}],
    "ipv6": {"all": True, "default": True, "lo": True},
}, lambda level, msg: logged.append((level, msg)))
# At return: what the container's first command would see.
carrier = open("/sys/class/net/d0/carrier").read().strip()
addresses = json.loads(sh("ip -j addr show d0"))[0]["addr_info"]
routes = json.loads(sh("ip -j -6 route show dev d0"))
# e1 never comes up: setup goes on after the bounded wait, saying so.
agent.LINK_WAIT = 0.2
e0_mac = open("/sys/class/net/e0/address").read().strip()
agent.configure_network({"interfaces": [{"mac": e0_mac, "mtu": 1500, "addresses": [],
                                         "ipv6": False}], "routes": []},
                        lambda level, msg: logged.append((level, msg)))
print(json.dumps({"carrier": carrier, "addresses": addresses, "routes": routes, "logged": logged}))
"""


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs util-linux unshare")
def test_setup_gives_the_nic_its_addresses_and_routes_and_waits_for_its_carrier() -> None:
    """As dockerd leaves a container's veth: IPv4 with its broadcast address, IPv6 usable at once
    (no duplicate address detection), the IPv6 default route with its metric, and the link-local
    address made: setup returns only once the carrier is on (bounded, with a warning if not)."""
    data = in_private_netns(CONFIGURE, own_sysfs=True)
    assert data["carrier"] == "1"  # it came 0.3 s after setup began: setup waited for it
    by_address = {a["local"]: a for a in data["addresses"]}
    assert by_address["172.30.5.9"]["broadcast"] == "172.30.5.255"
    assert by_address["fd00:b0::9"].get("nodad") and not by_address["fd00:b0::9"].get("tentative")
    assert any(a["local"] == "fe80::42:acff:fe11:9" for a in data["addresses"]), data["addresses"]
    assert {"dst": "default", "gateway": "fd00:b0::1", "metric": 1024}.items() <= next(
        r for r in data["routes"] if r["dst"] == "default"
    ).items()
    assert data["logged"] == [["warning", "no carrier on e0 after 0.2 s: starting anyway"]]
