"""What every lifecycle command shares: the CLI's :class:`Context`, the live status of a
container (:func:`refresh`, never the state file alone) and :func:`locked`, the lock-load-refresh
each command on one container starts with; the runtime-spec state object; calls to the monitor."""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

from bonneville.backends import procfs
from bonneville.backends.atomicfile import atomic_write
from bonneville.shim import state, unixsock
from bonneville.shim.control import Request
from bonneville.shim.state import ContainerState, Store
from bonneville.shim.status import Status


@dataclass
class Context:
    """What the CLI's global options give every command."""

    store: Store
    backend: str | None = None  # --backend / BONNEVILLE_BACKEND; only create uses it
    systemd_cgroup: bool = False  # --systemd-cgroup: cgroupsPath is slice:prefix:name

    def backend_for_create(self) -> str:
        """--backend, else $BONNEVILLE_BACKEND, else the config file's, else qemu."""
        from bonneville.backends.base import backend_for_create

        return backend_for_create(self.backend)


def refresh(ctx: Context, st: ContainerState) -> Status:
    """The live status: from the monitor process and the VM, never from the file alone."""
    if not st.created_done:
        if procfs.is_alive(st.creator_pid, st.creator_start):
            return Status.CREATING
        return Status.STOPPED  # a create that crashed half-way
    if ctx.store.read_exit(st.id) is not None:
        return Status.STOPPED
    if not procfs.is_alive(st.pid, st.pid_start):
        return Status.STOPPED
    if st.backend_state:
        from bonneville.backends.base import get_backend
        from bonneville.spec.errors import BackendError

        try:
            vm_alive = get_backend(st.backend).alive(st.backend_state)
        except BackendError:
            vm_alive = True  # a backend we cannot load here: the monitor's life decides
        if not vm_alive:
            return Status.STOPPED
    if st.paused:
        return Status.PAUSED
    return Status.RUNNING if st.started else Status.CREATED


class Locked(NamedTuple):
    """A container's state as :func:`locked` yields it."""

    state: ContainerState
    status: Status  # live, from refresh()


@contextlib.contextmanager
def locked(
    ctx: Context, container_id: str, exclusive: bool = True, wait: bool = True
) -> Iterator[Locked]:
    """What every command on one container starts with: its lock held (``Store.lock``), its
    state loaded and its live status refreshed."""
    with ctx.store.lock(container_id, exclusive, wait):
        st = ctx.store.load(container_id)
        yield Locked(st, refresh(ctx, st))


def state_json(st: ContainerState, status: Status) -> dict[str, Any]:
    """The runtime-spec state object (runc's field set)."""
    return {
        "ociVersion": state.OCI_VERSION,
        "id": st.id,
        "pid": st.pid if status is not Status.STOPPED else 0,
        "status": status.value,
        "bundle": st.bundle,
        "rootfs": st.rootfs,
        "created": st.created,
        "owner": st.owner,
        "annotations": st.annotations,
    }


def hook_state(st: ContainerState, status: Status) -> dict[str, Any]:
    """The state a hook reads on its stdin."""
    data = state_json(st, status)
    data["pid"] = st.pid  # hooks always see the container's pid, even when it just ended
    return data


def control_socket(ctx: Context, st: ContainerState) -> str:
    """The control socket that serves a container: its pod owner's monitor's."""
    return ctx.store.path(st.sandbox or st.id, state.SOCKET_FILE)


def monitor_call(
    ctx: Context, st: ContainerState, request: Request, timeout: float = 30.0
) -> dict[str, Any]:
    """A request to the monitor that serves ``st`` (a pod member's: its owner's, naming it)."""
    if st.sandbox:
        request = dataclasses.replace(request, container=st.id)
    return unixsock.call(control_socket(ctx, st), request.to_json(), timeout)


def write_pid_file(path: str, pid: int) -> None:
    """Digits only, no newline, written atomically (containerd reads it as soon as it exists)."""
    atomic_write(os.path.abspath(path), str(pid).encode(), mode=0o644)


def send_signal(pid: int, signum: int) -> None:
    """kill(2); a process already gone is no error."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)
