"""The QEMU backend: one QEMU process per container, driven over QMP, agent on virtio-serial.

This module answers what every command asks (is the VM alive? end it); machine.py, imported
only to launch a VM, starts QEMU. The monitor launches QEMU as its own child. Both QEMU's
monitor (QMP) and the agent's port are socketpairs handed to QEMU as already-connected
descriptors. QEMU never sees the caller's stdio
(containerd waits for every writer of the runtime's output pipe to close), and it dies with the
monitor (PR_SET_PDEATHSIG), so a SIGKILLed monitor never leaves a VM running.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from bonneville.backends import procfs
from bonneville.backends.base import VM, Backend, Capability, VMConfig
from bonneville.spec.errors import BackendError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from bonneville.backends.qemu import template as templates
    from bonneville.backends.qemu.cmdline import QemuOptions

ACCEL_ENV = "BONNEVILLE_ACCEL"
CLONE_ENV = "BONNEVILLE_CLONE"
# After SIGKILL a process is gone within milliseconds unless the kernel is stuck on I/O.
KILL_WAIT = 5.0
# What a launch imports (machine.py and its own imports: ~10 ms a CLI call does without): a
# monitor imports it ahead, while `create` gets ready (backends.base.preload_backend).
PRELOAD = ("bonneville.backends.qemu.machine",)


def detect_accel(
    environ: Mapping[str, str] | None = None,
    cpuinfo: str = "/proc/cpuinfo",
    kvm_device: str = "/dev/kvm",
) -> str:
    """ "kvm" if the CPU has VMX/SVM and /dev/kvm opens, else "tcg"; $BONNEVILLE_ACCEL wins."""
    environ = os.environ if environ is None else environ
    forced = environ.get(ACCEL_ENV, "").strip()
    if forced:
        if forced not in ("tcg", "kvm"):
            raise BackendError(f"{ACCEL_ENV} must be tcg or kvm, not {forced!r}")
        return forced
    # /dev/kvm can exist (and even open) where guests cannot run, e.g. nested without VMX
    # exposed: both facts must hold.
    try:
        with open(cpuinfo, encoding="ascii", errors="replace") as f:
            has_vt = any(
                line.startswith("flags") and {"vmx", "svm"} & set(line.split()) for line in f
            )
    except OSError:
        has_vt = False
    if not has_vt:
        return "tcg"
    try:
        fd = os.open(kvm_device, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return "tcg"
    os.close(fd)
    return "kvm"


def clone_enabled() -> bool:
    """Whether VMs start as clones of templates ($BONNEVILLE_CLONE, else [qemu] clone, else on)."""
    from bonneville.spec import settings

    return settings.get_bool("qemu", "clone", env=CLONE_ENV, default=True)


class QemuBackend(Backend):
    name = "qemu"
    capabilities = frozenset(
        {
            Capability.CLONE,
            Capability.PAUSE,
            Capability.CONSOLE,
            Capability.NETWORK,
            Capability.PODS,
            Capability.HOTPLUG,
            Capability.HOST_NETWORK,
        }
    )

    def __init__(self, options: QemuOptions | None = None, clone: bool | None = None) -> None:
        # options.accel is only used when given explicitly; otherwise it is detected per launch.
        self._options = options
        # None: from the settings ($BONNEVILLE_CLONE, [qemu] clone), read at each launch.
        self._clone = clone

    def options(self) -> QemuOptions:
        """The options the next launch will use (accelerator detected now unless given)."""
        from bonneville.backends.qemu.cmdline import QemuOptions

        if self._options is not None:
            return self._options
        return QemuOptions(accel=detect_accel())

    def launch(self, config: VMConfig) -> VM:
        """A clone of the template for this VM's shape (built now if missing), or a cold boot
        when cloning is off or impossible (the log says why)."""
        from bonneville.backends.qemu import machine

        clone = clone_enabled() if self._clone is None else self._clone
        return machine.launch(config, self.options(), clone)

    def template_for(self, memory_mib: int, vcpus: int, nics: int) -> templates.TemplateSpec:
        """The template a container VM of that shape would be cloned from (current image)."""
        from bonneville.backends.qemu import machine

        return machine.template_for(memory_mib, vcpus, nics, self.options())

    def build_template(self, spec: templates.TemplateSpec, directory: str) -> None:
        """Boot a VM to its agent's ready line and save it into ``directory``."""
        from bonneville.backends.qemu import machine

        machine.build_template(spec, directory)

    def alive(self, private: dict[str, Any]) -> bool:
        return procfs.is_alive(int(private.get("pid", 0)), private.get("start_time"))

    def destroy(self, private: dict[str, Any]) -> None:
        # The caller (delete) removes the VM's files next: wait until QEMU has let go.
        procfs.kill_pinned(int(private.get("pid", 0)), private.get("start_time"), KILL_WAIT)
