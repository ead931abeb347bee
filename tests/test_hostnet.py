"""Deleting the libvirt backend's host links (backends/libvirt/hostnet.py), in a private network
namespace: only names of our pattern go, and where libvirtd's (or PID 1's) namespace cannot be
entered they are deleted in the caller's own."""

from __future__ import annotations

import shutil

import pytest

from tests.support import in_private_netns

pytestmark = pytest.mark.skipif(shutil.which("unshare") is None, reason="needs util-linux")

SCRIPT = r"""
import json, subprocess
from bonneville.backends.libvirt import hostnet

def links():
    out = subprocess.run(["ip", "-j", "link", "show"], check=True, capture_output=True).stdout
    return sorted(l["ifname"] for l in json.loads(out))

subprocess.run("ip link add bv0123abcdh0 type veth peer name bv0123abcdc0;"
               " ip tuntap add dev bv0123abcdt0 mode tap;"
               " ip link add other0 type veth peer name other1", shell=True, check=True)
hostnet.host_netns = lambda: "/no/such/netns"   # libvirtd gone, PID 1's closed to us
closed = hostnet._removal_netns()
hostnet.host_netns = lambda: "/proc/self/ns/net"
same = hostnet._removal_netns()
hostnet.host_netns = lambda: "/no/such/netns"
hostnet.remove(["bv0123abcdh0", "bv0123abcdt0", "bv0123abcdc0", "other0"])
print(json.dumps({"closed": closed, "same": same, "after": links()}))
"""


def test_links_are_deleted_where_the_caller_is_when_the_host_namespace_is_closed() -> None:
    result = in_private_netns(SCRIPT)
    assert result["closed"] is None and result["same"] is None
    # The pair went with its host end (already gone is fine); a name not ours is never touched.
    assert result["after"] == ["lo", "other0", "other1"]
