"""The libvirt domain XML of one container's VM, built from a VMConfig (a pure function).

It describes the same machine as the QEMU backend's command line (``backends/qemu/cmdline.py``):
direct kernel boot of the guest image, one 9p share (tag ``protocol.ROOT_TAG``, passthrough,
inode remapping), the agent on a virtio-serial port named ``protocol.PORT_NAME``, the serial
console into a file, ACPI (the guest powers off through it), vmgenid, virtio-rng, and nothing
else: no USB controller, no balloon, no video, no default NIC. Every PCI address is given here,
on the root bus, so libvirt adds no PCIe root ports (each one is a device the guest kernel
probes at boot) and the output is stable for golden files (``tests/golden/libvirt/``).
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass

from bonneville.backends.base import USER_NIC, VMConfig
from bonneville.backends.qemu.cmdline import BOOT_TB_SIZE_MIB
from bonneville.guest.protocol import PORT_NAME, ROOT_TAG

# Where our facts about a domain live in its <metadata> (operators see them in `virsh dumpxml`).
METADATA_NS = "https://bonneville.dev/xmlns/libvirt/1"
METADATA_PREFIX = "bonneville"
ET.register_namespace(METADATA_PREFIX, METADATA_NS)


@dataclass(frozen=True)
class DomainOptions:
    """Host-side choices that are not part of a container's VMConfig."""

    name: str  # unique per container and prefixed, see backend.domain_name()
    uuid: str
    agent_socket: str  # unix socket QEMU listens on for the agent's port (kept short)
    accel: str = "tcg"  # "tcg" → <domain type='qemu'>, "kvm" → <domain type='kvm'>
    emulator: str = "/usr/bin/qemu-system-x86_64"
    machine: str = "q35"
    # Every libvirt VM boots (no clones): the cache a boot needs (see cmdline.BOOT_TB_SIZE_MIB).
    tb_size_mib: int | None = BOOT_TB_SIZE_MIB
    rng: bool = True
    vmgenid: bool = True
    # libvirtd's QEMU runs as root with no relabelling (a static DAC label): it must read the
    # share through the monitor's /proc/PID/root and create files with the guest's owners.
    # An embedded driver gets this from its qemu.conf instead.
    dac_root: bool = False


def _sub(parent: ET.Element, tag: str, text: str | None = None, **attrs: str) -> ET.Element:
    element = ET.SubElement(parent, tag, attrs)
    if text is not None:
        element.text = text
    return element


def _pci(parent: ET.Element, slot: int) -> None:
    _sub(
        parent,
        "address",
        type="pci",
        domain="0x0000",
        bus="0x00",
        slot=f"0x{slot:02x}",
        function="0x0",
    )


