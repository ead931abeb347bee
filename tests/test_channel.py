"""The agent channel is hostile input: nothing a guest sends can crash or hang the monitor.

Unit tests of the monitor's own handling, with the test playing a subverted agent on the other
end of a socketpair (the real agent's side is tested in test_agent.py)."""

from __future__ import annotations

import json
import logging
import select
import socket
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bonneville.guest import protocol
from bonneville.shim import launch
from bonneville.shim.agent_client import AgentConnection
from bonneville.shim.monitor import pod as monitor
from bonneville.spec.config import load_bundle
from bonneville.spec.errors import AgentError
from tests.support import default_config, write_bundle


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_bundle(tmp_path_factory.mktemp("channel") / "b", default_config(["true"]))


@pytest.fixture
def hostile(bundle: Path, tmp_path: Path) -> Iterator[tuple[monitor.Pod, socket.socket]]:
    """A monitor whose agent end is ours to write anything into."""
    config = launch.MonitorConfig(
        container_id="c1",
        state_dir=str(tmp_path),
        bundle=load_bundle(str(bundle)),
        backend="fake",
        console_socket=None,
    )
    sync_ours, sync_theirs = socket.socketpair()
    m = monitor.Pod(config, sync_theirs)
    ours, theirs = socket.socketpair()
    m.vm.agent = AgentConnection(theirs)
    yield m, ours
    for s in (ours, theirs, sync_ours, sync_theirs):
        s.close()


def _frame(ftype: int, stream: int, payload: bytes) -> bytes:
    return struct.pack(">BxHI", ftype, stream, len(payload)) + payload


def _control(message: object) -> bytes:
    return _frame(protocol.CONTROL, 0, json.dumps(message).encode())


HOSTILE = {
    "unknown frame type": _frame(9, 0, b""),
    "4 GiB length": struct.pack(">BxHI", protocol.STDOUT, 1, 0xFFFFFFFF),
    "control not JSON": _frame(protocol.CONTROL, 0, b"\xff{"),
    "control a list": _control([1, 2]),
    "op not a string": _control({"op": 5}),
    "exit status not a number": _control({"op": "exit", "id": 1, "status": "x"}),
    "exit id unhashable": _control({"op": "exit", "id": [1], "status": 0}),
    "deeply nested JSON": _frame(protocol.CONTROL, 0, b"[" * 200_000 + b"]" * 200_000),
}

# Frames that make no sense but do no harm: ignored, and the container carries on.
HARMLESS = {
    "reply to nothing": _control({"op": "reply", "req": [1]}),
    "reply to an unknown request": _control({"op": "reply", "req": 999}),
    "unknown op": _control({"op": "nonesuch"}),
    "exit of an unknown stream": _control({"op": "exit", "id": 77, "status": 0}),
    "output of an unknown stream": _frame(protocol.STDOUT, 999, b"x"),
    "stdin from the guest": _frame(protocol.STDIN, 1, b"x"),
}


@pytest.mark.parametrize("case", sorted(HARMLESS))
def test_harmless_nonsense_is_ignored(
    hostile: tuple[monitor.Pod, socket.socket], case: str
) -> None:
    m, agent = hostile
    agent.sendall(HARMLESS[case] + _control({"op": "exit", "id": 1, "status": 5}))
    assert m.agent is not None
    while m.exit_status is None and select.select([m.agent.sock], [], [], 5)[0]:
        m._on_agent()
    assert m.exit_status == 5


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_frame_ends_the_container_never_the_monitor(
    hostile: tuple[monitor.Pod, socket.socket], tmp_path: Path, case: str
) -> None:
    m, agent = hostile
    # From a thread: a frame larger than the socket buffer waits for the monitor to read.
    sender = threading.Thread(target=agent.sendall, args=(HOSTILE[case],))
    sender.start()
    assert m.agent is not None
    for _ in range(200):  # a big frame arrives in 64 KiB reads
        m._on_agent()
        if m.exit_status is not None:
            break
    agent.shutdown(socket.SHUT_RDWR)  # unblocks the sender if the monitor stopped reading
    sender.join()
    assert m.exit_status == monitor.VM_KILLED_STATUS
    exit_record = json.loads((tmp_path / "exit.json").read_text())
    assert exit_record["status"] == monitor.VM_KILLED_STATUS


def test_agent_log_flood_is_rate_limited(
    hostile: tuple[monitor.Pod, socket.socket], caplog: pytest.LogCaptureFixture
) -> None:
    m, agent = hostile
    flood = protocol.encode_control({"op": "log", "level": "info", "msg": "x" * 100_000})
    caplog.set_level(logging.INFO, logger="bonneville.monitor")
    count = 2000

    def send() -> None:
        for _ in range(count):
            agent.sendall(flood)
        agent.shutdown(socket.SHUT_WR)

    sender = threading.Thread(target=send)
    sender.start()
    assert m.agent is not None
    while not m.agent.closed:  # the monitor's loop: read whenever the agent has sent
        m._on_agent()
    sender.join()
    lines = [r for r in caplog.records if r.getMessage().startswith("agent: x")]
    assert len(lines) == monitor.AGENT_LOG_LINES
    assert all(len(r.getMessage()) <= monitor.AGENT_LOG_LINE_CHARS + 10 for r in lines)


def test_valid_output_after_garbage_is_never_written(
    hostile: tuple[monitor.Pod, socket.socket],
) -> None:
    """Once the channel is broken nothing more is taken from it."""
    m, agent = hostile
    agent.sendall(HOSTILE["control a list"] + _frame(protocol.STDOUT, 1, b"late"))
    m._on_agent()
    assert m.exit_status == monitor.VM_KILLED_STATUS
    assert m.agent is not None and m.agent.closed


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=4096))
def test_any_bytes_are_frames_or_an_agent_error(data: bytes) -> None:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        conn = AgentConnection(theirs)
        ours.sendall(data)
        ours.shutdown(socket.SHUT_WR)
        try:
            while not conn.closed:
                for ftype, _, _ in conn.receive():
                    assert ftype in protocol.FRAME_TYPES
        except AgentError:
            pass
