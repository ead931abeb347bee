"""The guest agent: PID 1 in each VM, serving the host over one framed channel.

A VM holds a pod: one or more containers (guest/container.py), each with its own namespaces,
cgroup and root taken from the share. This module is the entry point and the event loop: it
reads the host's frames, dispatches requests to their handlers (guest/rpc.py,
docs/protocol.md) and stdin to processes, and polls the pod's processes (guest/sandbox.py:
their stdio, reaping, exits), relayed connections and the DNS relay. It and the modules it
imports import only standard-library modules and our own guest modules, all at the top: the
image builder packs what importing this module loads, and a forked child finds them loaded.
``--fd N --root DIR`` runs it as an ordinary host process ("host mode") for the fake backend
and the tests; every difference between the two modes lives in guest/mode.py.
"""

from __future__ import annotations

import base64
import os
import select
import signal
import sys
import time
from collections.abc import Callable

from bonneville.guest import portwatch, protocol, rpc
from bonneville.guest.channel import Channel, kernel_options
from bonneville.guest.common import Refused, describe, errtext, one_line
from bonneville.guest.dnsrelay import DnsRelay
from bonneville.guest.mode import Mode
from bonneville.guest.sandbox import Sandbox
from bonneville.guest.tunnel import Tunnel

# For the type checker only: importing typing costs a cold boot ~0.1 s under TCG.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

BACKPRESSURE = 1 << 20  # stop reading children while this much waits to go to the host
RECONNECT_POLL_MS = 200  # how often a disconnected port is probed (it polls as always readable)


class Agent:
    """The event loop: requests from the host, children's output, their exits."""

    def __init__(self, mode: Mode) -> None:
        self.mode = mode
        self.log_fd = mode.open_log()
        self.channel = Channel(mode)
        self.sandbox = Sandbox(self.send_control, self.send_data)
        self.network_done = False
        self.tunnels: dict[int, Tunnel] = {}  # connections the host relays (port-forward)
        self.dns: DnsRelay | None = None
        self.watching_ports = False
        self.next_port_look = 0.0
        self.ports: set[tuple[str, int]] | None = None
        self.exiting = False
        self.after_reply: Callable[[], None] | None = None
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

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
        sandbox = self.sandbox
        for proc in sandbox.procs.values():
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

        for proc in list(sandbox.procs.values()):
            for fd in list(proc.outputs):
                if ready.get(fd, 0) & (select.POLLIN | select.POLLHUP | select.POLLERR):
                    sandbox.read_output(proc, fd)
            stdin_fd = proc.stdin_fd
            if stdin_fd is not None and proc.pending and ready.get(stdin_fd, 0):
                sandbox.write_stdin(proc)
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
            sandbox.reap()
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

    def feed_stdin(self, ident: int, data: bytes) -> None:
        """Host bytes for a process's stdin (or a relayed connection); empty means close it."""
        tunnel = self.tunnels.get(ident)
        if tunnel is not None:
            tunnel.feed(data)
            if tunnel.done:
                self.close_tunnel(tunnel)
            return
        self.sandbox.feed_stdin(ident, data)

    def handle_request(self, message: dict[str, Any]) -> None:
        """Run one request and reply to it."""
        op = message["op"]
        reply: dict[str, Any] = {"op": "reply", "req": message.get("req")}
        handler = rpc.HANDLERS.get(op)
        try:
            if handler is None:
                raise Refused(f"unknown op {op!r}")
            result = handler(self, message)
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

    def shutdown(self) -> None:
        """Stop every container process, flush what the host should get, power off / exit."""
        for target in self.sandbox.containers.values():
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
