"""The guest agent: PID 1 in each VM, serving the host over one framed channel.

A VM holds a pod: one or more containers (guest/container.py), each with its own namespaces,
cgroup and root taken from the share. This module is the event loop and the request handlers
(docs/protocol.md): it relays every process's stdio, reaps them and reports their exits. It
imports only standard-library modules and our own guest modules, all at the top: the image
builder packs what importing this module loads. ``--fd N --root DIR`` runs it as an ordinary
host process ("host mode") for the fake backend and the tests; every difference between the two
modes lives in guest/mode.py.
"""

from __future__ import annotations

import base64
import contextlib
import os
import select
import signal
import sys
import time
from collections.abc import Callable

from bonneville.guest import container as containers
from bonneville.guest import hotplug, portwatch, protocol, spawn, syscallfilter
from bonneville.guest.channel import Channel, kernel_options
from bonneville.guest.common import Refused, Stopwatch, describe, errtext, one_line
from bonneville.guest.container import Container, Plan, check_id
from bonneville.guest.dnsrelay import DnsRelay
from bonneville.guest.mode import Mode
from bonneville.guest.netconfig import configure_network
from bonneville.guest.process import ExecSpec, Proc, set_winsize
from bonneville.guest.tunnel import Tunnel
from bonneville.guest.tunnel import connect as tunnel_connect

# For the type checker only: importing typing costs a cold boot ~0.1 s under TCG.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

CHUNK = 64 * 1024  # one read from a child's pipe or pty
BACKPRESSURE = 1 << 20  # stop reading children while this much waits to go to the host
DRAIN_LIMIT = 8 << 20  # what a dead process's background writers may still add to its streams
RECONNECT_POLL_MS = 200  # how often a disconnected port is probed (it polls as always readable)


