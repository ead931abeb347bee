"""The container lifecycle behind the CLI commands (runc semantics, one VM per container)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import select
import signal
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

from bonneville.backends import procfs
from bonneville.backends.atomicfile import atomic_write
from bonneville.shim import cgroups, hooks, hostns, ids, state, unixsock
from bonneville.shim.control import Op, Request
from bonneville.shim.state import ContainerState, Store
from bonneville.shim.status import Status
from bonneville.spec.errors import (
    BonnevilleError,
    ConfigError,
    ContainerNotFound,
    HookError,
    InvalidState,
)

if TYPE_CHECKING:
    from bonneville.spec.config import Bundle, PendingValidation

log = logging.getLogger("bonneville")

# Hang guards only: a cold boot under TCG on a loaded host can take tens of seconds.
CREATE_TIMEOUT = 300.0
MONITOR_EXIT_TIMEOUT = 15.0
KILL_TIMEOUT = 5.0  # for the guest to confirm a SIGKILL before its monitor is killed instead


@dataclass
class Context:
    store: Store
    backend: str | None = None  # --backend / BONNEVILLE_BACKEND; only create uses it
    systemd_cgroup: bool = False  # --systemd-cgroup: cgroupsPath is slice:prefix:name

    def backend_for_create(self) -> str:
        """--backend, else $BONNEVILLE_BACKEND, else the config file's, else qemu."""
        from bonneville.backends.base import backend_for_create

        return backend_for_create(self.backend)


# ---- status ----------------------------------------------------------------------------------


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


def _hook_state(st: ContainerState, status: Status) -> dict[str, Any]:
    data = state_json(st, status)
    data["pid"] = st.pid  # hooks always see the container's pid, even when it just ended
    return data


# ---- create / start / run --------------------------------------------------------------------


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


