"""The DNS relay: the guest's side (guest/dnsrelay.py) and the host's (shim/monitor/dnsrelay.py)
together, as the agent and the owner monitor join them, in private network namespaces.

The test's process enters a new network namespace (unshare) that stands for the container's on
the host: a DNS-like responder listens there on 127.0.0.11:53 (UDP and TCP) as docker's embedded
resolver does, and the host relay asks it. One thread of it enters a second namespace that stands
for the VM: the guest relay listens there on the same address and the test's clients ask it.
Between them the test carries each message as the agent and the monitor do (JSON, base64).
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import json
import os
import select
import shutil
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from bonneville.guest import dnsrelay as guest_relay
from bonneville.shim.monitor import dnsrelay as host_relay
from bonneville.spec.config import parse_bundle
from tests.support import in_private_netns

T = TypeVar("T")
RESOLVER = "127.0.0.11"  # docker's embedded resolver
DEADLINE = 30.0  # seconds for anything the relay should do at once (loaded CI machines)
CLONE_NEWNET = 0x40000000
LIBC = ctypes.CDLL(None, use_errno=True)

needs_unshare = pytest.mark.skipif(shutil.which("unshare") is None, reason="needs util-linux")


def answer_to(message: bytes) -> bytes:
    """What the responder answers: recognisably its own, and particular to the message."""
    return b"answer:" + message[::-1]


# ---- run inside the private namespaces (the functions the scripts call) ----------------------


class Responder:
    """A DNS-like server on ``address`` port 53 (UDP and TCP, TCP messages length-prefixed as
    DNS has them) answering each message with :func:`answer_to`, once ``release`` is set."""

    def __init__(self, address: str, hold: bool = False) -> None:
        self.address = address
        self.seen: list[tuple[str, bytes]] = []  # (udp|tcp, message), in arrival order
        self.lock = threading.Lock()
        self.release = threading.Event()
        if not hold:
            self.release.set()
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.bind((address, 53))
        self.tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.tcp.bind((address, 53))
        self.tcp.listen(64)
        for target in (self._serve_udp, self._serve_tcp):
            threading.Thread(target=target, daemon=True).start()

    def count(self) -> int:
        with self.lock:
            return len(self.seen)

    def _record(self, how: str, message: bytes) -> None:
        with self.lock:
            self.seen.append((how, message))

    def _serve_udp(self) -> None:
        while True:
            message, peer = self.udp.recvfrom(65535)
            self._record("udp", message)
            threading.Thread(target=self._answer_udp, args=(message, peer), daemon=True).start()

    def _answer_udp(self, message: bytes, peer: Any) -> None:
        self.release.wait()
        self.udp.sendto(answer_to(message), peer)

    def _serve_tcp(self) -> None:
        while True:
            conn, _ = self.tcp.accept()
            threading.Thread(target=self._serve_connection, args=(conn,), daemon=True).start()

    def _serve_connection(self, conn: socket.socket) -> None:
        with conn:
            while (message := read_framed(conn)) is not None:
                self._record("tcp", message)
                self.release.wait()
                conn.sendall(framed(answer_to(message)))


def framed(message: bytes) -> bytes:
    return struct.pack(">H", len(message)) + message


def read_framed(conn: socket.socket) -> bytes | None:
    """One length-prefixed message from ``conn``; None at end of file."""
    buf = b""
    while len(buf) < 2 or len(buf) < 2 + struct.unpack_from(">H", buf)[0]:
        chunk = conn.recv(65536)
        if not chunk:
            return None
        buf += chunk
    return buf[2:]


def loopback_up() -> None:
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)


class Netns:
    """A network namespace of its own (the VM's stand-in), made by a thread that entered it; any
    ``run`` makes things there. A socket stays in the namespace it was made in, whichever thread
    uses it later."""

    def __init__(self) -> None:
        self.fd = -1

        def enter_new() -> None:
            if LIBC.unshare(CLONE_NEWNET) != 0:  # this thread only
                raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNET)")
            self.fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
            loopback_up()  # the `ip` child starts in this thread's namespace

        self._in_thread(enter_new)

    def run(self, make: Callable[[], T]) -> T:
        result: list[T] = []

        def enter() -> None:
            if LIBC.setns(self.fd, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns")
            result.append(make())

        self._in_thread(enter)
        return result[0]

    @staticmethod
    def _in_thread(action: Callable[[], None]) -> None:
        failure: list[BaseException] = []

        def run() -> None:
            try:
                action()
            except BaseException as exc:
                failure.append(exc)

        thread = threading.Thread(target=run)
        thread.start()
        thread.join()
        if failure:
            raise failure[0]


class Relay:
    """The guest relay (in the VM's stand-in namespace, ``vm``) and the host relay (in the
    caller's), joined as the agent (``dns``) and the owner monitor (``dns-answer``) join them."""

    def __init__(self, guest_addresses: list[str], resolvers: list[str]) -> None:
        self.vm = Netns()
        self.guest = self.vm.run(lambda: guest_relay.DnsRelay(guest_addresses))
        self.host = host_relay.DnsRelay(resolvers)
        self.passed_up = 0  # queries handed to the host relay

    def pump_until(self, done: Callable[[], bool], what: str) -> None:
        """Carry messages both ways until ``done()``."""
        deadline = time.monotonic() + DEADLINE
        while not done():
            assert time.monotonic() < deadline, f"{what}: not within {DEADLINE} s"
            ready, _, _ = select.select([*self.guest.fds(), self.host.wake_r], [], [], 0.05)
            for fd in ready:
                if fd == self.host.wake_r:
                    for ident, answer in self.host.take_answers():
                        down = wire({"op": "dns-answer", "id": ident, "data": b64(answer)})
                        self.guest.answer(int(down["id"]), base64.b64decode(down["data"]))
                    continue
                for ident, to, tcp, query in self.guest.on_ready(fd):
                    self.passed_up += 1
                    self.host.query(
                        wire({"op": "dns", "id": ident, "to": to, "tcp": tcp, "data": b64(query)})
                    )

    def udp_client(self) -> socket.socket:
        return self.vm.run(lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM))

    def tcp_client(self, address: str) -> socket.socket:
        # The guest relay's listener completes the handshake in the kernel: no pumping needed.
        return self.vm.run(lambda: socket.create_connection((address, 53), timeout=DEADLINE))

    def close(self) -> None:
        self.guest.close()
        self.host.close()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def wire(message: dict[str, Any]) -> dict[str, Any]:
    """``message`` as the other end of the channel reads it (a JSON control frame)."""
    decoded = json.loads(json.dumps(message))
    assert isinstance(decoded, dict)
    return decoded


def readable(sock: socket.socket) -> bool:
    return bool(select.select([sock], [], [], 0)[0])


class FramedReader:
    """Length-prefixed answers from a non-blocking TCP client, as they come."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.buf = b""
        self.eof = False

    def messages(self) -> list[bytes]:
        with contextlib.suppress(BlockingIOError):
            while chunk := self.sock.recv(65536):
                self.buf += chunk
            self.eof = True
        found, rest = [], self.buf
        while len(rest) >= 2 and len(rest) >= 2 + struct.unpack_from(">H", rest)[0]:
            (length,) = struct.unpack_from(">H", rest)
            found.append(rest[2 : 2 + length])
            rest = rest[2 + length :]
        return found


def relay_udp_and_tcp() -> dict[str, Any]:
    loopback_up()
    responder = Responder(RESOLVER)
    relay = Relay([RESOLVER], [RESOLVER])
    first, second = relay.udp_client(), relay.udp_client()
    stream = FramedReader(relay.tcp_client(RESOLVER))
    out: dict[str, Any] = {}
    # UDP: two clients, their queries interleaved; each gets its own answers.
    first.sendto(b"one", (RESOLVER, 53))
    second.sendto(b"two", (RESOLVER, 53))
    first.sendto(b"three", (RESOLVER, 53))
    got: dict[str, list[str]] = {"first": [], "second": []}

    def udp_answers() -> bool:
        for name, sock in (("first", first), ("second", second)):
            while readable(sock):
                got[name].append(sock.recv(65535).decode())
        return len(got["first"]) == 2 and len(got["second"]) == 1

    relay.pump_until(udp_answers, "the UDP answers")
    out["udp"] = {name: sorted(answers) for name, answers in got.items()}
    # TCP: two messages in one write, then one whose length prefix comes in two writes.
    stream.sock.sendall(framed(b"four") + framed(b"five") + b"\x00")
    relay.pump_until(lambda: relay.passed_up == 5, "the first TCP queries")
    stream.sock.sendall(b"\x03six")
    relay.pump_until(lambda: len(stream.messages()) == 3, "the TCP answers")
    out["tcp"] = sorted(m.decode() for m in stream.messages())
    out["seen"] = sorted([how, m.decode()] for how, m in responder.seen)
    out["in_flight"] = relay.host.in_flight
    relay.close()
    return out


def relay_tcp_half_closed() -> dict[str, Any]:
    """A TCP client that ends its side once its query is out (`printf … | nc`), as a resolver
    allows: its answer still comes back."""
    loopback_up()
    Responder(RESOLVER)
    relay = Relay([RESOLVER], [RESOLVER])
    client = relay.tcp_client(RESOLVER)
    client.sendall(framed(b"half"))
    client.shutdown(socket.SHUT_WR)
    stream = FramedReader(client)
    relay.pump_until(
        lambda: bool(stream.messages()) or (stream.eof and relay.passed_up == 1),
        "an answer or the connection's end",
    )
    out = {"answers": [m.decode() for m in stream.messages()], "passed_up": relay.passed_up}
    relay.close()
    return out


def relay_drops_what_it_was_not_given() -> dict[str, Any]:
    """The guest relay listens on two addresses; the host was given one. A responder listens on
    the other (and on 127.0.0.1) in the host's namespace: it must hear nothing."""
    loopback_up()
    given = Responder(RESOLVER)
    others = [Responder("127.0.0.12"), Responder("127.0.0.1")]
    relay = Relay([RESOLVER, "127.0.0.12"], [RESOLVER])
    stray_udp = relay.udp_client()
    stray_udp.sendto(b"stray-udp", ("127.0.0.12", 53))
    stray_tcp = relay.tcp_client("127.0.0.12")
    stray_tcp.sendall(framed(b"stray-tcp"))
    fine = relay.udp_client()
    fine.sendto(b"fine", (RESOLVER, 53))
    relay.pump_until(lambda: relay.passed_up == 3 and readable(fine), "the answer to 'fine'")
    out = {
        "fine": fine.recv(65535).decode(),
        "given": [[how, m.decode()] for how, m in given.seen],
        "others": [o.count() for o in others],
        "stray_answered": readable(stray_udp) or readable(stray_tcp),
        "in_flight": relay.host.in_flight,
    }
    relay.close()
    return out


def host_relay_refuses_forged_queries() -> dict[str, Any]:
    """What the host relay does with each message the agent could send: the queries it would
    ask (its threads recorded, not started), the rest dropped before any socket is made."""
    asked: list[list[Any]] = []

    class Recorded:
        def __init__(self, target: Any, args: tuple[Any, ...], daemon: bool) -> None:
            self.args = args

        def start(self) -> None:
            ident, to, tcp, data = self.args
            asked.append([ident, to, tcp, data.decode()])

    host_relay.threading.Thread = Recorded  # type: ignore[misc,assignment]
    host = host_relay.DnsRelay([RESOLVER, "::1"])
    messages: list[dict[str, Any]] = [
        {"op": "dns", "id": 1, "to": RESOLVER, "tcp": False, "data": b64(b"ok-udp")},
        {"op": "dns", "id": 2, "to": "::1", "tcp": True, "data": b64(b"ok-tcp")},
        {"op": "dns", "id": 3, "to": "127.0.0.1", "data": b64(b"not given")},
        {"op": "dns", "id": 4, "to": "127.0.0.11:8080", "data": b64(b"a port")},
        {"op": "dns", "id": 5, "to": "10.0.2.2", "data": b64(b"the host")},
        {"op": "dns", "id": 6, "data": b64(b"no address")},
        {"op": "dns", "id": "7", "to": RESOLVER, "data": b64(b"id not a number")},
        {"op": "dns", "id": 8, "to": RESOLVER, "data": "not base64!"},
        {"op": "dns", "id": 9, "to": RESOLVER, "data": ""},
        {"op": "dns", "id": 10, "to": RESOLVER, "data": b64(b"x" * 65536)},
    ]
    for message in messages:
        host.query(wire(message))
    # Not even a string: the monitor's agent handler takes a TypeError or ValueError for a
    # subverted agent and ends the pod (shim/monitor/pod.py, _on_agent).
    try:
        host.query(wire({"op": "dns", "id": 11, "to": [RESOLVER], "data": b64(b"a list")}))
        raised = None
    except (TypeError, ValueError) as exc:
        raised = type(exc).__name__
    return {"asked": asked, "in_flight": host.in_flight, "raised": raised}


def host_relay_in_flight_bound() -> dict[str, Any]:
    """More queries than MAX_IN_FLIGHT to a resolver that has not answered yet: the extra ones
    are dropped at once (the client retries, as after a lost datagram); answered, the bound is
    free again."""
    loopback_up()
    host_relay.TIMEOUT = 4 * DEADLINE  # the held queries must not time out meanwhile
    responder = Responder(RESOLVER, hold=True)
    host = host_relay.DnsRelay([RESOLVER])
    bound = host_relay.MAX_IN_FLIGHT
    for ident in range(bound + 8):
        host.query(wire({"op": "dns", "id": ident, "to": RESOLVER, "data": b64(b"q%d" % ident)}))
    out: dict[str, Any] = {"bound": bound, "in_flight": host.in_flight}
    answers: dict[int, bytes] = {}

    def take_until(count: int, what: str) -> None:
        deadline = time.monotonic() + DEADLINE
        while len(answers) < count:
            assert time.monotonic() < deadline, what
            if select.select([host.wake_r], [], [], 0.05)[0]:
                answers.update(host.take_answers())

    deadline = time.monotonic() + DEADLINE
    while responder.count() < bound:
        assert time.monotonic() < deadline, "the held queries did not all reach the resolver"
        time.sleep(0.05)
    responder.release.set()
    take_until(bound, "the held queries' answers")
    out["answered"] = sorted(answers)
    out["right_answers"] = all(answers[i] == answer_to(b"q%d" % i) for i in answers)
    out["in_flight_after"] = host.in_flight
    host.query(wire({"op": "dns", "id": 1000, "to": RESOLVER, "data": b64(b"again")}))
    take_until(bound + 1, "the answer after the bound was free")
    out["again"] = answers[1000].decode()
    out["seen"] = responder.count()
    host.close()
    return out


def guest_relay_pending_bound() -> dict[str, Any]:
    """More queries waiting for the host than MAX_PENDING: the oldest are forgotten (their
    answers, should they come, go nowhere); the newest still get theirs."""
    loopback_up()
    guest = guest_relay.DnsRelay([RESOLVER])
    udp = next(s for s in guest.sockets if s.type == socket.SOCK_DGRAM)
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    bound = guest_relay.MAX_PENDING
    idents: list[int] = []
    for n in range(bound + 10):
        # Loopback delivers within sendto: the datagram is there for on_ready to read.
        client.sendto(b"q%d" % n, (RESOLVER, 53))
        idents += [ident for ident, _, _, _ in guest.on_ready(udp.fileno())]
    out: dict[str, Any] = {"bound": bound, "queries": len(idents), "pending": len(guest.pending)}
    for ident in idents[:10]:
        guest.answer(ident, b"too late")  # forgotten: nothing is sent
    guest.answer(idents[10], b"oldest kept")
    guest.answer(idents[-1], b"newest")
    received = [client.recv(65535).decode(), client.recv(65535).decode()]
    client.setblocking(False)
    try:
        client.recv(65535)
        out["more"] = True
    except BlockingIOError:
        out["more"] = False
    out["received"] = received
    guest.close()
    return out


# ---- the tests -------------------------------------------------------------------------------


def run_in_netns(name: str) -> Any:
    """This module's function ``name``, run in a private network namespace; what it returned."""
    return in_private_netns(
        f"import json\nfrom tests.test_dnsrelay import {name}\nprint(json.dumps({name}()))"
    )


@needs_unshare
def test_queries_over_udp_and_tcp_reach_the_resolver_and_come_back() -> None:
    out = run_in_netns("relay_udp_and_tcp")
    assert out["udp"] == {"first": ["answer:eerht", "answer:eno"], "second": ["answer:owt"]}
    assert out["tcp"] == ["answer:evif", "answer:ruof", "answer:xis"]
    # Each asked over what the client used.
    assert out["seen"] == [
        ["tcp", "five"],
        ["tcp", "four"],
        ["tcp", "six"],
        ["udp", "one"],
        ["udp", "three"],
        ["udp", "two"],
    ]
    assert out["in_flight"] == 0


@needs_unshare
def test_a_tcp_client_that_half_closes_still_gets_its_answer() -> None:
    out = run_in_netns("relay_tcp_half_closed")
    assert out["passed_up"] == 1
    assert out["answers"] == ["answer:flah"]


@needs_unshare
def test_queries_to_an_address_the_host_was_not_given_are_dropped() -> None:
    out = run_in_netns("relay_drops_what_it_was_not_given")
    assert out["fine"] == "answer:enif"
    assert out["given"] == [["udp", "fine"]]
    assert out["others"] == [0, 0]
    assert not out["stray_answered"]
    assert out["in_flight"] == 0


@needs_unshare  # (a process of its own: the relay's threading is replaced there)
def test_the_host_relay_asks_only_given_resolvers_with_well_formed_queries() -> None:
    out = run_in_netns("host_relay_refuses_forged_queries")
    assert out["asked"] == [[1, RESOLVER, False, "ok-udp"], [2, "::1", True, "ok-tcp"]]
    assert out["in_flight"] == 2  # the two recorded (their threads never ran)
    assert out["raised"] is not None


@needs_unshare
def test_the_host_relay_bounds_the_queries_in_flight() -> None:
    out = run_in_netns("host_relay_in_flight_bound")
    bound = out["bound"]
    assert out["in_flight"] == bound
    assert out["answered"] == list(range(bound))
    assert out["right_answers"]
    assert out["in_flight_after"] == 0
    assert out["again"] == "answer:niaga"
    assert out["seen"] == bound + 1


@needs_unshare
def test_the_guest_relay_bounds_the_queries_waiting_for_the_host() -> None:
    out = run_in_netns("guest_relay_pending_bound")
    bound = out["bound"]
    assert (out["queries"], out["pending"]) == (bound + 10, bound)
    assert out["received"] == ["oldest kept", "newest"]
    assert not out["more"]


# ---- which resolvers are relayed -------------------------------------------------------------


def _bundle(tmp_path: Path, mounts: list[dict[str, object]]) -> Any:
    rootfs = tmp_path / "rootfs"
    (rootfs / "etc").mkdir(parents=True)
    raw = {"ociVersion": "1.0.2", "root": {"path": "rootfs"}, "mounts": mounts}
    return parse_bundle(str(tmp_path), raw)


def test_the_loopback_resolvers_of_the_containers_resolv_conf(tmp_path: Path) -> None:
    bundle = _bundle(tmp_path, [])
    assert host_relay.loopback_resolvers(bundle) == []  # no resolv.conf at all
    (tmp_path / "rootfs/etc/resolv.conf").write_text(
        "# nameserver 127.0.0.2\nsearch example.com\nnameserver 10.255.255.53\n"
        "nameserver 127.0.0.11\nnameserver ::1\nnameserver 127.0.0.11\n"
        "nameserver fe80::1%eth0\nnameserver\nnameserver not-an-address\n"
        "options ndots:0\nnameserver 127.0.0.53\n"
    )
    assert host_relay.loopback_resolvers(bundle) == ["127.0.0.11", "::1", "127.0.0.53"]


@pytest.mark.parametrize("relative", [False, True])
def test_resolv_conf_bind_mounted_over_the_rootfs_s_wins(tmp_path: Path, relative: bool) -> None:
    # docker and containerd bind a resolv.conf of theirs over the image's.
    (tmp_path / "resolv.conf").write_text("nameserver 127.0.0.11\n")
    source = "resolv.conf" if relative else str(tmp_path / "resolv.conf")
    mount = {"destination": "/etc/resolv.conf", "source": source, "options": ["rbind", "ro"]}
    bundle = _bundle(tmp_path, [mount])
    (tmp_path / "rootfs/etc/resolv.conf").write_text("nameserver 127.0.0.53\n")
    assert host_relay.loopback_resolvers(bundle) == ["127.0.0.11"]
    # Only a loopback resolver needs the relay: the VM reaches any other through its NIC.
    (tmp_path / "resolv.conf").write_text("nameserver 192.0.2.53\n")
    assert host_relay.loopback_resolvers(bundle) == []
