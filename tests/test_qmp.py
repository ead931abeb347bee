"""The QMP client against a scripted fake QEMU monitor on a socketpair (our logic, not QEMU's)."""

from __future__ import annotations

import json
import os
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from bonneville.backends.qemu.qmp import QMPClient, QMPError
from bonneville.spec.errors import BackendError

GREETING = {"QMP": {"version": {"qemu": {"major": 7, "minor": 2, "micro": 0}}, "capabilities": []}}

# A handler gets one request and returns the messages to send back (events and replies).
Handler = Callable[[dict[str, Any]], list[dict[str, Any]]]


class FakeMonitor:
    """Answers QMP requests in a thread; records them, and any descriptors sent along."""

    def __init__(self, sock: socket.socket, handler: Handler, greeting: bool = True) -> None:
        self.sock = sock
        self.handler = handler
        self.requests: list[dict[str, Any]] = []
        self.received_fds: list[int] = []
        self.greeting = greeting
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def send(self, message: dict[str, Any], raw: bytes = b"") -> None:
        self.sock.sendall(raw or json.dumps(message).encode() + b"\r\n")

    def _run(self) -> None:
        if self.greeting:
            self.send(GREETING)
        buf = b""
        while True:
            try:
                data, fds, _, _ = socket.recv_fds(self.sock, 65536, 4)
            except OSError:
                return
            self.received_fds += fds
            if not data:
                return
            buf += data
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                request = json.loads(line)
                self.requests.append(request)
                for message in self.handler(request):
                    self.send(message)


def answer_all(request: dict[str, Any]) -> list[dict[str, Any]]:
    """Success for everything, echoing the arguments back."""
    return [{"return": request.get("arguments", {}), "id": request["id"]}]


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    yield ours, theirs
    ours.close()
    theirs.close()


def connect(
    pair: tuple[socket.socket, socket.socket], handler: Handler
) -> tuple[QMPClient, FakeMonitor]:
    ours, theirs = pair
    monitor = FakeMonitor(theirs, handler)
    client = QMPClient(ours)
    greeting = client.handshake(timeout=5)
    assert greeting == GREETING
    return client, monitor


def test_handshake_negotiates_capabilities(pair: tuple[socket.socket, socket.socket]) -> None:
    client, monitor = connect(pair, answer_all)
    assert [r["execute"] for r in monitor.requests] == ["qmp_capabilities"]
    assert client.greeting == GREETING


def test_execute_returns_the_return_value(pair: tuple[socket.socket, socket.socket]) -> None:
    client, monitor = connect(pair, answer_all)
    assert client.execute("migrate-incoming", uri="fd:state") == {"uri": "fd:state"}
    assert monitor.requests[-1]["arguments"] == {"uri": "fd:state"}
    # Argument names with dashes go through command().
    assert client.command("x", {"x-ignore-shared": True}) == {"x-ignore-shared": True}
    # No arguments: no "arguments" member at all (QEMU accepts both; keep requests minimal).
    client.execute("stop")
    assert "arguments" not in monitor.requests[-1]


def test_error_reply_raises_with_its_description(pair: tuple[socket.socket, socket.socket]) -> None:
    def handler(request: dict[str, Any]) -> list[dict[str, Any]]:
        if request["execute"] == "bogus":
            error = {"class": "CommandNotFound", "desc": "The command bogus has not been found"}
            return [{"error": error, "id": request["id"]}]
        return answer_all(request)

    client, _ = connect(pair, handler)
    with pytest.raises(QMPError, match="The command bogus has not been found") as info:
        client.execute("bogus")
    assert isinstance(info.value, BackendError)
    assert info.value.error_class == "CommandNotFound"
    # The connection stays usable after an error.
    assert client.execute("query-status", x=1) == {"x": 1}


