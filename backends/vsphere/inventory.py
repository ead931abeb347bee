"""Where the VMs go, found through the API: datacenter, datastore, pool, folder, port group; a VM
looked up by its moref, and destroyed."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

from bonneville.backends.vsphere import specs, tls
from bonneville.backends.vsphere.config import VSphereSettings
from bonneville.backends.vsphere.connection import wait_task
from bonneville.backends.vsphere.datastore import Datastore
from bonneville.backends.vsphere.vmomi import vmomi
from bonneville.spec.errors import BackendError


@dataclass
class Inventory:
    datacenter: Any
    datastore: Datastore
    pool: Any
    folder: Any
    network: specs.NetworkRef | None


def children(si: Any, root: Any, kind: Any) -> list[Any]:
    """Every object of type ``kind`` below ``root``."""
    view = si.content.viewManager.CreateContainerView(root, [kind], True)
    try:
        return list(view.view)
    finally:
        view.Destroy()


def _pick(items: list[Any], name: str, what: str, where: str) -> Any:
    if name:
        for item in items:
            if item.name == name:
                return item
        known = ", ".join(sorted(i.name for i in items)) or "none"
        raise BackendError(f"{what} {name!r} not found in {where} (there: {known})")
    if len(items) == 1:
        return items[0]
    known = ", ".join(sorted(i.name for i in items)) or "none"
    raise BackendError(f"set vsphere.{what.replace(' ', '_')}: {where} has {known}")


def resolve(si: Any, cfg: VSphereSettings) -> Inventory:
    """The configured datacenter, datastore, resource pool, folder and port group."""
    vim = vmomi().vim

    content = si.content
    dc = _pick(
        children(si, content.rootFolder, vim.Datacenter),
        cfg.datacenter,
        "datacenter",
        "the inventory",
    )
    where = f"datacenter {dc.name}"
    ds = _pick(list(dc.datastore), cfg.datastore, "datastore", where)
    if cfg.resource_pool:
        pool = content.searchIndex.FindByInventoryPath(f"{dc.name}/host/{cfg.resource_pool}")
        if not isinstance(pool, vim.ResourcePool):
            raise BackendError(f"resource pool {cfg.resource_pool!r} not found in {where}")
    else:
        compute = _pick(
            children(si, dc.hostFolder, vim.ComputeResource), cfg.cluster, "cluster", where
        )
        pool = compute.resourcePool
    folder = dc.vmFolder
    if cfg.folder:
        folder = content.searchIndex.FindByInventoryPath(f"{dc.name}/vm/{cfg.folder}")
        if not isinstance(folder, vim.Folder):
            raise BackendError(f"VM folder {cfg.folder!r} not found in {where}")
    network = None
    if cfg.network:
        net = _pick(list(dc.network), cfg.network, "network", where)
        if isinstance(net, vim.dvs.DistributedVirtualPortgroup):
            network = specs.NetworkRef(net.name, net.config.distributedVirtualSwitch.uuid, net.key)
        else:
            network = specs.NetworkRef(net.name)
    return Inventory(
        dc, Datastore(si, dc, ds, cfg.url, tls.ssl_context(cfg)), pool, folder, network
    )


def find_vm(si: Any, moref: str) -> Any:
    """The VM with managed object id ``moref``, or None if it is gone."""
    vim, vmodl = vmomi().vim, vmomi().vmodl

    vm = vim.VirtualMachine(moref, si._stub)
    try:
        _ = vm.name
    except vmodl.fault.ManagedObjectNotFound:
        return None
    return vm


def api_version(si: Any) -> tuple[int, ...]:
    text = str(si.content.about.apiVersion or "0")
    try:
        return tuple(int(p) for p in text.split(".")[:2])
    except ValueError:
        return (0,)


def destroy_vm(vm: Any) -> None:
    """Power off (if on) and destroy with its disks; a VM already gone is fine."""
    vmodl = vmomi().vmodl

    try:
        if str(vm.runtime.powerState) != "poweredOff":
            with contextlib.suppress(BackendError):
                wait_task(vm.PowerOffVM_Task(), f"powering off {vm.name}")
        wait_task(vm.Destroy_Task(), f"destroying {vm.name}")
    except vmodl.fault.ManagedObjectNotFound:
        return
    except BackendError as exc:
        if isinstance(exc.__cause__, vmodl.fault.ManagedObjectNotFound):
            return
        raise
