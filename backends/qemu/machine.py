"""Starting QEMU for the QEMU backend (backend.py): the process and its QMP handshake, cold
boots, clones restored from a template, and templates saved from a booted VM.

backend.py is what every command imports (is the VM alive, end it); this module is imported
only to launch a VM, and a monitor imports it ahead (backend.PRELOAD) while `create` gets ready.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import re
import select
import shlex
import signal
import socket
import subprocess
import time
from collections.abc import Callable

from bonneville.backends import procfs
from bonneville.backends.base import HOTPLUG_BLOCK_MIB, VM, VMConfig
from bonneville.backends.qemu import template as templates
from bonneville.backends.qemu.cmdline import Boot, BootMode, QemuOptions, build_argv
from bonneville.backends.qemu.qmp import QMPClient
from bonneville.guest import protocol
from bonneville.spec.errors import BackendError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

log = logging.getLogger("bonneville.qemu")

# QEMU needs nothing from the caller's environment; LC_ALL=C keeps its messages unlocalised.
QEMU_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"}
# QEMU answers QMP in ~0.03 s (measured); the margin covers several VMs starting on 2 cores.
START_TIMEOUT = 10.0
# A template boots cold once (seconds under TCG; much more on a loaded host).
TEMPLATE_BOOT_TIMEOUT = 120.0
# Saving and restoring move only device state (RAM stays in the file): well under a second.
MIGRATION_TIMEOUT = 30.0
# The NICs of a template carry these MACs; each clone's agent sets the container's own.
TEMPLATE_MAC = "52:54:00:00:00:{:02x}"

_PR_SET_PDEATHSIG = 1
_PR_SET_THP_DISABLE = 41
_QEMU_ERROR = re.compile(r"^qemu[\w.-]*: ")


def _die_with_parent(no_huge_pages: bool = False) -> Callable[[], None]:
    """A preexec_fn making the child get SIGKILL when its parent thread dies.

    libc is resolved here, before the fork: the child may only call async-signal-safe code.
    The signal follows the *thread* that forked, so launch from a thread that outlives the VM
    (the monitor launches from its main thread). With ``no_huge_pages`` the child (and what it
    execs: the flag survives execve) gets no transparent huge pages.
    """
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    parent = os.getpid()

    def preexec() -> None:
        if prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            os._exit(127)
        # The parent may have died between fork and prctl: then no signal will ever come.
        if os.getppid() != parent:
            os._exit(127)
        if no_huge_pages and prctl(_PR_SET_THP_DISABLE, 1, 0, 0, 0) != 0:
            os._exit(127)

    return preexec


def _error_line(path: str, offset: int) -> str:
    """QEMU's error message in its log after ``offset``: its last ``qemu…: `` line.

    QEMU prefixes errors with its program name; hints such as "Use -machine help…" follow them
    and would hide the cause if we just took the last line.
    """
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(offset, size - 4096))
            tail = f.read()
    except OSError:
        return ""
    lines = [line.strip() for line in tail.decode(errors="replace").splitlines()]
    lines = [line for line in lines if line]
    errors = [line for line in lines if _QEMU_ERROR.match(line)]
    return (errors or lines or [""])[-1]


def _set_ignore_shared(qmp: QMPClient) -> None:
    """RAM in the shared memory file is not part of the migration stream: the file is the RAM.
    (And MIGRATION events report progress, so nobody polls.)"""
    qmp.execute(
        "migrate-set-capabilities",
        capabilities=[
            {"capability": "x-ignore-shared", "state": True},
            {"capability": "events", "state": True},
        ],
    )


def _wait_migration(qmp: QMPClient, deadline: float) -> None:
    """Until the outgoing migration has completed."""
    while True:
        event = qmp.wait_event("MIGRATION", timeout=max(0.0, deadline - time.monotonic()))
        status = (event.get("data") or {}).get("status")
        if status == "completed":
            return
        if status in ("failed", "cancelled"):
            info = qmp.execute("query-migrate") or {}
            raise BackendError(f"migration {status}: {info.get('error-desc', status)}")


def _wait_agent_ready(channel: socket.socket, deadline: float) -> None:
    """Until the agent's first message ("ready"): it runs and its port is open."""
    decoder = protocol.Decoder()
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise BackendError("the template VM's agent did not become ready")
        readable, _, _ = select.select([channel], [], [], remaining)
        if not readable:
            continue
        data = channel.recv(65536)
        if not data:
            raise BackendError("the template VM ended before its agent was ready")
        for ftype, _stream, payload in decoder.feed(data):
            if ftype == protocol.CONTROL:
                message = json.loads(payload)
                if message.get("op") == "log" and str(message.get("msg", "")).startswith("ready"):
                    return


