"""The birth of a container's processes: its init at ``create`` (let go at ``start``), and the
processes ``exec`` adds.

The init process builds the container itself, in runc's order, inside its new namespaces (a
``proc`` mount must be made from inside its PID namespace): the agent only forks it and reads
its reports. An exec'd process joins the namespaces the init made. Standard library only: this
module goes into the guest image.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket

from bonneville.guest import linux, mounts
from bonneville.guest.common import (
    ExecError,
    Log,
    Refused,
    describe,
    errtext,
    one_line,
    write_file,
)
from bonneville.guest.container import KIND_FLAGS, SHARED_KINDS, Container, Plan, Prepared
from bonneville.guest.mode import Mode
from bonneville.guest.paths import resolve_in_root
from bonneville.guest.process import (
    BUILT,
    EXEC_FAILED,
    FAILED,
    ExecSpec,
    attach_stdio,
    become,
    open_pty,
    read_report,
    report_pair,
    reset_signals,
    send_report,
    set_winsize,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

BUILD_TIMEOUT = 120.0  # a hang guard: a container's build over 9p under TCG takes ~0.1 s


def _fork_in_pid_namespace(ns_fd: int | None, new: bool, own_pid_ns: int) -> int:
    """fork() with the child in a new PID namespace, in the one ``ns_fd`` names, or in ours."""
    if new:
        linux.unshare(linux.CLONE_NEWPID)
    elif ns_fd is not None:
        linux.setns(ns_fd, linux.CLONE_NEWPID)
    pid = -1
    try:
        pid = os.fork()
        return pid
    finally:
        if pid != 0 and (new or ns_fd is not None):
            # Our own next children go to our namespace again (its handle: the agent's own);
            # the child keeps its namespace for the children of its own.
            with contextlib.suppress(OSError):
                linux.setns(own_pid_ns, linux.CLONE_NEWPID)


def _stdio_pipes(spec: ExecSpec) -> tuple[list[int], list[int]]:
    """(our ends, the child's ends) of a process's stdio pipes: stdin's (if wanted), stdout's,
    stderr's. Without stdin the child reads /dev/null."""
    ours: list[int] = []
    theirs: list[int] = []
    if spec.want_stdin:
        in_r, in_w = os.pipe()
        ours.append(in_w)
        theirs.append(in_r)
    else:
        theirs.append(os.open("/dev/null", os.O_RDONLY))
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    ours += [out_r, err_r]
    theirs += [out_w, err_w]
    return ours, theirs


def _await_report(sock: socket.socket, pid: int, what: str) -> tuple[bytes, str, int | None]:
    """The child's next report, or Refused when it hangs (it is killed) or breaks."""
    readable, _, _ = select.select([sock], [], [], BUILD_TIMEOUT)
    if not readable:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        raise Refused(f"{what}: no answer within {BUILD_TIMEOUT:.0f} s")
    try:
        return read_report(sock)
    except OSError as exc:
        raise Refused(f"{what}: {errtext(exc)}") from exc


def _reap_now(pid: int) -> None:
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


def create(
    mode: Mode,
    container: Container,
    config: dict[str, Any],
    spec: ExecSpec,
    plan: Plan,
    others: dict[str, Container],
    own_pid_ns: int,
    log: Log,
) -> None:
    """Fork the container's init, which builds the container in its namespaces and waits
    before execve for ``start`` (as runc's init waits on its exec fifo). Refused with the
    failing step if the build fails; then nothing of it is left."""
    joined = {}
    for kind, other_id in plan.joined().items():
        other = others.get(other_id)
        if other is None or other.exited or kind not in other.ns:
            raise Refused(f"cannot join the {kind} namespace of container {other_id}: not running")
        joined[kind] = other.ns[kind]
    tree = mode.container_dir(container.id)
    source = os.path.join(tree, "root")
    if not os.path.isdir(source):
        raise Refused(f"the container's root {container.id} is not in the VM's share")
    if container.cgroup is not None:
        try:
            os.mkdir(container.cgroup, 0o755)
        except OSError as exc:
            raise Refused(f"create the container's cgroup: {errtext(exc)}") from exc
    try:
        if config.get("resources"):
            if container.cgroup is None:
                log("info", "host mode: resource limits not applied")
            else:
                mode.set_limits(container.cgroup, config["resources"])
        target = mode.root_mountpoint(container.id)
        ours, theirs = ([], []) if spec.terminal else _stdio_pipes(spec)
        report, child_report = report_pair()
        go_r, go_w = os.pipe()
    except BaseException:
        container.remove_cgroup()
        raise
    try:
        pid = _fork_in_pid_namespace(joined.get("pid"), plan.new("pid"), own_pid_ns)
    except BaseException:
        for fd in [*ours, *theirs, go_r, go_w]:
            os.close(fd)
        report.close()
        child_report.close()
        container.remove_cgroup()
        raise
    if pid == 0:  # pragma: no cover - the child execs or exits
        report.close()
        _init_child(
            mode,
            container,
            config,
            spec,
            plan,
            joined,
            source,
            target,
            theirs,
            child_report,
            go_r,
        )
    child_report.close()
    os.close(go_r)
    for fd in theirs:
        os.close(fd)
    try:
        answer, text, master = _await_report(report, pid, "building the container")
    except BaseException:
        for fd in [*ours, go_w]:
            os.close(fd)
        report.close()
        _reap_now(pid)
        container.remove_cgroup()
        raise
    if answer != BUILT:
        for fd in [*ours, go_w]:
            os.close(fd)
        report.close()
        _reap_now(pid)
        container.remove_cgroup()
        raise Refused(text or "the container's init ended while building it")
    for warning in filter(None, text.split("\n")):
        log("warning", warning)
    if master is not None:
        ours = [master]
        if spec.rows and spec.cols:
            with contextlib.suppress(OSError):
                set_winsize(master, spec.rows, spec.cols)
    container.init_pid = pid
    for kind in KIND_FLAGS:
        try:
            container.ns[kind] = os.open(f"/proc/{pid}/ns/{kind}", os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            log("warning", f"container {container.id}: no handle on its {kind} namespace: {exc}")
    container.prepared = Prepared(spec, pid, report, go_w, ours)


def _init_child(
    mode: Mode,
    container: Container,
    config: dict[str, Any],
    spec: ExecSpec,
    plan: Plan,
    joined: dict[str, int],
    source: str,
    target: str,
    stdio: list[int],
    report: socket.socket,
    go: int,
) -> None:
    """In the forked init: build the container (reporting BUILT or FAILED), then become its
    process up to execve, waiting for ``go`` (reporting EXEC_FAILED). Never returns."""
    report_fd = report.detach()
    step = "enter the container's namespaces"
    warnings: list[str] = []
    try:
        reset_signals()
        if container.cgroup is not None:
            step = "join the container's cgroup"
            write_file(f"{container.cgroup}/cgroup.procs", "0")
        for kind in SHARED_KINDS:
            if kind in joined:
                linux.setns(joined[kind], KIND_FLAGS[kind])
        flags = linux.CLONE_NEWNS
        if container.cgroup is not None:
            flags |= linux.CLONE_NEWCGROUP
        for kind in SHARED_KINDS:
            if plan.new(kind):
                flags |= KIND_FLAGS[kind]
        linux.unshare(flags)
        linux.mount(None, "/", None, linux.MS_REC | linux.MS_PRIVATE)
        _build(mode, config, plan, source, target, warnings)
        step = "enter the container's root"
        if mode.pid1:
            mounts.detach_all_but(target)
        mounts.enter_root(target)
        master = slave = None
        if spec.terminal:
            step = "allocate the container's terminal"
            master, slave = open_pty("/dev/pts/ptmx")
            stdio = [slave, slave, slave]
        send_report(report_fd, BUILT, "\n".join(warnings), master)
        if master is not None:
            os.close(master)
    except Refused as exc:
        send_report(report_fd, FAILED, one_line(str(exc)))
        os._exit(1)
    except OSError as exc:
        send_report(report_fd, FAILED, one_line(f"{step}: {errtext(exc)}"))
        os._exit(1)
    except BaseException as exc:
        send_report(report_fd, FAILED, describe(exc))
        os._exit(1)
    try:
        attach_stdio((stdio[0], stdio[1], stdio[2]), slave, spec.uid, {report_fd, go})
        become(spec, go)
    except ExecError as exc:
        send_report(report_fd, EXEC_FAILED, str(exc))
    except OSError as exc:
        send_report(report_fd, EXEC_FAILED, errtext(exc))
    except BaseException as exc:
        send_report(report_fd, EXEC_FAILED, describe(exc))
    os._exit(127)


def _build(
    mode: Mode,
    config: dict[str, Any],
    plan: Plan,
    source: str,
    target: str,
    warnings: list[str],
) -> None:
    """The container's filesystem and names, in runc's order; OSError/Refused name the step."""

    def log(level: str, msg: str) -> None:
        warnings.append(msg)

    step = "mount the container's root"
    try:
        linux.mount(source, target, None, linux.MS_BIND | linux.MS_REC)
        for entry in config.get("mounts") or []:
            step = f"mount {entry.get('type') or 'bind'} on {entry.get('destination')}"
            mounts.mount_one(target, entry, log, os.path.dirname(source))
        dev_is_tmpfs = any(
            os.path.normpath(str(m.get("destination"))) == "/dev" and m.get("type") == "tmpfs"
            for m in config.get("mounts") or []
        )
        if dev_is_tmpfs:
            step = "create default devices in /dev"
            mounts.make_default_devices(target)
        for key, name in (("hostname", "hostname"), ("domainname", "domainname")):
            if config.get(key) and plan.new("uts"):
                step = f"set {key}"
                write_file(f"/proc/sys/kernel/{name}", str(config[key]))
        for key, value in (config.get("sysctl") or {}).items():
            step = f"sysctl {key}"
            if mode.guest_wide:
                write_file("/proc/sys/" + str(key).replace(".", "/"), str(value))
            else:
                log("info", f"host mode: sysctl {key}={value} not applied")
        for path in config.get("readonlyPaths") or []:
            step = f"make {path} read-only"
            mounts.readonly_path(target, str(path))
        for path in config.get("maskedPaths") or []:
            step = f"mask {path}"
            mounts.mask_path(target, str(path))
        if config.get("readonly"):
            step = "remount the root read-only"
            mounts.remount_readonly(target)
    except OSError as exc:
        raise Refused(f"{step}: {errtext(exc)}") from exc


def start(container: Container) -> tuple[int, list[int]]:
    """Let the prepared init go: (its pid, our ends of its stdio). Refused with runc's words
    when its program cannot run."""
    prepared, container.prepared = container.prepared, None
    if prepared is None:
        raise Refused("the container has no prepared process")
    try:
        os.write(prepared.go, b"g")
    except OSError:
        pass  # it died already: its report (or end of file) says why
    os.close(prepared.go)
    try:
        kind, text, _ = _await_report(prepared.report, prepared.pid, "starting the container")
    finally:
        prepared.report.close()
    if kind:
        for fd in prepared.fds:
            os.close(fd)
        raise Refused(text if kind in (EXEC_FAILED, FAILED) else "the container's init failed")
    return prepared.pid, prepared.fds


def exec_process(
    mode: Mode, container: Container, spec: ExecSpec, own_pid_ns: int
) -> tuple[int, list[int]]:
    """Fork a process into the running container's namespaces and cgroup: (its pid, our ends
    of its stdio). Refused with runc's words when it cannot run."""
    slave = None
    if spec.terminal:
        master, slave = open_pty(resolve_in_root(container.root, "/dev/pts/ptmx"))
        if spec.rows and spec.cols:
            set_winsize(master, spec.rows, spec.cols)
        ours, theirs = [master], [slave]
        stdio = (slave, slave, slave)
    else:
        ours, theirs = _stdio_pipes(spec)
        stdio = (theirs[0], theirs[1], theirs[2])
    report, child_report = report_pair()
    try:
        pid = _fork_in_pid_namespace(container.ns.get("pid"), False, own_pid_ns)
    except BaseException:
        for fd in [*ours, *theirs]:
            os.close(fd)
        report.close()
        child_report.close()
        raise
    if pid == 0:  # pragma: no cover - the child execs or exits
        report.close()
        report_fd = child_report.detach()
        try:
            reset_signals()
            if container.cgroup is not None:
                write_file(f"{container.cgroup}/cgroup.procs", "0")
            for name in ("cgroup", *SHARED_KINDS, "mnt"):
                if name in container.ns:
                    linux.setns(container.ns[name], KIND_FLAGS[name])
            attach_stdio(stdio, slave, spec.uid, {report_fd})
            become(spec)
        except ExecError as exc:
            send_report(report_fd, EXEC_FAILED, str(exc))
        except OSError as exc:
            send_report(report_fd, EXEC_FAILED, errtext(exc))
        except BaseException as exc:
            send_report(report_fd, EXEC_FAILED, describe(exc))
        os._exit(127)
    child_report.close()
    for fd in theirs:
        os.close(fd)
    try:
        answer, text, _ = _await_report(report, pid, "starting the process")
    finally:
        report.close()
    if answer:
        _reap_now(pid)
        for fd in ours:
            os.close(fd)
        raise Refused(text or "the process failed to start")
    return pid, ours
