"""The guest's listening TCP ports (guest/portwatch.py): /proc/net/tcp and tcp6 as the kernel
writes them, read back as (address, port); only listening rows count."""

from __future__ import annotations

import json
import shutil
import socket

import pytest

from bonneville.guest import portwatch
from tests.support import in_private_netns

# Taken from a Linux 6.1 kernel, in a namespace with 127.0.0.1:8080 and 0.0.0.0:53 listening
# and one connection made to 127.0.0.1:8080 (its two ends: state 01, ESTABLISHED).
TCP = """\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 812832 1 00000000583386a3 100 0 0 10 0
   1: 00000000:0035 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 812833 1 00000000ff8ef67e 100 0 0 10 0
   2: 0100007F:1F90 0100007F:C31A 01 00000000:00000000 00:00000000 00000000     0        0 812838 1 00000000973eb93f 20 0 0 10 -1
   3: 0100007F:C31A 0100007F:1F90 01 00000000:00000000 00:00000000 00000000     0        0 812837 2 000000002ef488cb 20 0 0 10 -1
"""  # noqa: E501

# The same kernel: [::1]:443 (IPV6_V6ONLY), [::]:80, [::ffff:127.0.0.1]:9000, and
# [fd00:1234:5678::9]:8443 with a connection made to it.
TCP6 = """\
  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000001000000:01BB 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 812834 1 00000000eaecec68 100 0 0 10 0
   1: 00000000000000000000000000000000:0050 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 812835 1 000000008c0699b6 100 0 0 10 0
   2: 0000000000000000FFFF00000100007F:2328 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 813934 1 00000000e98d0ecb 100 0 0 10 0
   3: 341200FD000078560000000009000000:20FB 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 813933 1 00000000e649b04f 100 0 0 10 0
   4: 341200FD000078560000000009000000:20FB 341200FD000078560000000009000000:BE6E 01 00000000:00000000 00:00000000 00000000     0        0 813936 1 000000003610ef55 20 0 0 10 -1
   5: 341200FD000078560000000009000000:BE6E 341200FD000078560000000009000000:20FB 01 00000000:00000000 00:00000000 00000000     0        0 813935 2 0000000035fadb2a 20 0 0 10 -1
"""  # noqa: E501


def test_ipv4_listening_rows_only() -> None:
    assert portwatch.parse(TCP, socket.AF_INET) == {("127.0.0.1", 8080), ("0.0.0.0", 53)}


def test_ipv6_listening_rows_only() -> None:
    assert portwatch.parse(TCP6, socket.AF_INET6) == {
        ("::1", 443),
        ("::", 80),
        ("::ffff:127.0.0.1", 9000),
        ("fd00:1234:5678::9", 8443),
    }


def test_a_table_without_rows_and_broken_rows() -> None:
    header = TCP.splitlines()[0]
    assert portwatch.parse(header + "\n", socket.AF_INET) == set()
    assert portwatch.parse("", socket.AF_INET) == set()
    broken = "\n".join(
        [
            header,
            "   0: 0100007F 00000000:0000 0A",  # no port
            "   1: 0100ZZ7F:1F90 00000000:0000 0A",  # not hex
            "   2: 0100007F:1F90",  # too short
            "   3: 0100007F:0050 00000000:0000 0A 00000000:00000000",  # fine
        ]
    )
    assert portwatch.parse(broken, socket.AF_INET) == {("127.0.0.1", 80)}


NETNS_SCRIPT = r"""
import json, socket, subprocess
from bonneville.guest import portwatch

subprocess.run("ip link set lo up; ip addr add fd00:b0:7::5/64 dev lo nodad",
               shell=True, check=True)
keep = []

def listen(family, address, port, v6only=None):
    s = socket.socket(family, socket.SOCK_STREAM)
    if v6only is not None:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, v6only)
    s.bind((address, port))
    s.listen()
    keep.append(s)
    return s

server = listen(socket.AF_INET, "127.0.0.1", 8080)
listen(socket.AF_INET, "0.0.0.0", 5353)
listen(socket.AF_INET6, "::", 80, v6only=0)
listen(socket.AF_INET6, "::1", 443, v6only=1)
listen(socket.AF_INET6, "fd00:b0:7::5", 8443)
# Not listening: a bound socket, a connection's two ends, a closed listener.
bound = socket.socket(); bound.bind(("127.0.0.1", 7000)); keep.append(bound)
client = socket.create_connection(("127.0.0.1", 8080)); keep.append(client)
keep.append(server.accept()[0])
gone = listen(socket.AF_INET, "127.0.0.1", 9090)
before = sorted(portwatch.listening())
gone.close()
after = sorted(portwatch.listening())
print(json.dumps({"before": before, "after": after, "client": client.getsockname()[1]}))
"""


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs util-linux")
def test_listening_reads_this_kernels_tables_in_a_private_netns() -> None:
    data = in_private_netns(NETNS_SCRIPT)
    expected = [
        ["0.0.0.0", 5353],
        ["127.0.0.1", 8080],
        ["127.0.0.1", 9090],
        ["::", 80],
        ["::1", 443],
        ["fd00:b0:7::5", 8443],
    ]
    assert data["before"] == expected, json.dumps(data)
    assert data["after"] == [e for e in expected if e != ["127.0.0.1", 9090]]
    assert all(port != data["client"] for _, port in data["after"])
