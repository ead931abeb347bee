"""A pod member's monitor: the host process whose PID is a container that runs inside another
container's VM (shim/pod.py decides; DESIGN.md, "containerd's CRI plugin").

Like every monitor, `create` forks it and it outlives `create`: containerd's shim waits on its
PID and signals it. It enters the pod's network namespace (so `--network container:` of *this*
container finds the pod too), builds its container's tree where containerd mounted the rootfs
and hands it to the pod's owner monitor with a ``join`` request (shim/monitor/share.py). From
then on its connection to the owner carries the container's frames: it relays stdio (or the
pty), forwards the signals it receives and window-size changes, and, when the owner reports the
container's exit, records it (``exit.json``) and exits with that status. If the owner goes (the
pod's sandbox ended, its VM died), the container has ended with it: status 137.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import selectors
import signal
import socket
import traceback

from bonneville.backends.atomicfile import atomic_write
from bonneville.guest import protocol
from bonneville.shim import console, hostns, state, unixsock
from bonneville.shim.control import VM_KILLED_STATUS, Op, Phase, Request, phase
from bonneville.shim.monitor import daemon, share
from bonneville.spec.errors import BonnevilleError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from bonneville.shim.launch import MonitorConfig

log = logging.getLogger("bonneville.monitor")

JOIN_TIMEOUT = 120.0  # the owner creates the container in its VM meanwhile (a hang guard)
TREE_DIR = "tree"


class Member:
    def __init__(self, config: MonitorConfig, sync: socket.socket) -> None:
        self.cfg = config
        self.spec = config.bundle.spec
        self.sync: socket.socket | None = sync
        self.timeline = daemon.Timeline()
        process = config.bundle.raw.get("process") or {}
        self.process: dict[str, Any] = process if isinstance(process, dict) else {}
        self.terminal = bool(self.process.get("terminal"))
        self.conn: socket.socket | None = None
        self.decoder = protocol.Decoder()
        self.console_fd = -1
        self.sig_r = -1
        self.started = False
        self.stdin_fd = -1
        self.selector: selectors.BaseSelector = selectors.SelectSelector()

    @property
    def _pty_relay(self) -> bool:
        return self.terminal and not self.cfg.use_stdio_tty

    # ---- set-up -------------------------------------------------------------------------------

    def _enter_namespaces(self) -> None:
        hostns.make_private_mount_namespace()
        ns = self.spec.linux.namespace("network")
        if ns is not None and ns.path:
            hostns.setns(ns.path, hostns.CLONE_NEWNET)

    def _join(self) -> None:
        tree = os.path.join(self.cfg.state_dir, TREE_DIR)
        tree_fd = share.detached_tree(tree, self.cfg.bundle)
        owner_socket = self.cfg.owner_socket
        try:
            conn = unixsock.connect_unix(owner_socket, timeout=JOIN_TIMEOUT)
        except OSError as exc:
            os.close(tree_fd)
            raise BonnevilleError(
                f"cannot reach the pod's sandbox container {self.cfg.owner}: {exc.strerror}"
            ) from exc
        request = Request(
            op=Op.JOIN,
            container=self.cfg.container_id,
            join=self._join_fields(),
        )
        try:
            socket.send_fds(conn, [request.encode()], [tree_fd])
            line = unixsock.read_line(conn, limit=unixsock.LINE_LIMIT)
        except (OSError, BonnevilleError) as exc:
            conn.close()
            raise BonnevilleError(f"the pod's sandbox container did not answer: {exc}") from exc
        finally:
            os.close(tree_fd)
        reply = json.loads(line) if line else {"error": "the pod's sandbox container ended"}
        if not isinstance(reply, dict) or not reply.get("ok"):
            conn.close()
            error = reply.get("error") if isinstance(reply, dict) else None
            raise BonnevilleError(str(error or "the pod's sandbox refused the container"))
        conn.settimeout(None)
        self.conn = conn

    def _join_fields(self) -> dict[str, Any]:
        """What the owner needs to create the container in its VM (guestspec's fields but the
        ones that depend on the VM, which the owner fills in)."""
        from bonneville.shim.monitor import guestspec

        request = guestspec.create_request(
            self.cfg.container_id, 0, self.cfg.bundle, self.cfg.namespaces, vm_memory_mib=None
        )
        return {
            "config": request["config"],
            "namespaces": request["namespaces"],
            "process": request["process"],
            "resources": guestspec.raw_resources(self.cfg.bundle),
        }

    def _open_console(self) -> None:
        if not self.terminal:
            return
        if self.cfg.use_stdio_tty:
            self.console_fd = 0
            return
        if not self.cfg.console_socket:
            raise BonnevilleError(
                "cannot allocate tty if bonneville will detach without setting console socket"
            )
        size = self.spec.process.console_size if self.spec.process else None
        self.console_fd = console.open_console(self.cfg.console_socket, size)

    def setup(self) -> None:
        assert self.sync is not None
        self._enter_namespaces()
        self.sync.sendall(phase(Phase.NAMESPACES))
        go = unixsock.read_line(self.sync)
        if not go or not json.loads(go).get("continue"):
            raise BonnevilleError("create was abandoned")
        self._join()
        self.timeline.mark(f"joined the pod of {self.cfg.owner}")
        self._open_console()
        self.sync.sendall(phase(Phase.READY, backend_state={}))

    # ---- main ---------------------------------------------------------------------------------

    def main(self) -> int:
        daemon.detach(
            self.cfg.state_dir,
            {self.sync.fileno() if self.sync else -1},
            quiet_stdio=self._pty_relay,
        )
        self.sig_r = daemon.signal_pipe()
        self.selector = selectors.DefaultSelector()
        try:
            self.setup()
        except BaseException as exc:
            message = (
                str(exc) if isinstance(exc, BonnevilleError) else f"{type(exc).__name__}: {exc}"
            )
            log.error("setup failed: %s\n%s", message, traceback.format_exc())
            if self.conn is not None:
                self.conn.close()  # the owner takes the container out of its VM
            if self.sync is not None:
                with contextlib.suppress(OSError):
                    self.sync.sendall(phase(Phase.ERROR, error=message))
            return 1
        assert self.sync is not None
        self.sync.close()
        self.sync = None
        daemon.release_free_memory()
        status = self.loop()
        with contextlib.suppress(OSError):
            os.unlink(os.path.join(self.cfg.state_dir, state.SOCKET_FILE))
        return status

    def loop(self) -> int:
        assert self.conn is not None
        self.selector.register(self.conn, selectors.EVENT_READ, "owner")
        self.selector.register(self.sig_r, selectors.EVENT_READ, "signal")
        while True:
            for key, _ in self.selector.select():
                if key.data == "owner":
                    status = self._on_owner()
                    if status is not None:
                        return status
                elif key.data == "signal":
                    self._on_signals()
                elif key.data == "stdin":
                    self._on_stdin()

    def _record(self, status: int, signum: int | None) -> int:
        with contextlib.suppress(OSError):
            atomic_write(
                os.path.join(self.cfg.state_dir, state.EXIT_FILE),
                json.dumps(
                    {"status": status, "signal": signum, "time": state.now_rfc3339()}
                ).encode(),
            )
        assert self.conn is not None
        self.conn.close()  # the owner takes the container out of its VM
        return status

    def _on_owner(self) -> int | None:
        assert self.conn is not None
        try:
            data = self.conn.recv(1 << 16)
            frames = self.decoder.feed(data) if data else []
        except (OSError, protocol.ProtocolError):
            data, frames = b"", []
        if not data:
            log.error("the pod's owner went away: the container ended with its VM")
            return self._record(VM_KILLED_STATUS, signal.SIGKILL)
        for ftype, _, payload in frames:
            if ftype in (protocol.STDOUT, protocol.STDERR) and payload:
                self._write_output(ftype, payload)
            elif ftype == protocol.CONTROL:
                message = protocol.decode_control(payload)
                op = message.get("op")
                if op == "started":
                    self.started = True
                    self._start_stdin()
                    self._send_window_size()
                elif op == "exit":
                    signum = message.get("signal")
                    if message.get("oom") is True and self.cfg.cgroup:
                        # The relay's cgroup is the one the runtime's caller watches.
                        from bonneville.shim.cgroups.oom import report_oom

                        report_oom(self.cfg.cgroup)
                    return self._record(
                        int(message.get("status", VM_KILLED_STATUS)),
                        signum if isinstance(signum, int) else None,
                    )
        return None

    def _write_output(self, ftype: int, data: bytes) -> None:
        fd = self.console_fd if self._pty_relay else (1 if ftype == protocol.STDOUT else 2)
        if fd < 0:
            return
        try:
            protocol.write_all(fd, data)
        except OSError as exc:
            if exc.errno not in (errno.EPIPE, errno.EIO, errno.EBADF):
                raise

    def _start_stdin(self) -> None:
        fd = self.console_fd if self._pty_relay else 0
        if fd < 0:
            return
        self.stdin_fd = fd
        try:
            os.set_blocking(fd, False)
            self.selector.register(fd, selectors.EVENT_READ, "stdin")
        except (PermissionError, OSError):
            # A regular file or /dev/null cannot be polled: it never blocks, read it now.
            os.set_blocking(fd, True)
            while self._on_stdin(registered=False):
                pass

    def _on_stdin(self, registered: bool = True) -> bool:
        assert self.conn is not None
        try:
            data = os.read(self.stdin_fd, 1 << 16)
        except BlockingIOError:
            return True
        except OSError:
            data = b""
        if not data:
            if registered:
                self.selector.unregister(self.stdin_fd)
            if self.terminal:
                return False  # a pty has no end of file to give
        with contextlib.suppress(OSError):
            for frame in protocol.encode_data(protocol.STDIN, 0, data):
                self.conn.sendall(frame)
        return bool(data)

    def _on_signals(self) -> None:
        assert self.conn is not None
        for signum in daemon.read_signals(self.sig_r):
            if signum == signal.SIGCHLD:
                continue
            if signum == signal.SIGWINCH:
                self._send_window_size()
                continue
            if signum == signal.SIGHUP and self.terminal:
                continue
            with contextlib.suppress(OSError):
                self.conn.sendall(protocol.encode_control({"op": "signal", "signal": signum}))

    def _send_window_size(self) -> None:
        if not self.terminal or self.console_fd < 0 or not self.started or self.conn is None:
            return
        size = console.window_size(self.console_fd)
        if size:
            with contextlib.suppress(OSError):
                self.conn.sendall(
                    protocol.encode_control({"op": "resize", "rows": size[0], "cols": size[1]})
                )