class QemuVM(VM):
    def __init__(
        self,
        proc: subprocess.Popen[bytes],
        pidfd: int,
        channel: socket.socket,
        qmp: QMPClient,
        log_path: str = "",
        log_offset: int = 0,
    ) -> None:
        self.log_path = log_path
        self.log_offset = log_offset  # where QEMU's own messages start in its log
        self._proc = proc
        self._pidfd = pidfd
        self._channel = channel
        self._qmp = qmp
        self._start = procfs.start_time(proc.pid)
        self._released = False
        self._dimms = 0

    @property
    def channel(self) -> socket.socket:
        return self._channel

    @property
    def pid(self) -> int:
        return self._proc.pid

    @property
    def qmp(self) -> QMPClient:
        """The VM's QMP connection (for tests and, later, template saving)."""
        return self._qmp

    def exit_fd(self) -> int:
        return self._pidfd

    def poll(self) -> bool:
        return self._proc.poll() is not None

    def private_state(self) -> dict[str, Any]:
        return {"pid": self._proc.pid, "start_time": self._start}

    def pause(self) -> None:
        self._qmp.execute("stop")

    def resume(self) -> None:
        self._qmp.execute("cont")

    def add_memory(self, mib: int) -> None:
        """A DIMM of ``mib`` MiB of anonymous RAM (allocated as the guest touches it); ACPI tells
        the guest, whose agent onlines it."""
        if mib <= 0 or mib % HOTPLUG_BLOCK_MIB:
            raise BackendError(f"memory is added in multiples of {HOTPLUG_BLOCK_MIB} MiB")
        self._dimms += 1
        name = f"hp{self._dimms}"
        self._qmp.execute(
            "object-add", **{"qom-type": "memory-backend-ram", "id": name, "size": mib << 20}
        )
        try:
            self._qmp.execute("device_add", driver="pc-dimm", id=f"dimm{self._dimms}", memdev=name)
        except BackendError:
            with contextlib.suppress(BackendError):
                self._qmp.execute("object-del", id=name)
            raise

    def add_vcpus(self, total: int) -> int:
        slots = self._qmp.execute("query-hotpluggable-cpus") or []
        present = sum(1 for slot in slots if slot.get("qom-path"))
        for slot in slots:
            if present >= total:
                break
            if slot.get("qom-path"):
                continue
            props = {k: v for k, v in (slot.get("props") or {}).items() if k != "node-id"}
            self._qmp.execute("device_add", driver=slot["type"], id=f"cpu{present}", **props)
            present += 1
        return present

    def stop(self, timeout: float = 5.0) -> None:
        if self._released:
            return
        deadline = time.monotonic() + timeout
        if self._proc.poll() is None:
            try:
                self._qmp.command("quit", timeout=max(0.1, min(2.0, timeout)))
            except BackendError:
                # No answer (hung, or already exiting and gone from the socket): a signal
                # reaches QEMU even when its monitor does not.
                self._signal(signal.SIGTERM)
            if not procfs.wait_fd(self._pidfd, deadline):
                self._signal(signal.SIGKILL)
        self._proc.wait()
        self._release()

    def _signal(self, signum: int) -> None:
        # Through the pidfd: it names this very process, reaped or not, never a reused PID.
        try:
            signal.pidfd_send_signal(self._pidfd, signum)
        except ProcessLookupError:
            pass

    def _release(self) -> None:
        self._released = True
        self._qmp.close()
        self._channel.close()
        os.close(self._pidfd)


