"""The narrow interface every VM backend implements.

The monitor owns one VM through a backend: it asks for a launch, talks to the agent over the
VM's channel, and stops it. The CLI never holds a VM object; it only sees the backend's private
state blob (stored in the container's state file, opaque to the core) and may ask whether that
VM is alive or destroy what is left of it.
"""

from __future__ import annotations

import contextlib
import enum
import importlib
import json
import os
import socket
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

from bonneville.backends.atomicfile import atomic_write
from bonneville.spec.errors import BackendError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, ClassVar


class Capability(enum.Enum):
    CLONE = "clone"  # starts VMs by cloning a pre-booted template
    PAUSE = "pause"  # can freeze and thaw a running VM
    NETWORK = "network"  # can give the guest a NIC bridged to the container's netns
    CONSOLE = "console"  # captures the guest's serial console to a file
    PODS = "pods"  # more containers can join a running VM (its share takes their trees)
    HOTPLUG = "hotplug"  # can add RAM and vCPUs to a running VM (a pod that grows)
    HOST_NETWORK = "host-network"  # can give the guest a user-mode NIC on the host's networks


@dataclass(frozen=True)
class VMConfig:
    """Everything a backend needs to start one container's VM."""

    container_id: str
    memory_mib: int
    vcpus: int
    # Host directory exported to the guest (9p tag protocol.ROOT_TAG): the pod's share, one
    # directory per container, named by its id (shim/monitor/share.py).
    share_dir: str
    # Private directory of this VM (sockets, console log, backend files); removed on delete.
    run_dir: str
    kernel: str
    initrd: str
    readonly_share: bool = False
    kernel_args: tuple[str, ...] = ()
    # Tap devices (names in the monitor's network namespace) with the MAC the guest must use;
    # USER_NIC instead of a tap name: a user-mode NIC (QEMU's slirp) on the host's networks.
    nics: tuple[tuple[str, str], ...] = ()
    # The vCPUs the VM may grow to while it runs (0: ``vcpus``): a pod's containers add theirs.
    max_vcpus: int = 0
    # Backend-specific extras. "runtime_netns_fd": the runtime's network namespace (the
    # monitor itself sits in the container's), for backends that must reach a remote server.
    extra: dict[str, Any] = field(default_factory=dict)


USER_NIC = "user:"
# The user-mode network the guest is given with a USER_NIC (QEMU's defaults): its address,
# the host (whose loopback the guest reaches there) and the gateway.
USER_NET_GUEST = "10.0.2.15/24"
USER_NET_HOST = "10.0.2.2"

# The granularity of memory hotplug: x86-64 Linux adds memory in 128 MiB sections.
HOTPLUG_BLOCK_MIB = 128
# The most RAM a VM may grow to (its address space is reserved at start; nothing is allocated).
MAX_MEMORY_MIB = 64 * 1024
HOTPLUG_SLOTS = 16


class VM(ABC):
    """A running VM owned by the monitor process that launched it."""

    @property
    @abstractmethod
    def channel(self) -> socket.socket:
        """Connected byte stream to the guest agent."""

    @property
    @abstractmethod
    def pid(self) -> int:
        """Host PID of the process that runs the VM (0 if none runs on this host)."""

    @abstractmethod
    def exit_fd(self) -> int:
        """A descriptor that becomes readable when the VM ends (for the monitor's selector)."""

    @abstractmethod
    def poll(self) -> bool:
        """True once the VM has ended (reaping it if it is our child)."""

    @abstractmethod
    def private_state(self) -> dict[str, Any]:
        """JSON-serialisable facts the CLI needs later for alive()/destroy()."""

    def pause(self) -> None:
        raise BackendError("this backend cannot pause a VM")

    def resume(self) -> None:
        raise BackendError("this backend cannot resume a VM")

    def add_memory(self, mib: int) -> None:
        """Plug ``mib`` more MiB of RAM into the running VM (a multiple of HOTPLUG_BLOCK_MIB);
        the guest onlines it."""
        raise BackendError("this backend cannot add memory to a running VM")

    def add_vcpus(self, total: int) -> int:
        """Plug vCPUs until the VM has ``total`` (at most its maximum); the count it has."""
        raise BackendError("this backend cannot add vCPUs to a running VM")

    def guest_addressing(self) -> list[dict[str, Any]]:
        """How the guest addresses NICs the backend put on a network of its own (not the
        container's namespace): ``network.addressing`` of docs/protocol.md."""
        return []

    def addressed(self, addresses: list[dict[str, Any]]) -> None:
        """What the guest got from ``guest_addressing`` (``network``'s reply), for the state."""
        return None

    @abstractmethod
    def stop(self, timeout: float = 5.0) -> None:
        """Power the VM off (forcibly after ``timeout``) and release everything it held."""


