"""The QEMU command line of one container's VM, built from a VMConfig (a pure function).

Nothing here touches the system: the QEMU binary, the accelerator and the descriptors of the
already-connected sockets are passed in, so the output is stable and golden-file tested
(``tests/golden/qemu/``). A cold boot, a template boot and a clone of a template differ only in
how guest RAM is backed and whether QEMU waits for an incoming migration (see DESIGN.md,
"Instant clone"); every device must be identical between a template and its clones, which is
why one function builds all three.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from bonneville.backends.base import (
    HOTPLUG_BLOCK_MIB,
    HOTPLUG_SLOTS,
    MAX_MEMORY_MIB,
    USER_NIC,
    VMConfig,
)
from bonneville.guest.protocol import PORT_NAME, ROOT_TAG

# Under TCG the translation-block cache may grow to 1 GiB per VM (QEMU's default), and what it
# fills stays resident. A clone's cache holds only what ran since its restore (~26 MiB after a
# `docker run`): 64 MiB bounds a long-running guest at no cost; 16 MiB made `docker run` 0.5 s
# slower (constant retranslation). A boot translates the kernel's init code and the agent's
# Python start besides, ~70 MiB with the Debian kernel: at 64 MiB the cache overflowed and was
# flushed near the end of every boot (measured: a guest Python that imports the agent and exits
# done at 3.48 s against 3.11 s with 96 MiB or more, medians of 4 interleaved boots). Boots
# (cold, a template's, whose cache clones do not inherit, and every libvirt VM's) get at least
# BOOT_TB_SIZE_MIB.
DEFAULT_TB_SIZE_MIB = 64
BOOT_TB_SIZE_MIB = 128

SANDBOX = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"


class BootMode(enum.Enum):
    COLD = "cold"  # anonymous RAM, boots the kernel
    TEMPLATE = "template"  # RAM in a shared file that becomes the template's memory image
    CLONE = "clone"  # private copy-on-write mapping of a template's memory, waits for its state


@dataclass(frozen=True)
class Boot:
    """How guest RAM is backed: ``memory_file`` is the template's memory (TEMPLATE and CLONE)."""

    mode: BootMode = BootMode.COLD
    memory_file: str = ""

    def __post_init__(self) -> None:
        if (self.mode is BootMode.COLD) != (not self.memory_file):
            raise ValueError("a memory file goes with template and clone boots only")


@dataclass(frozen=True)
class QemuOptions:
    """Host-side choices that are not part of a container's VMConfig."""

    binary: str = "qemu-system-x86_64"
    accel: str = "tcg"  # "tcg" or "kvm"; detected by the backend, never assumed
    # q35, pc or microvm (with its own options, e.g. "microvm,pit=off"); see _bus().
    machine: str = "q35"
    # None: cpu_model() picks it (`max` without ERMS under TCG, `host` under KVM).
    cpu: str | None = None
    # The translation cache's bound (a boot's is at least BOOT_TB_SIZE_MIB); None: QEMU's 1 GiB.
    tb_size_mib: int | None = DEFAULT_TB_SIZE_MIB
    sandbox: bool = True
    rng: bool = True
    vmgenid: bool = True


def escape(value: str) -> str:
    """A value inside a QEMU option list: a comma is written as two."""
    return value.replace(",", ",,")


def _bus(machine: str) -> str:
    """Suffix of virtio device names: microvm has no PCI bus, only virtio-mmio."""
    return "device" if machine.split(",", 1)[0] == "microvm" else "pci"


def max_memory_mib(config: VMConfig) -> int:
    """The RAM the VM may grow to: MAX_MEMORY_MIB, or its own RAM plus a block if larger."""
    return max(MAX_MEMORY_MIB, config.memory_mib + HOTPLUG_BLOCK_MIB)


def cpu_model(options: QemuOptions) -> str:
    """The ``-cpu`` value: the host's CPU under KVM; under TCG, ``max`` without ERMS.

    ``max`` offers x86-64-v2 and v3 (SSE4.2, POPCNT, AVX2...), which the glibc of newer
    distributions requires (RHEL 9 refuses to start without v2): ``qemu64`` would break those
    container images. ERMS ("enhanced REP MOVSB") makes the guest kernel and glibc copy and
    clear memory with ``rep movsb``, which TCG emulates one byte per iteration; without it they
    use ``rep movsq`` and vector loops. Measured: the guest reaches /init 0.26 s sooner (uptime
    2.01 -> 1.75 s, medians of 5 interleaved boots): unpacking the initramfs and clearing pages
    are memory copies. Part of every template's key, so changing it rebuilds the templates.
    """
    if options.cpu is not None:
        return options.cpu
    return "host" if options.accel == "kvm" else "max,erms=off"


