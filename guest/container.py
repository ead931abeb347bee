"""One container inside the VM: its namespaces, cgroup and root, and its end.

A pod's VM holds several containers (docs/protocol.md, ``create``). Each gets, as under runc,
its own mount namespace whose root is its tree from the share, its own cgroup (with a cgroup
namespace rooted there), and its own PID, UTS and IPC namespaces unless its config joins
another container's (a Kubernetes pod shares IPC and UTS, and PID with
``shareProcessNamespace``) or the VM's (no namespace of that type in the config). The network
is the VM's: one per pod. Its processes are born in guest/spawn.py. Standard library only:
this module goes into the guest image.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time

from bonneville.guest import linux
from bonneville.guest.common import Refused, read_text, write_file
from bonneville.guest.proc import in_sessions

TYPE_CHECKING = False
if TYPE_CHECKING:
    import socket
    from typing import Any

    from bonneville.guest.process import ExecSpec

# Namespaces a container may have of its own or join, in the order a joining child enters
# them (the mount namespace last: it changes what every path means).
SHARED_KINDS = ("ipc", "uts")
KIND_FLAGS = {
    "pid": linux.CLONE_NEWPID,
    "ipc": linux.CLONE_NEWIPC,
    "uts": linux.CLONE_NEWUTS,
    "mnt": linux.CLONE_NEWNS,
    "cgroup": linux.CLONE_NEWCGROUP,
}
EMPTY_TIMEOUT = 10.0  # for a killed container's processes to be gone
VALID_ID_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_+.-")


def check_id(container_id: object) -> str:
    """A container id as the host's state store allows them (it names a directory here too)."""
    if (
        not isinstance(container_id, str)
        or not container_id
        or container_id in (".", "..")
        or not set(container_id) <= VALID_ID_CHARS
        or len(container_id) > 1024
    ):
        raise Refused(f"invalid container id {container_id!r}")
    return container_id


class Plan:
    """Which namespaces a container makes and which it joins: "new", "vm" (the VM's own: no
    namespace of that type in its config), or another container's id."""

    def __init__(self, raw: Any) -> None:
        raw = raw if isinstance(raw, dict) else {}
        self.kinds: dict[str, str] = {}
        for kind in ("pid", *SHARED_KINDS):
            value = raw.get(kind, "new")
            if not isinstance(value, str) or not value:
                raise Refused(f"namespaces.{kind} must be a string")
            if value.startswith("container:"):
                check_id(value.partition(":")[2])
            elif value not in ("new", "vm"):
                raise Refused(f"namespaces.{kind}: unknown value {value!r}")
            self.kinds[kind] = value

    def joined(self) -> dict[str, str]:
        """Kind → the container whose namespace of that kind is joined."""
        return {
            kind: value.partition(":")[2]
            for kind, value in self.kinds.items()
            if value.startswith("container:")
        }

    def new(self, kind: str) -> bool:
        return self.kinds.get(kind) == "new"


class Prepared:
    """An init process built and waiting before execve for ``start``."""

    def __init__(
        self, spec: ExecSpec, pid: int, report: socket.socket, go: int, fds: list[int]
    ) -> None:
        self.spec = spec
        self.pid = pid
        self.report = report
        self.go = go
        # Our ends of its stdio: stdin's pipe, stdout's, stderr's; or the pty master alone.
        self.fds = fds

    def discard(self) -> None:
        """Close our ends: the child reads end of file on ``go`` and exits."""
        for fd in [self.go, *self.fds]:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.report.close()


class Container:
    """A container of the pod: its init, namespaces and cgroup."""

    def __init__(self, container_id: str, stream: int, cgroup: str | None) -> None:
        self.id = container_id
        self.stream = stream  # the init process's stream
        self.cgroup = cgroup
        self.init_pid = 0
        self.ns: dict[str, int] = {}  # kind → a descriptor that keeps the namespace
        self.prepared: Prepared | None = None
        self.streams: set[int] = set()  # the streams of its live processes
        self.exec_pids: set[int] = set()  # its exec'd processes (host mode finds them so)
        self.seccomp: dict[str, Any] | None = None  # its profile, for exec'd processes too
        self.exited = False
        self.removed = False

    @property
    def root(self) -> str:
        """The container's root as the agent reaches it (through its init's /proc entry)."""
        return f"/proc/{self.init_pid}/root"

    def close_namespaces(self) -> None:
        for fd in self.ns.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self.ns.clear()

    def pids(self) -> list[int]:
        """Its processes (guest PIDs): its cgroup's; in host mode (no cgroups) those in the
        sessions its init and exec'd processes lead (each starts one: process.attach_stdio),
        which orphans keep when the agent adopts them."""
        if self.cgroup is not None:
            try:
                with open(f"{self.cgroup}/cgroup.procs") as f:
                    return sorted(int(line) for line in f.read().split())
            except OSError:
                return []
        return in_sessions({pid for pid in (self.init_pid, *self.exec_pids) if pid})

    def kill(self, sig: int) -> None:
        """Signal every process of the container (SIGKILL: through cgroup.kill, fork-proof)."""
        if sig == signal.SIGKILL and self.cgroup is not None:
            with contextlib.suppress(OSError):
                write_file(f"{self.cgroup}/cgroup.kill", "1")
                return
        for _ in range(3 if sig == signal.SIGKILL else 1):
            pids = self.pids()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            if not pids:
                break

    def empty(self) -> bool:
        if self.cgroup is not None:
            try:
                return "populated 0" in read_text(f"{self.cgroup}/cgroup.events")
            except OSError:
                return True
        return not self.pids()

    def oom_killed(self) -> bool:
        """Whether the OOM killer (its limit's or the VM's) took any of its processes."""
        if self.cgroup is None:
            return False
        try:
            text = read_text(f"{self.cgroup}/memory.events")
        except OSError:
            return False
        for line in text.splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return value.strip() not in ("", "0")
        return False

    def freeze(self, frozen: bool) -> None:
        """cgroup.freeze, waiting (bounded) until the kernel says it is done."""
        if self.cgroup is None:
            raise Refused("pause needs the container's cgroup (host mode has none)")
        write_file(f"{self.cgroup}/cgroup.freeze", "1" if frozen else "0")
        deadline = time.monotonic() + 5
        wanted = f"frozen {int(frozen)}"
        while wanted not in read_text(f"{self.cgroup}/cgroup.events"):
            if time.monotonic() > deadline:
                raise Refused(f"the container's cgroup did not {'freeze' if frozen else 'thaw'}")
            time.sleep(0.005)

    def remove_cgroup(self) -> None:
        """Remove its cgroup (once no process is left in it)."""
        if self.cgroup is not None:
            with contextlib.suppress(OSError):
                os.rmdir(self.cgroup)


def wait_empty(container: Container, reap: Any, timeout: float = EMPTY_TIMEOUT) -> None:
    """Wait (bounded) until a killed container has no process left, reaping as they go."""
    deadline = time.monotonic() + timeout
    while not container.empty() and time.monotonic() < deadline:
        reap()
        time.sleep(0.002)
    reap()


def remove(container: Container, reap: Any) -> None:
    """End every process of the container and free what it holds in the VM (its namespaces,
    whose mounts go with the last reference, and its cgroup)."""
    if container.prepared is not None:
        container.prepared.discard()
        container.prepared = None
    container.kill(signal.SIGKILL)
    wait_empty(container, reap)
    container.close_namespaces()
    container.remove_cgroup()
    container.removed = True
