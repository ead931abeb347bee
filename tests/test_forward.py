"""The host ends of the guest's listening ports (shim/monitor/forward.py), in a private network
namespace standing for the host (host networking) or for a pod's (port-forward): where each
guest socket is published, which guest address a connection is sent to, what goes when the
guest's socket does, and a port already taken.

The agent and the pod's event loop are played by the test: the listeners and connections the
forwarder registers in the pod's selector are dispatched as shim/monitor/pod.py does.
"""

from __future__ import annotations

import io
import logging
import selectors
import shutil
import socket
import time
from typing import Any

import pytest

from bonneville.guest import protocol
from bonneville.shim.monitor.forward import Forwarder
from tests.support import in_private_netns

pytestmark = pytest.mark.skipif(shutil.which("unshare") is None, reason="needs util-linux")

DEADLINE = 30.0


# ---- run inside the private namespace (the functions the scripts call) -----------------------


class FakeAgent:
    """The agent channel as the forwarder uses it: requests and data, recorded."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, dict[str, Any]]] = []
        self.callbacks: list[Any] = []
        self.data: list[tuple[int, int, bytes]] = []

    def request(self, op: str, callback: Any, **fields: Any) -> int:
        self.requests.append((op, fields))
        self.callbacks.append(callback)
        return len(self.requests)

    def send_data(self, ftype: int, stream: int, data: bytes) -> None:
        self.data.append((ftype, stream, data))


class FakeMembers:
    def __init__(self) -> None:
        self.next = 100

    def new_stream(self) -> int:
        self.next += 1
        return self.next


class FakePod:
    def __init__(self) -> None:
        self.selector = selectors.DefaultSelector()
        self.agent = FakeAgent()
        self.members = FakeMembers()


class Host:
    """A forwarder on a fake pod, and the pod's loop for what it registers."""

    def __init__(self, on_host: bool) -> None:
        self.pod = FakePod()
        self.forwarder = Forwarder(self.pod, on_host=on_host)  # type: ignore[arg-type]
        self.log = io.StringIO()
        handler = logging.StreamHandler(self.log)
        logger = logging.getLogger("bonneville.monitor")
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)

    def dispatch(self, until: Any, what: str) -> None:
        """Run the pod loop's forwarder branches until ``until()``."""
        deadline = time.monotonic() + DEADLINE
        while not until():
            assert time.monotonic() < deadline, f"{what}: not within {DEADLINE} s"
            for key, events in self.pod.selector.select(0.05):
                kind, which = key.data
                if kind == "listener":
                    self.forwarder.on_accept(which)
                elif kind == "relayed":
                    self.forwarder.on_ready(which, events)

    def published(self) -> list[list[Any]]:
        """Each listener: [its address, port, IPV6_V6ONLY (None for IPv4), the guest's]."""
        found = []
        for ours, sock in sorted(self.forwarder.listeners.items()):
            v6only = None
            if sock.family == socket.AF_INET6:
                v6only = sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY)
            assert sock.getsockname()[:2] == ours
            found.append([*ours, v6only, list(self.forwarder.guest[ours])])
        return found

    def connect(self, address: str, port: int) -> dict[str, Any] | str:
        """What a client connecting to ``address`` port ``port`` gets: the guest address and
        port the agent is asked to connect to, or the error."""
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        client = socket.socket(family, socket.SOCK_STREAM)
        client.settimeout(DEADLINE)
        try:
            client.connect((address, port))
        except OSError as exc:
            client.close()
            return type(exc).__name__
        before = len(self.pod.agent.requests)
        self.dispatch(lambda: len(self.pod.agent.requests) > before, "the connect request")
        client.close()
        op, fields = self.pod.agent.requests[-1]
        assert op == "connect"
        # Not connected in the guest: the forwarder drops its end.
        self.pod.agent.callbacks[-1]({"ok": False, "error": "refused in the test"})
        return {"address": fields["address"], "port": fields["port"]}


def loopback_up() -> None:
    import subprocess

    subprocess.run(
        "ip link set lo up; ip addr add 10.0.2.15/24 dev lo; ip addr add fd00::5/64 dev lo nodad",
        shell=True,
        check=True,
    )


