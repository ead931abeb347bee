"""`delete`, and ending a container's monitor and VM (kill and a failed create end them too)."""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import time

from bonneville.backends import procfs
from bonneville.shim import hooks, state, unixsock
from bonneville.shim.cgroups import tree
from bonneville.shim.control import Op, Request
from bonneville.shim.lifecycle.context import (
    Context,
    hook_state,
    monitor_call,
    refresh,
    send_signal,
)
from bonneville.shim.state import ContainerState
from bonneville.shim.status import Status
from bonneville.spec.errors import BonnevilleError, ContainerNotFound, InvalidState

log = logging.getLogger("bonneville")

# A hang guard only.
MONITOR_EXIT_TIMEOUT = 15.0


def delete(ctx: Context, container_id: str, force: bool = False) -> None:
    try:
        # Not locked(): a missing or damaged state file is not an error here but what to delete.
        with ctx.store.lock(container_id):
            _delete_locked(ctx, container_id, force)
    except ContainerNotFound:
        if not force:  # runc: delete --force of an unknown container succeeds
            raise


def _delete_locked(ctx: Context, container_id: str, force: bool) -> None:
    try:
        st = ctx.store.load(container_id)
    except ContainerNotFound:
        # A directory without a state file: a create that died before writing it.
        ctx.store.remove(container_id)
        return
    except BonnevilleError as exc:
        # A damaged state file names no process we could trust; a monitor still serving its
        # socket is asked to end the VM, then the entry goes.
        log.warning("deleting damaged container %s: %s", container_id, exc)
        with contextlib.suppress(BonnevilleError):
            unixsock.call(
                ctx.store.path(container_id, state.SOCKET_FILE), Request(Op.DESTROY).to_json(), 5
            )
        ctx.store.remove(container_id)
        return
    status = refresh(ctx, st)
    if not status.can_delete and not force:
        raise InvalidState(
            f"cannot delete container {container_id} that is not stopped: {status.value}",
            status.value,
        )
    if status is Status.CREATING and st.creator_pid:
        send_signal(st.creator_pid, signal.SIGKILL)
    stop_monitor(ctx, st)
    # Also after a crash of the monitor or of create: the state names the cgroup.
    tree.remove(st.cgroup, st.cgroup_unit)
    hooks.run_hooks_warn("poststop", st.poststop_hooks, hook_state(st, Status.STOPPED))
    ctx.store.remove(container_id)


def stop_monitor(ctx: Context, st: ContainerState) -> None:
    """End the container: ask the monitor to power off, then make sure of it."""
    if procfs.is_alive(st.pid, st.pid_start):
        with contextlib.suppress(BonnevilleError):
            monitor_call(ctx, st, Request(Op.DESTROY), timeout=5)
        if not _wait_gone(st.pid, st.pid_start, MONITOR_EXIT_TIMEOUT):
            send_signal(st.pid, signal.SIGKILL)
            _wait_gone(st.pid, st.pid_start, MONITOR_EXIT_TIMEOUT)
    destroy_vm(ctx, st)


def _wait_gone(pid: int, start_time: int | None, timeout: float) -> bool:
    if not procfs.is_alive(pid, start_time):
        return True
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        deadline = time.monotonic() + timeout
        while procfs.is_alive(pid, start_time):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            select.select([pidfd], [], [], remaining)
            # Readable means it exited; it may linger as a zombie of its parent: that is gone.
            if select.select([pidfd], [], [], 0)[0]:
                return True
        return True
    finally:
        os.close(pidfd)


def destroy_vm(ctx: Context, st: ContainerState) -> None:
    """Destroy what is left of the VM: as create recorded it, else as far as its launch got.
    A pod member's VM is its owner's: never its to destroy."""
    from bonneville.backends.base import get_backend, read_journal

    if st.sandbox:
        return
    private = st.backend_state or read_journal(ctx.store.path(st.id))
    if private:
        with contextlib.suppress(BonnevilleError):
            get_backend(st.backend).destroy(private)
