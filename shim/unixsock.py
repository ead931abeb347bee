"""Unix sockets addressed through /proc/self/fd, so long --root paths (docker's, containerd's)
never hit the 108-byte sun_path limit."""

from __future__ import annotations

import json
import os
import socket

from bonneville.spec.errors import BonnevilleError

LINE_LIMIT = 64 << 20  # a control request carries a process object, as large as ARG_MAX allows

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


def _short_path(path: str) -> tuple[int, str]:
    dirfd = os.open(os.path.dirname(path) or ".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    return dirfd, f"/proc/self/fd/{dirfd}/{os.path.basename(path)}"


def bind_unix(path: str, backlog: int = 16) -> socket.socket:
    dirfd, short = _short_path(path)
    try:
        with_sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        with_sock.bind(short)
        with_sock.listen(backlog)
        return with_sock
    finally:
        os.close(dirfd)


def connect_unix(path: str, timeout: float | None = None) -> socket.socket:
    dirfd, short = _short_path(path)
    try:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.settimeout(timeout)
        try:
            sock.connect(short)
        except OSError:
            sock.close()
            raise
        return sock
    finally:
        os.close(dirfd)


def call(path: str, request: dict[str, Any], timeout: float = 30.0) -> dict[str, Any]:
    """One JSON-line request to a monitor's control socket and its JSON-line reply."""
    try:
        sock = connect_unix(path, timeout)
    except OSError as exc:
        raise BonnevilleError(f"cannot reach the container monitor: {exc.strerror}") from exc
    with sock:
        try:
            sock.sendall(json.dumps(request).encode() + b"\n")
            reply = read_line(sock)
        except OSError as exc:
            raise BonnevilleError(f"container monitor did not answer: {exc}") from exc
    if reply is None:
        raise BonnevilleError("container monitor closed the connection")
    try:
        data = json.loads(reply)
    except ValueError as exc:
        raise BonnevilleError("container monitor sent a malformed reply") from exc
    if not isinstance(data, dict):
        raise BonnevilleError("container monitor sent a malformed reply")
    if not data.get("ok"):
        raise BonnevilleError(str(data.get("error") or "container monitor refused the request"))
    return data


def read_line(sock: socket.socket, limit: int = 1 << 20) -> bytes | None:
    """Read one newline-terminated line (None on EOF before any byte)."""
    buf = bytearray()
    while not buf.endswith(b"\n"):
        chunk = sock.recv(65536)
        if not chunk:
            return bytes(buf) if buf else None
        buf += chunk
        if len(buf) > limit:
            raise BonnevilleError("control message too large")
    return bytes(buf)
