"""The per-container monitor: the long-lived host process whose PID is the container's.

`create` forks it (shim/launch.py) and hands it the container's configuration. It enters the
container's host namespaces, prepares the shared root, launches the VM through a backend, waits
for the agent, and then relays: stdio (or the pty) between the caller and the guest process,
signals sent to it or through `kill`, window size, and finally the container's exit status, which
becomes its own. Its control socket serves the CLI's requests.
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
import sys
import time
import traceback
from collections.abc import Callable

from bonneville.backends.base import (
    VM,
    Backend,
    Capability,
    VMConfig,
    backend_for_create,
    get_backend,
    preload_backend,
)
from bonneville.guest import protocol
from bonneville.shim import console, hostns, launch, network, state, unixsock
from bonneville.shim.agent_client import AgentConnection
from bonneville.shim.signals import IGNORED_BY_DEFAULT
from bonneville.spec.errors import BonnevilleError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

log = logging.getLogger("bonneville.monitor")

AGENT_BOOT_TIMEOUT = 120.0  # a hang guard for cold boots under TCG on a loaded host
AGENT_CALL_TIMEOUT = 60.0
VM_KILLED_STATUS = 137  # the VM died under the container: report it as SIGKILL, like runc
# The agent's log lines reach monitor.log at most this fast, each cut to this length.
AGENT_LOG_LINES = 100
AGENT_LOG_WINDOW = 10.0
AGENT_LOG_LINE_CHARS = 2000


class SetupFailed(BonnevilleError):
    pass


def serve(sync: socket.socket, backend: str | None) -> int:
    """The monitor process (forked by shim/launch.py): import what a launch needs while `create`
    gets ready, then run the container it hands over; 0 if it hands over none (it failed).
    ``backend`` is the --backend flag if the CLI was given one."""
    _preload(backend)
    try:
        line = unixsock.read_line(sync, limit=launch.CONFIG_LIMIT)
        if not line:
            return 0
        message = json.loads(line)
        os.environ.clear()
        os.environ.update(message["environ"])
        config = launch.MonitorConfig.from_message(message)
    except Exception as exc:  # create parsed this config: a bug, but say so
        with contextlib.suppress(OSError):
            _send_json(sync, {"phase": "error", "error": f"monitor: bad setup message: {exc}"})
        return 1
    return Monitor(config, sync).main()


def _preload(backend: str | None) -> None:
    """Import what comes after the hand-over: the spec's parser and resources, the backend (the
    flag's, else the configured one) and the image lookup. An error here is create's to report
    (it reads the same settings), not ours."""
    import bonneville.spec.config
    import bonneville.spec.resources  # noqa: F401

    with contextlib.suppress(Exception):
        preload_backend(backend or backend_for_create())


def _laps(reply: dict[str, Any]) -> str:
    """The agent's step timings (``timings``: [[step, seconds], …]) for a log line."""
    laps = reply.get("timings")
    if not isinstance(laps, list):
        return "no timings"
    # The guest is not trusted: only well-formed laps, names cut short, a few of them.
    return ", ".join(
        f"{str(lap[0])[:40]} {lap[1]:.3f}"
        for lap in laps[:20]
        if isinstance(lap, list) and len(lap) == 2 and isinstance(lap[1], int | float)
    )


def _release_free_memory() -> None:
    """Give the heap pages the CLI's code left free back to the kernel: this process lives as
    long as the container, and its PSS is part of each container's cost (~1.4 MiB here)."""
    import ctypes
    import gc

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # malloc_trim is glibc's
        ctypes.CDLL(None).malloc_trim(0)


def _send_json(sock: socket.socket, message: dict[str, Any]) -> None:
    sock.sendall(json.dumps(message).encode() + b"\n")


