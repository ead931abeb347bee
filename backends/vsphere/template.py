"""The boot ISO on the datastore and the template VM every container's VM is cloned from.

One of each per guest image (and a template per port group): the ISO is uploaded once (again if
its size is wrong: a broken upload), the template made once with its base snapshot (linked
clones start there) and powered on when instant clones need a running source.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from typing import Any

from bonneville.backends.vsphere import media, specs
from bonneville.backends.vsphere.config import VSphereSettings
from bonneville.backends.vsphere.connection import wait_task
from bonneville.backends.vsphere.datastore import ds_path
from bonneville.backends.vsphere.inventory import Inventory, children, destroy_vm
from bonneville.backends.vsphere.vmomi import vmomi

log = logging.getLogger("bonneville.vsphere")

ISO_DIR = "bonneville"
TEMPLATE_LOCK = "/run/bonneville-vsphere-template.lock"


def ensure_iso(inv: Inventory, iso: media.BootISO) -> str:
    """The boot ISO's datastore path, uploaded if absent or of another size (a broken upload)."""
    name = iso.datastore_name
    size = inv.datastore.exists(name)
    if size != os.path.getsize(iso.path):
        inv.datastore.mkdir(ISO_DIR)
        log.info("uploading boot ISO %s to %s", iso.path, ds_path(inv.datastore.name, name))
        inv.datastore.upload(iso.path, name)
    return ds_path(inv.datastore.name, name)


def _find_template(si: Any, inv: Inventory, name: str) -> Any:
    vim = vmomi().vim

    for vm in children(si, inv.datacenter.vmFolder, vim.VirtualMachine):
        if vm.name == name:
            return vm
    return None


def base_snapshot(vm: Any) -> Any:
    """The template's snapshot linked clones start from (None if it has none)."""
    tree = vm.snapshot.rootSnapshotList if vm.snapshot else []
    for node in tree or []:
        if node.name == specs.SNAPSHOT_NAME:
            return node.snapshot
    return None


def template_name(cfg: VSphereSettings, iso_key: str) -> str:
    """One template per ISO and port group: clones keep the template's NIC, so a template made
    without ``network`` (or for another) would leave the container's VM unreachable."""
    if not cfg.network:
        return f"{cfg.template_prefix}-{iso_key}"
    tag = hashlib.sha256(cfg.network.encode()).hexdigest()[:8]
    return f"{cfg.template_prefix}-{iso_key}-net{tag}"


def ensure_template(
    si: Any,
    inv: Inventory,
    cfg: VSphereSettings,
    iso: media.BootISO,
    iso_path: str,
    image_key: str,
    powered_on: bool,
) -> Any:
    """The template VM of this ISO (made now if missing), with its base snapshot."""
    import fcntl

    name = template_name(cfg, iso.key)
    fd = os.open(TEMPLATE_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        # One creator per runtime host; two hosts sharing a vCenter may still race (docs).
        fcntl.flock(fd, fcntl.LOCK_EX)
        vm = _find_template(si, inv, name)
        if vm is None:
            log.info("creating template VM %s", name)
            plan = specs.TemplatePlan(
                name, inv.datastore.name, iso_path, image_key, network=inv.network
            )
            vm = wait_task(
                inv.folder.CreateVM_Task(config=specs.template_config(plan), pool=inv.pool),
                f"creating template VM {name}",
            )
            try:
                wait_task(
                    vm.CreateSnapshot_Task(
                        name=specs.SNAPSHOT_NAME,
                        description="linked clones start here",
                        memory=False,
                        quiesce=False,
                    ),
                    f"snapshotting template {name}",
                )
            except BaseException:
                with contextlib.suppress(Exception):
                    destroy_vm(vm)
                raise
        if powered_on and str(vm.runtime.powerState) != "poweredOn":
            wait_task(vm.PowerOnVM_Task(), f"powering on template {name}")
        return vm
    finally:
        os.close(fd)