def build_argv(
    config: VMConfig,
    *,
    agent_fd: int,
    qmp_fd: int,
    options: QemuOptions,
    boot: Boot | None = None,
) -> list[str]:
    """The argv that runs ``config`` as a VM (argv[0] is the QEMU binary)."""
    boot = boot or Boot()
    bus = _bus(options.machine)
    run_dir = config.run_dir.rstrip("/") or "/"

    accel = options.accel
    if accel == "tcg" and options.tb_size_mib is not None:
        tb_size = options.tb_size_mib
        if boot.mode is not BootMode.CLONE:
            tb_size = max(tb_size, BOOT_TB_SIZE_MIB)
        accel += f",tb-size={tb_size}"
    machine = options.machine
    if boot.mode is not BootMode.COLD:
        machine += ",memory-backend=mem"

    argv = [
        options.binary,
        "-name",
        f"bonneville-{config.container_id}",
        # No defaults, no user config files, no display: only the devices listed here exist, and
        # QEMU never touches its stdio (which is /dev/null and a log file anyway).
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-machine",
        machine,
        "-accel",
        accel,
        "-cpu",
        cpu_model(options),
        "-m",
        f"{config.memory_mib}M",
        "-smp",
        f"{config.vcpus}",
    ]
    if bus == "pci":
        # Room for a pod that grows: RAM in DIMMs (up to MAX_MEMORY_MIB, nothing allocated
        # until plugged) and vCPUs up to the host's, added while it runs (machine.py). ACPI
        # hotplug needs a PC machine: microvm VMs keep their size.
        argv[argv.index("-m") + 1] += f",slots={HOTPLUG_SLOTS},maxmem={max_memory_mib(config)}M"
        argv[argv.index("-smp") + 1] += f",maxcpus={max(config.vcpus, config.max_vcpus)}"
    if boot.mode is not BootMode.COLD:
        # share=on: the template's RAM writes go to the file, which then *is* its memory image.
        # share=off: a clone maps that file privately (copy-on-write), leaving it untouched.
        share = "on" if boot.mode is BootMode.TEMPLATE else "off"
        argv += [
            "-object",
            f"memory-backend-file,id=mem,size={config.memory_mib}M,"
            f"mem-path={escape(boot.memory_file)},share={share}",
        ]
    if options.sandbox:
        # Denying spawn also rules out `exec:` migration URIs: templates and clones use fd:.
        argv += ["-sandbox", SANDBOX]
    argv += ["-no-reboot", "-kernel", config.kernel]
    if config.initrd:
        argv += ["-initrd", config.initrd]
    if config.kernel_args:
        argv += ["-append", " ".join(config.kernel_args)]
    argv += [
        # Both sockets arrive already connected (socketpairs): no socket paths, whose length
        # limit long state directories would exceed.
        "-chardev",
        f"socket,id=qmp,fd={qmp_fd}",
        "-mon",
        "chardev=qmp,mode=control",
        "-chardev",
        f"socket,id=agent,fd={agent_fd}",
        # Port 0 is reserved for a console we do not use; one more for the agent. Each port
        # costs the guest two virtqueues to set up, 31 (the default) would be wasted boot time.
        "-device",
        f"virtio-serial-{bus},id=vser0,max_ports=2",
        "-device",
        f"virtserialport,bus=vser0.0,nr=1,chardev=agent,name={PORT_NAME}",
        "-chardev",
        f"file,id=console,path={escape(run_dir + '/console.log')}",
        "-serial",
        "chardev:console",
    ]
    fsdev = f"local,id=root,path={escape(config.share_dir)},security_model=passthrough"
    # The share holds bind mounts from other filesystems: remap their inode numbers so files on
    # different host devices never look like hard links of each other to the guest.
    fsdev += ",multidevs=remap"
    if config.readonly_share:
        fsdev += ",readonly=on"
    argv += ["-fsdev", fsdev, "-device", f"virtio-9p-{bus},fsdev=root,mount_tag={ROOT_TAG}"]
    if options.vmgenid:
        # A fresh generation ID on every QEMU start (and so on every clone) makes the guest
        # kernel reseed its RNG.
        argv += ["-device", "vmgenid,guid=auto"]
    if options.rng:
        argv += [
            "-object",
            "rng-random,id=rng0,filename=/dev/urandom",
            "-device",
            f"virtio-rng-{bus},rng=rng0",
        ]
    # No option ROM on a PCI NIC: the guest boots its kernel directly and never network-boots,
    # and iPXE's 244 KiB ROM would be loaded into every VM's private memory.
    rom = ",romfile=" if bus == "pci" else ""
    for index, (tap, mac) in enumerate(config.nics):
        if not tap:
            # A template's NIC: the device (its state is what clones restore) with no backend;
            # each clone plugs its own tap into the same device, and the agent gives the NIC
            # the container's MAC.
            argv += ["-device", f"virtio-net-{bus},id=nic{index},mac={mac}{rom}"]
            continue
        if tap == USER_NIC:
            # Host networking: QEMU's user-mode stack (no extra process) reaches the host's
            # networks; restrict=off, as a host-network container reaches them under runc.
            argv += [
                "-netdev",
                f"user,id=net{index},restrict=off,ipv6=off",
                "-device",
                f"virtio-net-{bus},id=nic{index},netdev=net{index},mac={mac}{rom}",
            ]
            continue
        argv += [
            "-netdev",
            f"tap,id=net{index},ifname={escape(tap)},script=no,downscript=no",
            "-device",
            f"virtio-net-{bus},id=nic{index},netdev=net{index},mac={mac}{rom}",
        ]
    if boot.mode is BootMode.CLONE:
        # The state arrives later over QMP (migrate-incoming), after x-ignore-shared is set.
        argv += ["-incoming", "defer"]
    return argv