def write_pid_file(path: str, pid: int) -> None:
    """Digits only, no newline, written atomically (containerd reads it as soon as it exists)."""
    atomic_write(os.path.abspath(path), str(pid).encode(), mode=0o644)


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

    host_cgroup = _place_cgroup(ctx, container_id, spec)
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
                _enter_cgroup(st, host_cgroup, bundle, monitor_pid, member=owner is not None)
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
            hooks.run_hooks("prestart", spec.hooks.prestart, _hook_state(st, Status.CREATING))
            hooks.run_hooks(
                "createRuntime", spec.hooks.create_runtime, _hook_state(st, Status.CREATING)
            )
            sync.sendall(b'{"continue": true}\n')
            ready = _read_phase(sync, deadline)
            # A member's VM is its owner's: its state tells whether the VM lives.
            st.backend_state = dict(
                owner.backend_state if owner is not None else ready.get("backend_state") or {}
            )
            ctx.store.save(st)
            hooks.run_hooks(
                "createContainer", spec.hooks.create_container, _hook_state(st, Status.CREATED)
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


def _place_cgroup(ctx: Context, container_id: str, spec: Any) -> cgroups.Placement | None:
    """Where the container's host cgroup goes (runc's rules); None where no cgroup hierarchy
    is mounted. A cgroupsPath runc refuses is refused here, before anything exists."""
    host = cgroups.Host.read()
    if host.mode == "none":
        return None
    return cgroups.place(host, spec.linux.cgroups_path, container_id, ctx.systemd_cgroup)


def _enter_cgroup(
    st: ContainerState, placement: cgroups.Placement, bundle: Bundle, pid: int, member: bool
) -> None:
    """Make the container's cgroup, bound it (shim/cgroups.py, the VM's size or a member's
    relay) and move the monitor into it. runc's default place (no cgroupsPath) is a courtesy:
    where it cannot be made (a read-only /sys/fs/cgroup), the container runs without it."""
    spec = bundle.spec
    raw = (bundle.raw.get("linux") or {}).get("resources") or {}
    raw = raw if isinstance(raw, dict) else {}
    if member:
        limits = cgroups.member_limits(raw)
    else:
        limits = cgroups.vm_limits(
            spec.linux.resources.memory_mib(),
            st.vm_vcpus,
            raw,
            shares=not _is_pod_sandbox(spec.annotations),
        )
    try:
        cgroups.create(placement, cgroups.Host.read(), pid)
        cgroups.apply(placement.dirs, limits)
    except BonnevilleError as exc:
        if spec.linux.cgroups_path:
            raise
        log.warning("container %s runs without a cgroup of its own: %s", st.id, exc)
        cgroups.remove(st.cgroup, st.cgroup_unit, timeout=0)
        st.cgroup, st.cgroup_unit = {}, ""


def _is_pod_sandbox(annotations: dict[str, str]) -> bool:
    """A CRI sandbox: its config's CPU weight is the pause process's (2 shares), but its
    cgroup holds the whole pod's VM, so the host cgroup keeps the default weight."""
    from bonneville.shim.pod import CRI_TYPE, CRIO_TYPE

    return "sandbox" in (annotations.get(CRI_TYPE), annotations.get(CRIO_TYPE))


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
    _destroy_vm(ctx, st)
    cgroups.remove(st.cgroup, st.cgroup_unit)
    ctx.store.remove(st.id)


def _destroy_vm(ctx: Context, st: ContainerState) -> None:
    """Destroy what is left of the VM: as create recorded it, else as far as its launch got.
    A pod member's VM is its owner's: never its to destroy."""
    from bonneville.backends.base import get_backend, read_journal

    if st.sandbox:
        return
    private = st.backend_state or read_journal(ctx.store.path(st.id))
    if private:
        with contextlib.suppress(BonnevilleError):
            get_backend(st.backend).destroy(private)


def control_socket(ctx: Context, st: ContainerState) -> str:
    """The control socket that serves a container: its pod owner's monitor's."""
    return ctx.store.path(st.sandbox or st.id, state.SOCKET_FILE)


def _monitor_call(
    ctx: Context, st: ContainerState, request: Request, timeout: float = 30.0
) -> dict[str, Any]:
    if st.sandbox:
        request = dataclasses.replace(request, container=st.id)
    return unixsock.call(control_socket(ctx, st), request.to_json(), timeout)


def start(ctx: Context, container_id: str) -> None:
    with locked(ctx, container_id) as (st, status):
        if not status.can_start:
            if status is Status.STOPPED:
                raise InvalidState("cannot start a container that has stopped", status.value)
            raise InvalidState(f"cannot start an already {status.value} container", status.value)
        try:
            hooks.run_hooks(
                "startContainer", st.start_container_hooks, _hook_state(st, Status.CREATED)
            )
        except HookError:
            _stop_monitor(ctx, st)
            raise
        _monitor_call(ctx, st, Request(Op.START))
        st.started = True
        ctx.store.save(st)
        hooks.run_hooks_warn("poststart", st.poststart_hooks, _hook_state(st, Status.RUNNING))


def run(
    ctx: Context,
    container_id: str,
    bundle_path: str,
    pid_file: str | None,
    console_socket: str | None,
    detach: bool,
    keep: bool = False,
) -> int:
    """create + start, then (unless detached) wait, relay signals, delete; the exit status."""
    import sys

    use_stdio_tty = not detach and not console_socket
    st = create(ctx, container_id, bundle_path, pid_file, console_socket, use_stdio_tty)
    saved_tty: list[Any] | None = None
    try:
        terminal = _is_terminal_spec(st)
        if use_stdio_tty and terminal and os.isatty(0):
            import termios
            import tty

            saved_tty = termios.tcgetattr(0)
            tty.setraw(0)
        start(ctx, container_id)
    except BaseException:
        _restore_tty(saved_tty)
        with contextlib.suppress(BonnevilleError):
            delete(ctx, container_id, force=True)
        raise
    if detach:
        return 0
    forwarded = [s for s in range(1, signal.NSIG) if s not in _UNFORWARDED]
    for signum in forwarded:
        with contextlib.suppress(OSError, ValueError):
            signal.signal(signum, lambda n, _f: _forward(st.pid, n))
    try:
        while True:
            try:
                _, wait_status = os.waitpid(st.pid, 0)
                break
            except InterruptedError:
                continue
    finally:
        _restore_tty(saved_tty)
        for signum in forwarded:
            with contextlib.suppress(OSError, ValueError):
                signal.signal(signum, signal.SIG_DFL)
    status = os.waitstatus_to_exitcode(wait_status)
    if status < 0:
        status = 128 - status
    sys.stdout.flush()
    if not keep:
        with contextlib.suppress(BonnevilleError):
            delete(ctx, container_id, force=True)
    return status


_UNFORWARDED = {signal.SIGKILL, signal.SIGSTOP, signal.SIGCHLD, signal.SIGPIPE}


def _forward(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)


def _restore_tty(saved: list[Any] | None) -> None:
    if saved is not None:
        import termios

        with contextlib.suppress(OSError):
            termios.tcsetattr(0, termios.TCSADRAIN, saved)


def _is_terminal_spec(st: ContainerState) -> bool:
    try:
        with open(os.path.join(st.bundle, "config.json"), "rb") as f:
            return bool((json.load(f).get("process") or {}).get("terminal"))
    except (OSError, ValueError, AttributeError):
        return False


# ---- kill / delete / state / list ------------------------------------------------------------


def kill(ctx: Context, container_id: str, signum: int, all_processes: bool = False) -> None:
    with locked(ctx, container_id) as (st, status):
        if not status.can_kill:
            raise InvalidState("container not running", status.value)
        if signum == 0:
            return  # kill(2)'s signal 0: the check above is all it asks for
        request = Request(Op.SIGNAL, signal=signum, all=all_processes)
        try:
            if signum == signal.SIGKILL:
                # A guest that does not confirm soon gets the same end through its monitor.
                _monitor_call(ctx, st, request, KILL_TIMEOUT)
            else:
                _monitor_call(ctx, st, request)
        except BonnevilleError:
            if signum != signal.SIGKILL:
                raise
            # A wedged monitor must not make SIGKILL fail: kill it, its VM dies with it.
            _forward(st.pid, signal.SIGKILL)
            _destroy_vm(ctx, st)


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


def _stop_monitor(ctx: Context, st: ContainerState) -> None:
    """End the container: ask the monitor to power off, then make sure of it."""
    if procfs.is_alive(st.pid, st.pid_start):
        with contextlib.suppress(BonnevilleError):
            _monitor_call(ctx, st, Request(Op.DESTROY), timeout=5)
        if not _wait_gone(st.pid, st.pid_start, MONITOR_EXIT_TIMEOUT):
            _forward(st.pid, signal.SIGKILL)
            _wait_gone(st.pid, st.pid_start, MONITOR_EXIT_TIMEOUT)
    _destroy_vm(ctx, st)


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
        _forward(st.creator_pid, signal.SIGKILL)
    _stop_monitor(ctx, st)
    # Also after a crash of the monitor or of create: the state names the cgroup.
    cgroups.remove(st.cgroup, st.cgroup_unit)
    hooks.run_hooks_warn("poststop", st.poststop_hooks, _hook_state(st, Status.STOPPED))
    ctx.store.remove(container_id)


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


def pause(ctx: Context, container_id: str) -> None:
    with locked(ctx, container_id) as (st, status):
        if not status.can_pause:
            raise InvalidState(f"container not running: {status.value}", status.value)
        _monitor_call(ctx, st, Request(Op.PAUSE))
        st.paused = True
        ctx.store.save(st)


def resume(ctx: Context, container_id: str) -> None:
    with locked(ctx, container_id) as (st, status):
        if not status.can_resume:
            raise InvalidState("container not paused", status.value)
        _monitor_call(ctx, st, Request(Op.RESUME))
        st.paused = False
        ctx.store.save(st)


# ---- exec -----------------------------------------------------------------------------------


def exec_process(
    ctx: Context,
    container_id: str,
    process: dict[str, Any],
    console_socket: str | None = None,
    detach: bool = False,
    pid_file: str | None = None,
) -> int:
    """Run ``process`` (an OCI process object) in a running container; its exit status
    (0 with ``detach``, once it runs). The PID in ``pid_file`` is its host proxy."""
    from bonneville.shim.execproxy import ExecProxy
    from bonneville.spec.config import parse_process

    parse_process(process, "process")
    if process.get("terminal") and not console_socket and detach:
        raise BonnevilleError(
            "cannot allocate tty if bonneville will detach without setting console socket"
        )
    with locked(ctx, container_id, exclusive=False) as (st, status):
        if not status.can_exec:
            raise InvalidState(f"cannot exec in a {status.value} container", status.value)
    _enter_cgroup_as_proxy(st)
    proxy = ExecProxy(control_socket(ctx, st), process, console_socket, st.id if st.sandbox else "")
    if not detach:
        proxy.start()
        if pid_file:
            write_pid_file(pid_file, os.getpid())
        return proxy.relay()
    ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:
        os.close(ready_r)
        status_code = 1
        try:
            proxy.start()

            def ready() -> None:
                os.write(ready_w, b"\n")
                os.close(ready_w)

            status_code = proxy.relay(ready)
        except BaseException as exc:
            with contextlib.suppress(OSError):
                os.write(ready_w, ("E" + str(exc).replace("\n", " ") + "\n").encode())
        finally:
            os._exit(status_code)
    os.close(ready_w)
    with os.fdopen(ready_r, "rb") as reader:
        answer = reader.readline().decode(errors="replace")
    if answer != "\n":
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
        raise BonnevilleError(answer[1:].strip() or "exec failed")
    if pid_file:
        write_pid_file(pid_file, pid)
    return 0


def _enter_cgroup_as_proxy(st: ContainerState) -> None:
    """Join the container's cgroup, as runc's exec'd process does: the proxy is the host
    process that stands for the guest one (with --detach, the child forked from here). It
    offers itself first to the host's OOM killer, so an exec storm that fills the cgroup costs
    proxies, not the VM."""
    if not st.cgroup:
        return
    try:
        cgroups.join(st.cgroup, os.getpid())
    except BonnevilleError as exc:
        log.warning("exec in %s: the proxy stays outside its cgroup: %s", st.id, exc)
        return
    with contextlib.suppress(OSError), open("/proc/self/oom_score_adj", "w") as f:
        f.write("1000")


def process_for_exec(
    st_bundle: str,
    args: list[str],
    env: list[str],
    cwd: str | None,
    user: str | None,
    tty: bool,
) -> dict[str, Any]:
    """runc's exec without --process: the container's own process with these changes."""
    from bonneville.spec.config import load_bundle

    raw = dict(load_bundle(st_bundle, validate=False).raw.get("process") or {})
    if not args:
        raise BonnevilleError("exec: a command or --process is required")
    raw["args"] = args
    raw["terminal"] = tty
    raw.pop("consoleSize", None)
    if env:
        raw["env"] = list(raw.get("env") or []) + env
    if cwd:
        raw["cwd"] = cwd
    if user:
        uid, _, gid = user.partition(":")
        if not uid.isdigit() or (gid and not gid.isdigit()):
            raise BonnevilleError(f"invalid user {user!r}: want UID[:GID]")
        raw["user"] = {**(raw.get("user") or {}), "uid": int(uid), "gid": int(gid or 0)}
    return raw


def bundle_of(ctx: Context, container_id: str) -> str:
    with ctx.store.lock(container_id, exclusive=False):
        return ctx.store.load(container_id).bundle


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
        pids += [pid for pid in cgroups.processes(st.cgroup) if pid not in pids]
        return pids


# ---- update / stats -------------------------------------------------------------------------


def update(ctx: Context, container_id: str, resources: dict[str, Any]) -> None:
    """Change the limits of a created or running container, inside its VM."""
    with locked(ctx, container_id) as (st, status):
        if status is Status.STOPPED:
            raise InvalidState(f"container not running: {status.value}", status.value)
        if status is Status.PAUSED:
            # The agent that writes the limits is frozen with the rest of the VM.
            raise InvalidState("container is paused: resume it to update its limits", "paused")
        _monitor_call(ctx, st, Request(Op.UPDATE, resources=resources))
        _update_host_cgroup(ctx, st, resources)


def _update_host_cgroup(ctx: Context, st: ContainerState, resources: dict[str, Any]) -> None:
    """The host's bound on the VM follows the guest's new limits: CPU bandwidth is the new
    quota (at most the vCPUs) plus QEMU's allowance, the weight the new shares. Memory and
    pids stay: the VM's RAM is fixed at boot (a guest limit moves only below it) and guest
    processes are not host tasks. A pod member's cgroup holds only its relay; a pod's owner
    with members keeps the bound its grown VM was given."""
    if not st.cgroup or st.sandbox:
        return
    quota, period, shares = cgroups.cpu_fields(resources)
    host_quota: int | None = None
    host_period = cgroups.DEFAULT_CPU_PERIOD_US
    if (quota is not None or period is not None) and not _has_members(ctx, st.id):
        host_quota, host_period = cgroups.cpu_quota(st.vm_vcpus, quota, period)
    limits = cgroups.Limits(
        cpu_quota=host_quota,
        cpu_period=host_period,
        cpu_shares=shares if shares and not _is_pod_sandbox(st.annotations) else None,
    )
    cgroups.apply(st.cgroup, limits)


def _has_members(ctx: Context, owner: str) -> bool:
    """Whether a container of this root runs in ``owner``'s VM."""
    for container_id in ctx.store.ids():
        with contextlib.suppress(BonnevilleError):
            other = ctx.store.load(container_id)
            if other.sandbox == owner and refresh(ctx, other) is not Status.STOPPED:
                return True
    return False


def stats(ctx: Context, container_id: str) -> dict[str, Any]:
    """The container's resource usage, read from its cgroup inside the VM (runc's Stats)."""
    with locked(ctx, container_id, exclusive=False) as (st, status):
        if status is Status.STOPPED:
            raise InvalidState(f"container not running: {status.value}", status.value)
        if status is Status.PAUSED:
            # A paused VM cannot answer; runc reads the frozen cgroup, we have nothing to read.
            raise InvalidState("container is paused: its VM cannot report statistics", "paused")
        reply = _monitor_call(ctx, st, Request(Op.STATS))
    raw = reply.get("stats")
    return raw if isinstance(raw, dict) else {}
