"""Pure builders of the vSphere specs the backend sends (golden-tested in tests/golden/vsphere/).

Every function takes plain values (datastore paths, managed object references already looked
up) and returns pyVmomi data objects; nothing here talks to a server. The golden files are the
SOAP XML pyVmomi sends for them (`to_xml`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from bonneville.backends.vsphere.vmomi import vmomi

GUEST_ID = "otherLinux64Guest"
HARDWARE_VERSION = "vmx-13"  # ESXi 6.5 and later
# Device keys of the controllers every new VM gets from the host (ESXi's defaults, also vcsim's).
IDE0_KEY = 200
SIO_KEY = 400
# Our own keys for devices added in the same spec (negative: assigned by the server).
SCSI_KEY = -100
CDROM_KEY = -101
NIC_KEY = -102
CONSOLE_KEY = -103
CHANNEL_KEY = -104
DISK_KEY = -105
SCSI_BUS = 0
ROOT_DISK_UNIT = 0
# The guest's ttyS0 is the kernel console, ttyS1 the agent's channel (ISO_KERNEL_ARGS).
CONSOLE_UNIT = 0
CHANNEL_UNIT = 1
ISO_KERNEL_ARGS = ("bonneville.channel=ttyS1", "bonneville.root=disk")
# The template's channel port, disconnected: each clone's reconfigure points it at the clone's
# own monitor (an instant clone's while it runs: a serial port is not hot-added, only edited).
PARKED_CHANNEL_URI = "tcp://127.0.0.1:9"

EXTRA_TOKEN = "guestinfo.bonneville.token"
EXTRA_CHANNEL = "guestinfo.bonneville.channel"
EXTRA_CONTAINER = "bonneville.container-id"
EXTRA_IMAGE = "bonneville.image"
EXTRA_ROLE = "bonneville.role"
SNAPSHOT_NAME = "bonneville-base"
SERIALIZE_VERSION = "vim.version.version12"


@dataclass(frozen=True)
class NetworkRef:
    """A port group: standard (by name) or distributed (switch UUID + port group key)."""

    name: str
    switch_uuid: str = ""
    portgroup_key: str = ""


@dataclass(frozen=True)
class TemplatePlan:
    name: str
    datastore: str  # datastore name: "[ds] name/" is where the VM's files go
    iso_path: str  # "[ds] bonneville/boot-KEY.iso"
    image_key: str
    memory_mib: int = 256
    vcpus: int = 1
    network: NetworkRef | None = None


@dataclass(frozen=True)
class ContainerPlan:
    container_id: str
    vm_folder_path: str  # "[ds] vmname" (no trailing slash)
    disk_path: str  # "[ds] vmname/root.vmdk", uploaded before this reconfigure
    channel_uri: str  # "tcp://host:port" the serial port connects to
    token: str
    memory_mib: int
    vcpus: int
    image_key: str = ""
    # Keys of the serial ports the clone inherited from its template ("console", "channel"):
    # edited in place; a port missing (a template made by an older version) is added.
    serial_keys: tuple[tuple[str, int], ...] = ()
    # An instant clone runs with its template's vCPUs and memory (not changed while it runs).
    resize: bool = True


def to_xml(obj: Any) -> str:
    """The SOAP serialisation of a pyVmomi data object, one element a line (for diffs)."""
    import xml.dom.minidom

    SoapAdapter = vmomi("pyVmomi.SoapAdapter")

    # Serialised for vSphere 6.7 (vim.version.version12, what InstantClone needs): without a
    # version pyVmomi silently drops types newer than vSphere 2.0, such as the URI backing.
    raw = SoapAdapter.Serialize(obj, version=SERIALIZE_VERSION)
    text: str = xml.dom.minidom.parseString(raw).toprettyxml(indent="  ")
    return text


def _option(key: str, value: str) -> Any:
    vim = vmomi().vim

    return vim.option.OptionValue(key=key, value=value)


def annotation(container_id: str | None, image_key: str) -> str:
    what = f"container {container_id}" if container_id else "template"
    return (
        f"Bonneville {what} (guest image {image_key}).\n"
        "Created and deleted by the bonneville runtime; do not edit."
    )


def template_config(plan: TemplatePlan) -> Any:
    """ConfigSpec for CreateVM_Task of the template: boots the ISO, has the disk controller."""
    vim = vmomi().vim

    add = vim.vm.device.VirtualDeviceSpec.Operation.add
    changes = [
        vim.vm.device.VirtualDeviceSpec(
            operation=add,
            device=vim.vm.device.ParaVirtualSCSIController(
                key=SCSI_KEY,
                busNumber=SCSI_BUS,
                sharedBus=vim.vm.device.VirtualSCSIController.Sharing.noSharing,
            ),
        ),
        vim.vm.device.VirtualDeviceSpec(
            operation=add,
            device=vim.vm.device.VirtualCdrom(
                key=CDROM_KEY,
                controllerKey=IDE0_KEY,
                unitNumber=0,
                backing=vim.vm.device.VirtualCdrom.IsoBackingInfo(fileName=plan.iso_path),
                connectable=vim.vm.device.VirtualDevice.ConnectInfo(
                    startConnected=True, allowGuestControl=False, connected=True
                ),
            ),
        ),
    ]
    # The serial ports too, the channel disconnected: an instant clone of the running template
    # cannot have one added, only its backing changed (container_config).
    for port in _serial_ports(
        f"[{plan.datastore}] {plan.name}", PARKED_CHANNEL_URI, False
    ).values():
        changes.append(vim.vm.device.VirtualDeviceSpec(operation=add, device=port))
    if plan.network is not None:
        changes.append(vim.vm.device.VirtualDeviceSpec(operation=add, device=_nic(plan.network)))
    return vim.vm.ConfigSpec(
        name=plan.name,
        guestId=GUEST_ID,
        version=HARDWARE_VERSION,
        numCPUs=plan.vcpus,
        memoryMB=plan.memory_mib,
        annotation=annotation(None, plan.image_key),
        files=vim.vm.FileInfo(vmPathName=f"[{plan.datastore}]"),
        bootOptions=vim.vm.BootOptions(
            bootOrder=[vim.vm.BootOptions.BootableCdromDevice()],
        ),
        extraConfig=[
            _option(EXTRA_IMAGE, plan.image_key),
            _option(EXTRA_ROLE, "template"),
        ],
        deviceChange=changes,
    )


def _nic(network: NetworkRef) -> Any:
    vim = vmomi().vim

    backing: Any
    if network.switch_uuid:
        backing = vim.vm.device.VirtualEthernetCard.DistributedVirtualPortBackingInfo(
            port=vim.dvs.PortConnection(
                switchUuid=network.switch_uuid, portgroupKey=network.portgroup_key
            )
        )
    else:
        backing = vim.vm.device.VirtualEthernetCard.NetworkBackingInfo(deviceName=network.name)
    return vim.vm.device.VirtualVmxnet3(
        key=NIC_KEY,
        backing=backing,
        addressType="generated",
        connectable=vim.vm.device.VirtualDevice.ConnectInfo(
            startConnected=True, allowGuestControl=False, connected=True
        ),
    )


def _serial_ports(vm_dir: str, channel_uri: str, connected: bool) -> dict[str, Any]:
    """The console (a file in the VM's folder) and the agent's channel (a network serial port,
    client direction), by role."""
    vim = vmomi().vim

    def connect(on: bool) -> Any:
        return vim.vm.device.VirtualDevice.ConnectInfo(
            startConnected=on, allowGuestControl=False, connected=on
        )

    return {
        "console": vim.vm.device.VirtualSerialPort(
            key=CONSOLE_KEY,
            controllerKey=SIO_KEY,
            unitNumber=CONSOLE_UNIT,
            yieldOnPoll=True,
            backing=vim.vm.device.VirtualSerialPort.FileBackingInfo(
                fileName=f"{vm_dir}/console.log"
            ),
            connectable=connect(True),
        ),
        "channel": vim.vm.device.VirtualSerialPort(
            key=CHANNEL_KEY,
            controllerKey=SIO_KEY,
            unitNumber=CHANNEL_UNIT,
            yieldOnPoll=True,
            backing=vim.vm.device.VirtualSerialPort.URIBackingInfo(
                direction="client", serviceURI=channel_uri
            ),
            connectable=connect(connected),
        ),
    }


def container_config(plan: ContainerPlan, scsi_key: int) -> Any:
    """ConfigSpec that turns a fresh clone into one container's VM: size, root disk, serial
    console and agent channel, identity for the guest and for people reading vCenter."""
    vim = vmomi().vim

    operation = vim.vm.device.VirtualDeviceSpec.Operation
    disk = vim.vm.device.VirtualDisk(
        key=DISK_KEY,
        controllerKey=scsi_key,
        unitNumber=ROOT_DISK_UNIT,
        backing=vim.vm.device.VirtualDisk.FlatVer2BackingInfo(
            fileName=plan.disk_path, diskMode="persistent", thinProvisioned=False
        ),
    )
    changes = [vim.vm.device.VirtualDeviceSpec(operation=operation.add, device=disk)]
    inherited = dict(plan.serial_keys)
    for role, port in _serial_ports(plan.vm_folder_path, plan.channel_uri, True).items():
        if role in inherited:
            port.key = inherited[role]
            # ESXi takes an edit without it; vcsim dereferences it.
            port.deviceInfo = vim.Description(label=f"bonneville {role}", summary=role)
            changes.append(vim.vm.device.VirtualDeviceSpec(operation=operation.edit, device=port))
        else:
            changes.append(vim.vm.device.VirtualDeviceSpec(operation=operation.add, device=port))
    spec = vim.vm.ConfigSpec(
        annotation=annotation(plan.container_id, plan.image_key),
        extraConfig=[
            _option(EXTRA_TOKEN, plan.token),
            _option(EXTRA_CHANNEL, plan.channel_uri),
            _option(EXTRA_CONTAINER, plan.container_id),
            _option(EXTRA_ROLE, "container"),
        ],
        deviceChange=changes,
    )
    if plan.resize:
        spec.numCPUs = plan.vcpus
        spec.memoryMB = plan.memory_mib
    return spec


def linked_clone_spec(snapshot: Any, pool: Any, datastore: Any) -> Any:
    """CloneSpec of a linked clone: a child disk over the template snapshot's, powered off."""
    vim = vmomi().vim

    return vim.vm.CloneSpec(
        location=vim.vm.RelocateSpec(
            pool=pool,
            datastore=datastore,
            diskMoveType="createNewChildDiskBacking",
        ),
        snapshot=snapshot,
        powerOn=False,
        template=False,
    )


def full_clone_spec(pool: Any, datastore: Any) -> Any:
    """CloneSpec of a full copy (no snapshot): the fallback when linked clones are refused."""
    vim = vmomi().vim

    return vim.vm.CloneSpec(
        location=vim.vm.RelocateSpec(pool=pool, datastore=datastore),
        powerOn=False,
        template=False,
    )


def instant_clone_spec(name: str, pool: Any, datastore: Any, folder: Any, token: str) -> Any:
    """InstantCloneSpec (vSphere 6.7+): the child starts from the running template's memory;
    only extraConfig may change here, devices are reconfigured afterwards."""
    vim = vmomi().vim

    return vim.vm.InstantCloneSpec(
        name=name,
        location=vim.vm.RelocateSpec(pool=pool, datastore=datastore, folder=folder),
        config=[_option(EXTRA_TOKEN, token), _option(EXTRA_ROLE, "container")],
    )


def vmdk_descriptor(flat_name: str, size_bytes: int, cid: int) -> str:
    """An ESXi (createType "vmfs") descriptor for a raw image uploaded as ``flat_name``."""
    if size_bytes % 512:
        raise ValueError("a VMDK extent is a whole number of 512-byte sectors")
    sectors = size_bytes // 512
    heads, per_track = 255, 63
    cylinders = max(1, sectors // (heads * per_track))
    return (
        "# Disk DescriptorFile\n"
        "version=1\n"
        'encoding="UTF-8"\n'
        f"CID={cid:08x}\n"
        "parentCID=ffffffff\n"
        'createType="vmfs"\n'
        "\n"
        "# Extent description\n"
        f'RW {sectors} VMFS "{flat_name}"\n'
        "\n"
        "# The Disk Data Base\n"
        "#DDB\n"
        "\n"
        'ddb.adapterType = "lsilogic"\n'
        f'ddb.geometry.cylinders = "{cylinders}"\n'
        f'ddb.geometry.heads = "{heads}"\n'
        f'ddb.geometry.sectors = "{per_track}"\n'
        'ddb.virtualHWVersion = "13"\n'
    )
