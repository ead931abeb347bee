"""The container's VM: cloned from the template by the best path the server offers, then given
its root disk, serial ports and size.

InstantClone_Task of the powered-on template where the server's API is 6.7 or later, else a
linked clone of the template's snapshot, else a full clone (``clone_mode`` forces one). A path
the server refuses sends us down the chain; a fault no other path would fix (no room, no
permission) is reported as it is.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

from bonneville.backends.base import VMConfig
from bonneville.backends.vsphere import media, specs
from bonneville.backends.vsphere.config import VSphereSettings
from bonneville.backends.vsphere.connection import wait_task
from bonneville.backends.vsphere.inventory import Inventory, api_version, destroy_vm
from bonneville.backends.vsphere.template import base_snapshot, ensure_template
from bonneville.backends.vsphere.vmomi import vmomi
from bonneville.spec.errors import BackendError

log = logging.getLogger("bonneville.vsphere")

INSTANT = "instant clone"
INSTANT_CLONE_API = (6, 7)


class Undo:
    """Cleanup steps, run newest first when a launch fails."""

    def __init__(self) -> None:
        self.steps: list[tuple[str, Callable[[], None]]] = []

    def push(self, what: str, step: Callable[[], None]) -> None:
        self.steps.append((what, step))

    def run(self) -> None:
        while self.steps:
            what, step = self.steps.pop()
            try:
                step()
            except Exception as exc:
                log.error("cleanup failed (%s): %s", what, exc)


def make_vm(
    si: Any,
    inv: Inventory,
    cfg: VSphereSettings,
    iso: media.BootISO,
    iso_path: str,
    image_key: str,
    name: str,
    token: str,
    undo: Undo,
    size: tuple[int, int],
    allow_instant: bool = True,
) -> tuple[Any, str]:
    """The container's VM by the best path the server offers; (vm, path taken)."""
    vmodl = vmomi().vmodl

    mode = cfg.clone_mode
    instant_ok = api_version(si) >= INSTANT_CLONE_API
    if mode == "instant" and not instant_ok:
        raise BackendError(
            f"vsphere.clone_mode=instant needs vSphere API {INSTANT_CLONE_API[0]}."
            f"{INSTANT_CLONE_API[1]}+, the server speaks {si.content.about.apiVersion}"
        )
    want_instant = mode == "instant" or (mode == "auto" and instant_ok and allow_instant)
    template = ensure_template(si, inv, cfg, iso, iso_path, image_key, powered_on=want_instant)
    memory_mib, vcpus = size
    hardware = template.config.hardware
    if want_instant and (memory_mib > hardware.memoryMB or vcpus > hardware.numCPU):
        # A fork runs with its template's memory and vCPUs: a running VM is not resized.
        what = (
            f"the container wants {memory_mib} MiB and {vcpus} vCPUs, the template has "
            f"{hardware.memoryMB} MiB and {hardware.numCPU}"
        )
        if mode == "instant":
            log.warning("%s: the instant clone runs with the template's", what)
        else:
            log.info("%s: a linked clone instead of an instant clone", what)
            want_instant = False
    attempts: list[tuple[str, Callable[[], Any]]] = []
    if want_instant:
        attempts.append(
            (
                INSTANT,
                lambda: template.InstantClone_Task(
                    spec=specs.instant_clone_spec(
                        name, inv.pool, inv.datastore.ds, inv.folder, token
                    )
                ),
            )
        )
    elif mode == "auto":
        log.info(
            "vSphere API %s has no InstantClone (needs %d.%d): skipping it",
            si.content.about.apiVersion,
            *INSTANT_CLONE_API,
        )
    if mode in ("auto", "linked"):
        snapshot = base_snapshot(template)
        if snapshot is not None:
            attempts.append(
                (
                    "linked clone",
                    lambda: template.CloneVM_Task(
                        folder=inv.folder,
                        name=name,
                        spec=specs.linked_clone_spec(snapshot, inv.pool, inv.datastore.ds),
                    ),
                )
            )
    if mode in ("auto", "full"):
        attempts.append(
            (
                "full clone",
                lambda: template.CloneVM_Task(
                    folder=inv.folder,
                    name=name,
                    spec=specs.full_clone_spec(inv.pool, inv.datastore.ds),
                ),
            )
        )
    errors = []
    for path, start in attempts:
        try:
            vm = wait_task(start(), f"{path} of {template.name} as {name}")
        except (BackendError, vmodl.MethodFault) as exc:
            if isinstance(exc, BackendError) and _is_setup_fault(exc):
                raise
            log.warning("%s failed (%s); trying the next way", path, exc)
            errors.append(f"{path}: {exc}")
            continue
        undo.push(f"destroy VM {name}", lambda v=vm: destroy_vm(v))  # type: ignore[misc]
        log.info("VM %s made by %s of %s", name, path, template.name)
        return vm, path
    raise BackendError(f"cannot make VM {name}: " + "; ".join(errors))