def published_on_the_host() -> dict[str, Any]:
    loopback_up()
    host = Host(on_host=True)
    guest = [
        ["0.0.0.0", 8001],  # a server with an IPv4 and an IPv6 wildcard socket
        ["::", 8001],
        ["127.0.0.1", 8002],
        ["::1", 8003],
        ["10.0.2.15", 8004],  # the user-mode NIC's address: the host has no such
        ["::", 8005],
        ["0.0.0.0", 8006],
    ]
    host.forwarder.on_ports(guest)
    out: dict[str, Any] = {"published": host.published()}
    out["connect"] = {
        f"{address} {port}": host.connect(address, port)
        for address, port in [
            ("127.0.0.1", 8001),
            ("::1", 8001),
            ("10.0.2.15", 8001),  # another address of the host: a wildcard takes it
            ("127.0.0.1", 8002),
            ("::1", 8002),
            ("10.0.2.15", 8002),
            ("::1", 8003),
            ("127.0.0.1", 8003),
            ("127.0.0.1", 8004),
            ("127.0.0.1", 8005),
            ("::1", 8006),
            ("127.0.0.1", 8006),
        ]
    }
    out["relayed_after_refusals"] = sorted(host.forwarder.relayed)
    # The same report again changes nothing; then the guest closes all but one socket.
    listeners = dict(host.forwarder.listeners)
    host.forwarder.on_ports(guest)
    out["same_sockets"] = listeners == host.forwarder.listeners
    host.forwarder.on_ports([["127.0.0.1", 8002]])
    out["after_close"] = host.published()
    out["withdrawn_8001"] = host.connect("127.0.0.1", 8001)
    out["registered"] = sorted(key.data for key in host.pod.selector.get_map().values())
    host.forwarder.on_ports([])
    out["after_all_closed"] = host.published()
    out["registered_at_end"] = len(host.pod.selector.get_map())
    out["log"] = host.log.getvalue().splitlines()
    return out


def taken_on_the_host() -> dict[str, Any]:
    """A port a host service already uses is not published: one log line, no crash; once the
    service is gone and the guest opens the port again, it is."""
    loopback_up()
    host = Host(on_host=True)
    service = socket.create_server(("127.0.0.1", 8100))
    host.forwarder.on_ports([["127.0.0.1", 8100], ["127.0.0.1", 8101]])
    out: dict[str, Any] = {"published": host.published()}
    host.forwarder.on_ports([["127.0.0.1", 8100], ["127.0.0.1", 8101]])  # no retry, no new line
    out["log_while_taken"] = host.log.getvalue().splitlines()
    service.close()
    host.forwarder.on_ports([["127.0.0.1", 8101]])  # the guest closed it,
    host.forwarder.on_ports([["127.0.0.1", 8100], ["127.0.0.1", 8101]])  # and opened it again
    out["published_after"] = host.published()
    out["connect"] = host.connect("127.0.0.1", 8100)
    host.forwarder.close()
    return out


def forwarded_in_a_pod() -> dict[str, Any]:
    """A pod's sandbox: CRI's port-forward dials localhost:PORT in the pod's namespace, so every
    guest port is listened for on 127.0.0.1 there, whatever the guest bound."""
    loopback_up()
    host = Host(on_host=False)
    host.forwarder.on_ports(
        [
            ["0.0.0.0", 80],
            ["::", 80],
            ["10.88.0.5", 8080],
            ["::1", 9090],
            ["127.0.0.1", 9091],
            ["::", 9092],
        ]
    )
    out: dict[str, Any] = {"published": host.published()}
    out["connect"] = {
        f"{address} {port}": host.connect(address, port)
        for address, port in [
            ("127.0.0.1", 80),
            ("127.0.0.1", 8080),
            ("127.0.0.1", 9090),
            ("127.0.0.1", 9092),
            ("::1", 9092),  # not on the pod's IPv6 loopback: CRI dials tcp4
            ("10.0.2.15", 80),  # nor on its other addresses
        ]
    }
    return out


def relayed_both_ways() -> dict[str, Any]:
    """One connection: the client's bytes go to the agent as the stream's STDIN, the guest's
    come back, end of file both ways, then the guest's `closed`."""
    loopback_up()
    host = Host(on_host=True)
    agent = host.pod.agent
    host.forwarder.on_ports([["::", 8200]])
    client = socket.create_connection(("127.0.0.1", 8200), timeout=DEADLINE)
    host.dispatch(lambda: bool(agent.requests), "the connect request")
    stream = agent.requests[0][1]["id"]
    agent.callbacks[0]({"ok": True})
    client.sendall(b"ping")
    host.dispatch(lambda: bool(agent.data), "the client's bytes")
    out: dict[str, Any] = {"request": agent.requests[0], "up": [list(d[:2]) for d in agent.data]}
    out["up_data"] = b"".join(d[2] for d in agent.data).decode()
    host.forwarder.on_output(stream, b"pong")
    out["down"] = client.recv(100).decode()
    host.forwarder.on_output(stream, b"")  # the guest side ended its writing
    out["down_eof"] = client.recv(100).decode()
    client.shutdown(socket.SHUT_WR)
    host.dispatch(lambda: agent.data[-1][2] == b"", "the client's end of file")
    out["up_eof"] = list(agent.data[-1])[:2]
    out["still_relayed"] = stream in host.forwarder.relayed
    host.forwarder.on_closed(stream)
    out["relayed_after_closed"] = sorted(host.forwarder.relayed)
    out["registered_at_end"] = sorted(key.data for key in host.pod.selector.get_map().values())
    host.forwarder.close()
    out["closed_listeners"] = len(host.forwarder.listeners)
    client.close()
    return out


# ---- the tests -------------------------------------------------------------------------------


def run_in_netns(name: str) -> Any:
    """This module's function ``name``, run in a private network namespace; what it returned."""
    return in_private_netns(
        f"import json\nfrom tests.test_forward import {name}\nprint(json.dumps({name}()))"
    )


