"""The pod's VM, as its owner monitor holds it: the network namespace it serves, its launch
(a clone during the prestart hooks where the backend clones), its NICs, and the agent channel.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import os
import time

from bonneville.backends.base import (
    USER_NET_GUEST,
    USER_NIC,
    VM,
    Backend,
    Capability,
    VMConfig,
    get_backend,
)
from bonneville.guest import protocol
from bonneville.shim import hostns, network
from bonneville.shim.agent_client import AgentConnection
from bonneville.shim.monitor.daemon import Timeline
from bonneville.spec.errors import BonnevilleError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from bonneville.shim.launch import MonitorConfig

log = logging.getLogger("bonneville.monitor")

AGENT_BOOT_TIMEOUT = 120.0  # a hang guard for cold boots under TCG on a loaded host
DEFAULT_MEMORY_MIB = 256


class PodVM:
    """The VM of a pod and the host side of its network."""

    def __init__(self, cfg: MonitorConfig, timeline: Timeline) -> None:
        self.cfg = cfg
        self.timeline = timeline
        self._backend: Backend | None = None
        self.vm: VM | None = None
        self.agent: AgentConnection | None = None
        self.own_netns = False  # we sit in the container's network namespace, not the host's
        self.interfaces: list[network.Interface] = []
        self.routes: list[dict[str, Any]] = []
        self.early_taps: list[str] = []  # taps of a VM launched during the hooks
        self.user_mac = ""  # host networking's NIC
        self.memory_mib = 0  # the VM's RAM (grown as a pod's members join)
        self.vcpus = 0
        self.max_vcpus = 0
        # Backends that talk to a remote server (vSphere) open their sockets back in the
        # runtime's own network namespace, from a thread: kept before we leave it.
        self.runtime_netns_fd = -1
        # The guest's address on a network of the backend's own (vSphere's port group).
        self.guest_address = ""

    @property
    def backend(self) -> Backend:
        if self._backend is None:
            self._backend = get_backend(self.cfg.backend)
        return self._backend

    def enter_network(self) -> None:
        """Into the container's network namespace: a new one, or the one its config names."""
        self.runtime_netns_fd = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        ns = self.cfg.bundle.spec.linux.namespace("network")
        if ns is None or self.cfg.host_network:
            return  # the host's: the VM gets a user-mode NIC (nics())
        if ns.path:
            hostns.setns(ns.path, hostns.CLONE_NEWNET)
        else:
            hostns.unshare(hostns.CLONE_NEWNET)
        if hostns.namespace_id("/proc/self/ns/net") == self.cfg.runtime_netns:
            # create refuses this already; wiring taps here would hijack the host's NICs.
            raise BonnevilleError("the container's network namespace is the runtime's own")
        self.own_netns = True

    @property
    def wires_network(self) -> bool:
        return self.own_netns and Capability.NETWORK in self.backend.capabilities

    def launch_early(self, export: str) -> bool:
        """Clone the VM while the CLI waits for the config's validation and runs the
        prestart/createRuntime hooks (dockerd's takes ~0.15 s), instead of after them.

        dockerd's hook is what moves the container's veth into our namespace, so with hooks the
        NICs are guessed: those present now, or one if there are none yet. adopt_early() checks
        the guess once the hooks are done, and a wrong one is undone and launched again. Only
        for backends that clone (a cold boot outlasts the wait). False if not launched.
        """
        if Capability.CLONE not in self.backend.capabilities:
            return False
        hooks = self.cfg.bundle.spec.hooks
        taps: list[str] = []
        try:
            if self.cfg.host_network:
                self.boot(export, self.user_nics())
                return True
            if self.wires_network:
                present, _ = network.discover()
                guess = len(present) or int(bool(hooks.prestart or hooks.create_runtime))
                taps = network.make_taps(guess)
            self.boot(export, [(tap, network.placeholder_mac(i)) for i, tap in enumerate(taps)])
        except Exception as exc:
            # Launching after the hooks, as without this early start, meets (and reports) any
            # real problem there.
            log.info("launch during the hooks failed (%s): launching after them", exc)
            self.discard()
            network.remove_taps(taps)
            return False
        self.early_taps = taps
        return True

    def adopt_early(self) -> bool:
        """Keep the VM launched during the hooks if it has a NIC per interface they left;
        otherwise discard it (False: the caller launches again)."""
        if self.cfg.host_network:
            return True  # its NIC is the user-mode one, whatever the hooks did
        interfaces: list[network.Interface] = []
        routes: list[dict[str, Any]] = []
        if self.early_taps:
            interfaces, routes = network.discover(own_taps=self.early_taps)
        if len(interfaces) != len(self.early_taps):
            log.info(
                "the hooks left %d interfaces, not the %d guessed: launching again",
                len(interfaces),
                len(self.early_taps),
            )
            self.discard()
            network.remove_taps(self.early_taps)
            self.early_taps = []
            return False
        network.mirror(interfaces, self.early_taps)
        self.interfaces, self.routes = interfaces, routes
        return True

    def launch(self, export: str) -> None:
        """Start the VM with a NIC per interface the namespace has now, and greet its agent."""
        if self.cfg.host_network:
            self.boot(export, self.user_nics())
            return
        if self.wires_network:
            self.interfaces, self.routes = network.discover()
            network.wire(self.interfaces)
        self.boot(export, [(i.tap, i.mac) for i in self.interfaces])

    def boot(self, export: str, nics: list[tuple[str, str]]) -> None:
        from bonneville.backends.image import ensure_image

        backend = self.backend
        spec = self.cfg.bundle.spec
        resources = spec.linux.resources
        host_cpus = os.cpu_count() or 1
        if not backend.boots_guest_image:
            kernel = initrd = ""
            kernel_args: tuple[str, ...] = ()
        else:
            image = ensure_image()
            kernel, initrd, kernel_args = image.kernel, image.initrd, image.kernel_args
        self.memory_mib = resources.memory_mib(DEFAULT_MEMORY_MIB)
        self.vcpus = resources.vcpus(host_cpus)
        self.max_vcpus = host_cpus
        vm_config = VMConfig(
            container_id=self.cfg.container_id,
            memory_mib=self.memory_mib,
            vcpus=self.vcpus,
            max_vcpus=self.max_vcpus,
            share_dir=export,
            run_dir=self.cfg.state_dir,
            kernel=kernel,
            initrd=initrd,
            # A read-only root is enforced by the tree's own mount (ro on the host side) and
            # the guest's remount; QEMU's readonly=on would also freeze rw volumes beneath it.
            readonly_share=False,
            kernel_args=kernel_args,
            nics=tuple(nics),
            extra={"runtime_netns_fd": self.runtime_netns_fd},
        )
        self.timeline.mark("launching the VM")
        self.vm = backend.launch(vm_config)
        self.timeline.mark("VM launched")
        self.agent = AgentConnection(self.vm.channel)
        # First thing: a clone wakes with its template's clock and entropy pool.
        self.agent.call(
            "hello",
            AGENT_BOOT_TIMEOUT,
            version=protocol.VERSION,
            time=time.time(),
            entropy=base64.b64encode(os.urandom(64)).decode(),
        )
        self.timeline.mark("agent answered")

    def grow(self, add_memory_mib: int, vcpus: int) -> None:
        """Plug RAM and vCPUs into the running VM (the agent must then bring them online)."""
        if Capability.HOTPLUG not in self.backend.capabilities or self.vm is None:
            raise BonnevilleError(
                f"the {self.backend.name} backend cannot add memory or vCPUs to a running VM"
                " (the qemu backend can)"
            )
        if add_memory_mib:
            self.vm.add_memory(add_memory_mib)
            self.memory_mib += add_memory_mib
            self.timeline.mark(f"{add_memory_mib} MiB plugged in: {self.memory_mib} MiB")
        if vcpus > self.vcpus:
            self.vcpus = self.vm.add_vcpus(vcpus)
            self.timeline.mark(f"vCPUs plugged in: {self.vcpus}")

    def user_nics(self) -> list[tuple[str, str]]:
        """Host networking's one NIC: the user-mode stack, with a MAC of our own."""
        if not self.user_mac:
            self.user_mac = network.random_mac()
        return [(USER_NIC, self.user_mac)]

    def network_request(self) -> dict[str, Any]:
        """``network``'s argument: the interfaces the hooks left, as the guest gets them (with
        host networking, the user-mode stack's address and gateway)."""
        if self.cfg.host_network:
            gateway = USER_NET_GUEST.rpartition(".")[0] + ".2"
            return {
                "interfaces": [
                    {
                        "mac": self.user_mac,
                        "mtu": 1500,
                        "addresses": [USER_NET_GUEST],
                        "ipv6": False,
                    }
                ],
                "routes": [
                    {"dst": "default", "gateway": gateway, "mac": self.user_mac, "version": 4}
                ],
                "ipv6": {},
            }
        request = network.guest_config(
            self.interfaces,
            self.routes,
            {name: network.ipv6_enabled(name) for name in network.IPV6_SETTINGS}
            if self.own_netns
            else None,
        )
        addressing = self.vm.guest_addressing() if self.vm is not None else []
        if addressing:
            request["addressing"] = addressing
        return request

    def addressed(self, reply: dict[str, Any]) -> None:
        """Note what the guest's NICs on the backend's network got (``network``'s reply): the
        log, the backend's state, and ``guest_address``, where the relay sends connections."""
        got = [a for a in reply.get("addresses") or [] if isinstance(a, dict)]
        if self.vm is None or not got:
            return
        self.vm.addressed(got)
        for entry in got:
            log.info(
                "guest NIC %s (%s): %s by %s, gateway %s, DNS %s",
                entry.get("interface"),
                entry.get("mac"),
                entry.get("address"),
                entry.get("mode"),
                entry.get("gateway") or "none",
                " ".join(str(s) for s in entry.get("dns") or []) or "unchanged",
            )
        self.guest_address = str(got[0].get("address") or "").partition("/")[0]

    def discard(self) -> None:
        """Stop the VM and have the backend release all it made for it (roots, host links)."""
        if self.vm is not None:
            with contextlib.suppress(Exception):
                self.vm.stop(timeout=2.0)
            with contextlib.suppress(Exception):
                self.backend.destroy(self.vm.private_state())
        self.agent = None
        self.vm = None

    def stop(self) -> None:
        if self.vm is not None:
            with contextlib.suppress(Exception):
                self.vm.stop(timeout=2.0)
            self.timeline.mark("VM stopped")

    def taps(self) -> list[str]:
        """Every tap of ours in the namespace (a failed create must not leave them in a
        namespace the caller keeps: CNI's, a pod's)."""
        return [*self.early_taps, *(i.tap for i in self.interfaces if i.tap)]
