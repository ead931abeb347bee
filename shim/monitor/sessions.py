"""The pod's processes beyond the owner's own container: its members (each a container whose
monitor joined the pod, shim/monitor/member.py) and exec sessions (an exec proxy per guest
process), both connections carrying frames as the agent's channel does (docs/protocol.md)."""

from __future__ import annotations

import contextlib
import json
import logging
import selectors
import signal
import socket

from bonneville.guest import protocol
from bonneville.shim.control import Request
from bonneville.shim.monitor import guestspec, share, sizing
from bonneville.spec.errors import BonnevilleError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from bonneville.shim.monitor.pod import Pod

log = logging.getLogger("bonneville.monitor")


class Session:
    """A connection that carries frames for one guest process: an exec proxy's, or a pod
    member's monitor (its container's init). Frames as with the agent (docs/protocol.md)."""

    def __init__(self, conn: socket.socket, stream: int, container: str, member: bool) -> None:
        self.conn = conn
        self.stream = stream
        self.container = container
        self.member = member
        self.decoder = protocol.Decoder()

    def send(self, frame: bytes) -> None:
        with contextlib.suppress(OSError):
            self.conn.sendall(frame)

    def control(self, message: dict[str, Any]) -> None:
        self.send(protocol.encode_control(message))


class PodContainer:
    """A container of the pod as the owner sees it."""

    def __init__(self, container_id: str, stream: int, process: dict[str, Any]) -> None:
        self.id = container_id
        self.stream = stream
        self.process = process
        self.terminal = bool(process.get("terminal"))
        self.demand = sizing.Demand()  # what its limits ask of the VM (a member's)
        self.started = False
        self.paused = False
        self.exited = False
        self.session: Session | None = None  # a member's; None for the owner's own