def test_host_networking_publishes_each_guest_socket_where_runc_would_have_it() -> None:
    out = run_in_netns("published_on_the_host")
    assert out["published"] == [
        # Our wildcard and the guest's IPv4 wildcard of the same port fold into one dual-stack
        # listener; connections go to the guest's loopback.
        ["0.0.0.0", 8004, None, ["10.0.2.15", 8004]],
        ["0.0.0.0", 8006, None, ["127.0.0.1", 8006]],
        ["127.0.0.1", 8002, None, ["127.0.0.1", 8002]],
        ["::", 8001, 0, ["::1", 8001]],
        ["::", 8005, 0, ["::1", 8005]],
        ["::1", 8003, 1, ["::1", 8003]],
    ]
    assert out["connect"] == {
        "127.0.0.1 8001": {"address": "::1", "port": 8001},
        "::1 8001": {"address": "::1", "port": 8001},
        "10.0.2.15 8001": {"address": "::1", "port": 8001},
        "127.0.0.1 8002": {"address": "127.0.0.1", "port": 8002},
        # A guest loopback socket is on the host's loopback only.
        "::1 8002": "ConnectionRefusedError",
        "10.0.2.15 8002": "ConnectionRefusedError",
        "::1 8003": {"address": "::1", "port": 8003},
        "127.0.0.1 8003": "ConnectionRefusedError",
        "127.0.0.1 8004": {"address": "10.0.2.15", "port": 8004},
        "127.0.0.1 8005": {"address": "::1", "port": 8005},
        # An IPv4 wildcard is IPv4 on the host too.
        "::1 8006": "ConnectionRefusedError",
        "127.0.0.1 8006": {"address": "127.0.0.1", "port": 8006},
    }
    assert out["relayed_after_refusals"] == []
    assert out["same_sockets"]
    assert out["after_close"] == [["127.0.0.1", 8002, None, ["127.0.0.1", 8002]]]
    assert out["withdrawn_8001"] == "ConnectionRefusedError"
    assert out["registered"] == [["listener", ["127.0.0.1", 8002]]]
    assert out["after_all_closed"] == []
    assert out["registered_at_end"] == 0
    log = out["log"]
    assert "port [::]:8001 published" in log and "port 127.0.0.1:8002 published" in log
    assert "port [::]:8001 withdrawn" in log and "port 127.0.0.1:8002 withdrawn" in log
    assert not [line for line in log if "0.0.0.0:8001" in line]


def test_a_port_the_host_already_uses_is_a_log_line_then_published_once_free() -> None:
    out = run_in_netns("taken_on_the_host")
    assert out["published"] == [["127.0.0.1", 8101, None, ["127.0.0.1", 8101]]]
    assert out["log_while_taken"] == [
        "port 127.0.0.1:8100 is not published: it is in use on the host",
        "port 127.0.0.1:8101 published",
    ]
    assert out["published_after"] == [
        ["127.0.0.1", 8100, None, ["127.0.0.1", 8100]],
        ["127.0.0.1", 8101, None, ["127.0.0.1", 8101]],
    ]
    assert out["connect"] == {"address": "127.0.0.1", "port": 8100}


def test_a_pods_ports_are_forwarded_from_its_namespaces_ipv4_loopback() -> None:
    out = run_in_netns("forwarded_in_a_pod")
    assert out["published"] == [
        # The first guest socket of a port names the guest address (the report is sorted).
        ["127.0.0.1", 80, None, ["127.0.0.1", 80]],
        ["127.0.0.1", 8080, None, ["10.88.0.5", 8080]],
        ["127.0.0.1", 9090, None, ["::1", 9090]],
        ["127.0.0.1", 9091, None, ["127.0.0.1", 9091]],
        ["127.0.0.1", 9092, None, ["::1", 9092]],
    ]
    assert out["connect"] == {
        "127.0.0.1 80": {"address": "127.0.0.1", "port": 80},
        "127.0.0.1 8080": {"address": "10.88.0.5", "port": 8080},
        "127.0.0.1 9090": {"address": "::1", "port": 9090},
        "127.0.0.1 9092": {"address": "::1", "port": 9092},
        "::1 9092": "ConnectionRefusedError",
        "10.0.2.15 80": "ConnectionRefusedError",
    }


def test_a_connection_is_relayed_both_ways_and_ends_cleanly() -> None:
    out = run_in_netns("relayed_both_ways")
    op, fields = out["request"]
    assert (op, fields["address"], fields["port"]) == ("connect", "::1", 8200)
    stream = fields["id"]
    assert out["up"] == [[protocol.STDIN, stream]]
    assert out["up_data"] == "ping"
    assert (out["down"], out["down_eof"]) == ("pong", "")
    assert out["up_eof"] == [protocol.STDIN, stream]
    assert out["still_relayed"]  # until the guest says its end is closed
    assert out["relayed_after_closed"] == []
    assert out["registered_at_end"] == [["listener", ["::", 8200]]]
    assert out["closed_listeners"] == 0
