"""The vSphere backend: each container a VM on vCenter/ESXi, driven with pyVmomi.

launch(): boot ISO on the datastore (once per guest image) → template VM (once per ISO; a
snapshot for linked clones, powered on for instant clones: template.py) → the container's VM by
InstantClone_Task where the server has it, else a linked clone of the template snapshot, else a
full clone → its root disk (ext4 of the share, uploaded into the VM's folder) and serial ports
added, CPU/memory set (clone.py) → power on → the guest's agent connects to our TCP listener
(transport.py) → the running VM (vm.py). Everything made for the container is undone, newest
first, if any step fails. Every call to the server goes through connection.py, from the
runtime's network namespace.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from typing import Any

from bonneville.backends.base import VM, Backend, Capability, VMConfig, write_journal
from bonneville.backends.vsphere import media
from bonneville.backends.vsphere.addressing import Lease, allocate, parse_range, release
from bonneville.backends.vsphere.clone import INSTANT, Undo, configure, make_vm, nic_mac, vm_folder
from bonneville.backends.vsphere.config import VSphereSettings, load
from bonneville.backends.vsphere.connection import connect, disconnect, in_netns, session, wait_task
from bonneville.backends.vsphere.inventory import destroy_vm, find_vm, resolve
from bonneville.backends.vsphere.template import ensure_iso
from bonneville.backends.vsphere.transport import SerialListener, new_token
from bonneville.backends.vsphere.vm import VSphereVM
from bonneville.spec.errors import BackendError

log = logging.getLogger("bonneville.vsphere")


# Seconds an instant clone's agent has to connect under clone_mode "auto" before the linked
# clone is tried (its guest is already booted: it answers in well under a second when it does).
INSTANT_AGENT_TIMEOUT = 20.0


def _advertise_host(cfg: VSphereSettings) -> str:
    """The address ESXi reaches us at: configured, else the one we reach vSphere from."""
    if cfg.advertise_host:
        return cfg.advertise_host
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect((cfg.host, cfg.port))
            address: str = probe.getsockname()[0]
            return address
        except OSError as exc:
            raise BackendError(
                f"set vsphere.advertise_host: cannot tell our address ({exc})"
            ) from exc


def vm_name(container_id: str, token: str) -> str:
    # vSphere names are up to 80 characters; the token part keeps runtimes sharing a vCenter
    # (or a reused container id) from colliding.
    return f"bnv-{container_id[:60]}-{token[:8]}"


class VSphereBackend(Backend):
    name = "vsphere"
    capabilities = frozenset({Capability.CONSOLE})

    def __init__(self, settings: VSphereSettings | None = None) -> None:
        self._settings = settings

    @property
    def settings(self) -> VSphereSettings:
        if self._settings is None:
            self._settings = load()
        return self._settings

    def preflight(self) -> None:
        """Bad settings (a malformed static_range, say) fail create before it makes anything."""
        _ = self.settings

    def launch(self, config: VMConfig) -> VM:
        netns_fd = int(config.extra.get("runtime_netns_fd", -1))
        return in_netns(netns_fd, lambda: self._launch(config, netns_fd))

    def _launch(self, config: VMConfig, netns_fd: int) -> VM:
        cfg = self.settings
        from bonneville.backends.image.kernel import find_kernel

        image_dir = os.path.dirname(config.kernel)
        image_key = os.path.basename(image_dir)
        iso = media.ensure_boot_iso(
            image_key, image_dir, find_kernel().path, config.initrd, config.kernel_args
        )
        token = new_token()
        name = vm_name(config.container_id, token)
        advertise = _advertise_host(cfg)
        undo = Undo()
        lease: Lease | None = None
        if cfg.net_mode == "static":
            lease = allocate(
                os.path.dirname(config.run_dir),
                parse_range(cfg.static_range),
                config.container_id,
                token,
            )
            held = lease.record()
            # Journaled at once: a create killed from here on still gives the address back.
            write_journal(config.run_dir, {"lease": held})
            undo.push(f"release {lease.address}", lambda: release(held))
        try:
            si = connect(cfg)
            undo.push("log out", lambda: disconnect(si))
            inv = resolve(si, cfg)
            iso_path = ensure_iso(inv, iso)
            # The VM's one container's tree (the export holds a directory per container).
            tree = os.path.join(config.share_dir, config.container_id)
            disk = media.make_root_disk(tree, config.run_dir, token)
            for path in (disk.descriptor, disk.flat):
                undo.push(f"remove {path}", lambda p=path: _unlink(p))  # type: ignore[misc]
            listener = SerialListener(cfg.listen_host)
            undo.push("close the listener", listener.close)
            allow_instant = True
            while True:
                # One undo list per attempt: a failed instant clone (refused, not configurable,
                # or its agent never connecting) is removed before the linked clone is tried;
                # anything else failing unwinds everything.
                attempt = Undo()
                undo.push("remove the VM", attempt.run)
                vm, path = make_vm(
                    si,
                    inv,
                    cfg,
                    iso,
                    iso_path,
                    image_key,
                    name,
                    token,
                    attempt,
                    (config.memory_mib, config.vcpus),
                    allow_instant,
                )
                try:
                    folder = vm_folder(vm)
                    # What destroy() needs, should this process die before create records it.
                    write_journal(
                        config.run_dir,
                        {
                            "vm": vm._moId,
                            "name": name,
                            "datacenter": inv.datacenter.name,
                            "datastore": inv.datastore.name,
                            "folder": folder[1],
                            **({"lease": lease.record()} if lease else {}),
                        },
                    )
                    plan = configure(
                        vm,
                        folder,
                        inv,
                        disk,
                        listener.uri(advertise),
                        config,
                        token,
                        image_key,
                        attempt,
                        instant=path == INSTANT,
                    )
                    folder_rel = folder[1]
                    if str(vm.runtime.powerState) != "poweredOn":
                        wait_task(vm.PowerOnVM_Task(), f"powering on VM {name}")
                    log.info(
                        "VM %s powered on; waiting for its agent on %s", name, plan.channel_uri
                    )
                    timeout = cfg.agent_timeout
                    if path == INSTANT and cfg.clone_mode == "auto":
                        # A fork of the running template is up at once: waiting the whole
                        # boot-time allowance would only delay the fallback.
                        timeout = min(timeout, INSTANT_AGENT_TIMEOUT)
                    channel = listener.accept(token, timeout)
                    mac = nic_mac(vm) if cfg.net_mode != "none" else ""
                    break
                except BackendError as exc:
                    if path != INSTANT or cfg.clone_mode != "auto":
                        raise
                    log.warning("the instant clone failed (%s): falling back", exc)
                    attempt.run()
                    allow_instant = False
            for local in (disk.flat, disk.descriptor):
                _unlink(local)
        except BaseException:
            undo.run()
            raise
        return VSphereVM(
            cfg, si, vm, inv, folder_rel, channel, listener, path, netns_fd, mac=mac, lease=lease
        )

    def alive(self, private: dict[str, Any]) -> bool:
        moref = str(private.get("vm") or "")
        if not moref:
            return False
        try:
            with session(self.settings) as si:
                vm = find_vm(si, moref)
                return vm is not None and str(vm.runtime.powerState) == "poweredOn"
        except BackendError:
            # vSphere unreachable: the monitor (alive, or we would not be asked) watches the
            # VM itself and ends when it does; do not call a running container stopped.
            return True

    def destroy(self, private: dict[str, Any]) -> None:
        try:
            self._destroy(private)
        finally:
            release(private.get("lease"))

    def _destroy(self, private: dict[str, Any]) -> None:
        moref = str(private.get("vm") or "")
        if not moref:
            return
        with session(self.settings) as si:
            vm = find_vm(si, moref)
            if vm is not None and vm.name == private.get("name"):
                destroy_vm(vm)
            folder = str(private.get("folder") or "")
            if folder:
                inv = resolve(si, self.settings)
                if inv.datastore.name == private.get("datastore"):
                    inv.datastore.delete(folder)


def _unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