class TemplateUnusable(BackendError):
    """A clone could not be restored from its template (so the template is discarded)."""


def launch(config: VMConfig, options: QemuOptions, clone: bool) -> QemuVM:
    """A clone of the template for this VM's shape (built now if missing), or a cold boot
    when cloning is off or impossible (the log says why)."""
    if not clone:
        log.info("cold boot: cloning is disabled")
        return spawn(config, options, Boot())
    spec = template_spec(config, options)
    try:
        template, built = templates.ensure(spec, build_template)
    except BackendError as exc:
        log.warning("cold boot: cannot build a template (%s)", exc)
        return spawn(config, options, Boot())
    if built:
        log.info("built template %s", template.key)
    try:
        vm = clone_template(config, options, template)
    except TemplateUnusable as exc:
        log.warning("cold boot: template %s is unusable (%s), removed", template.key, exc)
        with contextlib.suppress(BackendError):
            templates.remove(template.key)
        return spawn(config, options, Boot())
    log.info("cloned from template %s", template.key)
    return vm


def template_for(
    memory_mib: int, vcpus: int, nics: int, options: QemuOptions
) -> templates.TemplateSpec:
    """The template a container VM of that shape would be cloned from (current image)."""
    from bonneville.backends.image import ensure_image

    image = ensure_image()
    return templates.TemplateSpec(
        kernel=image.kernel,
        initrd=image.initrd,
        kernel_args=tuple(image.kernel_args),
        memory_mib=memory_mib,
        vcpus=vcpus,
        nics=nics,
        options=options,
        max_vcpus=os.cpu_count() or 1,
    )


def template_spec(config: VMConfig, options: QemuOptions) -> templates.TemplateSpec:
    """The template a clone for ``config`` comes from."""
    return templates.TemplateSpec(
        kernel=config.kernel,
        initrd=config.initrd,
        kernel_args=config.kernel_args,
        memory_mib=config.memory_mib,
        vcpus=config.vcpus,
        nics=len(config.nics),
        options=options,
        max_vcpus=config.max_vcpus,
    )


