"""A small QMP (QEMU Machine Protocol) client over an already-connected socket.

QMP is line-delimited JSON: a greeting, then ``{"execute": …, "id": …}`` requests answered by
``{"return": …}`` or ``{"error": {"class", "desc"}}`` carrying the same ``id``, interleaved with
asynchronous ``{"event": …}`` messages (STOP, RESUME, SHUTDOWN…). Every wait has a deadline: a
hung QEMU must never hang the monitor.
"""

from __future__ import annotations

import json
import select
import socket
import time
from collections import deque
from collections.abc import Mapping, Sequence

from bonneville.spec.errors import BackendError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

DEFAULT_TIMEOUT = 10.0
# A QMP message is small; a runaway peer must not make us buffer without bound.
MAX_LINE = 16 << 20


class QMPError(BackendError):
    """QEMU answered a command with an error."""

    def __init__(self, command: str, error_class: str, desc: str) -> None:
        super().__init__(f"QMP {command}: {desc}")
        self.command = command
        self.error_class = error_class
        self.desc = desc


class QMPClient:
    """Speaks QMP on ``sock``, which the client owns from now on (``close`` closes it)."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        # Non-blocking: every wait goes through poll() with a deadline, never a blocking call.
        sock.setblocking(False)
        self._buf = bytearray()
        # Bounded: nobody may ever read the events of a long-lived VM; old ones go first.
        self._events: deque[dict[str, Any]] = deque(maxlen=1024)
        self._next_id = 0
        self._closed = False
        self.greeting: dict[str, Any] = {}

    def fileno(self) -> int:
        return self._sock.fileno()

    def handshake(self, timeout: float = DEFAULT_TIMEOUT) -> dict[str, Any]:
        """Read the greeting and leave capabilities negotiation mode; returns the greeting."""
        deadline = time.monotonic() + timeout
        message = self._read_message(deadline, "the QMP greeting")
        if "QMP" not in message:
            raise BackendError(f"QMP: expected a greeting, got {_short(message)}")
        self.greeting = message
        self.command("qmp_capabilities", timeout=max(0.0, deadline - time.monotonic()))
        return message

    def execute(self, command: str, **args: Any) -> Any:
        """Run ``command`` with ``args`` (default deadline); its ``return`` value."""
        return self.command(command, args)

    def command(
        self,
        command: str,
        args: Mapping[str, Any] | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        fds: Sequence[int] = (),
    ) -> Any:
        """Run ``command``; ``fds`` travel with it (SCM_RIGHTS) for ``getfd``/``add-fd``."""
        deadline = time.monotonic() + timeout
        self._next_id += 1
        request_id = self._next_id
        request: dict[str, Any] = {"execute": command, "id": request_id}
        if args:
            request["arguments"] = dict(args)
        data = json.dumps(request, separators=(",", ":")).encode() + b"\n"
        self._send(data, fds, deadline, command)
        while True:
            message = self._read_message(deadline, f"the reply to {command}")
            if "event" in message:
                self._events.append(message)
                continue
            # A reply to an earlier request that timed out: its caller is gone, drop it.
            if message.get("id") != request_id:
                continue
            if "error" in message:
                error = message["error"]
                raise QMPError(
                    command, str(error.get("class", "GenericError")), str(error.get("desc", ""))
                )
            return message.get("return")

    def events(self) -> list[dict[str, Any]]:
        """Events received so far (and not yet taken), oldest first; empties the queue."""
        events = list(self._events)
        self._events.clear()
        return events

    def wait_event(self, name: str, timeout: float = DEFAULT_TIMEOUT) -> dict[str, Any]:
        """The first event called ``name`` (queued or still to come); others stay queued."""
        for queued in self._events:
            if queued.get("event") == name:
                self._events.remove(queued)
                return queued
        deadline = time.monotonic() + timeout
        while True:
            message = self._read_message(deadline, f"the {name} event")
            if message.get("event") == name:
                return message
            if "event" in message:
                self._events.append(message)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._sock.close()

    def _send(self, data: bytes, fds: Sequence[int], deadline: float, what: str) -> None:
        view = memoryview(data)
        while view:
            self._wait(select.POLLOUT, deadline, f"sending {what}")
            try:
                if fds:
                    sent = socket.send_fds(self._sock, [view], list(fds))
                    fds = ()  # the descriptors go with the first bytes only
                else:
                    sent = self._sock.send(view)
            except BlockingIOError:
                continue
            except (BrokenPipeError, ConnectionResetError) as exc:
                raise BackendError(f"QMP: connection closed while sending {what}") from exc
            except OSError as exc:
                raise BackendError(f"QMP: cannot send {what}: {exc.strerror}") from exc
            view = view[sent:]

    def _read_message(self, deadline: float, what: str) -> dict[str, Any]:
        while True:
            end = self._buf.find(b"\n")
            if end >= 0:
                line = bytes(self._buf[: end + 1])
                del self._buf[: end + 1]
                if not line.strip():
                    continue
                try:
                    message = json.loads(line)
                except ValueError as exc:
                    raise BackendError(f"QMP: malformed message {line[:80]!r}") from exc
                if not isinstance(message, dict):
                    raise BackendError(f"QMP: unexpected message {_short(message)}")
                return message
            if len(self._buf) > MAX_LINE:
                raise BackendError("QMP: message too long")
            self._wait(select.POLLIN, deadline, f"waiting for {what}")
            try:
                chunk = self._sock.recv(65536)
            except BlockingIOError:
                continue
            except OSError as exc:
                raise BackendError(f"QMP: connection failed: {exc.strerror}") from exc
            if not chunk:
                raise BackendError(f"QMP: connection closed while waiting for {what}")
            self._buf += chunk

    def _wait(self, events: int, deadline: float, what: str) -> None:
        if self._closed:
            raise BackendError("QMP: connection already closed")
        poller = select.poll()
        poller.register(self._sock.fileno(), events)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BackendError(f"QMP: timed out {what}")
            # poll() reports POLLHUP/POLLERR too: the following recv/send surfaces them.
            if poller.poll(remaining * 1000):
                return


def _short(message: object) -> str:
    text = json.dumps(message)
    return text if len(text) <= 120 else text[:117] + "..."
