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

import base64
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

from bonneville.backends.atomicfile import atomic_write
from bonneville.backends.base import Capability
from bonneville.guest import protocol
from bonneville.shim import console, network, state, unixsock
from bonneville.shim.agent_client import AgentConnection
from bonneville.shim.control import VM_KILLED_STATUS, Phase, phase
from bonneville.shim.monitor import daemon, dnsrelay, guestspec, share, sizing
from bonneville.shim.monitor.forward import Forwarder
from bonneville.shim.monitor.relay import AddressRelay
from bonneville.shim.monitor.requests import Requests
from bonneville.shim.monitor.sessions import Members, PodContainer, Session
from bonneville.shim.monitor.vm import PodVM
from bonneville.spec.errors import BonnevilleError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from bonneville.shim.launch import MonitorConfig

    Reply = Callable[[dict[str, Any]], None]

log = logging.getLogger("bonneville.monitor")

AGENT_CALL_TIMEOUT = 60.0
# The agent's log lines reach monitor.log at most this fast, each cut to this length.
AGENT_LOG_LINES = 100
AGENT_LOG_WINDOW = 10.0
AGENT_LOG_LINE_CHARS = 2000


class SetupFailed(BonnevilleError):
    pass


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
        self.oom_killed = False  # the guest's OOM killer took the container (exit "oom")
        self.after_teardown: list[Callable[[], None]] = []  # answers that wait for it
        self.console_fd = -1  # our side of the container's console (pty slave or caller's tty)
        self.stdin_fd = -1
        self.stdin_open = False
        self.out_fds = {protocol.STDOUT: 1, protocol.STDERR: 2}
        self.next_stream = protocol.INIT_STREAM + 1
        self.sessions: dict[int, Session] = {}
        self.requests = Requests(self)
        self.members = Members(self)
        self.forwarder: Forwarder | None = None  # the guest's ports, published or forwarded
        self.dns: dnsrelay.DnsRelay | None = None
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
        if self.spec.root.readonly:
            share.seal_root(self.export, self.own.id)
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
        network_request = self.vm.network_request()
        resolvers = dnsrelay.loopback_resolvers(self.cfg.bundle)
        if resolvers and (self.vm.own_netns or self.cfg.host_network):
            self.dns = dnsrelay.DnsRelay(resolvers)
            network_request["dnsRelay"] = resolvers
        if self.cfg.host_network or _is_sandbox(self.spec.annotations):
            self.forwarder = Forwarder(self, on_host=self.cfg.host_network)
            network_request["watchPorts"] = True
        elif network_request.get("addressing"):  # a VM on its backend's own network
            self.forwarder = AddressRelay(self)
            network_request["watchPorts"] = True
        reply = self.agent.call("network", AGENT_CALL_TIMEOUT, network=network_request)
        self.vm.addressed(reply)
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
        if self.dns is not None:
            sel.register(self.dns.wake_r, selectors.EVENT_READ, "dns")
        self._on_agent(backlog=True)
        while self.exit_status is None:
            for key, events in sel.select():
                what = key.data
                if what == "agent":
                    self._on_agent()
                elif what == "control":
                    self.requests.on_control()
                elif what == "signal":
                    self._on_signals()
                elif what == "vm":
                    if vm.poll() and self.exit_status is None:
                        log.error("the VM ended before the container's process did")
                        self._finish(VM_KILLED_STATUS)
                elif what == "stdin":
                    self._on_stdin()
                elif isinstance(what, tuple) and what[0] == "client":
                    self.requests.on_client(key.fileobj)  # type: ignore[arg-type]
                elif isinstance(what, Session):
                    self.members.on_session(what)
                elif what == "dns" and self.dns is not None:
                    for ident, answer in self.dns.take_answers():
                        data = base64.b64encode(answer).decode()
                        self.agent.send_control({"op": "dns-answer", "id": ident, "data": data})
                elif isinstance(what, tuple) and self.forwarder is not None:
                    if what[0] == "listener":
                        self.forwarder.on_accept(what[1])
                    elif what[0] == "relayed":
                        self.forwarder.on_ready(what[1], events)
                if self.exit_status is not None:
                    break
        self._teardown()
        if self.oom_killed and self.cfg.cgroup:
            # The VM is gone; this process alone is left in the cgroup the runtime's caller
            # watches for OOM kills.
            from bonneville.shim.cgroups.oom import report_oom

            report_oom(self.cfg.cgroup)
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
        if self.forwarder is not None:
            self.forwarder.close()
        if self.dns is not None:
            self.dns.close()
        self.vm.stop()
        if self.control is not None:
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(self.cfg.state_dir, state.SOCKET_FILE))

    def _finish(self, status: int, signum: int | None = None) -> None:
        """Record the exit status where the CLI finds it, then let the loop end."""
        with contextlib.suppress(OSError):
            atomic_write(
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
                elif self.forwarder is not None and stream in self.forwarder.relayed:
                    self.forwarder.on_output(stream, payload)
            elif ftype == protocol.CONTROL:
                message = protocol.decode_control(payload)
                op = message.get("op")
                if op == "exit":
                    self._on_exit(message)
                elif op == "ports" and self.forwarder is not None:
                    self.forwarder.on_ports(message.get("tcp"))
                elif op == "closed" and self.forwarder is not None:
                    self.forwarder.on_closed(int(message.get("id", -1)))
                elif op == "dns" and self.dns is not None:
                    self.dns.query(message)
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
            self.oom_killed = message.get("oom") is True
            self._finish(status, signum if isinstance(signum, int) else None)
            return
        session = self.sessions.get(stream) if isinstance(stream, int) else None
        if session is None:
            return
        if session.member:
            member = self.containers.get(session.container)
            if member is not None:
                member.exited = True
        exit_message = {"op": "exit", "status": status, "signal": signum}
        if session.member and message.get("oom") is True:
            exit_message["oom"] = True
        session.control(exit_message)
        if not session.member:
            self.members.end_session(session, kill=False)
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
            self.requests.signal(self.own, signum, False, lambda _r: None)

    # ---- control socket -----------------------------------------------------------------------

    # ---- pod members --------------------------------------------------------------------------

    # ---- exec sessions: an exec proxy process per guest process -------------------------------


def _is_sandbox(annotations: dict[str, str]) -> bool:
    """A pod's sandbox (containerd's or CRI-O's annotation): the pod's ports are forwarded."""
    from bonneville.shim.pod import CRI_TYPE, CRIO_TYPE

    return "sandbox" in (annotations.get(CRI_TYPE), annotations.get(CRIO_TYPE))