class Agent:
    """The event loop: requests from the host, children's output, their exits."""

    def __init__(self, mode: Mode) -> None:
        self.mode = mode
        self.log_fd = mode.open_log()
        self.channel = Channel(mode)
        self.containers: dict[str, Container] = {}
        self.procs: dict[int, Proc] = {}
        self.by_pid: dict[int, Proc] = {}
        self.network_done = False
        self.tunnels: dict[int, Tunnel] = {}  # connections the host relays (port-forward)
        self.dns: DnsRelay | None = None
        self.watching_ports = False
        self.next_port_look = 0.0
        self.ports: set[tuple[str, int]] | None = None
        self.exiting = False
        self.after_reply: Callable[[], None] | None = None
        try:
            with open("/proc/sys/kernel/cap_last_cap") as f:
                self.cap_last = int(f.read())
        except OSError:
            self.cap_last = len(protocol.CAPABILITIES) - 1
        # Our own PID namespace: where we return after forking into a container's.
        self.own_pid_ns = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.handlers: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
            "hello": self.op_hello,
            "create": self.op_create,
            "network": self.op_network,
            "start": self.op_start,
            "exec": self.op_exec,
            "signal": self.op_signal,
            "resize": self.op_resize,
            "ps": self.op_ps,
            "update": self.op_update,
            "stats": self.op_stats,
            "pause": self.op_pause,
            "resume": self.op_resume,
            "remove": self.op_remove,
            "online": self.op_online,
            "connect": self.op_connect,
            "dns-answer": self.op_dns_answer,
            "shutdown": self.op_shutdown,
        }

    # -- output to the host and the console --

    def log(self, level: str, msg: str) -> None:
        """A diagnostic line: on the console/stderr, and to the host when it listens."""
        line = one_line(msg)
        try:
            os.write(self.log_fd, f"bonneville-agent: {level}: {line}\n".encode(errors="replace"))
        except OSError:
            pass
        if self.channel.fd >= 0 and not self.channel.closed:
            try:
                self.send_control({"op": "log", "level": level, "msg": line})
            except OSError:
                pass

    def send_control(self, message: dict[str, Any]) -> None:
        """Queue one control message to the host."""
        self.channel.send(protocol.encode_control(message))

    def send_data(self, ftype: int, stream: int, data: bytes) -> None:
        """Queue output (empty: EOF) of process ``stream``."""
        for frame in protocol.encode_data(ftype, stream, data):
            self.channel.send(frame)

    # -- main loop --

    def run(self) -> int:
        """Serve until shut down (host mode) or forever (PID 1)."""
        signal.signal(signal.SIGCHLD, lambda _signum, _frame: None)
        signal.set_wakeup_fd(self.wake_w)
        if self.mode.pid1:
            # The kernel drops signals PID 1 has no handler for; Python's SIGINT handler would
            # let a container's `kill -INT 1` (or ctrl-alt-del) raise KeyboardInterrupt here.
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        self.mode.start(self.log)
        self.channel.open(self.log)
        self.log("info", f"ready (pid {os.getpid()}, share {self.mode.share})")
        while not self.exiting:
            try:
                self.step()
            except Exception as exc:
                # PID 1 must never die (the kernel panics): report and carry on.
                self.log("error", f"agent loop: {describe(exc)}")
                time.sleep(0.05)  # no tight loop if the failure repeats
        return 0

    def step(self) -> None:
        """One turn: wait for something, then handle output, input, requests, exits."""
        channel = self.channel
        if not channel.connected and not channel.closed:
            self.read_channel()  # a port without a host polls readable: probe it instead
        if channel.closed:
            self.host_gone()
            return
        watched: dict[int, int] = {self.wake_r: select.POLLIN}
        if channel.connected:
            watched[channel.fd] = select.POLLIN | (select.POLLOUT if channel.queue else 0)
        reading = channel.queued < BACKPRESSURE
        for proc in self.procs.values():
            if reading:
                for fd in proc.outputs:
                    watched[fd] = watched.get(fd, 0) | select.POLLIN
            if proc.stdin_fd is not None and proc.pending:
                watched[proc.stdin_fd] = watched.get(proc.stdin_fd, 0) | select.POLLOUT
        for tunnel in self.tunnels.values():
            events = (select.POLLIN if reading and tunnel.reading else 0) | (
                select.POLLOUT if tunnel.pending else 0
            )
            if events:
                watched[tunnel.fileno()] = events
        if self.dns is not None:
            for fd in self.dns.fds():
                watched[fd] = select.POLLIN
        poller = select.poll()
        for fd, events in watched.items():
            poller.register(fd, events)
        timeout = None if channel.connected else RECONNECT_POLL_MS
        if self.watching_ports:
            wait_ms = max(0, int((self.next_port_look - time.monotonic()) * 1000))
            timeout = wait_ms if timeout is None else min(timeout, wait_ms)
        ready = dict(poller.poll(timeout))

        for proc in list(self.procs.values()):
            for fd in list(proc.outputs):
                if ready.get(fd, 0) & (select.POLLIN | select.POLLHUP | select.POLLERR):
                    self.read_output(proc, fd)
            stdin_fd = proc.stdin_fd
            if stdin_fd is not None and proc.pending and ready.get(stdin_fd, 0):
                self.write_stdin(proc)
        for tunnel in list(self.tunnels.values()):
            if ready.get(tunnel.fileno(), 0):
                self.relay_tunnel(tunnel)
        if self.dns is not None:
            for fd in self.dns.fds():
                if ready.get(fd, 0):
                    for ident, to, tcp, query in self.dns.on_ready(fd):
                        self.send_control(
                            {
                                "op": "dns",
                                "id": ident,
                                "to": to,
                                "tcp": tcp,
                                "data": base64.b64encode(query).decode(),
                            }
                        )
        if self.watching_ports and time.monotonic() >= self.next_port_look:
            self.look_at_ports()
        if channel.connected and ready.get(channel.fd, 0) & ~select.POLLOUT:
            self.read_channel()
        if self.wake_r in ready:
            self.drain_wakeups()
            self.reap()
        if not channel.closed:
            channel.flush()

    def relay_tunnel(self, tunnel: Tunnel) -> None:
        """Move what a relayed connection has both ways; tell the host when it is over."""
        tunnel.flush()
        if tunnel.reading and self.channel.queued < BACKPRESSURE:
            data = tunnel.read()
            if data is not None:
                self.send_data(protocol.STDOUT, tunnel.id, data)
        if tunnel.done:
            self.close_tunnel(tunnel)

    def close_tunnel(self, tunnel: Tunnel) -> None:
        self.tunnels.pop(tunnel.id, None)
        if tunnel.reading:
            self.send_data(protocol.STDOUT, tunnel.id, b"")
        tunnel.close()
        self.send_control({"op": "closed", "id": tunnel.id})

    def look_at_ports(self) -> None:
        """Tell the host when the set of listening TCP ports changed."""
        self.next_port_look = time.monotonic() + portwatch.INTERVAL
        now = portwatch.listening()
        if now != self.ports:
            self.ports = now
            self.send_control({"op": "ports", "tcp": sorted([a, p] for a, p in now)})

    def drain_wakeups(self) -> None:
        try:
            while os.read(self.wake_r, 512):
                pass
        except BlockingIOError:
            pass

    def read_channel(self) -> None:
        """Read and handle what the host sent; a broken stream is logged and reopened."""
        try:
            frames = self.channel.receive()
        except protocol.ProtocolError as exc:
            self.log("error", f"protocol error from the host, dropping the channel: {exc}")
            self.channel.flush_blocking(1.0)
            self.channel.reopen(self.log)
            return
        self.handle_frames(frames)

    def handle_frames(self, frames: list[tuple[int, int, bytes]]) -> None:
        """Dispatch control frames to the request handlers and stdin to processes."""
        for ftype, stream, payload in frames:
            if ftype == protocol.CONTROL:
                try:
                    message = protocol.decode_control(payload)
                except protocol.ProtocolError as exc:
                    # The frame boundary is intact: say so and keep serving.
                    self.log("error", f"malformed control frame ignored: {exc}")
                    continue
                self.handle_request(message)
            elif ftype == protocol.STDIN:
                self.feed_stdin(stream, payload)
            else:
                self.log("warning", f"ignoring frame of type {ftype} from the host")

    def handle_request(self, message: dict[str, Any]) -> None:
        """Run one request and reply to it."""
        op = message["op"]
        reply: dict[str, Any] = {"op": "reply", "req": message.get("req")}
        handler = self.handlers.get(op)
        try:
            if handler is None:
                raise Refused(f"unknown op {op!r}")
            result = handler(message)
            reply.update(result)
            reply["ok"] = True
        except Refused as exc:
            reply.update(ok=False, error=one_line(str(exc)))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            reply.update(ok=False, error=one_line(f"bad {op} request: {type(exc).__name__} {exc}"))
        except OSError as exc:
            reply.update(ok=False, error=one_line(f"{op}: {errtext(exc)}"))
        except Exception as exc:
            self.log("error", f"{op} failed: {describe(exc)}")
            reply.update(ok=False, error=one_line(f"{op}: {exc}"))
        if "req" in message:
            self.send_control(reply)  # a message without one is a notification
        elif not reply.get("ok"):
            self.log("warning", f"{op}: {reply.get('error')}")
        action, self.after_reply = self.after_reply, None
        if action is not None:
            action()

    def host_gone(self) -> None:
        """The socket's peer is gone for good: nobody can use these containers any more."""
        self.log("info", "host closed the channel: stopping")
        self.shutdown()

    # -- requests --

    def container(self, message: dict[str, Any]) -> Container:
        """The container a request names."""
        container_id = message.get("container")
        found = self.containers.get(container_id) if isinstance(container_id, str) else None
        if found is None or found.removed:
            raise Refused(f"container {container_id!r} does not exist")
        return found

    def stream_free(self, stream: int) -> None:
        if not 0 < stream <= 0xFFFF:
            raise Refused(f"process id {stream} is not a stream number (1-65535)")
        taken = stream in self.procs or any(
            c.stream == stream and not c.exited for c in self.containers.values()
        )
        if taken:
            raise Refused(f"process id {stream} is already in use")

    def op_hello(self, message: dict[str, Any]) -> dict[str, Any]:
        """Version check; the clock and host entropy, first thing after a clone's restore."""
        version = message.get("version")
        if version != protocol.VERSION:
            raise Refused(
                f"unsupported protocol version {version!r} (agent speaks {protocol.VERSION})"
            )
        if message.get("time") is not None:
            self.mode.set_clock(float(message["time"]))
        if message.get("entropy"):
            self.mode.add_entropy(base64.b64decode(message["entropy"]))
        return {"version": protocol.VERSION, "pid": os.getpid(), "kernel": os.uname().release}

    def op_create(self, message: dict[str, Any]) -> dict[str, Any]:
        """Build a container and take its init process up to execve; ``start`` lets it go."""
        watch = Stopwatch()
        container_id = check_id(message["container"])
        old = self.containers.get(container_id)
        if old is not None and not old.removed:
            raise Refused(f"container {container_id} already exists")
        stream = int(message["stream"])
        self.stream_free(stream)
        config = message.get("config") or {}
        if not isinstance(config, dict):
            raise Refused("create: config must be an object")
        process = message.get("process")
        if not isinstance(process, dict):
            raise Refused("create: process must be an object")
        spec = ExecSpec(process, True, self.cap_last)
        syscallfilter.check(config.get("seccomp"))
        spec.seccomp = config.get("seccomp")
        plan = Plan(message.get("namespaces"))
        self.mode.prepare_cgroups()
        self.mode.ensure_share()
        watch.lap("share")
        created = Container(container_id, stream, self.mode.cgroup_of(container_id))
        created.seccomp = spec.seccomp
        spawn.create(
            self.mode, created, config, spec, plan, self.containers, self.own_pid_ns, self.log
        )
        self.containers[container_id] = created
        watch.lap("container built, its process prepared")
        return {"timings": watch.laps}

    def op_network(self, message: dict[str, Any]) -> dict[str, Any]:
        """Give the VM (the pod) its network: after the prestart hooks made the interfaces."""
        watch = Stopwatch()
        if self.network_done:
            raise Refused("the network is already configured")
        network = message.get("network")
        if not isinstance(network, dict):
            raise Refused("network: network must be an object")
        if self.mode.guest_wide:
            try:
                configure_network(network, self.log)
            except OSError as exc:
                raise Refused(f"configure the network: {errtext(exc)}") from exc
        relays = [str(a) for a in network.get("dnsRelay") or []]
        if relays:
            try:
                self.dns = DnsRelay(relays)
            except OSError as exc:
                raise Refused(f"relay DNS on {', '.join(relays)}: {errtext(exc)}") from exc
        self.watching_ports = bool(network.get("watchPorts"))
        self.network_done = True
        watch.lap("network")
        return {"timings": watch.laps}

    def op_start(self, message: dict[str, Any]) -> dict[str, Any]:
        """Let a created container's init go."""
        watch = Stopwatch()
        target = self.container(message)
        if target.exited:
            raise Refused("cannot start a container that has stopped")
        if target.prepared is None:
            raise Refused("container already started")
        terminal = target.prepared.spec.terminal
        try:
            pid, fds = spawn.start(target)
        except Refused:
            # runc: a container whose process cannot start is stopped.
            target.exited = True
            with contextlib.suppress(ChildProcessError):
                os.waitpid(target.init_pid, os.WNOHANG)
            raise
        watch.lap("child setup and execve")
        proc = self.track(target, target.stream, pid, fds, terminal, True)
        proc.init = True
        return {"pid": pid, "timings": watch.laps}

    def op_exec(self, message: dict[str, Any]) -> dict[str, Any]:
        """Start a process in a running container; its output and exit follow as frames."""
        watch = Stopwatch()
        target = self.container(message)
        ident = int(message["id"])
        self.stream_free(ident)
        if target.exited or target.prepared is not None or not target.init_pid:
            raise Refused("cannot exec in a container that is not running")
        spec = ExecSpec(message["process"], bool(message.get("stdin")), self.cap_last)
        spec.seccomp = target.seccomp  # runc applies the container's profile to exec too
        pid, fds = spawn.exec_process(self.mode, target, spec, self.own_pid_ns)
        watch.lap("child setup and execve")
        self.track(target, ident, pid, fds, spec.terminal, spec.want_stdin)
        return {"pid": pid, "timings": watch.laps}

    def track(
        self, owner: Container, ident: int, pid: int, fds: list[int], terminal: bool, stdin: bool
    ) -> Proc:
        """Relay a started process's stdio from now on."""
        proc = Proc(ident, pid, terminal, owner.id)
        if terminal:
            proc.outputs[fds[0]] = protocol.STDOUT
            proc.stdin_fd = fds[0]
        else:
            if stdin:
                proc.stdin_fd = fds.pop(0)
            proc.outputs[fds[0]] = protocol.STDOUT
            proc.outputs[fds[1]] = protocol.STDERR
        for fd in [*proc.outputs, *([proc.stdin_fd] if proc.stdin_fd is not None else [])]:
            os.set_blocking(fd, False)
        self.procs[ident] = proc
        self.by_pid[pid] = proc
        owner.streams.add(ident)
        if ident != owner.stream:
            owner.exec_pids.add(pid)
        return proc

    def op_signal(self, message: dict[str, Any]) -> dict[str, Any]:
        """kill(2) one process (by stream), or every process of a container."""
        sig = int(message["signal"])
        target = self.container(message)
        if message.get("all"):
            target.kill(sig)
            return {}
        ident = message.get("id")
        if ident is None:
            ident = target.stream
        proc = self.procs.get(int(ident))
        if proc is None or proc.container != target.id:
            raise Refused("no such process")
        try:
            os.kill(proc.pid, sig)
        except ProcessLookupError as exc:
            raise Refused("no such process") from exc
        return {}

    def op_resize(self, message: dict[str, Any]) -> dict[str, Any]:
        """Window size of a process's pty."""
        proc = self.procs.get(int(message["id"]))
        if proc is None:
            raise Refused("no such process")
        if not proc.terminal or not proc.outputs:
            raise Refused(f"process {proc.id} has no terminal")
        set_winsize(next(iter(proc.outputs)), int(message["rows"]), int(message["cols"]))
        return {}

    def op_ps(self, message: dict[str, Any]) -> dict[str, Any]:
        """Guest pids of a container's processes."""
        return {"pids": self.container(message).pids()}

    def op_update(self, message: dict[str, Any]) -> dict[str, Any]:
        """Change a container's cgroup limits (already converted and checked by the host)."""
        files = message.get("resources")
        if not isinstance(files, dict):
            raise Refused("update: resources must be an object")
        self.mode.set_limits(self.container(message).cgroup, files)
        return {}

    def op_stats(self, message: dict[str, Any]) -> dict[str, Any]:
        """The text of a container cgroup's statistics files (the host parses them)."""
        cgroup = self.container(message).cgroup
        if cgroup is None:
            raise Refused("statistics come from the VM's cgroups (host mode has none)")
        files = {}
        for name in protocol.CGROUP_STATS_FILES:
            try:
                with open(f"{cgroup}/{name}") as f:
                    files[name] = f.read().strip()
            except OSError:
                continue  # e.g. memory.peak, newer than some kernels
        return {"stats": files}

    def op_pause(self, message: dict[str, Any]) -> dict[str, Any]:
        """Freeze a container's processes (its cgroup), as runc's pause does."""
        self.container(message).freeze(True)
        return {}

    def op_resume(self, message: dict[str, Any]) -> dict[str, Any]:
        self.container(message).freeze(False)
        return {}

    def op_remove(self, message: dict[str, Any]) -> dict[str, Any]:
        """End a container's processes and free what it holds in the VM; the host then takes
        its tree out of the share."""
        target = self.container(message)
        if target.cgroup is not None:
            with contextlib.suppress(OSError):
                target.freeze(False)  # a frozen cgroup's processes cannot die
        containers.remove(target, self.reap)
        del self.containers[target.id]
        return {}

    def op_online(self, message: dict[str, Any]) -> dict[str, Any]:
        """Bring the RAM and vCPUs the host just plugged in online."""
        if not self.mode.pid1:
            raise Refused("host mode has no hardware to plug")
        return hotplug.online(int(message.get("memory_mib") or 0), int(message.get("vcpus") or 0))

    def op_connect(self, message: dict[str, Any]) -> dict[str, Any]:
        """Connect to a port the guest listens on; the stream ``id`` carries the connection
        (STDIN frames to it, STDOUT frames from it, end of file both ways, then ``closed``)."""
        ident = int(message["id"])
        self.stream_free(ident)
        if ident in self.tunnels:
            raise Refused(f"process id {ident} is already in use")
        port = int(message["port"])
        if not 0 < port < 65536:
            raise Refused(f"not a port: {port}")
        address = str(message.get("address") or "127.0.0.1")
        self.tunnels[ident] = Tunnel(ident, tunnel_connect(address, port))
        return {}

    def op_dns_answer(self, message: dict[str, Any]) -> dict[str, Any]:
        """The host's answer to a DNS query the relay passed on (a notification)."""
        if self.dns is not None:
            self.dns.answer(int(message["id"]), base64.b64decode(message.get("data") or ""))
        return {}

    def op_shutdown(self, message: dict[str, Any]) -> dict[str, Any]:
        """Power off after the reply went out."""
        self.after_reply = self.shutdown
        return {}

    def shutdown(self) -> None:
        """Stop every container process, flush what the host should get, power off / exit."""
        for target in self.containers.values():
            if target.prepared is not None:
                target.prepared.discard()
                target.prepared = None
        self.mode.kill_everything(signal.SIGKILL)
        if not self.channel.closed:
            self.channel.flush_blocking(2.0)
        self.mode.power_off()
        if self.mode.pid1:
            self.log("error", "power off failed: still running")
        else:
            self.exiting = True

    # -- process I/O --

    def feed_stdin(self, ident: int, data: bytes) -> None:
        """Host bytes for a process's stdin (or a relayed connection); empty means close it."""
        tunnel = self.tunnels.get(ident)
        if tunnel is not None:
            tunnel.feed(data)
            if tunnel.done:
                self.close_tunnel(tunnel)
            return
        proc = self.procs.get(ident)
        if proc is None or proc.stdin_fd is None:
            return
        if not data:
            if proc.terminal:
                return  # a pty has no EOF to give; the host's end closing is not the child's
            proc.stdin_eof = True
            if not proc.pending:
                proc.close_stdin()
            return
        proc.pending += data
        self.write_stdin(proc)

    def write_stdin(self, proc: Proc) -> None:
        """Write what the child takes now; keep the rest."""
        fd = proc.stdin_fd
        if fd is None:
            return
        try:
            written = os.write(fd, proc.pending)
        except BlockingIOError:
            return
        except OSError:
            proc.close_stdin()  # EPIPE/EIO: the child closed its stdin
            return
        del proc.pending[:written]
        if not proc.pending and proc.stdin_eof:
            proc.close_stdin()

    def read_output(self, proc: Proc, fd: int) -> bool:
        """Forward one chunk of output; on EOF send the EOF frame. True if data came."""
        try:
            data = os.read(fd, CHUNK)
        except BlockingIOError:
            return False
        except OSError:
            data = b""  # EIO: the pty's last slave closed
        ftype = proc.outputs[fd]
        self.send_data(ftype, proc.id, data)
        if data:
            return True
        del proc.outputs[fd]
        if proc.stdin_fd == fd:
            proc.stdin_fd = None
            proc.pending.clear()
        os.close(fd)
        return False

    def reap(self) -> None:
        """Collect every exited child (orphans too); report the host's processes."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            proc = self.by_pid.pop(pid, None)
            if proc is not None:
                self.finish(proc, status)

    def finish(self, proc: Proc, status: int) -> None:
        """A host process ended: its remaining output, EOFs, then ``exit``."""
        owner = self.containers.get(proc.container)
        if proc.init and owner is not None:
            # The container ends with its init, as a PID namespace does: once its exit is
            # reported, no other process of it is left (nor a zombie of one).
            owner.kill(signal.SIGKILL)
            containers.wait_empty(owner, self.reap)
            owner.exited = True
        for fd in list(proc.outputs):
            # Until EAGAIN only: a background grandchild may hold the pipe open forever.
            drained = 0
            while fd in proc.outputs and drained < DRAIN_LIMIT:
                if not self.read_output(proc, fd):
                    break
                drained += CHUNK
        for fd, ftype in list(proc.outputs.items()):
            self.send_data(ftype, proc.id, b"")
            del proc.outputs[fd]
            if proc.stdin_fd == fd:
                proc.stdin_fd = None
            os.close(fd)
        proc.close_stdin()
        del self.procs[proc.id]
        if owner is not None:
            owner.streams.discard(proc.id)
            owner.exec_pids.discard(proc.pid)
            if proc.init:
                owner.close_namespaces()
        if os.WIFSIGNALED(status):
            signum: int | None = os.WTERMSIG(status)
            code = 128 + os.WTERMSIG(status)
        else:
            signum, code = None, os.waitstatus_to_exitcode(status)
        message: dict[str, Any] = {
            "op": "exit",
            "id": proc.id,
            "container": proc.container,
            "status": code,
            "signal": signum,
        }
        if proc.init and owner is not None and owner.oom_killed():
            message["oom"] = True  # the host's cgroup is told (shim/cgroups.report_oom)
        self.send_control(message)


# --- entry point ----------------------------------------------------------------------------


def ensure_stdio() -> None:
    """Descriptors 0-2 exist, so pipes never land there and get clobbered by dup2."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open("/dev/null", os.O_RDWR)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)


