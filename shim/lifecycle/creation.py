"""`create`: the checks, the pod placement, the host cgroup, the monitor's hand-over and the
create hooks; a create that fails leaves nothing behind."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import signal
import socket
import time
from typing import TYPE_CHECKING, Any

from bonneville.backends import procfs
from bonneville.shim import hooks, hostns, ids, state, unixsock
from bonneville.shim.cgroups import tree
from bonneville.shim.lifecycle import hostcgroup, teardown
from bonneville.shim.lifecycle.context import Context, hook_state, write_pid_file
from bonneville.shim.state import ContainerState
from bonneville.shim.status import Status
from bonneville.spec.errors import BonnevilleError, ConfigError

if TYPE_CHECKING:
    from bonneville.spec.config import Bundle, PendingValidation

log = logging.getLogger("bonneville")

# A hang guard only: a cold boot under TCG on a loaded host can take tens of seconds.
CREATE_TIMEOUT = 300.0


def create(
    ctx: Context,
    container_id: str,
    bundle_path: str,
    pid_file: str | None = None,
    console_socket: str | None = None,
    use_stdio_tty: bool = False,
) -> ContainerState:
    """Create the container: its VM is up and its agent ready when this returns."""
    from bonneville.spec.config import open_bundle

    ids.validate_id(container_id)
    # The schema is checked in a child while the monitor launches the VM; its verdict comes
    # before any hook runs, and outranks any other error (as if it had been checked first).
    bundle, validation = open_bundle(bundle_path)
    try:
        return _create(
            ctx, container_id, bundle, validation, pid_file, console_socket, use_stdio_tty
        )
    except ConfigError:
        raise
    except Exception:
        validation.result()
        raise
    finally:
        validation.abandon()


def _create(
    ctx: Context,
    container_id: str,
    bundle: Bundle,
    validation: PendingValidation,
    pid_file: str | None,
    console_socket: str | None,
    use_stdio_tty: bool,
) -> ContainerState:
    from bonneville.backends.base import Capability, get_backend
    from bonneville.shim import launch

    spec = bundle.spec
    if spec.process is None:
        raise BonnevilleError("config.json: process is required to create a container")
    if spec.process.terminal and not console_socket and not use_stdio_tty:
        raise BonnevilleError(
            "cannot allocate tty if bonneville will detach without setting console socket"
        )
    if not spec.process.terminal and console_socket:
        raise BonnevilleError(
            "cannot use console socket if bonneville will not detach or allocate tty"
        )
    from bonneville.shim.pod import place

    placement = place(ctx.store, spec)
    owner: ContainerState | None = None
    if placement.owner:
        owner = ctx.store.load(placement.owner)
        backend_name = owner.backend
    else:
        backend_name = ctx.backend_for_create()
    backend = get_backend(backend_name)  # unknown or unavailable: fail before anything exists
    backend.preflight()
    if owner is not None and Capability.PODS not in backend.capabilities:
        raise BonnevilleError(
            f"container {owner.id}'s VM cannot take more containers: the {backend_name} backend"
            " runs one container per VM (pods and --network container: need qemu or libvirt)"
        )
    host_network = owner is None and _shares_host_network(spec.linux)
    if host_network and Capability.HOST_NETWORK not in backend.capabilities:
        raise BonnevilleError(
            f"host networking (no network namespace of the container's own: docker --network"
            f" host, a hostNetwork pod) needs the qemu or libvirt backend, not {backend_name}"
        )

    host_cgroup = hostcgroup.place(ctx, container_id, spec)
    ctx.store.create_dir(container_id)
    st = ContainerState(
        id=container_id,
        bundle=bundle.path,
        rootfs=bundle.rootfs,
        backend=backend_name,
        annotations=dict(spec.annotations),
        creator_pid=os.getpid(),
        creator_start=procfs.start_time(os.getpid()),
        sandbox=owner.id if owner is not None else "",
        start_container_hooks=_raw_hooks(bundle, "startContainer"),
        poststart_hooks=_raw_hooks(bundle, "poststart"),
        poststop_hooks=_raw_hooks(bundle, "poststop"),
        cgroup=dict(host_cgroup.dirs) if host_cgroup else {},
        cgroup_unit=host_cgroup.unit if host_cgroup else "",
        vm_vcpus=spec.linux.resources.vcpus(os.cpu_count() or 1) if owner is None else 0,
    )
    monitor_pid = 0
    sync: socket.socket | None = None
    try:
        with ctx.store.lock(container_id):
            ctx.store.save(st)
            monitor_pid, sync = launch.take(backend_name)
            st.pid = monitor_pid
            st.pid_start = procfs.start_time(monitor_pid)
            ctx.store.save(st)
            if host_cgroup is not None:
                # Before the hand-over: the monitor launches the VM as soon as it has it, and
                # QEMU must be born in the cgroup (its memory is charged where it is allocated).
                hostcgroup.enter(st, host_cgroup, bundle, monitor_pid, member=owner is not None)
                ctx.store.save(st)
            config = launch.MonitorConfig(
                container_id=container_id,
                state_dir=ctx.store.path(container_id),
                bundle=bundle,
                backend=backend_name,
                console_socket=os.path.abspath(console_socket) if console_socket else None,
                use_stdio_tty=use_stdio_tty,
                runtime_netns=hostns.namespace_id("/proc/self/ns/net"),
                owner=owner.id if owner is not None else "",
                owner_socket=ctx.store.path(owner.id, state.SOCKET_FILE) if owner else "",
                namespaces=placement.namespaces,
                cgroup=dict(st.cgroup),
                host_network=host_network,
            )
            launch.hand_over(sync, config)
            deadline = time.monotonic() + CREATE_TIMEOUT
            _read_phase(sync, deadline)  # the monitor sits in the container's namespaces
            validation.result()  # (the monitor is launching a clone meanwhile)
            hooks.run_hooks("prestart", spec.hooks.prestart, hook_state(st, Status.CREATING))
            hooks.run_hooks(
                "createRuntime", spec.hooks.create_runtime, hook_state(st, Status.CREATING)
            )
            sync.sendall(b'{"continue": true}\n')
            ready = _read_phase(sync, deadline)
            # A member's VM is its owner's: its state tells whether the VM lives.
            st.backend_state = dict(
                owner.backend_state if owner is not None else ready.get("backend_state") or {}
            )
            ctx.store.save(st)
            hooks.run_hooks(
                "createContainer", spec.hooks.create_container, hook_state(st, Status.CREATED)
            )
            st.created_done = True
            ctx.store.save(st)
            if pid_file:
                write_pid_file(pid_file, monitor_pid)
    except BaseException:
        _abort_create(ctx, st, monitor_pid)
        raise
    finally:
        if sync is not None:
            sync.close()
    log.debug("created %s (monitor %d)", container_id, monitor_pid)
    return st


def _read_phase(sock: socket.socket, deadline: float) -> dict[str, Any]:
    remaining = deadline - time.monotonic()
    readable, _, _ = select.select([sock], [], [], max(remaining, 0))
    if not readable:
        raise BonnevilleError("timed out waiting for the container's VM to start")
    line = unixsock.read_line(sock)
    if not line:
        raise BonnevilleError("the container monitor died during create (see its log)")
    message = json.loads(line)
    if not isinstance(message, dict):
        raise BonnevilleError("malformed message from the container monitor")
    if message.get("phase") == "error":
        raise BonnevilleError(str(message.get("error")))
    return message


def _raw_hooks(bundle: Bundle, kind: str) -> list[dict[str, Any]]:
    return list((bundle.raw.get("hooks") or {}).get(kind) or [])


def _shares_host_network(linux: Any) -> bool:
    """No network namespace, or a path naming our own (docker --network host passes one)."""
    ns = linux.namespace("network")
    if ns is None:
        return True
    if not ns.path:
        return False
    try:
        return hostns.namespace_id(ns.path) == hostns.namespace_id("/proc/self/ns/net")
    except OSError as exc:
        raise BonnevilleError(f"network namespace {ns.path}: {exc.strerror}") from exc


def _abort_create(ctx: Context, st: ContainerState, monitor_pid: int) -> None:
    """Leave nothing behind: no monitor, VM, mount (they live in its namespace) or state."""
    if monitor_pid:
        with contextlib.suppress(ProcessLookupError):
            os.kill(monitor_pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(monitor_pid, 0)
    teardown.destroy_vm(ctx, st)
    tree.remove(st.cgroup, st.cgroup_unit)
    ctx.store.remove(st.id)