class Monitor:
    def __init__(self, config: launch.MonitorConfig, sync: socket.socket) -> None:
        self.cfg = config
        self.spec = config.bundle.spec
        self.sync: socket.socket | None = sync
        self.backend: Backend | None = None
        self.vm: VM | None = None
        self.agent: AgentConnection | None = None
        # Made after _detach, which closes every descriptor it does not know.
        self.selector: selectors.BaseSelector = selectors.SelectSelector()
        self.control: socket.socket | None = None
        self.started = False
        self.paused = False
        self.exit_status: int | None = None
        self.after_teardown: list[Callable[[], None]] = []  # answers that wait for it
        self.terminal = bool(self.spec.process and self.spec.process.terminal)
        self.console_fd = -1  # our side of the container's console (pty slave or caller's tty)
        self.stdin_fd = -1
        self.stdin_open = False
        self.out_fds = {protocol.STDOUT: 1, protocol.STDERR: 2}
        self.next_stream = protocol.INIT_STREAM + 1
        self.sessions: dict[int, ExecSession] = {}
        self.own_netns = False  # we sit in the container's network namespace, not the host's
        self.interfaces: list[network.Interface] = []
        self.early_taps: list[str] = []  # taps of a VM launched during the hooks
        self.built_early = False  # its agent built the container meanwhile (all but network)
        self.share_ready = False
        # The share, or the container's build in the VM, failed during the hooks.
        self.early_error: BaseException | None = None
        self.routes: list[dict[str, Any]] = []
        self.sig_r, self.sig_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.memory_mib = 0  # the VM's RAM, fixed at launch
        self.t0 = time.monotonic()
        self.runtime_netns_fd = -1
        self.log_window_start = time.monotonic()
        self.log_lines = 0
        self.log_dropped = 0

    # ---- process set-up -------------------------------------------------------------------

    def _detach(self) -> None:
        # (launch._fork made us a session leader already: no terminal signal reaches us.)
        log_path = os.path.join(self.cfg.state_dir, state.LOG_FILE)
        logfd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        keep = {0, 1, 2, logfd, self.sync.fileno() if self.sync else -1, self.sig_r, self.sig_w}
        if self.terminal and not self.cfg.use_stdio_tty:
            # The container's console is the pty; the caller's stdio must not be held open.
            devnull = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(devnull, fd)
            os.close(devnull)
        for fd in _open_fds():
            if fd not in keep:
                with contextlib.suppress(OSError):
                    os.close(fd)
        # Our diagnostics go to our own log, never to fd 2 (the container's stderr).
        sys.stderr = open(logfd, "w", buffering=1, closefd=True)  # noqa: SIM115
        root = logging.getLogger("bonneville")
        root.handlers.clear()
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        root.addHandler(handler)
        root.setLevel(logging.DEBUG)
        root.propagate = False

    def _mark(self, phase: str) -> None:
        """A timing line in the monitor's log: where a create spends its time."""
        log.debug("%.3f s %s", time.monotonic() - self.t0, phase)

    def _install_signals(self) -> None:
        signal.set_wakeup_fd(self.sig_w, warn_on_full_buffer=False)
        for signum in range(1, signal.NSIG):
            if signum in (signal.SIGKILL, signal.SIGSTOP, signal.SIGPIPE):
                continue
            with contextlib.suppress(OSError, ValueError, RuntimeError):
                signal.signal(signum, lambda *_: None)
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)

    def _enter_namespaces(self) -> None:
        hostns.make_private_mount_namespace()
        # Backends that talk to a remote server (vSphere) open their sockets back in the
        # runtime's own network namespace, from a thread: kept before we leave it.
        self.runtime_netns_fd = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        if self.spec.linux is None:
            return
        for ns in self.spec.linux.namespaces:
            if ns.type != "network":
                # Every other namespace is the VM itself: the guest has its own kernel.
                continue
            if ns.path:
                hostns.setns(ns.path, hostns.CLONE_NEWNET)
            else:
                hostns.unshare(hostns.CLONE_NEWNET)
            if hostns.namespace_id("/proc/self/ns/net") == self.cfg.runtime_netns:
                # create refuses this already; wiring taps here would hijack the host's NICs.
                raise SetupFailed("the container's network namespace is the runtime's own")
            self.own_netns = True

    def _prepare_share(self) -> str:
        share = os.path.join(self.cfg.state_dir, state.SHARE_DIR)
        if self.share_ready:
            return share
        os.mkdir(share, 0o755)
        rootfs = self.cfg.bundle.rootfs
        hostns.bind(rootfs, share, recursive=True, flags=0)
        for m in self.spec.mounts:
            is_dir = True
            if m.is_bind:
                source = (
                    m.source
                    if os.path.isabs(m.source)
                    else os.path.join(self.cfg.bundle.path, m.source)
                )
                if not os.path.exists(source):
                    raise SetupFailed(f"mount source {m.source} for {m.destination} does not exist")
                is_dir = os.path.isdir(source)
            target = hostns.make_mountpoint(share, m.destination, is_dir)
            if m.is_bind:
                flags = hostns.option_flags(m.options)
                hostns.bind(source, target, "rbind" in m.options, flags | hostns.MS_NOSUID)
        # Device nodes or setuid files a guest creates must be inert on the host.
        flags = hostns.MS_NOSUID | hostns.MS_NODEV
        if self.spec.root.readonly:
            flags |= hostns.MS_RDONLY
        hostns.mount("none", share, None, hostns.MS_BIND | hostns.MS_REMOUNT | flags)
        self.share_ready = True
        return share

    def _container_build(self) -> dict[str, Any]:
        """``setup.container`` but its network (docs/protocol.md)."""
        linux = self.spec.linux
        resources_raw = ((self.cfg.bundle.raw.get("linux") or {}).get("resources")) or {}
        mounts = [
            {
                "destination": m.destination,
                "type": m.type,
                "source": m.source,
                "options": list(m.options),
            }
            for m in self.spec.mounts
        ]
        return {
            "hostname": self.spec.hostname,
            "domainname": self.spec.domainname,
            "readonly": self.spec.root.readonly,
            "mounts": mounts,
            "maskedPaths": list(linux.masked_paths) if linux else [],
            "readonlyPaths": list(linux.readonly_paths) if linux else [],
            "sysctl": dict(linux.sysctl) if linux else {},
            "time": time.time(),
            "entropy": base64.b64encode(os.urandom(64)).decode(),
            "resources": self._cgroup_files(resources_raw, strict=False),
        }

    def _container_network(self) -> dict[str, Any]:
        """``setup.container.network``: the interfaces the hooks left, as the guest gets them."""
        return network.guest_config(
            self.interfaces,
            self.routes,
            {name: network.ipv6_enabled(name) for name in network.IPV6_SETTINGS}
            if self.own_netns
            else None,
        )

    def _cgroup_files(self, resources: dict[str, Any], strict: bool) -> dict[str, str]:
        """The container's limits as guest cgroup files (see spec/resources.py)."""
        from bonneville.spec.resources import to_cgroup

        return to_cgroup(
            resources,
            vm_memory_mib=self.memory_mib,
            strict=strict,
            warn=lambda text: log.warning("resources %s", text),
        )

    def _launch(self, share: str) -> None:
        """Start the VM with a NIC per interface the namespace has now, and greet its agent."""
        backend = self._backend()
        if self.own_netns and Capability.NETWORK in backend.capabilities:
            self.interfaces, self.routes = network.discover()
            network.wire(self.interfaces)
        self._boot(share, [(i.tap, i.mac) for i in self.interfaces])

    def _backend(self) -> Backend:
        if self.backend is None:
            self.backend = get_backend(self.cfg.backend)
        return self.backend

    def _boot(self, share: str, nics: list[tuple[str, str]]) -> None:
        from bonneville.guest.image import ensure_image

        backend = self._backend()
        resources = self.spec.linux.resources if self.spec.linux else None
        host_cpus = os.cpu_count() or 1
        if not backend.boots_guest_image:
            kernel = initrd = ""
            kernel_args: tuple[str, ...] = ()
        else:
            image = ensure_image()
            kernel, initrd, kernel_args = image.kernel, image.initrd, image.kernel_args
        self.memory_mib = resources.memory_mib() if resources else 256
        vm_config = VMConfig(
            container_id=self.cfg.container_id,
            memory_mib=self.memory_mib,
            vcpus=resources.vcpus(host_cpus) if resources else 1,
            share_dir=share,
            run_dir=self.cfg.state_dir,
            kernel=kernel,
            initrd=initrd,
            # A read-only root is enforced by the share's own mount (ro on the host side) and
            # the guest's remount; QEMU's readonly=on would also freeze rw volumes beneath it.
            readonly_share=False,
            kernel_args=kernel_args,
            nics=tuple(nics),
            extra={"runtime_netns_fd": self.runtime_netns_fd},
        )
        self._mark("launching the VM")
        self.vm = backend.launch(vm_config)
        self._mark("VM launched")
        self.agent = AgentConnection(self.vm.channel)
        self.agent.call("hello", AGENT_BOOT_TIMEOUT, version=protocol.VERSION)
        self._mark("agent answered")

    def _launch_during_hooks(self) -> None:
        """Clone the VM while the CLI waits for the config's validation and runs the
        prestart/createRuntime hooks (dockerd's takes ~0.15 s), instead of after them.

        dockerd's hook is what moves the container's veth into our namespace, so with hooks the
        NICs are guessed: those present now, or one if there are none yet. _adopt_early_vm()
        checks the guess once the hooks are done, and a wrong one is undone and launched again.
        Only for backends that clone (a cold boot outlasts the wait).
        """
        hooks = self.spec.hooks
        backend = self._backend()
        if Capability.CLONE not in backend.capabilities:
            return
        try:
            share = self._prepare_share()
        except (BonnevilleError, OSError) as exc:
            # A bad mount: create must fail with that, after the hooks (the CLI is running them
            # and reads our next message only then), as without this early start.
            self.early_error = exc
            return
        taps: list[str] = []
        try:
            if self.own_netns and Capability.NETWORK in backend.capabilities:
                present, _ = network.discover()
                guess = len(present) or int(bool(hooks.prestart or hooks.create_runtime))
                taps = network.make_taps(guess)
            self._boot(share, [(tap, network.placeholder_mac(i)) for i, tap in enumerate(taps)])
        except Exception as exc:
            # Launching after the hooks, as without this early start, meets (and reports) any
            # real problem there.
            log.info("launch during the hooks failed (%s): launching after them", exc)
            self._discard_vm()
            network.remove_taps(taps)
            return
        self.early_taps = taps
        self._build_during_hooks()

    def _build_during_hooks(self) -> None:
        """Have the agent build the container, all but its network, while the CLI runs the
        hooks (runc's init too makes its mounts before the prestart hooks run; they see the
        bundle on the host, never the guest's mounts). The setup after them then only gives
        the container its network. A failure is create's, reported after the hooks."""
        assert self.agent is not None
        try:
            reply = self.agent.call(
                "setup", AGENT_CALL_TIMEOUT, stage="early", container=self._container_build()
            )
        except BonnevilleError as exc:
            self.early_error = exc
            return
        self.built_early = True
        self._mark(f"container built during the hooks (in the guest: {_laps(reply)})")

    def _adopt_early_vm(self) -> None:
        """Keep the VM launched during the hooks if it has a NIC per interface they left."""
        interfaces: list[network.Interface] = []
        routes: list[dict[str, Any]] = []
        if self.early_taps:
            interfaces, routes = network.discover(own_taps=self.early_taps)
        if len(interfaces) != len(self.early_taps):
            log.info(
                "the hooks left %d interfaces, not the %d guessed: launching again",
                len(interfaces),
                len(self.early_taps),
            )
            self._discard_vm()
            network.remove_taps(self.early_taps)
            self.early_taps = []
            self._launch(self._prepare_share())
            return
        network.mirror(interfaces, self.early_taps)
        self.interfaces, self.routes = interfaces, routes

    def _discard_vm(self) -> None:
        """Stop the VM and have the backend release all it made for it (roots, host links)."""
        if self.vm is not None:
            with contextlib.suppress(Exception):
                self.vm.stop(timeout=2.0)
            assert self.backend is not None
            with contextlib.suppress(Exception):
                self.backend.destroy(self.vm.private_state())
        self.agent = None
        self.vm = None
        self.built_early = False

    def _set_up_container(self) -> None:
        assert self.agent is not None
        # With the process, the agent forks it right after replying and takes it up to execve
        # while the host finishes create; start's exec then only lets it go (as runc's init
        # waits on its exec fifo).
        # Built during the hooks already: the agent needs only the network now.
        container = {} if self.built_early else self._container_build()
        container["network"] = self._container_network()
        reply = self.agent.call(
            "setup",
            AGENT_CALL_TIMEOUT,
            container=container,
            process=self.cfg.bundle.raw.get("process") or {},
        )
        self._mark(f"container set up (in the guest: {_laps(reply)})")

    def _open_console(self) -> None:
        if not self.terminal:
            return
        if self.cfg.use_stdio_tty:
            self.console_fd = 0
            return
        if not self.cfg.console_socket:
            raise SetupFailed(
                "cannot allocate tty if bonneville will detach without setting console socket"
            )
        process = self.spec.process
        size = process.console_size if process else None
        self.console_fd = console.open_console(self.cfg.console_socket, size)

    def setup(self) -> None:
        assert self.sync is not None
        self._mark("monitor started")
        self._enter_namespaces()
        # Phase 1: our namespaces exist; the CLI runs prestart/createRuntime hooks now
        # (dockerd's libnetwork-setkey joins /proc/<our pid>/ns/net).
        _send_json(self.sync, {"phase": "namespaces"})
        self._launch_during_hooks()
        go = unixsock.read_line(self.sync)
        if not go or not json.loads(go).get("continue"):
            raise SetupFailed("create was abandoned")
        self._mark("hooks done")
        if self.early_error is not None:
            raise self.early_error
        if self.vm is None:
            self._launch(self._prepare_share())
        else:
            self._adopt_early_vm()
        self._set_up_container()
        self._open_console()
        control_path = os.path.join(self.cfg.state_dir, state.SOCKET_FILE)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(control_path)
        self.control = unixsock.bind_unix(control_path)
        assert self.vm is not None
        _send_json(self.sync, {"phase": "ready", "backend_state": self.vm.private_state()})

    # ---- main -----------------------------------------------------------------------------

    def main(self) -> int:
        self._detach()
        self.selector = selectors.DefaultSelector()
        self._install_signals()
        try:
            self.setup()
        except BaseException as exc:
            message = (
                str(exc) if isinstance(exc, BonnevilleError) else f"{type(exc).__name__}: {exc}"
            )
            log.error("setup failed: %s\n%s", message, traceback.format_exc())
            # Clean up before telling create: it kills this process as soon as it hears.
            self._teardown()
            # create records no backend state when it fails, so no later delete will ask the
            # backend to release what lives beyond the VM (libvirtd's host links, roots).
            self._discard_vm()
            # Our taps would outlive us in a namespace the caller keeps (CNI's, a pod's).
            network.remove_taps([*self.early_taps, *(i.tap for i in self.interfaces if i.tap)])
            if self.sync is not None:
                with contextlib.suppress(OSError):
                    _send_json(self.sync, {"phase": "error", "error": message})
            return 1
        assert self.sync is not None
        self.sync.close()
        self.sync = None
        _release_free_memory()
        return self.loop()

    def loop(self) -> int:
        assert self.agent is not None and self.vm is not None and self.control is not None
        sel = self.selector
        sel.register(self.agent.sock, selectors.EVENT_READ, "agent")
        sel.register(self.control, selectors.EVENT_READ, "control")
        sel.register(self.sig_r, selectors.EVENT_READ, "signal")
        sel.register(self.vm.exit_fd(), selectors.EVENT_READ, "vm")
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
                    if self.vm.poll() and self.exit_status is None:
                        log.error("the VM ended before the container's process did")
                        self._finish(VM_KILLED_STATUS)
                elif what == "stdin":
                    self._on_stdin()
                elif isinstance(what, tuple) and what[0] == "client":
                    self._on_client(key.fileobj)  # type: ignore[arg-type]
                elif isinstance(what, ExecSession):
                    self._on_session(what)
                if self.exit_status is not None:
                    break
        self._teardown()
        for callback in self.after_teardown:
            callback()
        return self.exit_status

    def _teardown(self) -> None:
        if self.vm is not None:
            with contextlib.suppress(Exception):
                self.vm.stop(timeout=2.0)
            self._mark("VM stopped")
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

    # ---- agent ----------------------------------------------------------------------------

    def _on_agent(self, backlog: bool = False) -> None:
        assert self.agent is not None
        try:
            self._handle_frames(self.agent.take_backlog() if backlog else self.agent.receive())
        except (BonnevilleError, protocol.ProtocolError, ValueError, TypeError) as exc:
            # The guest is not trusted: a frame we cannot make sense of means its agent is
            # broken or subverted. End the container as if the VM had died; never crash.
            log.error("agent channel: %s: stopping the container", exc)
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
                if stream == protocol.INIT_STREAM:
                    if payload:
                        self._write_output(ftype, payload)
                elif stream in self.sessions:
                    self.sessions[stream].send(
                        protocol.encode(ftype, protocol.AGENT_STREAM, payload)
                    )
            elif ftype == protocol.CONTROL:
                message = protocol.decode_control(payload)
                op = message.get("op")
                session = self.sessions.get(message.get("id", -1))
                if op == "exit" and session is not None:
                    session.send(protocol.encode_control(message))
                    self._end_session(session, kill=False)
                elif op == "exit" and message.get("id") == protocol.INIT_STREAM:
                    self._mark("the container's process exited")
                    self._finish(
                        int(message.get("status", VM_KILLED_STATUS)), message.get("signal")
                    )
                elif op == "log":
                    self._agent_log(message.get("msg"))

    def _agent_log(self, msg: object) -> None:
        """The agent's diagnostics, bounded: a guest must not fill the host's disk with them."""
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

    @property
    def _pty_relay(self) -> bool:
        """Output and input go through our pty slave (not the caller's own terminal)."""
        return self.terminal and not self.cfg.use_stdio_tty

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

    # ---- stdin ----------------------------------------------------------------------------

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
        assert self.agent is not None
        try:
            data = os.read(self.stdin_fd, 1 << 16)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            self.agent.send_data(protocol.STDIN, protocol.INIT_STREAM, data)
            return
        self.stdin_open = False
        if registered:
            self.selector.unregister(self.stdin_fd)
        if not self.terminal:
            # EOF on the caller's stdin closes the container's stdin; a pty has no such EOF.
            self.agent.send_data(protocol.STDIN, protocol.INIT_STREAM, b"")

    # ---- control socket -------------------------------------------------------------------

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
        try:
            line = unixsock.read_line(conn)
            request = json.loads(line) if line else {}
        except (OSError, ValueError, BonnevilleError):
            conn.close()
            return
        if not isinstance(request, dict):
            conn.close()
            return

        def reply(message: dict[str, Any]) -> None:
            with contextlib.suppress(OSError):
                _send_json(conn, message)
            conn.close()

        if request.get("op") == "exec":
            self._exec(request, conn)
            return
        try:
            self._dispatch(request, reply)
        except BonnevilleError as exc:
            reply({"ok": False, "error": str(exc)})
        except Exception as exc:
            log.error("request %s failed: %s", request, traceback.format_exc())
            reply({"ok": False, "error": f"{type(exc).__name__}: {exc}"})

    def _dispatch(self, request: dict[str, Any], reply: Any) -> None:
        assert self.agent is not None and self.vm is not None
        op = request.get("op")
        if op == "start":
            self._start(reply)
        elif op == "signal":
            self._signal(
                int(request.get("signal", signal.SIGTERM)), bool(request.get("all")), reply
            )
        elif op == "destroy":
            self._finish(self.exit_status if self.exit_status is not None else VM_KILLED_STATUS)
            reply({"ok": True})
        elif op == "pause":
            self.vm.pause()
            self.paused = True
            reply({"ok": True})
        elif op == "resume":
            self.vm.resume()
            self.paused = False
            reply({"ok": True})
        elif op == "ps":
            self.agent.request("ps", lambda r: reply(r))
        elif op == "update":
            resources = request.get("resources")
            if not isinstance(resources, dict):
                raise BonnevilleError("update: resources must be a JSON object")
            files = self._cgroup_files(resources, strict=True)
            self.agent.request("update", lambda r: reply(r), resources=files)
        elif op == "stats":
            self.agent.request("stats", lambda r: reply(r))
        else:
            reply({"ok": False, "error": f"unknown request {op!r}"})

    def _start(self, reply: Any) -> None:
        assert self.agent is not None
        if self.started:
            reply({"ok": False, "error": "container already started"})
            return
        process = self.cfg.bundle.raw.get("process") or {}
        self._mark("start requested")

        def started(result: dict[str, Any]) -> None:
            if result.get("ok"):
                self._mark(f"the container's process runs (in the guest: {_laps(result)})")
                self.started = True
                self._start_stdin()
                self._send_window_size()
                reply({"ok": True, "pid": result.get("pid")})
            else:
                # runc: a failed start leaves the container stopped, and so does ours by the
                # time `start` hears: the answer waits for the VM's teardown.
                error = result.get("error", "exec failed")
                self.after_teardown.append(lambda: reply({"ok": False, "error": error}))
                self._finish(1)

        self.agent.request("exec", started, id=protocol.INIT_STREAM, process=process, stdin=True)

    def _signal(self, signum: int, all_processes: bool, reply: Any) -> None:
        assert self.agent is not None
        if not self.started:
            if signum in IGNORED_BY_DEFAULT:
                reply({"ok": True})
                return
            # The process never ran: the signal's default action ends the container.
            self._finish(128 + signum, signum)
            reply({"ok": True})
            return
        if self.paused and signum == signal.SIGKILL:
            # As runc thaws a frozen cgroup for SIGKILL: the VM must run to die.
            assert self.vm is not None
            self.vm.resume()
            self.paused = False
        if self.paused:
            # A paused guest cannot answer: the signal waits in the channel and is delivered on
            # resume, as a frozen process gets it when thawed (runc's kill returns at once too).
            self.agent.request(
                "signal", lambda _r: None, id=protocol.INIT_STREAM, signal=signum, all=all_processes
            )
            reply({"ok": True})
            return
        self.agent.request(
            "signal",
            lambda r: reply(r),
            id=protocol.INIT_STREAM,
            signal=signum,
            all=all_processes,
        )

    # ---- exec sessions: an exec proxy process per guest process -----------------------------

    def _exec(self, request: dict[str, Any], conn: socket.socket) -> None:
        """Start a process in the running container; ``conn`` then carries its frames."""
        assert self.agent is not None
        if not self.started:
            with contextlib.suppress(OSError):
                _send_json(conn, {"ok": False, "error": "cannot exec in a stopped container"})
            conn.close()
            return
        session = ExecSession(self.next_stream, conn)
        self.next_stream += 1

        def started(result: dict[str, Any]) -> None:
            if result.get("ok"):
                self.sessions[session.stream] = session
                session.send(protocol.encode_control({"op": "started", "pid": result.get("pid")}))
                conn.setblocking(True)
                self.selector.register(conn, selectors.EVENT_READ, session)
            else:
                session.send(protocol.encode_control({"op": "error", "error": result.get("error")}))
                conn.close()

        self.agent.request(
            "exec", started, id=session.stream, process=request.get("process") or {}, stdin=True
        )

    def _on_session(self, session: ExecSession) -> None:
        assert self.agent is not None
        try:
            data = session.conn.recv(1 << 16)
            frames = session.decoder.feed(data) if data else []
        except (OSError, protocol.ProtocolError):
            data, frames = b"", []
        if not data:
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

    def _end_session(self, session: ExecSession, kill: bool) -> None:
        self.sessions.pop(session.stream, None)
        if kill and self.agent is not None:
            with contextlib.suppress(BonnevilleError):
                self.agent.request(
                    "signal", lambda _r: None, id=session.stream, signal=signal.SIGKILL, all=False
                )
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(session.conn)
        session.conn.close()

    # ---- signals sent to the monitor itself ------------------------------------------------

    def _on_signals(self) -> None:
        try:
            data = os.read(self.sig_r, 1024)
        except BlockingIOError:
            return
        for signum in data:
            if signum == signal.SIGCHLD:
                continue
            if signum == signal.SIGWINCH:
                self._send_window_size()
                continue
            if signum == signal.SIGHUP and self.terminal:
                # The console's other end closed; the guest's pty hangs up on its own.
                continue
            self._signal(signum, False, lambda _r: None)

    def _send_window_size(self) -> None:
        if not self.terminal or self.console_fd < 0 or not self.started or self.agent is None:
            return
        size = console.window_size(self.console_fd)
        if size:
            self.agent.request(
                "resize", lambda _r: None, id=protocol.INIT_STREAM, rows=size[0], cols=size[1]
            )


class ExecSession:
    """One exec'd process and the connection of its host proxy (frames, as with the agent)."""

    def __init__(self, stream: int, conn: socket.socket) -> None:
        self.stream = stream
        self.conn = conn
        self.decoder = protocol.Decoder()

    def send(self, frame: bytes) -> None:
        with contextlib.suppress(OSError):
            self.conn.sendall(frame)


def _open_fds() -> list[int]:
    try:
        return [int(n) for n in os.listdir("/proc/self/fd")]
    except OSError:
        return list(range(3, 1024))
