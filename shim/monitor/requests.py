"""The owner monitor's control socket (shim/control.py): requests from the CLI, exec proxies and
pod members, each for one container of the pod (the owner's own when none is named)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import selectors
import signal
import socket
import traceback

from bonneville.backends.base import Capability
from bonneville.shim import unixsock
from bonneville.shim.control import VM_KILLED_STATUS, Op, Request
from bonneville.shim.monitor import daemon, guestspec
from bonneville.shim.monitor.sessions import PodContainer, refuse_exec
from bonneville.shim.signals import IGNORED_BY_DEFAULT
from bonneville.spec.errors import BonnevilleError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

    from bonneville.shim.monitor.pod import Pod

    Reply = Callable[[dict[str, Any]], None]

log = logging.getLogger("bonneville.monitor")


class Requests:
    """What the owner does for each request."""

    def __init__(self, pod: Pod) -> None:
        self.pod = pod

    def on_control(self) -> None:
        assert self.pod.control is not None
        try:
            conn, _ = self.pod.control.accept()
        except OSError:
            return
        conn.setblocking(True)
        conn.settimeout(5)
        self.pod.selector.register(conn, selectors.EVENT_READ, ("client",))

    def on_client(self, conn: socket.socket) -> None:
        self.pod.selector.unregister(conn)
        fds: list[int] = []
        try:
            line, fds = read_request(conn)
            request = Request.decode(json.loads(line)) if line else None
        except (OSError, ValueError, BonnevilleError) as exc:
            for fd in fds:
                os.close(fd)
            if not isinstance(exc, OSError):
                with contextlib.suppress(OSError):
                    conn.sendall(json.dumps({"ok": False, "error": str(exc)}).encode() + b"\n")
            conn.close()
            return
        if request is None:
            conn.close()
            return

        def reply(message: dict[str, Any]) -> None:
            with contextlib.suppress(OSError):
                conn.sendall(json.dumps(message).encode() + b"\n")
            conn.close()

        try:
            if request.op is Op.EXEC:
                self.pod.members.exec(request, conn)
            elif request.op is Op.JOIN:
                self.pod.members.join(request, conn, fds)
            else:
                self.dispatch(request, reply)
        except Exception as exc:
            if not isinstance(exc, BonnevilleError):
                log.error("request %s failed: %s", request, traceback.format_exc())
            error = str(exc) if isinstance(exc, BonnevilleError) else f"{type(exc).__name__}: {exc}"
            if request.op is Op.EXEC:
                refuse_exec(conn, error)  # an exec proxy reads frames
            else:
                reply({"ok": False, "error": error})
        finally:
            for fd in fds:
                os.close(fd)

    def container(self, request: Request) -> PodContainer:
        found = self.pod.containers.get(request.container or self.pod.own.id)
        if found is None:
            raise BonnevilleError(f"container {request.container} is not in this pod")
        return found

    def dispatch(self, request: Request, reply: Reply) -> None:
        target = self.container(request)
        op = request.op
        if op is Op.START:
            self.start(target, reply)
        elif op is Op.SIGNAL:
            self.signal(target, request.signal, request.all, reply)
        elif op is Op.DESTROY:
            if target is self.pod.own:
                status = (
                    self.pod.exit_status if self.pod.exit_status is not None else VM_KILLED_STATUS
                )
                self.pod._finish(status)
                reply({"ok": True})
            else:
                self.pod.members.end_member(target, VM_KILLED_STATUS, None)
                reply({"ok": True})
        elif op in (Op.PAUSE, Op.RESUME):
            self.pause(target, op is Op.PAUSE, reply)
        elif op is Op.PS:
            self.pod.agent.request("ps", reply, container=target.id)
        elif op is Op.UPDATE:
            if request.resources is None:
                raise BonnevilleError("update: resources must be a JSON object")
            files = guestspec.cgroup_files(request.resources, self.pod.vm.memory_mib, strict=True)
            self.pod.agent.request("update", reply, container=target.id, resources=files)
        elif op is Op.STATS:
            self.pod.agent.request("stats", reply, container=target.id)
        else:
            reply({"ok": False, "error": f"unknown request {op.value!r}"})

    def pause(self, target: PodContainer, pause: bool, reply: Reply) -> None:
        vm = self.pod.vm.vm
        assert vm is not None
        alone = len(self.pod.containers) == 1
        if (
            target is self.pod.own
            and alone
            and Capability.PAUSE in self.pod.vm.backend.capabilities
        ):
            # A container alone in its VM: freeze the whole VM (no vCPU time at all).
            if pause:
                vm.pause()
            else:
                vm.resume()
            target.paused = pause
            reply({"ok": True})
            return

        def done(result: dict[str, Any]) -> None:
            if result.get("ok"):
                target.paused = pause
            reply(result)

        self.pod.agent.request("pause" if pause else "resume", done, container=target.id)

    def start(self, target: PodContainer, reply: Reply) -> None:
        if target.started:
            reply({"ok": False, "error": "container already started"})
            return
        self.pod.timeline.mark(f"start {target.id} requested")

        def started(result: dict[str, Any]) -> None:
            if result.get("ok"):
                self.pod.timeline.mark(
                    f"{target.id}'s process runs (in the guest: {daemon.laps(result)})"
                )
                target.started = True
                if target is self.pod.own:
                    self.pod._start_stdin()
                    self.pod._send_window_size()
                elif target.session is not None:
                    target.session.control({"op": "started", "pid": result.get("pid")})
                reply({"ok": True, "pid": result.get("pid")})
                return
            # runc: a failed start leaves the container stopped, and so does ours by the time
            # `start` hears: the answer waits for the container's end.
            error = result.get("error", "exec failed")
            if target is self.pod.own:
                self.pod.after_teardown.append(lambda: reply({"ok": False, "error": error}))
                self.pod._finish(1)
            else:
                self.pod.members.end_member(target, 1, None)
                reply({"ok": False, "error": error})

        self.pod.agent.request("start", started, container=target.id)

    def signal(self, target: PodContainer, signum: int, every: bool, reply: Reply) -> None:
        if not target.started:
            if signum in IGNORED_BY_DEFAULT:
                reply({"ok": True})
                return
            # The process never ran: the signal's default action ends the container.
            if target is self.pod.own:
                self.pod._finish(128 + signum, signum)
            else:
                self.pod.members.end_member(target, 128 + signum, signum)
            reply({"ok": True})
            return
        if target.paused and signum == signal.SIGKILL:
            # As runc thaws a frozen cgroup for SIGKILL: the processes must run to die.
            self.pause(target, False, lambda _r: None)
        fields = {"container": target.id, "signal": signum, "all": every, "id": target.stream}
        if target.paused:
            # A paused guest cannot answer: the signal waits and is delivered on resume, as a
            # frozen process gets it when thawed (runc's kill returns at once too).
            self.pod.agent.request("signal", lambda _r: None, **fields)
            reply({"ok": True})
            return
        self.pod.agent.request("signal", reply, **fields)


def read_request(conn: socket.socket) -> tuple[bytes | None, list[int]]:
    """One request line, and the descriptors that came with it (a member's root)."""
    buf = bytearray()
    fds: list[int] = []
    while not buf.endswith(b"\n"):
        data, new_fds, _, _ = socket.recv_fds(conn, 65536, 4)
        fds += new_fds
        if not data:
            return (bytes(buf) if buf else None), fds
        buf += data
        if len(buf) > unixsock.LINE_LIMIT:
            for fd in fds:
                os.close(fd)
            raise BonnevilleError("control message too large")
    return bytes(buf), fds