def build_xml(config: VMConfig, options: DomainOptions) -> str:
    """The domain XML that runs ``config`` as a VM."""
    if options.accel not in ("tcg", "kvm"):
        raise ValueError(f"accel must be tcg or kvm, not {options.accel!r}")
    run_dir = config.run_dir.rstrip("/") or "/"
    domain = ET.Element("domain", type="kvm" if options.accel == "kvm" else "qemu")
    _sub(domain, "name", options.name)
    _sub(domain, "uuid", options.uuid)
    _sub(domain, "title", f"bonneville container {config.container_id}")
    metadata = _sub(domain, "metadata")
    ET.SubElement(
        metadata,
        f"{{{METADATA_NS}}}container",
        {"id": config.container_id, "state": run_dir},
    )
    _sub(domain, "memory", str(config.memory_mib), unit="MiB")
    _sub(domain, "vcpu", str(config.vcpus), placement="static")

    os_ = _sub(domain, "os")
    _sub(os_, "type", "hvm", arch="x86_64", machine=options.machine)
    _sub(os_, "kernel", config.kernel)
    if config.initrd:
        _sub(os_, "initrd", config.initrd)
    if config.kernel_args:
        _sub(os_, "cmdline", " ".join(config.kernel_args))

    features = _sub(domain, "features")
    # The agent powers the VM off through ACPI when the container ends.
    _sub(features, "acpi")
    if options.accel == "tcg" and options.tb_size_mib is not None:
        # Bounds the translation cache (see cmdline.DEFAULT_TB_SIZE_MIB and BOOT_TB_SIZE_MIB).
        tcg = _sub(features, "tcg")
        _sub(tcg, "tb-cache", str(options.tb_size_mib), unit="MiB")
    if options.accel == "kvm":
        _sub(domain, "cpu", mode="host-passthrough", check="none", migratable="off")
    else:
        # QEMU's `-cpu max,erms=off`, as in the QEMU backend (see cmdline.cpu_model: x86-64-v2
        # for newer distributions' glibc; no `rep movsb`, which TCG copies a byte at a time).
        cpu = _sub(domain, "cpu", mode="maximum", check="none", migratable="off")
        _sub(cpu, "feature", policy="disable", name="erms")
    _sub(domain, "clock", offset="utc")
    # Any end of the guest ends the VM: the container is over, never rebooted.
    _sub(domain, "on_poweroff", "destroy")
    _sub(domain, "on_reboot", "destroy")
    _sub(domain, "on_crash", "destroy")
    if options.vmgenid:
        # A fresh generation ID per start makes the guest kernel reseed its RNG.
        _sub(domain, "genid")

    devices = _sub(domain, "devices")
    _sub(devices, "emulator", options.emulator)
    slot = 1

    def next_slot() -> int:
        nonlocal slot
        slot += 1
        return slot

    fs = _sub(devices, "filesystem", type="mount", accessmode="passthrough", multidevs="remap")
    _sub(fs, "driver", type="path")
    _sub(fs, "source", dir=config.share_dir)
    _sub(fs, "target", dir=ROOT_TAG)
    if config.readonly_share:
        _sub(fs, "readonly")
    _pci(fs, next_slot())

    for index, (tap, mac) in enumerate(config.nics):
        if tap == USER_NIC:
            # Host networking: libvirt's user-mode stack (slirp), as the QEMU backend's.
            nic = _sub(devices, "interface", type="user")
            _sub(nic, "mac", address=mac)
        else:
            # The tap exists already (the monitor or the backend made it): libvirt must
            # neither create nor delete it.
            nic = _sub(devices, "interface", type="ethernet")
            _sub(nic, "mac", address=mac)
            _sub(nic, "target", dev=tap, managed="no")
        _sub(nic, "model", type="virtio")
        _sub(nic, "rom", enabled="no")  # no iPXE: the guest never network-boots (as cmdline.py)
        _sub(nic, "alias", name=f"ua-net{index}")
        _pci(nic, next_slot())

    # Port 0 is reserved for a console we do not use; one more for the agent (each port costs
    # the guest two virtqueues to set up).
    vser = _sub(devices, "controller", type="virtio-serial", index="0", ports="2")
    _pci(vser, next_slot())
    channel = _sub(devices, "channel", type="unix")
    _sub(channel, "source", mode="bind", path=options.agent_socket)
    _sub(channel, "target", type="virtio", name=PORT_NAME)
    _sub(channel, "address", type="virtio-serial", controller="0", bus="0", port="1")

    serial = _sub(devices, "serial", type="file")
    _sub(serial, "source", path=f"{run_dir}/console.log", append="off")
    _sub(serial, "target", type="isa-serial", port="0")

    if options.rng:
        rng = _sub(devices, "rng", model="virtio")
        _sub(rng, "backend", "/dev/urandom", model="random")
        _pci(rng, next_slot())
    # libvirt adds these unless told not to; the QEMU backend has none of them either.
    _sub(devices, "controller", type="usb", model="none")
    _sub(devices, "memballoon", model="none")

    if options.dac_root:
        seclabel = _sub(domain, "seclabel", type="static", model="dac", relabel="no")
        _sub(seclabel, "label", "+0:+0")
    ET.indent(domain, space="  ")
    return ET.tostring(domain, encoding="unicode") + "\n"
