"""The commands that only read, under the shared lock: `state`, `list`, `ps`, and the
statistics `events` prints."""

from __future__ import annotations

import logging
from typing import Any

from bonneville.backends import procfs
from bonneville.shim import state
from bonneville.shim.cgroups import tree
from bonneville.shim.control import Op, Request
from bonneville.shim.lifecycle.context import Context, locked, monitor_call, state_json
from bonneville.shim.status import Status
from bonneville.spec.errors import BonnevilleError, ContainerNotFound, InvalidState

log = logging.getLogger("bonneville")


def container_state(ctx: Context, container_id: str) -> dict[str, Any]:
    with locked(ctx, container_id, exclusive=False, wait=False) as (st, status):
        return state_json(st, status)


def list_containers(ctx: Context) -> list[dict[str, Any]]:
    """Every container's state; a damaged entry is listed as stopped, never a crash."""
    result: list[dict[str, Any]] = []
    for container_id in ctx.store.ids():
        try:
            result.append(container_state(ctx, container_id))
        except ContainerNotFound:
            continue
        except BonnevilleError as exc:
            log.warning("skipping damaged container %s: %s", container_id, exc)
            result.append(
                {
                    "ociVersion": state.OCI_VERSION,
                    "id": container_id,
                    "pid": 0,
                    "status": Status.STOPPED.value,
                    "bundle": "",
                    "rootfs": "",
                    "created": "",
                    "owner": "",
                    "annotations": {},
                }
            )
    return result


def ps(ctx: Context, container_id: str) -> list[int]:
    """Host PIDs of the container: its monitor, what runs under it (the VM) and the rest of its
    cgroup (exec proxies)."""
    with locked(ctx, container_id, exclusive=False) as (st, status):
        if status is Status.STOPPED:
            return []
        pids = [st.pid, *procfs.descendants(st.pid)]
        if st.backend_state and not st.sandbox:
            from bonneville.backends.base import get_backend

            extra = get_backend(st.backend).vm_pids(st.backend_state)
            pids += [pid for pid in extra if pid not in pids]
        # As runc lists its cgroup: the exec proxies too.
        pids += [pid for pid in tree.processes(st.cgroup) if pid not in pids]
        return pids


def stats(ctx: Context, container_id: str) -> dict[str, Any]:
    """The container's resource usage, read from its cgroup inside the VM (runc's Stats)."""
    with locked(ctx, container_id, exclusive=False) as (st, status):
        if status is Status.STOPPED:
            raise InvalidState(f"container not running: {status.value}", status.value)
        if status is Status.PAUSED:
            # A paused VM cannot answer; runc reads the frozen cgroup, we have nothing to read.
            raise InvalidState("container is paused: its VM cannot report statistics", "paused")
        reply = monitor_call(ctx, st, Request(Op.STATS))
    raw = reply.get("stats")
    return raw if isinstance(raw, dict) else {}