def parse_args(argv: list[str]) -> Mode:
    """``[--fd N] [--root DIR] [--no-pid1]`` (argparse is too heavy for the guest image)."""
    channel_fd: int | None = None
    root: str | None = None
    no_pid1 = False
    args = list(argv)
    while args:
        arg = args.pop(0)
        if arg == "--no-pid1":
            no_pid1 = True
        elif arg in ("--fd", "--root") and args:
            value = args.pop(0)
            if arg == "--fd":
                channel_fd = int(value)
            else:
                root = os.path.abspath(value)
        else:
            raise SystemExit(f"usage: agent [--fd N] [--root DIR] [--no-pid1] (bad {arg!r})")
    pid1 = os.getpid() == 1 and not no_pid1
    options: dict[str, str] = {}
    if pid1:
        with open("/proc/cmdline") as f:
            options = kernel_options(f.read())
    return Mode(pid1, channel_fd, root, options)


def main(argv: list[str]) -> int:
    """Run the agent; as PID 1 never return."""
    ensure_stdio()
    mode = parse_args(argv)
    agent = Agent(mode)
    while True:
        try:
            return agent.run()
        except Exception as exc:
            if not mode.pid1:
                agent.log("error", f"fatal: {describe(exc)}")
                return 1
            agent.log("error", f"restarting the loop after: {describe(exc)}")
        except BaseException as exc:
            # KeyboardInterrupt/SystemExit: a host process may go, PID 1 may not (kernel panic).
            if not mode.pid1:
                raise
            agent.log("error", f"restarting the loop after: {describe(exc)}")
        time.sleep(1)  # no tight loop if the failure repeats


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
