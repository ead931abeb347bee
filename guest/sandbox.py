"""The pod as the agent holds it: its containers, the processes the host started in them (each
named by its stream), their stdio relayed to and from the host, and their exits reaped and
reported. The requests that change it are guest/rpc.py's; guest/agent.py's loop polls the
descriptors it holds. Standard library only: this module goes into the guest image.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable

from bonneville.guest import container as containers
from bonneville.guest import protocol
from bonneville.guest.common import Refused
from bonneville.guest.container import Container
from bonneville.guest.process import Proc

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

CHUNK = 64 * 1024  # one read from a child's pipe or pty
DRAIN_LIMIT = 8 << 20  # what a dead process's background writers may still add to its streams


class Sandbox:
    """The containers of the pod and their processes; output and exits go to the host through
    ``send_control`` and ``send_data`` (the agent's, which queue frames on its channel)."""

    def __init__(
        self,
        send_control: Callable[[dict[str, Any]], None],
        send_data: Callable[[int, int, bytes], None],
    ) -> None:
        self.send_control = send_control
        self.send_data = send_data
        self.containers: dict[str, Container] = {}
        self.procs: dict[int, Proc] = {}
        self.by_pid: dict[int, Proc] = {}
        try:
            with open("/proc/sys/kernel/cap_last_cap") as f:
                self.cap_last = int(f.read())
        except OSError:
            self.cap_last = len(protocol.CAPABILITIES) - 1
        # Our own PID namespace: where we return after forking into a container's.
        self.own_pid_ns = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)

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

    # -- process I/O --

    def feed_stdin(self, ident: int, data: bytes) -> None:
        """Host bytes for a process's stdin; empty means close it."""
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

    # -- exits --

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
            message["oom"] = True  # the host's cgroup is told (shim/cgroups/oom.py)
        self.send_control(message)
