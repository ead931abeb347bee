"""The host–agent wire protocol, shared by the monitor (host) and the agent (guest).

Every message is a frame: an 8-byte header ``>BxHI`` (type, pad, stream, length) followed by
``length`` bytes of payload. Control frames carry one UTF-8 JSON object; data frames carry raw
bytes of one process's stdio, ``stream`` being the process id the host chose for it. A data frame
with an empty payload means end of file on that stream. The format is documented in
``docs/protocol.md``. This module imports only the standard library modules the guest carries.
"""

from __future__ import annotations

import json
import os
import struct

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

VERSION = 2

# Names both sides agree on: the virtio-serial port and the 9p mount tag of the shared root.
PORT_NAME = "bonneville.agent"
ROOT_TAG = "bonneville-root"

# The capabilities the agent can apply, in number order (include/uapi/linux/capability.h,
# CAP_LAST_CAP = 40 on the guest's Linux 6.1); `bonneville features` reports this same list.
CAPABILITIES = (
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
)

# The container's cgroup files inside the VM: the only ones the agent writes (`setup`'s and
# `update`'s "resources"), and the ones `stats` reads. See spec/resources.py.
CGROUP_LIMIT_FILES = (
    "memory.max",
    "memory.low",
    "memory.swap.max",
    "cpu.max",
    "cpu.weight",
    "pids.max",
)
CGROUP_STATS_FILES = (
    "cpu.stat",
    "memory.current",
    "memory.max",
    "memory.peak",
    "memory.stat",
    "memory.events",
    "memory.swap.current",
    "memory.swap.max",
    "pids.current",
    "pids.max",
)

HEADER = struct.Struct(">BxHI")
# Larger frames are a protocol error, never an allocation. Data is split into frames of at most
# MAX_PAYLOAD; a control frame is one JSON message, and ``create`` and ``exec`` carry a process
# whose argv and environment may be as large as execve(2) ever takes: 6 MiB (docs/protocol.md,
# "Large processes"), with room here for JSON escapes and the rest of the request.
MAX_PAYLOAD = 1 << 20  # 1 MiB
MAX_CONTROL = 16 << 20  # 16 MiB

CONTROL = 1
STDIN = 2
STDOUT = 3
STDERR = 4
DATA_TYPES = (STDIN, STDOUT, STDERR)
FRAME_TYPES = (CONTROL, STDIN, STDOUT, STDERR)

# Stream 0 is the agent itself; containers' processes use ids from 1 (1 is the init process).
AGENT_STREAM = 0
INIT_STREAM = 1


class ProtocolError(Exception):
    """The peer sent something that is not a valid frame."""


def encode(ftype: int, stream: int, payload: bytes) -> bytes:
    """One frame as bytes."""
    if ftype not in FRAME_TYPES:
        raise ProtocolError(f"unknown frame type {ftype}")
    limit = MAX_CONTROL if ftype == CONTROL else MAX_PAYLOAD
    if len(payload) > limit:
        raise ProtocolError(f"payload of {len(payload)} bytes exceeds {limit}")
    return HEADER.pack(ftype, stream, len(payload)) + payload


def encode_control(message: dict[str, Any], stream: int = AGENT_STREAM) -> bytes:
    """A control frame carrying ``message`` as JSON."""
    return encode(CONTROL, stream, json.dumps(message, separators=(",", ":")).encode())


def encode_data(ftype: int, stream: int, data: bytes) -> list[bytes]:
    """Data frames for ``data``, split so no frame exceeds the limit (empty data means EOF)."""
    if not data:
        return [encode(ftype, stream, b"")]
    return [
        encode(ftype, stream, data[i : i + MAX_PAYLOAD]) for i in range(0, len(data), MAX_PAYLOAD)
    ]


def decode_control(payload: bytes) -> dict[str, Any]:
    """The JSON object of a control frame; anything else is a ProtocolError."""
    try:
        message = json.loads(payload)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        # RecursionError: a megabyte of nested brackets must be an error, not a crash.
        raise ProtocolError(f"control frame is not JSON: {type(exc).__name__}") from exc
    if not isinstance(message, dict) or not isinstance(message.get("op"), str):
        raise ProtocolError("control frame is not an object with an 'op'")
    return message


class Decoder:
    """Incremental frame parser: feed bytes as they arrive, take whole frames out."""

    def __init__(self, max_buffer: int = HEADER.size + MAX_CONTROL) -> None:
        self._buf = bytearray()
        self._max_buffer = max_buffer

    def feed(self, data: bytes) -> list[tuple[int, int, bytes]]:
        """Add ``data``; return every complete frame as (type, stream, payload)."""
        self._buf += data
        frames: list[tuple[int, int, bytes]] = []
        while len(self._buf) >= HEADER.size:
            ftype, stream, length = HEADER.unpack_from(self._buf)
            if ftype not in FRAME_TYPES:
                raise ProtocolError(f"unknown frame type {ftype}")
            limit = MAX_CONTROL if ftype == CONTROL else MAX_PAYLOAD
            if length > limit:
                raise ProtocolError(f"frame of {length} bytes exceeds {limit}")
            end = HEADER.size + length
            if len(self._buf) < end:
                break
            frames.append((ftype, stream, bytes(self._buf[HEADER.size : end])))
            del self._buf[:end]
        if len(self._buf) > self._max_buffer:
            raise ProtocolError("receive buffer overflow")
        return frames


def write_all(fd: int, data: bytes) -> None:
    """Write every byte of ``data`` to a blocking descriptor."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]
