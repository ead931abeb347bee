"""The container's running VM: the agent's channel, a watcher that tells the monitor when the VM
stops (powered off or deleted behind our back), and its teardown."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
from typing import Any

from bonneville.backends.base import VM
from bonneville.backends.vsphere.addressing import (
    Lease,
    guest_addressing,
    net_state,
    parse_range,
    release,
)
from bonneville.backends.vsphere.config import VSphereSettings
from bonneville.backends.vsphere.connection import disconnect, enter_netns, in_netns, session
from bonneville.backends.vsphere.inventory import Inventory, destroy_vm, find_vm
from bonneville.backends.vsphere.transport import SerialListener

log = logging.getLogger("bonneville.vsphere")

WATCH_INTERVAL = 2.0  # how often the monitor's watcher asks whether the VM still runs


class VSphereVM(VM):
    def __init__(
        self,
        cfg: VSphereSettings,
        si: Any,
        vm: Any,
        inv: Inventory,
        folder_path: str,
        channel: socket.socket,
        listener: SerialListener,
        clone_path: str,
        netns_fd: int = -1,
        mac: str = "",
        lease: Lease | None = None,
    ) -> None:
        self._cfg = cfg
        self._si = si
        self._vm = vm
        self._inv = inv
        self._moref: str = vm._moId
        self._name: str = vm.name
        self._folder_path = folder_path
        self._channel = channel
        self._listener = listener
        self.clone_path = clone_path
        self._netns_fd = netns_fd
        self._mac = mac
        self._lease = lease
        self._addresses: list[dict[str, Any]] = []  # what the guest reported it got
        self._ended = threading.Event()
        self._stop_watch = threading.Event()
        self._exit_r, self._exit_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._watcher = threading.Thread(target=self._watch, name="vsphere-watch", daemon=True)
        self._watcher.start()

    def _watch(self) -> None:
        """Tell the monitor when the VM stops running (powered off or deleted behind us)."""
        try:
            if self._netns_fd >= 0:
                enter_netns(self._netns_fd)
            with session(self._cfg) as si:
                while not self._stop_watch.wait(WATCH_INTERVAL):
                    vm = find_vm(si, self._moref)
                    if vm is None or str(vm.runtime.powerState) != "poweredOn":
                        break
        except Exception as exc:
            log.error("watching VM %s: %s", self._name, exc)
            if self._stop_watch.is_set():
                return
        if not self._stop_watch.is_set():
            self._ended.set()
            with contextlib.suppress(OSError):
                os.write(self._exit_w, b"x")

    @property
    def channel(self) -> socket.socket:
        return self._channel

    @property
    def pid(self) -> int:
        return 0

    def exit_fd(self) -> int:
        return self._exit_r

    def poll(self) -> bool:
        return self._ended.is_set()

    def private_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "vm": self._moref,
            "name": self._name,
            "datacenter": self._inv.datacenter.name,
            "datastore": self._inv.datastore.name,
            "folder": self._folder_path,
            "clone": self.clone_path,
        }
        state.update(net_state(self._cfg.net_mode, self._mac, self._lease, self._addresses))
        return state

    def guest_addressing(self) -> list[dict[str, Any]]:
        if self._cfg.net_mode != "none" and not self._mac:
            log.warning(
                "VM %s has no NIC on %s: its network is left alone", self._name, self._cfg.network
            )
        address = ""
        if self._lease is not None:
            address = (
                f"{self._lease.address}/{parse_range(self._cfg.static_range).network.prefixlen}"
            )
        return guest_addressing(
            self._cfg.net_mode, self._mac, address, self._cfg.gateway, self._cfg.dns
        )

    def addressed(self, addresses: list[dict[str, Any]]) -> None:
        self._addresses = [a for a in addresses if isinstance(a, dict)]

    def _destroy(self) -> None:
        destroy_vm(self._vm)
        self._inv.datastore.delete(self._folder_path)

    def stop(self, timeout: float = 5.0) -> None:
        self._stop_watch.set()
        with contextlib.suppress(OSError):
            self._channel.close()
        self._listener.close()
        try:
            in_netns(self._netns_fd, self._destroy)
        finally:
            if self._lease is not None:
                release(self._lease.record())
            disconnect(self._si)
            for fd in (self._exit_r, self._exit_w):
                with contextlib.suppress(OSError):
                    os.close(fd)
