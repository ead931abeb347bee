"""The owner monitor: the process whose PID is the pod's first container's, and which owns the
pod's VM.

`create` forks it (shim/launch.py) and hands it the container. It enters the container's host
namespaces, builds the pod's share, launches the VM (shim/monitor/vm.py), creates its container
in it, and then relays: stdio (or the pty) between the caller and the guest process, signals,
window size, and the container's exit status, which becomes its own. Its control socket
(shim/control.py) serves the CLI, exec proxies and the monitors of the pod's other containers
(members: shim/monitor/member.py), whose stdio and exits it relays over their connections. The
pod ends with its owner's container: every member then reads exit status 137.
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
from collections.abc import Callable

from bonneville.backends.base import Capability
from bonneville.guest import protocol
from bonneville.shim import console, network, state, unixsock
from bonneville.shim.agent_client import AgentConnection
from bonneville.shim.control import Op, Phase, Request, phase
from bonneville.shim.monitor import daemon, guestspec, share, sizing
from bonneville.shim.monitor.vm import PodVM
from bonneville.shim.signals import IGNORED_BY_DEFAULT
from bonneville.spec.errors import BonnevilleError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from bonneville.shim.launch import MonitorConfig

    Reply = Callable[[dict[str, Any]], None]

log = logging.getLogger("bonneville.monitor")

AGENT_CALL_TIMEOUT = 60.0
VM_KILLED_STATUS = 137  # the VM died under the container: report it as SIGKILL, like runc
# The agent's log lines reach monitor.log at most this fast, each cut to this length.
AGENT_LOG_LINES = 100
AGENT_LOG_WINDOW = 10.0
AGENT_LOG_LINE_CHARS = 2000


class SetupFailed(BonnevilleError):
    pass


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


class Pod:
    def __init__(self, config: MonitorConfig, sync: socket.socket) -> None:
        self.cfg = config
        self.spec = config.bundle.spec
        self.sync: socket.socket | None = sync
        self.timeline = daemon.Timeline()
        self.vm = PodVM(config, self.timeline)
        self.export = os.path.join(config.state_dir, state.SHARE_DIR)
        self.own = PodContainer(
            config.container_id, protocol.INIT_STREAM, config.bundle.raw.get("process") or {}
        )
        self.containers: dict[str, PodContainer] = {self.own.id: self.own}
        # Made after detach, which closes every descriptor it does not know.
        self.selector: selectors.BaseSelector = selectors.SelectSelector()
        self.control: socket.socket | None = None
        self.exit_status: int | None = None
        self.after_teardown: list[Callable[[], None]] = []  # answers that wait for it
        self.console_fd = -1  # our side of the container's console (pty slave or caller's tty)
        self.stdin_fd = -1
        self.stdin_open = False
        self.out_fds = {protocol.STDOUT: 1, protocol.STDERR: 2}
        self.next_stream = protocol.INIT_STREAM + 1
        self.sessions: dict[int, Session] = {}
        # What the VM holds for its own container (its size at launch), before members'.
        self.base_demand = sizing.Demand()
        self.created_early = False  # the own container was created during the hooks
        # The share, or the container's build in the VM, failed during the hooks.
        self.early_error: BaseException | None = None
        self.sig_r = -1
        self.log_window_start = 0.0
        self.log_lines = 0
        self.log_dropped = 0

    @property
    def agent(self) -> AgentConnection:
        assert self.vm.agent is not None
        return self.vm.agent

    # ---- set-up -------------------------------------------------------------------------------

    def _prepare_share(self) -> None:
        if os.path.isdir(share.container_dir(self.export, self.own.id)):
            return
        share.make_export(self.export)
        tree = share.container_dir(self.export, self.own.id)
        os.mkdir(tree, 0o755)
        share.build_tree(tree, self.cfg.bundle)

    def _create_own(self) -> None:
        """Build the container in the VM and prepare its process (the agent's ``create``)."""
        request = guestspec.create_request(
            self.own.id, self.own.stream, self.cfg.bundle, self.cfg.namespaces, self.vm.memory_mib
        )
        reply = self.agent.call("create", AGENT_CALL_TIMEOUT, **request)
        self.timeline.mark(f"container created (in the guest: {daemon.laps(reply)})")

    def _during_hooks(self) -> None:
        """Prepare the share, clone the VM and create the container while the CLI runs the
        hooks (runc's init too makes its mounts before the prestart hooks run; they see the
        bundle on the host, never the guest's mounts). A failure is create's, reported after
        the hooks."""
        if Capability.CLONE not in self.vm.backend.capabilities:
            return
        try:
            self._prepare_share()
        except (BonnevilleError, OSError) as exc:
            # A bad mount: create must fail with that, after the hooks (the CLI is running them
            # and reads our next message only then), as without this early start.
            self.early_error = exc
            return
        if not self.vm.launch_early(self.export):
            return
        try:
            self._create_own()
        except BonnevilleError as exc:
            self.early_error = exc
            return
        self.created_early = True

    def _open_console(self) -> None:
        if not self.own.terminal:
            return
        if self.cfg.use_stdio_tty:
            self.console_fd = 0
            return
        if not self.cfg.console_socket:
            raise SetupFailed(
                "cannot allocate tty if bonneville will detach without setting console socket"
            )
        size = self.spec.process.console_size if self.spec.process else None
        self.console_fd = console.open_console(self.cfg.console_socket, size)

    def setup(self) -> None:
        assert self.sync is not None
        self.timeline.mark("monitor started")
        from bonneville.shim import hostns

        hostns.make_private_mount_namespace()
        self.vm.enter_network()
        # Phase 1: our namespaces exist; the CLI runs prestart/createRuntime hooks now
        # (dockerd's libnetwork-setkey joins /proc/<our pid>/ns/net).
        self.sync.sendall(phase(Phase.NAMESPACES))
        self._during_hooks()
        go = unixsock.read_line(self.sync)
        if not go or not json.loads(go).get("continue"):
            raise SetupFailed("create was abandoned")
        self.timeline.mark("hooks done")
        if self.early_error is not None:
            raise self.early_error
        if self.vm.vm is not None and not self.vm.adopt_early():
            self.created_early = False
        if self.vm.vm is None:
            self._prepare_share()
            self.vm.launch(self.export)
        self.base_demand = sizing.Demand(self.vm.memory_mib, self.vm.vcpus)
        if not self.created_early:
            self._create_own()
        reply = self.agent.call("network", AGENT_CALL_TIMEOUT, network=self.vm.network_request())
        self.timeline.mark(f"network configured (in the guest: {daemon.laps(reply)})")
        self._open_console()
        control_path = os.path.join(self.cfg.state_dir, state.SOCKET_FILE)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(control_path)
        self.control = unixsock.bind_unix(control_path)
        assert self.vm.vm is not None
        self.sync.sendall(phase(Phase.READY, backend_state=self.vm.vm.private_state()))

    # ---- main ---------------------------------------------------------------------------------

    def main(self) -> int:
        daemon.detach(
            self.cfg.state_dir,
            {self.sync.fileno() if self.sync else -1},
            quiet_stdio=self.own.terminal and not self.cfg.use_stdio_tty,
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
            # Clean up before telling create: it kills this process as soon as it hears.
            self.vm.stop()
            # create records no backend state when it fails, so no later delete will ask the
            # backend to release what lives beyond the VM (libvirtd's host links, roots).
            self.vm.discard()
            network.remove_taps(self.vm.taps())
            if self.sync is not None:
                with contextlib.suppress(OSError):
                    self.sync.sendall(phase(Phase.ERROR, error=message))
            return 1
        assert self.sync is not None
        self.sync.close()
        self.sync = None
        daemon.release_free_memory()
        return self.loop()

    def loop(self) -> int:
        vm = self.vm.vm
        assert vm is not None and self.control is not None
        sel = self.selector
        sel.register(self.agent.sock, selectors.EVENT_READ, "agent")
        sel.register(self.control, selectors.EVENT_READ, "control")
        sel.register(self.sig_r, selectors.EVENT_READ, "signal")
        sel.register(vm.exit_fd(), selectors.EVENT_READ, "vm")
        self._on_agent(backlog=True)
        while self.exit_status is None:
            for key, _ in sel.select():
                what = key.data
                if what == "agent":
                    self._on_agent()
                elif what == "control":
                    self._on_control()
                elif what == "signal":
                    self._on_signals()
                elif what == "vm":
                    if vm.poll() and self.exit_status is None:
                        log.error("the VM ended before the container's process did")
                        self._finish(VM_KILLED_STATUS)
                elif what == "stdin":
                    self._on_stdin()
                elif isinstance(what, tuple) and what[0] == "client":
                    self._on_client(key.fileobj)  # type: ignore[arg-type]
                elif isinstance(what, Session):
                    self._on_session(what)
                if self.exit_status is not None:
                    break
        self._teardown()
        for callback in self.after_teardown:
            callback()
        return self.exit_status

    def _teardown(self) -> None:
        # The pod ends with its owner: every member's container ends with it.
        for session in list(self.sessions.values()):
            if session.member:
                session.control({"op": "exit", "status": VM_KILLED_STATUS, "signal": None})
            with contextlib.suppress(OSError):
                session.conn.close()
        self.sessions.clear()
        self.vm.stop()
        if self.control is not None:
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(self.cfg.state_dir, state.SOCKET_FILE))

    def _finish(self, status: int, signum: int | None = None) -> None:
        """Record the exit status where the CLI finds it, then let the loop end."""
        with contextlib.suppress(OSError):
            state.atomic_write(
                os.path.join(self.cfg.state_dir, state.EXIT_FILE),
                json.dumps(
                    {"status": status, "signal": signum, "time": state.now_rfc3339()}
                ).encode(),
            )
        self.exit_status = status

    # ---- the agent ----------------------------------------------------------------------------

    def _on_agent(self, backlog: bool = False) -> None:
        try:
            self._handle_frames(self.agent.take_backlog() if backlog else self.agent.receive())
        except (BonnevilleError, protocol.ProtocolError, ValueError, TypeError) as exc:
            # The guest is not trusted: a frame we cannot make sense of means its agent is
            # broken or subverted. End the pod as if the VM had died; never crash.
            log.error("agent channel: %s: stopping the pod", exc)
            self.agent.closed = True
            if self.exit_status is None:
                self._finish(VM_KILLED_STATUS)
            return
        if self.agent.closed and self.exit_status is None:
            log.error("the agent closed its channel")
            self._finish(VM_KILLED_STATUS)

    def _handle_frames(self, frames: list[tuple[int, int, bytes]]) -> None:
        for ftype, stream, payload in frames:
            if ftype in (protocol.STDOUT, protocol.STDERR):
                if stream == self.own.stream:
                    if payload:
                        self._write_output(ftype, payload)
                elif stream in self.sessions:
                    self.sessions[stream].send(
                        protocol.encode(ftype, protocol.AGENT_STREAM, payload)
                    )
            elif ftype == protocol.CONTROL:
                message = protocol.decode_control(payload)
                op = message.get("op")
                if op == "exit":
                    self._on_exit(message)
                elif op == "log":
                    self._agent_log(message.get("msg"))

    def _on_exit(self, message: dict[str, Any]) -> None:
        stream = message.get("id")
        status = int(message.get("status", VM_KILLED_STATUS))
        signum = message.get("signal")
        if not isinstance(stream, int) or isinstance(stream, bool):
            raise protocol.ProtocolError(f"exit of a process id that is not a number: {stream!r}")
        if stream == self.own.stream:
            self.timeline.mark("the container's process exited")
            self.own.exited = True
            self._finish(status, signum if isinstance(signum, int) else None)
            return
        session = self.sessions.get(stream) if isinstance(stream, int) else None
        if session is None:
            return
        if session.member:
            member = self.containers.get(session.container)
            if member is not None:
                member.exited = True
        session.control({"op": "exit", "status": status, "signal": signum})
        if not session.member:
            self._end_session(session, kill=False)
        # A member's monitor closes its side once it recorded the exit: _on_session then
        # removes the container from the VM.

    def _agent_log(self, msg: object) -> None:
        """The agent's diagnostics, bounded: a guest must not fill the host's disk with them."""
        import time

        now = time.monotonic()
        if now - self.log_window_start >= AGENT_LOG_WINDOW:
            if self.log_dropped:
                log.warning("agent: %d more lines dropped", self.log_dropped)
            self.log_window_start, self.log_lines, self.log_dropped = now, 0, 0
        if self.log_lines >= AGENT_LOG_LINES:
            self.log_dropped += 1
            return
        self.log_lines += 1
        log.info("agent: %s", str(msg)[:AGENT_LOG_LINE_CHARS])

    # ---- the owner's own container's stdio ----------------------------------------------------

    @property
    def _pty_relay(self) -> bool:
        """Output and input go through our pty slave (not the caller's own terminal)."""
        return self.own.terminal and not self.cfg.use_stdio_tty

    def _write_output(self, ftype: int, data: bytes) -> None:
        fd = self.console_fd if self._pty_relay else self.out_fds[ftype]
        if fd < 0:
            return
        try:
            protocol.write_all(fd, data)
        except OSError as exc:
            if exc.errno not in (errno.EPIPE, errno.EIO, errno.EBADF):
                raise
            # The reader went away: drop this stream's output from now on, like a closed pipe.
            if self._pty_relay:
                self.console_fd = -1
            else:
                self.out_fds[ftype] = -1

    def _start_stdin(self) -> None:
        fd = self.console_fd if self._pty_relay else 0
        if fd < 0:
            return
        self.stdin_fd = fd
        self.stdin_open = True
        try:
            os.set_blocking(fd, False)
            self.selector.register(fd, selectors.EVENT_READ, "stdin")
        except (PermissionError, OSError):
            # A regular file or /dev/null cannot be polled: it never blocks, read it now.
            os.set_blocking(fd, True)
            while self.stdin_open:
                self._on_stdin(registered=False)

    def _on_stdin(self, registered: bool = True) -> None:
        try:
            data = os.read(self.stdin_fd, 1 << 16)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            self.agent.send_data(protocol.STDIN, self.own.stream, data)
            return
        self.stdin_open = False
        if registered:
            self.selector.unregister(self.stdin_fd)
        if not self.own.terminal:
            # EOF on the caller's stdin closes the container's stdin; a pty has no such EOF.
            self.agent.send_data(protocol.STDIN, self.own.stream, b"")

    def _send_window_size(self) -> None:
        if not self.own.terminal or self.console_fd < 0 or not self.own.started:
            return
        size = console.window_size(self.console_fd)
        if size:
            self.agent.request(
                "resize", lambda _r: None, id=self.own.stream, rows=size[0], cols=size[1]
            )

    # ---- signals sent to the monitor itself ---------------------------------------------------

    def _on_signals(self) -> None:
        for signum in daemon.read_signals(self.sig_r):
            if signum == signal.SIGCHLD:
                continue
            if signum == signal.SIGWINCH:
                self._send_window_size()
                continue
            if signum == signal.SIGHUP and self.own.terminal:
                # The console's other end closed; the guest's pty hangs up on its own.
                continue
            self._signal(self.own, signum, False, lambda _r: None)

    # ---- control socket -----------------------------------------------------------------------

    def _on_control(self) -> None:
        assert self.control is not None
        try:
            conn, _ = self.control.accept()
        except OSError:
            return
        conn.setblocking(True)
        conn.settimeout(5)
        self.selector.register(conn, selectors.EVENT_READ, ("client",))

    def _on_client(self, conn: socket.socket) -> None:
        self.selector.unregister(conn)
        fds: list[int] = []
        try:
            line, fds = _read_request(conn)
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
                self._exec(request, conn)
            elif request.op is Op.JOIN:
                self._join(request, conn, fds)
            else:
                self._dispatch(request, reply)
        except Exception as exc:
            if not isinstance(exc, BonnevilleError):
                log.error("request %s failed: %s", request, traceback.format_exc())
            error = str(exc) if isinstance(exc, BonnevilleError) else f"{type(exc).__name__}: {exc}"
            if request.op is Op.EXEC:
                _refuse_exec(conn, error)  # an exec proxy reads frames
            else:
                reply({"ok": False, "error": error})
        finally:
            for fd in fds:
                os.close(fd)

    def _container(self, request: Request) -> PodContainer:
        found = self.containers.get(request.container or self.own.id)
        if found is None:
            raise BonnevilleError(f"container {request.container} is not in this pod")
        return found

    def _dispatch(self, request: Request, reply: Reply) -> None:
        target = self._container(request)
        op = request.op
        if op is Op.START:
            self._start(target, reply)
        elif op is Op.SIGNAL:
            self._signal(target, request.signal, request.all, reply)
        elif op is Op.DESTROY:
            if target is self.own:
                status = self.exit_status if self.exit_status is not None else VM_KILLED_STATUS
                self._finish(status)
                reply({"ok": True})
            else:
                self._end_member(target, VM_KILLED_STATUS, None)
                reply({"ok": True})
        elif op in (Op.PAUSE, Op.RESUME):
            self._pause(target, op is Op.PAUSE, reply)
        elif op is Op.PS:
            self.agent.request("ps", reply, container=target.id)
        elif op is Op.UPDATE:
            if request.resources is None:
                raise BonnevilleError("update: resources must be a JSON object")
            files = guestspec.cgroup_files(request.resources, self.vm.memory_mib, strict=True)
            self.agent.request("update", reply, container=target.id, resources=files)
        elif op is Op.STATS:
            self.agent.request("stats", reply, container=target.id)
        else:
            reply({"ok": False, "error": f"unknown request {op.value!r}"})

    def _pause(self, target: PodContainer, pause: bool, reply: Reply) -> None:
        vm = self.vm.vm
        assert vm is not None
        alone = len(self.containers) == 1
        if target is self.own and alone and Capability.PAUSE in self.vm.backend.capabilities:
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

        self.agent.request("pause" if pause else "resume", done, container=target.id)

    def _start(self, target: PodContainer, reply: Reply) -> None:
        if target.started:
            reply({"ok": False, "error": "container already started"})
            return
        self.timeline.mark(f"start {target.id} requested")

        def started(result: dict[str, Any]) -> None:
            if result.get("ok"):
                self.timeline.mark(
                    f"{target.id}'s process runs (in the guest: {daemon.laps(result)})"
                )
                target.started = True
                if target is self.own:
                    self._start_stdin()
                    self._send_window_size()
                elif target.session is not None:
                    target.session.control({"op": "started", "pid": result.get("pid")})
                reply({"ok": True, "pid": result.get("pid")})
                return
            # runc: a failed start leaves the container stopped, and so does ours by the time
            # `start` hears: the answer waits for the container's end.
            error = result.get("error", "exec failed")
            if target is self.own:
                self.after_teardown.append(lambda: reply({"ok": False, "error": error}))
                self._finish(1)
            else:
                self._end_member(target, 1, None)
                reply({"ok": False, "error": error})

        self.agent.request("start", started, container=target.id)

    def _signal(self, target: PodContainer, signum: int, every: bool, reply: Reply) -> None:
        if not target.started:
            if signum in IGNORED_BY_DEFAULT:
                reply({"ok": True})
                return
            # The process never ran: the signal's default action ends the container.
            if target is self.own:
                self._finish(128 + signum, signum)
            else:
                self._end_member(target, 128 + signum, signum)
            reply({"ok": True})
            return
        if target.paused and signum == signal.SIGKILL:
            # As runc thaws a frozen cgroup for SIGKILL: the processes must run to die.
            self._pause(target, False, lambda _r: None)
        fields = {"container": target.id, "signal": signum, "all": every, "id": target.stream}
        if target.paused:
            # A paused guest cannot answer: the signal waits and is delivered on resume, as a
            # frozen process gets it when thawed (runc's kill returns at once too).
            self.agent.request("signal", lambda _r: None, **fields)
            reply({"ok": True})
            return
        self.agent.request("signal", reply, **fields)

    # ---- pod members --------------------------------------------------------------------------

    def _join(self, request: Request, conn: socket.socket, fds: list[int]) -> None:
        """A member's monitor brings its container: attach its tree, create it in the VM; the
        connection then carries its frames (its init's stdio, exit, signals, resizes)."""
        join = request.join or {}
        member_id = request.container
        process = join.get("process")
        if not member_id or member_id in self.containers:
            raise BonnevilleError(f"container {member_id!r} is already in this pod")
        if len(fds) != 1:
            raise BonnevilleError("join: the container's root must come with the request")
        if not isinstance(process, dict):
            raise BonnevilleError("join: process must be a JSON object")
        if self.exit_status is not None:
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
            self.base_demand,
            [*(m.demand for m in self.containers.values() if m is not self.own), wanted],
            self.vm.memory_mib,
            self.vm.vcpus,
            self.vm.max_vcpus,
        )
        share.attach(self.export, member_id, fds[0])
        stream = self._new_stream()
        member = PodContainer(member_id, stream, process)
        member.demand = wanted
        session = Session(conn, stream, member_id, member=True)
        member.session = session

        def refuse(result: dict[str, Any]) -> None:
            share.detach(self.export, member_id)
            with contextlib.suppress(OSError):
                conn.sendall(json.dumps(result).encode() + b"\n")
            conn.close()

        def create(_grown: dict[str, Any] | None = None) -> None:
            if _grown is not None and not _grown.get("ok"):
                refuse({"ok": False, "error": f"the pod's VM did not grow: {_grown.get('error')}"})
                return
            config["resources"] = guestspec.cgroup_files(
                resources, self.vm.memory_mib, strict=False
            )
            self.agent.request(
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
            self.containers[member_id] = member
            self.sessions[stream] = session
            with contextlib.suppress(OSError):
                conn.sendall(json.dumps({"ok": True, "stream": stream}).encode() + b"\n")
            conn.setblocking(True)
            self.selector.register(conn, selectors.EVENT_READ, session)
            log.info("container %s joined the pod (stream %d)", member_id, stream)

        if grow.add_memory_mib or grow.vcpus > self.vm.vcpus:
            try:
                self.vm.grow(grow.add_memory_mib, grow.vcpus)
            except BonnevilleError as exc:
                share.detach(self.export, member_id)
                raise BonnevilleError(
                    f"container {member_id} needs {wanted.memory_mib} MiB and {wanted.vcpus}"
                    f" vCPUs in a pod VM of {self.vm.memory_mib} MiB and {self.vm.vcpus}: {exc}"
                ) from exc
            self.agent.request(
                "online", create, memory_mib=grow.add_memory_mib, vcpus=self.vm.vcpus
            )
        else:
            create()

    def _end_member(self, member: PodContainer, status: int, signum: int | None) -> None:
        """End a member's container: out of the VM, its monitor told its status."""
        member.exited = True
        session = member.session
        if session is not None:
            session.control({"op": "exit", "status": status, "signal": signum})
            self._remove_member(member)

    def _remove_member(self, member: PodContainer) -> None:
        """Take a member out of the VM and the share (its monitor is gone or told)."""
        session = member.session
        member.session = None
        if session is not None:
            self.sessions.pop(session.stream, None)
            with contextlib.suppress(KeyError, ValueError):
                self.selector.unregister(session.conn)
            session.conn.close()
        self.containers.pop(member.id, None)

        def removed(result: dict[str, Any]) -> None:
            if not result.get("ok"):
                log.warning("removing %s from the VM: %s", member.id, result.get("error"))
            share.detach(self.export, member.id)

        self.agent.request("remove", removed, container=member.id)

    # ---- exec sessions: an exec proxy process per guest process -------------------------------

    def _new_stream(self) -> int:
        for _ in range(0xFFFF):
            stream = self.next_stream
            self.next_stream = self.next_stream + 1 if self.next_stream < 0xFFFF else 2
            in_use = stream in self.sessions or any(
                c.stream == stream for c in self.containers.values()
            )
            if not in_use:
                return stream
        raise BonnevilleError("too many processes in the pod")

    def _exec(self, request: Request, conn: socket.socket) -> None:
        """Start a process in a running container; ``conn`` then carries its frames."""
        target = self._container(request)
        if not target.started or target.exited:
            _refuse_exec(conn, "cannot exec in a stopped container")
            return
        session = Session(conn, self._new_stream(), target.id, member=False)

        def started(result: dict[str, Any]) -> None:
            if result.get("ok"):
                self.sessions[session.stream] = session
                session.control({"op": "started", "pid": result.get("pid")})
                conn.setblocking(True)
                self.selector.register(conn, selectors.EVENT_READ, session)
            else:
                session.control({"op": "error", "error": result.get("error")})
                conn.close()

        self.agent.request(
            "exec",
            started,
            container=target.id,
            id=session.stream,
            process=request.process or {},
            stdin=True,
        )

    def _on_session(self, session: Session) -> None:
        try:
            data = session.conn.recv(1 << 16)
            frames = session.decoder.feed(data) if data else []
        except (OSError, protocol.ProtocolError):
            data, frames = b"", []
        if not data:
            if session.member:
                # The member's monitor is gone (it recorded its container's exit, or it was
                # killed): its container leaves the VM.
                member = self.containers.get(session.container)
                if member is not None:
                    self._remove_member(member)
                else:
                    self._end_session(session, kill=True)
            else:
                # The proxy went away before its process ended: the process goes too (runc's
                # exec'd process would lose its stdio and its waiter the same way).
                self._end_session(session, kill=True)
            return
        for ftype, _, payload in frames:
            if ftype == protocol.STDIN:
                self.agent.send_data(protocol.STDIN, session.stream, payload)
            elif ftype == protocol.CONTROL:
                message = protocol.decode_control(payload)
                op = message.get("op")
                if op == "signal":
                    self.agent.request(
                        "signal",
                        lambda _r: None,
                        container=session.container,
                        id=session.stream,
                        signal=int(message.get("signal", signal.SIGTERM)),
                        all=False,
                    )
                elif op == "resize":
                    self.agent.request(
                        "resize",
                        lambda _r: None,
                        id=session.stream,
                        rows=int(message.get("rows", 0)),
                        cols=int(message.get("cols", 0)),
                    )

    def _end_session(self, session: Session, kill: bool) -> None:
        self.sessions.pop(session.stream, None)
        if kill:
            with contextlib.suppress(BonnevilleError):
                self.agent.request(
                    "signal",
                    lambda _r: None,
                    container=session.container,
                    id=session.stream,
                    signal=signal.SIGKILL,
                    all=False,
                )
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(session.conn)
        session.conn.close()


def _read_request(conn: socket.socket) -> tuple[bytes | None, list[int]]:
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


def _refuse_exec(conn: socket.socket, error: str) -> None:
    """An exec proxy's request refused: one ``error`` frame, then the end."""
    with contextlib.suppress(OSError):
        conn.sendall(protocol.encode_control({"op": "error", "error": error}))
    conn.close()