def test_events_interleaved_with_replies_are_queued(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    def handler(request: dict[str, Any]) -> list[dict[str, Any]]:
        if request["execute"] == "stop":
            stop_event = {"event": "STOP", "timestamp": {"seconds": 1, "microseconds": 0}}
            return [stop_event, {"return": {}, "id": request["id"]}]
        if request["execute"] == "cont":
            resume = {"event": "RESUME", "timestamp": {"seconds": 2, "microseconds": 0}}
            return [{"return": {}, "id": request["id"]}, resume]
        return answer_all(request)

    client, _ = connect(pair, handler)
    assert client.execute("stop") == {}
    assert client.execute("cont") == {}
    # RESUME came after the reply to cont: it is read when we wait for it.
    assert client.wait_event("RESUME", timeout=5)["event"] == "RESUME"
    assert [e["event"] for e in client.events()] == ["STOP"]
    assert client.events() == []


def test_wait_event_keeps_other_events(pair: tuple[socket.socket, socket.socket]) -> None:
    client, monitor = connect(pair, answer_all)
    monitor.send({"event": "RTC_CHANGE"})
    monitor.send({"event": "SHUTDOWN"})
    assert client.wait_event("SHUTDOWN", timeout=5)["event"] == "SHUTDOWN"
    assert [e["event"] for e in client.events()] == ["RTC_CHANGE"]


def test_stale_replies_are_skipped(pair: tuple[socket.socket, socket.socket]) -> None:
    # A reply to a request that timed out earlier arrives first: it must not be taken for ours.
    def handler(request: dict[str, Any]) -> list[dict[str, Any]]:
        stale = {"return": "stale", "id": request["id"] - 1}
        return [stale, {"return": "fresh", "id": request["id"]}]

    ours, theirs = pair
    FakeMonitor(theirs, handler)
    client = QMPClient(ours)
    client.handshake(timeout=5)
    assert client.execute("query-name") == "fresh"


def test_hung_monitor_times_out(pair: tuple[socket.socket, socket.socket]) -> None:
    def handler(request: dict[str, Any]) -> list[dict[str, Any]]:
        return answer_all(request) if request["execute"] == "qmp_capabilities" else []

    client, _ = connect(pair, handler)
    with pytest.raises(BackendError, match="timed out"):
        client.command("query-status", timeout=0.3)


def test_missing_greeting_times_out(pair: tuple[socket.socket, socket.socket]) -> None:
    ours, theirs = pair
    FakeMonitor(theirs, answer_all, greeting=False)
    with pytest.raises(BackendError, match="greeting"):
        QMPClient(ours).handshake(timeout=0.3)


def test_wrong_greeting_is_refused(pair: tuple[socket.socket, socket.socket]) -> None:
    ours, theirs = pair
    theirs.sendall(b'{"return": {}}\n')
    with pytest.raises(BackendError, match="expected a greeting"):
        QMPClient(ours).handshake(timeout=5)


def test_closed_connection_is_an_error(pair: tuple[socket.socket, socket.socket]) -> None:
    ours, theirs = pair
    theirs.sendall(json.dumps(GREETING).encode() + b"\n")
    theirs.close()
    with pytest.raises(BackendError, match="connection closed"):
        QMPClient(ours).handshake(timeout=5)


def test_malformed_message_is_an_error(pair: tuple[socket.socket, socket.socket]) -> None:
    ours, theirs = pair
    theirs.sendall(b"{not json\n")
    with pytest.raises(BackendError, match="malformed"):
        QMPClient(ours).handshake(timeout=5)


def test_message_split_across_reads(pair: tuple[socket.socket, socket.socket]) -> None:
    ours, theirs = pair
    client = QMPClient(ours)
    data = json.dumps(GREETING).encode() + b"\n"

    def dribble() -> None:
        for i in range(len(data)):
            theirs.sendall(data[i : i + 1])
        request = json.loads(theirs.recv(4096))
        theirs.sendall(json.dumps({"return": {}, "id": request["id"]}).encode() + b"\n")

    thread = threading.Thread(target=dribble, daemon=True)
    thread.start()
    assert client.handshake(timeout=5) == GREETING
    thread.join(5)


def test_descriptors_travel_with_the_command(pair: tuple[socket.socket, socket.socket]) -> None:
    client, monitor = connect(pair, answer_all)
    read_end, write_end = os.pipe()
    try:
        client.command("getfd", {"fdname": "state"}, fds=[read_end])
        assert len(monitor.received_fds) == 1
        os.write(write_end, b"x")
        assert os.read(monitor.received_fds[0], 1) == b"x"
    finally:
        for fd in (read_end, write_end, *monitor.received_fds):
            os.close(fd)


def test_closed_client_refuses_commands(pair: tuple[socket.socket, socket.socket]) -> None:
    client, _ = connect(pair, answer_all)
    client.close()
    client.close()  # idempotent
    with pytest.raises(BackendError):
        client.execute("query-status")
