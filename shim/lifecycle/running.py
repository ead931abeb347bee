"""The commands that act on a created or running container: `start`, `run` (create, start,
wait), `kill`, `pause`/`resume`, `exec` (through a host proxy) and `update`."""

from __future__ import annotations

import contextlib
import json
import os
import signal
from typing import Any

from bonneville.shim import hooks
from bonneville.shim.control import Op, Request
from bonneville.shim.lifecycle import creation, hostcgroup, teardown
from bonneville.shim.lifecycle.context import (
    Context,
    control_socket,
    hook_state,
    locked,
    monitor_call,
    send_signal,
    write_pid_file,
)
from bonneville.shim.state import ContainerState
from bonneville.shim.status import Status
from bonneville.spec.errors import BonnevilleError, HookError, InvalidState

KILL_TIMEOUT = 5.0  # for the guest to confirm a SIGKILL before its monitor is killed instead


def start(ctx: Context, container_id: str) -> None:
    with locked(ctx, container_id) as (st, status):
        if not status.can_start:
            if status is Status.STOPPED:
                raise InvalidState("cannot start a container that has stopped", status.value)
            raise InvalidState(f"cannot start an already {status.value} container", status.value)
        try:
            hooks.run_hooks(
                "startContainer", st.start_container_hooks, hook_state(st, Status.CREATED)
            )
        except HookError:
            teardown.stop_monitor(ctx, st)
            raise
        monitor_call(ctx, st, Request(Op.START))
        st.started = True
        ctx.store.save(st)
        hooks.run_hooks_warn("poststart", st.poststart_hooks, hook_state(st, Status.RUNNING))


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
    st = creation.create(ctx, container_id, bundle_path, pid_file, console_socket, use_stdio_tty)
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
            teardown.delete(ctx, container_id, force=True)
        raise
    if detach:
        return 0
    forwarded = [s for s in range(1, signal.NSIG) if s not in _UNFORWARDED]
    for signum in forwarded:
        with contextlib.suppress(OSError, ValueError):
            signal.signal(signum, lambda n, _f: send_signal(st.pid, n))
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
            teardown.delete(ctx, container_id, force=True)
    return status


_UNFORWARDED = {signal.SIGKILL, signal.SIGSTOP, signal.SIGCHLD, signal.SIGPIPE}


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
                monitor_call(ctx, st, request, KILL_TIMEOUT)
            else:
                monitor_call(ctx, st, request)
        except BonnevilleError:
            if signum != signal.SIGKILL:
                raise
            # A wedged monitor must not make SIGKILL fail: kill it, its VM dies with it.
            send_signal(st.pid, signal.SIGKILL)
            teardown.destroy_vm(ctx, st)


def pause(ctx: Context, container_id: str) -> None:
    with locked(ctx, container_id) as (st, status):
        if not status.can_pause:
            raise InvalidState(f"container not running: {status.value}", status.value)
        monitor_call(ctx, st, Request(Op.PAUSE))
        st.paused = True
        ctx.store.save(st)


def resume(ctx: Context, container_id: str) -> None:
    with locked(ctx, container_id) as (st, status):
        if not status.can_resume:
            raise InvalidState("container not paused", status.value)
        monitor_call(ctx, st, Request(Op.RESUME))
        st.paused = False
        ctx.store.save(st)


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
    hostcgroup.join_as_proxy(st)
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


def update(ctx: Context, container_id: str, resources: dict[str, Any]) -> None:
    """Change the limits of a created or running container, inside its VM."""
    with locked(ctx, container_id) as (st, status):
        if status is Status.STOPPED:
            raise InvalidState(f"container not running: {status.value}", status.value)
        if status is Status.PAUSED:
            # The agent that writes the limits is frozen with the rest of the VM.
            raise InvalidState("container is paused: resume it to update its limits", "paused")
        monitor_call(ctx, st, Request(Op.UPDATE, resources=resources))
        hostcgroup.update_limits(ctx, st, resources)