def build_template(spec: templates.TemplateSpec, directory: str) -> None:
    """Boot a VM to its agent's ready line and save it into ``directory``."""
    share = os.path.join(directory, "share")
    os.mkdir(share, 0o755)  # stays empty: a template never sees container data
    config = VMConfig(
        container_id=f"template-{os.path.basename(directory).strip('.')[:12]}",
        memory_mib=spec.memory_mib,
        vcpus=spec.vcpus,
        max_vcpus=spec.max_vcpus,
        share_dir=share,
        run_dir=directory,
        kernel=spec.kernel,
        initrd=spec.initrd,
        kernel_args=spec.kernel_args,
        nics=tuple(("", TEMPLATE_MAC.format(i + 1)) for i in range(spec.nics)),
    )
    memory = os.path.join(directory, templates.MEMORY_FILE)
    vm = spawn(config, spec.options, Boot(BootMode.TEMPLATE, memory))
    try:
        _wait_agent_ready(vm.channel, time.monotonic() + TEMPLATE_BOOT_TIMEOUT)
        qmp = vm.qmp
        qmp.execute("stop")
        _set_ignore_shared(qmp)
        state_path = os.path.join(directory, templates.STATE_FILE)
        fd = os.open(state_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            qmp.command("getfd", {"fdname": "template"}, fds=[fd])
        finally:
            os.close(fd)
        qmp.execute("migrate", uri="fd:template")
        _wait_migration(qmp, time.monotonic() + MIGRATION_TIMEOUT)
    finally:
        vm.stop(timeout=2.0)
    os.rmdir(share)
    # The memory file must never change again: clones map it copy-on-write.
    os.chmod(memory, 0o400)
    os.chmod(state_path, 0o400)


def clone_template(config: VMConfig, options: QemuOptions, template: templates.Template) -> QemuVM:
    """A VM restored from ``template``: its RAM a private mapping of the template's."""
    vm = spawn(config, options, Boot(BootMode.CLONE, template.memory_path))
    try:
        qmp = vm.qmp
        _set_ignore_shared(qmp)
        try:
            fd = os.open(template.state_path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise TemplateUnusable(f"cannot open its state: {exc.strerror}") from exc
        try:
            qmp.command("getfd", {"fdname": "template"}, fds=[fd])
        finally:
            os.close(fd)
        qmp.execute("migrate-incoming", uri="fd:template")
        try:
            _wait_migration(qmp, time.monotonic() + MIGRATION_TIMEOUT)
        except BackendError as exc:
            raise TemplateUnusable(_error_line(vm.log_path, vm.log_offset) or str(exc)) from exc
        # The template was saved stopped, so its clones arrive stopped.
        qmp.execute("cont")
    except BaseException:
        vm.stop(timeout=1.0)
        raise
    return vm


def spawn(config: VMConfig, options: QemuOptions, boot: Boot) -> QemuVM:
    """Start QEMU for ``config``; return once it answers QMP (its agent's port is connected)."""
    os.makedirs(config.run_dir, exist_ok=True)
    log_path = os.path.join(config.run_dir, "qemu.log")
    agent, agent_qemu = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    qmp_sock, qmp_qemu = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    proc: subprocess.Popen[bytes] | None = None
    try:
        argv = build_argv(
            config,
            agent_fd=agent_qemu.fileno(),
            qmp_fd=qmp_qemu.fileno(),
            options=options,
            boot=boot,
        )
        with open(log_path, "wb") as log:
            # The command line heads the log (for whoever debugs a VM); QEMU's own
            # messages follow, and only those are quoted in a launch error.
            log.write(f"# {shlex.join(argv)}\n".encode())
            log.flush()
            log_offset = log.tell()
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log,
                close_fds=True,
                pass_fds=(agent_qemu.fileno(), qmp_qemu.fileno()),
                env=QEMU_ENV,
                # Its own session: terminal signals meant for the caller must not reach
                # QEMU; the monitor decides what the VM gets.
                start_new_session=True,
                # Under TCG QEMU asks for huge pages for its translation cache, whose
                # last one is then mostly empty, and for some of its heap: 2.4 MiB more
                # per idle clone (measured), and no speed-up that 20 interleaved
                # `docker run`s could tell from the noise.
                preexec_fn=_die_with_parent(no_huge_pages=options.accel == "tcg"),
            )
    except OSError as exc:
        agent.close()
        qmp_sock.close()
        raise BackendError(f"cannot start {options.binary}: {exc.strerror or exc}") from exc
    finally:
        # QEMU holds its own copies now: ours would keep the sockets open after it exits.
        agent_qemu.close()
        qmp_qemu.close()

    qmp = QMPClient(qmp_sock)
    pidfd = -1
    try:
        pidfd = os.pidfd_open(proc.pid)
        qmp.handshake(START_TIMEOUT)
    except BackendError as exc:
        status = _discard(proc, pidfd)
        agent.close()
        qmp.close()
        line = _error_line(log_path, log_offset)
        detail = line or f"QEMU exited with status {status} ({exc})"
        raise BackendError(f"cannot start the VM: {detail}") from exc
    except BaseException:
        _discard(proc, pidfd)
        agent.close()
        qmp.close()
        raise
    return QemuVM(proc, pidfd, agent, qmp, log_path, log_offset)


def _discard(proc: subprocess.Popen[bytes], pidfd: int) -> int:
    """Make sure a QEMU that failed to start is gone and reaped; its exit status."""
    # A QEMU that rejected its arguments is already exiting: give it a moment so its error
    # message is complete in the log, then kill whatever is left.
    if pidfd < 0 or not procfs.wait_fd(pidfd, time.monotonic() + 1.0):
        proc.kill()
    status = proc.wait()
    if pidfd >= 0:
        os.close(pidfd)
    return status
