"""The framed wire protocol shared by host and agent (docs/protocol.md)."""

from __future__ import annotations

import socket

import pytest

from bonneville.guest import protocol
from bonneville.shim.agent_client import AgentConnection
from bonneville.spec.errors import AgentError


def test_control_roundtrip_in_pieces() -> None:
    frame = protocol.encode_control({"op": "hello", "version": 1}, stream=0)
    frame += protocol.encode(protocol.STDOUT, 3, b"abc")
    decoder = protocol.Decoder()
    frames = []
    for i in range(len(frame)):  # byte by byte: partial headers and payloads
        frames += decoder.feed(frame[i : i + 1])
    assert frames[0][0] == protocol.CONTROL
    assert protocol.decode_control(frames[0][2]) == {"op": "hello", "version": 1}
    assert frames[1] == (protocol.STDOUT, 3, b"abc")


def test_header_layout_is_the_documented_one() -> None:
    assert protocol.encode(protocol.STDERR, 0x0102, b"xy") == b"\x04\x00\x01\x02\x00\x00\x00\x02xy"


def test_large_data_is_split_and_empty_means_eof() -> None:
    data = b"x" * (protocol.MAX_PAYLOAD * 2 + 5)
    frames = protocol.encode_data(protocol.STDIN, 1, data)
    assert len(frames) == 3
    decoded = protocol.Decoder().feed(b"".join(frames))
    assert b"".join(p for _, _, p in decoded) == data
    assert protocol.Decoder().feed(protocol.encode_data(protocol.STDIN, 1, b"")[0]) == [
        (protocol.STDIN, 1, b"")
    ]


@pytest.mark.parametrize(
    "bad",
    [
        b"\x09\x00\x00\x01\x00\x00\x00\x00",  # unknown type
        b"\x01\x00\x00\x00\x7f\xff\xff\xff",  # 2 GiB frame: refused before any allocation
    ],
)
def test_malformed_frames_are_protocol_errors(bad: bytes) -> None:
    with pytest.raises(protocol.ProtocolError):
        protocol.Decoder().feed(bad)


@pytest.mark.parametrize("payload", [b"not json", b"[1,2]", b'{"no_op": 1}', b"\xff\xfe"])
def test_bad_control_payloads(payload: bytes) -> None:
    with pytest.raises(protocol.ProtocolError):
        protocol.decode_control(payload)


def test_oversized_encode_is_refused() -> None:
    with pytest.raises(protocol.ProtocolError):
        protocol.encode(protocol.STDOUT, 1, b"x" * (protocol.MAX_PAYLOAD + 1))


def test_control_frames_carry_what_execve_takes() -> None:
    """A create or exec request carries a process of up to 6 MiB of argv and environment
    (spec/config.py); data frames stay at most MAX_PAYLOAD."""
    message = {"op": "create", "process": {"env": ["X=" + "x" * (6 << 20)]}}
    frame = protocol.encode_control(message)
    assert protocol.MAX_PAYLOAD < len(frame) < protocol.MAX_CONTROL
    decoder = protocol.Decoder()
    frames = []
    for i in range(0, len(frame), 65536):  # as the channel reads it
        frames += decoder.feed(frame[i : i + 65536])
    assert [protocol.decode_control(p) for _, _, p in frames] == [message]
    with pytest.raises(protocol.ProtocolError):
        protocol.encode(protocol.CONTROL, 0, b"x" * (protocol.MAX_CONTROL + 1))
    with pytest.raises(protocol.ProtocolError):
        protocol.Decoder().feed(protocol.HEADER.pack(protocol.STDIN, 1, protocol.MAX_PAYLOAD + 1))
    with pytest.raises(protocol.ProtocolError):
        protocol.Decoder().feed(protocol.HEADER.pack(protocol.CONTROL, 0, protocol.MAX_CONTROL + 1))


def test_host_refuses_a_request_over_the_limit_in_one_line() -> None:
    host, guest = socket.socketpair()
    with host, guest:
        conn = AgentConnection(host)
        with pytest.raises(AgentError) as info:
            conn.send_control({"op": "create", "pad": "x" * protocol.MAX_CONTROL})
        assert str(info.value).startswith("the create request is over the 16 MiB the agent")
        assert "ProtocolError" not in str(info.value) and "\n" not in str(info.value)
        assert not conn.closed


def test_host_client_matches_replies_and_keeps_other_frames() -> None:
    host, guest = socket.socketpair()
    with host, guest:
        conn = AgentConnection(host)
        # The "agent" answers after first sending unrelated output and an exit event.
        guest.sendall(
            protocol.encode(protocol.STDOUT, 1, b"early")
            + protocol.encode_control({"op": "exit", "id": 1, "status": 0})
            + protocol.encode_control({"op": "reply", "req": 1, "ok": True, "pid": 7})
        )
        reply = conn.call("exec", timeout=5, id=1)
        assert reply["pid"] == 7
        kinds = [f[0] for f in conn.take_backlog()]
        assert kinds == [protocol.STDOUT, protocol.CONTROL]
        sent = protocol.Decoder().feed(guest.recv(65536))
        assert protocol.decode_control(sent[0][2]) == {"op": "exec", "req": 1, "id": 1}


def test_host_client_reports_refusals_and_garbage() -> None:
    host, guest = socket.socketpair()
    with host, guest:
        conn = AgentConnection(host)
        guest.sendall(
            protocol.encode_control({"op": "reply", "req": 1, "ok": False, "error": "no"})
        )
        with pytest.raises(AgentError, match="no"):
            conn.call("signal", timeout=5)
        guest.sendall(b"\xee" * 8)
        with pytest.raises(AgentError, match="protocol error"):
            conn.call("ps", timeout=5)
