"""The host side of the agent protocol (docs/protocol.md): requests, replies, events."""

from __future__ import annotations

import select
import socket
import time
from collections.abc import Callable

from bonneville.guest import protocol
from bonneville.spec.errors import AgentError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    Reply = dict[str, Any]
Frame = tuple[int, int, bytes]


class AgentConnection:
    """One agent channel. Replies go to the callback given with the request; every other frame
    (output, exit, log) is returned by ``receive`` for the caller to handle."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sock.setblocking(True)
        self._decoder = protocol.Decoder()
        self._next_req = 1
        self._pending: dict[int, Callable[[Reply], None]] = {}
        self._backlog: list[Frame] = []
        self.closed = False

    def fileno(self) -> int:
        return self.sock.fileno()

    def send_control(self, message: dict[str, Any], stream: int = protocol.AGENT_STREAM) -> None:
        try:
            frame = protocol.encode_control(message, stream)
        except protocol.ProtocolError as exc:
            # config.json's checks keep a process well below this (spec/config.py): only a
            # request bloated elsewhere, or by JSON escapes, gets here.
            raise AgentError(
                f"the {message.get('op')} request is over the {protocol.MAX_CONTROL >> 20} MiB"
                f" the agent channel carries ({exc})"
            ) from exc
        self._send(frame)

    def send_data(self, ftype: int, stream: int, data: bytes) -> None:
        for frame in protocol.encode_data(ftype, stream, data):
            self._send(frame)

    def _send(self, frame: bytes) -> None:
        try:
            self.sock.sendall(frame)
        except OSError as exc:
            self.closed = True
            raise AgentError(f"agent channel broken: {exc}") from exc

    def request(self, op: str, callback: Callable[[Reply], None], **fields: Any) -> int:
        req = self._next_req
        self._next_req += 1
        self._pending[req] = callback
        self.send_control({"op": op, "req": req, **fields})
        return req

    def receive(self) -> list[Frame]:
        """Read what is available (the socket is readable); dispatch replies, return the rest."""
        frames: list[Frame] = []
        try:
            data = self.sock.recv(1 << 16)
        except BlockingIOError:
            return frames
        except OSError as exc:
            self.closed = True
            raise AgentError(f"agent channel broken: {exc}") from exc
        if not data:
            self.closed = True
            return frames
        try:
            decoded = self._decoder.feed(data)
        except protocol.ProtocolError as exc:
            self.closed = True
            raise AgentError(f"agent protocol error: {exc}") from exc
        for ftype, stream, payload in decoded:
            if ftype == protocol.CONTROL:
                try:
                    message = protocol.decode_control(payload)
                except protocol.ProtocolError as exc:
                    self.closed = True
                    raise AgentError(f"agent protocol error: {exc}") from exc
                if message.get("op") == "reply" and isinstance(message.get("req"), int):
                    callback = self._pending.pop(message["req"], None)
                    if callback is not None:
                        callback(message)
                    continue
            frames.append((ftype, stream, payload))
        return frames

    def take_backlog(self) -> list[Frame]:
        """Frames that arrived while ``call`` waited for a reply."""
        frames, self._backlog = self._backlog, []
        return frames

    def call(self, op: str, timeout: float, **fields: Any) -> Reply:
        """Send a request and wait for its reply; frames arriving meanwhile are kept."""
        box: list[Reply] = []
        self.request(op, box.append, **fields)
        deadline = time.monotonic() + timeout
        while not box:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AgentError(f"the agent did not answer {op!r} within {timeout:.0f}s")
            readable, _, _ = select.select([self.sock], [], [], remaining)
            if readable:
                self._backlog.extend(self.receive())
                if self.closed and not box:
                    raise AgentError(f"the agent closed its channel during {op!r}")
        reply = box[0]
        if not reply.get("ok"):
            raise AgentError(str(reply.get("error") or f"the agent refused {op!r}"))
        return reply