class Backend(ABC):
    name: ClassVar[str]
    capabilities: ClassVar[frozenset[Capability]]
    # Whether VMConfig.kernel/initrd must name the guest image (the fake backend boots none).
    boots_guest_image: ClassVar[bool] = True

    def require(self, capability: Capability) -> None:
        if capability not in self.capabilities:
            raise BackendError(f"backend {self.name} does not support {capability.value}")

    def preflight(self) -> None:
        """Fail, before create makes anything, if this host cannot run a VM of this backend."""
        return None

    @abstractmethod
    def launch(self, config: VMConfig) -> VM:
        """Start a VM; return once its process runs and the agent channel is connected."""

    def vm_pids(self, private: dict[str, Any]) -> list[int]:
        """Host PIDs running the VM that are not descendants of the monitor (e.g. libvirtd's)."""
        return []

    @abstractmethod
    def alive(self, private: dict[str, Any]) -> bool:
        """Whether the VM described by a private state blob still runs."""

    @abstractmethod
    def destroy(self, private: dict[str, Any]) -> None:
        """Kill whatever is left of that VM; idempotent, never fails on an already gone VM."""


# What a launch has made so far beyond the monitor's own children and namespaces (host links,
# a QEMU that libvirtd forked, a remote VM), in the VM's run directory. A backend writes it
# *before* making each such thing, so a monitor killed half-way through launch() still leaves
# the CLI what it needs to destroy() the rest; create records the full state once it is ready.
JOURNAL_FILE = "backend-journal.json"


def write_journal(run_dir: str, private: dict[str, Any]) -> None:
    atomic_write(os.path.join(run_dir, JOURNAL_FILE), json.dumps(private).encode())


def read_journal(run_dir: str) -> dict[str, Any]:
    """The last journal written in ``run_dir`` ({} if none, or if it cannot be read)."""
    try:
        with open(os.path.join(run_dir, JOURNAL_FILE), encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


_BACKENDS = {
    "qemu": "bonneville.backends.qemu.backend:QemuBackend",
    "libvirt": "bonneville.backends.libvirt.backend:LibvirtBackend",
    "fake": "bonneville.backends.fake:FakeBackend",
    "vsphere": "bonneville.backends.vsphere.backend:VSphereBackend",
}


DEFAULT_BACKEND = "qemu"


def backend_names() -> list[str]:
    return sorted(_BACKENDS)


def backend_for_create(flag: str | None = None) -> str:
    """The backend of a new container: --backend, else $BONNEVILLE_BACKEND, else the config
    file's, else qemu."""
    if flag:
        return flag
    from bonneville.spec import settings

    return str(
        settings.get("runtime", "backend", env="BONNEVILLE_BACKEND", default=DEFAULT_BACKEND)
    )


def preload_backend(name: str) -> None:
    """Import the backend called ``name`` and what its launches use, if it can be: a monitor
    does it while `create` gets ready (errors are get_backend's to report, later)."""
    target = _BACKENDS.get(name)
    if target is None:
        return
    with contextlib.suppress(Exception):
        module = importlib.import_module(target.partition(":")[0])
        for extra in getattr(module, "PRELOAD", ()):  # what only a launch imports
            importlib.import_module(extra)
        importlib.import_module("bonneville.backends.image")


def get_backend(name: str) -> Backend:
    """The backend called ``name``, imported only now (each pulls in its own dependencies)."""
    target = _BACKENDS.get(name)
    if target is None:
        raise BackendError(f"unknown backend {name!r} (available: {', '.join(backend_names())})")
    module_name, _, class_name = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise BackendError(f"backend {name} is not available: {exc}") from exc
    cls = getattr(module, class_name)
    backend: Backend = cls()
    return backend