class Members:
    """Members joining and leaving, and exec sessions."""

    def __init__(self, pod: Pod) -> None:
        self.pod = pod

    def join(self, request: Request, conn: socket.socket, fds: list[int]) -> None:
        """A member's monitor brings its container: attach its tree, create it in the VM; the
        connection then carries its frames (its init's stdio, exit, signals, resizes)."""
        join = request.join or {}
        member_id = request.container
        process = join.get("process")
        if not member_id or member_id in self.pod.containers:
            raise BonnevilleError(f"container {member_id!r} is already in this pod")
        if len(fds) != 1:
            raise BonnevilleError("join: the container's root must come with the request")
        if not isinstance(process, dict):
            raise BonnevilleError("join: process must be a JSON object")
        if self.pod.exit_status is not None:
            raise BonnevilleError("the pod's sandbox container has stopped")
        resources = join.get("resources") or {}
        namespaces = join.get("namespaces") or {}
        config = join.get("config") or {}
        if not isinstance(resources, dict) or not isinstance(namespaces, dict):
            raise BonnevilleError("join: malformed request")
        if not isinstance(config, dict):
            raise BonnevilleError("join: malformed request")
        wanted = sizing.demand(resources)
        grow = sizing.growth(
            self.pod.base_demand,
            [*(m.demand for m in self.pod.containers.values() if m is not self.pod.own), wanted],
            self.pod.vm.memory_mib,
            self.pod.vm.vcpus,
            self.pod.vm.max_vcpus,
        )
        share.attach(self.pod.export, member_id, fds[0])
        stream = self.new_stream()
        member = PodContainer(member_id, stream, process)
        member.demand = wanted
        session = Session(conn, stream, member_id, member=True)
        member.session = session

        def refuse(result: dict[str, Any]) -> None:
            share.detach(self.pod.export, member_id)
            with contextlib.suppress(OSError):
                conn.sendall(json.dumps(result).encode() + b"\n")
            conn.close()

        def create(_grown: dict[str, Any] | None = None) -> None:
            if _grown is not None and not _grown.get("ok"):
                refuse({"ok": False, "error": f"the pod's VM did not grow: {_grown.get('error')}"})
                return
            config["resources"] = guestspec.cgroup_files(
                resources, self.pod.vm.memory_mib, strict=False
            )
            self.pod.agent.request(
                "create",
                created,
                container=member_id,
                stream=stream,
                config=config,
                namespaces=namespaces,
                process=process,
            )

        def created(result: dict[str, Any]) -> None:
            if not result.get("ok"):
                refuse(result)
                return
            if config.get("readonly"):
                try:
                    share.seal_root(self.pod.export, member_id)
                except BonnevilleError as exc:
                    log.warning(
                        "the read-only root of %s is writable on the host: %s", member_id, exc
                    )
            self.pod.containers[member_id] = member
            self.pod.sessions[stream] = session
            with contextlib.suppress(OSError):
                conn.sendall(json.dumps({"ok": True, "stream": stream}).encode() + b"\n")
            conn.setblocking(True)
            self.pod.selector.register(conn, selectors.EVENT_READ, session)
            log.info("container %s joined the pod (stream %d)", member_id, stream)

        if grow.add_memory_mib or grow.vcpus > self.pod.vm.vcpus:
            try:
                # The host's bound on the VM first: the guest must never touch RAM the host
                # cgroup would not let QEMU have. (Imported here: a pod that never grows
                # keeps the monitor without it.)
                from bonneville.shim.cgroups.limits import raise_vm_limits

                raise_vm_limits(
                    self.pod.cfg.cgroup,
                    self.pod.vm.memory_mib + grow.add_memory_mib,
                    max(self.pod.vm.vcpus, grow.vcpus),
                )
                self.pod.vm.grow(grow.add_memory_mib, grow.vcpus)
            except BonnevilleError as exc:
                share.detach(self.pod.export, member_id)
                raise BonnevilleError(
                    f"container {member_id} needs {wanted.memory_mib} MiB and {wanted.vcpus}"
                    f" vCPUs in a pod VM of {self.pod.vm.memory_mib} MiB and"
                    f" {self.pod.vm.vcpus}: {exc}"
                ) from exc
            self.pod.agent.request(
                "online", create, memory_mib=grow.add_memory_mib, vcpus=self.pod.vm.vcpus
            )
        else:
            create()

    def end_member(self, member: PodContainer, status: int, signum: int | None) -> None:
        """End a member's container: out of the VM, its monitor told its status."""
        member.exited = True
        session = member.session
        if session is not None:
            session.control({"op": "exit", "status": status, "signal": signum})
            self.remove_member(member)

    def remove_member(self, member: PodContainer) -> None:
        """Take a member out of the VM and the share (its monitor is gone or told)."""
        session = member.session
        member.session = None
        if session is not None:
            self.pod.sessions.pop(session.stream, None)
            with contextlib.suppress(KeyError, ValueError):
                self.pod.selector.unregister(session.conn)
            session.conn.close()
        self.pod.containers.pop(member.id, None)

        def removed(result: dict[str, Any]) -> None:
            if not result.get("ok"):
                log.warning("removing %s from the VM: %s", member.id, result.get("error"))
            share.detach(self.pod.export, member.id)

        self.pod.agent.request("remove", removed, container=member.id)

    def new_stream(self) -> int:
        for _ in range(0xFFFF):
            stream = self.pod.next_stream
            self.pod.next_stream = self.pod.next_stream + 1 if self.pod.next_stream < 0xFFFF else 2
            forwarded = self.pod.forwarder.streams if self.pod.forwarder else set()
            in_use = (
                stream in self.pod.sessions
                or stream in forwarded
                or any(c.stream == stream for c in self.pod.containers.values())
            )
            if not in_use:
                return stream
        raise BonnevilleError("too many processes in the pod")

    def exec(self, request: Request, conn: socket.socket) -> None:
        """Start a process in a running container; ``conn`` then carries its frames."""
        target = self.pod.requests.container(request)
        if not target.started or target.exited:
            refuse_exec(conn, "cannot exec in a stopped container")
            return
        session = Session(conn, self.new_stream(), target.id, member=False)

        def started(result: dict[str, Any]) -> None:
            if result.get("ok"):
                self.pod.sessions[session.stream] = session
                session.control({"op": "started", "pid": result.get("pid")})
                conn.setblocking(True)
                self.pod.selector.register(conn, selectors.EVENT_READ, session)
            else:
                session.control({"op": "error", "error": result.get("error")})
                conn.close()

        self.pod.agent.request(
            "exec",
            started,
            container=target.id,
            id=session.stream,
            process=request.process or {},
            stdin=True,
        )

    def on_session(self, session: Session) -> None:
        try:
            data = session.conn.recv(1 << 16)
            frames = session.decoder.feed(data) if data else []
        except (OSError, protocol.ProtocolError):
            data, frames = b"", []
        if not data:
            if session.member:
                # The member's monitor is gone (it recorded its container's exit, or it was
                # killed): its container leaves the VM.
                member = self.pod.containers.get(session.container)
                if member is not None:
                    self.remove_member(member)
                else:
                    self.end_session(session, kill=True)
            else:
                # The proxy went away before its process ended: the process goes too (runc's
                # exec'd process would lose its stdio and its waiter the same way).
                self.end_session(session, kill=True)
            return
        for ftype, _, payload in frames:
            if ftype == protocol.STDIN:
                self.pod.agent.send_data(protocol.STDIN, session.stream, payload)
            elif ftype == protocol.CONTROL:
                message = protocol.decode_control(payload)
                op = message.get("op")
                if op == "signal":
                    self.pod.agent.request(
                        "signal",
                        lambda _r: None,
                        container=session.container,
                        id=session.stream,
                        signal=int(message.get("signal", signal.SIGTERM)),
                        all=False,
                    )
                elif op == "resize":
                    self.pod.agent.request(
                        "resize",
                        lambda _r: None,
                        id=session.stream,
                        rows=int(message.get("rows", 0)),
                        cols=int(message.get("cols", 0)),
                    )

    def end_session(self, session: Session, kill: bool) -> None:
        self.pod.sessions.pop(session.stream, None)
        if kill:
            with contextlib.suppress(BonnevilleError):
                self.pod.agent.request(
                    "signal",
                    lambda _r: None,
                    container=session.container,
                    id=session.stream,
                    signal=signal.SIGKILL,
                    all=False,
                )
        with contextlib.suppress(KeyError, ValueError):
            self.pod.selector.unregister(session.conn)
        session.conn.close()


def refuse_exec(conn: socket.socket, error: str) -> None:
    """An exec proxy's request refused: one ``error`` frame, then the end."""
    with contextlib.suppress(OSError):
        conn.sendall(protocol.encode_control({"op": "error", "error": error}))
    conn.close()
