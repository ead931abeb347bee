"""The agent's rtnetlink client, run for real in a private network namespace on the host."""

from __future__ import annotations

import shutil

import pytest

from conftest import in_private_netns

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