def configure(
    vm: Any,
    folder: tuple[str, str],
    inv: Inventory,
    disk: media.RootDisk,
    channel_uri: str,
    config: VMConfig,
    token: str,
    image_key: str,
    undo: Undo,
    instant: bool = False,
) -> specs.ContainerPlan:
    """Upload the root disk into the VM's ``folder`` (``vm_folder``) and add it; point the
    serial ports at the VM's console file and its monitor; size it (unless it is an instant
    clone, which runs as its template did)."""
    name = vm.name
    folder_path, folder_rel = folder
    undo.push(f"delete {folder_path}", lambda: inv.datastore.delete(folder_rel))
    for local in (disk.flat, disk.descriptor):
        inv.datastore.upload(local, f"{folder_rel}/{os.path.basename(local)}")
    plan = specs.ContainerPlan(
        container_id=config.container_id,
        vm_folder_path=folder_path,
        disk_path=f"{folder_path}/{os.path.basename(disk.descriptor)}",
        channel_uri=channel_uri,
        token=token,
        memory_mib=config.memory_mib,
        vcpus=config.vcpus,
        image_key=image_key,
        serial_keys=_serial_keys(vm),
        resize=not instant,
    )
    wait_task(
        vm.ReconfigVM_Task(spec=specs.container_config(plan, _scsi_key(vm))),
        f"configuring VM {name}",
    )
    return plan


def vm_folder(vm: Any) -> tuple[str, str]:
    """The VM's own datastore folder: ("[ds] dir", "dir")."""
    folder_path = os.path.dirname(str(vm.config.files.vmPathName)).rstrip("/")
    folder_rel = folder_path.split("] ", 1)[1] if "] " in folder_path else ""
    if not folder_rel:
        raise BackendError(f"VM {vm.name} has no folder of its own: {folder_path}")
    return folder_path, folder_rel


def nic_mac(vm: Any) -> str:
    """The MAC vSphere gave the VM's NIC on the port group ("" if it has none)."""
    vim = vmomi().vim

    for device in vm.config.hardware.device:
        if isinstance(device, vim.vm.device.VirtualEthernetCard) and device.macAddress:
            return str(device.macAddress).lower()
    return ""


def _scsi_key(vm: Any) -> int:
    vim = vmomi().vim

    for device in vm.config.hardware.device:
        if isinstance(device, vim.vm.device.VirtualSCSIController) and device.busNumber == 0:
            key: int = device.key
            return key
    raise BackendError(f"VM {vm.name} has no SCSI controller for its root disk")


def _serial_keys(vm: Any) -> tuple[tuple[str, int], ...]:
    """The serial ports the VM has from its template, by role (specs._serial_ports)."""
    vim = vmomi().vim

    roles = {
        vim.vm.device.VirtualSerialPort.FileBackingInfo: "console",
        vim.vm.device.VirtualSerialPort.URIBackingInfo: "channel",
    }
    found: dict[str, int] = {}
    for device in vm.config.hardware.device:
        if isinstance(device, vim.vm.device.VirtualSerialPort):
            role = roles.get(type(device.backing))
            if role is not None and role not in found:
                found[role] = device.key
    return tuple(sorted(found.items()))


def _is_setup_fault(exc: BackendError) -> bool:
    """Faults no other clone path would fix (no room, no permission): report them as they are."""
    vim = vmomi().vim

    return isinstance(exc.__cause__, vim.fault.NoPermission | vim.fault.InsufficientResourcesFault)
