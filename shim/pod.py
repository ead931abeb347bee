"""Where a new container runs: in a VM of its own, or inside a running pod's VM.

A Kubernetes pod is a sandbox (pause) container and app containers that join its network, IPC
and UTS namespaces (and PID, with ``shareProcessNamespace``) by path; `docker run --network
container:A` joins A's network the same way. A VM cannot share a namespace with another VM, so a
container that joins one of a Bonneville container's namespaces runs *inside that container's
VM* (the pod's): containerd's and CRI-O's annotations say so for a pod, and without them a
namespace path that names one of our containers does (DESIGN.md, "containerd's CRI plugin").

The container that made the VM is the pod's *owner*: its monitor owns the VM; a member's monitor
relays its stdio and exit status through the owner's (shim/monitor/).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

from bonneville.backends import procfs
from bonneville.shim.state import ContainerState, Store
from bonneville.spec.errors import BonnevilleError, ContainerNotFound

TYPE_CHECKING = False
if TYPE_CHECKING:
    from bonneville.spec.config import Spec

CRI_TYPE = "io.kubernetes.cri.container-type"
CRI_SANDBOX = "io.kubernetes.cri.sandbox-id"
CRIO_TYPE = "io.kubernetes.cri-o.ContainerType"
CRIO_SANDBOX = "io.kubernetes.cri-o.SandboxID"
# Namespaces whose sharing is decided inside the pod's VM: each container has its own unless
# its config joins another container's (or the VM's, with no namespace of that type).
GUEST_KINDS = {"pid": "pid", "ipc": "ipc", "uts": "uts"}
_PROC_NS = re.compile(r"^/proc/(\d+)/ns/[a-z_]+$")


@dataclass(frozen=True)
class Placement:
    """``owner``: the container whose VM this one joins ("" for a VM of its own);
    ``namespaces``: for each guest namespace kind, "new", "vm" or "container:<id>"."""

    owner: str = ""
    namespaces: dict[str, str] = field(default_factory=dict)


def _live(store: Store, container_id: str) -> ContainerState | None:
    """A container of this root whose monitor runs, or None."""
    try:
        st = store.load(container_id)
    except (ContainerNotFound, BonnevilleError):
        return None
    if not st.created_done or not procfs.is_alive(st.pid, st.pid_start):
        return None
    if store.read_exit(container_id) is not None:
        return None
    return st


def _ns_identity(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def _container_of_path(store: Store, path: str, kind: str) -> ContainerState | None:
    """The live container whose monitor's namespace of ``kind`` the path names."""
    match = _PROC_NS.match(path)
    if match:
        pid = int(match.group(1))
        for container_id in store.ids():
            st = _live(store, container_id)
            if st is not None and st.pid == pid:
                return st
    wanted = _ns_identity(path)
    if wanted is None:
        return None
    for container_id in store.ids():
        st = _live(store, container_id)
        if st is not None and _ns_identity(f"/proc/{st.pid}/ns/{kind}") == wanted:
            return st
    return None


def _pod_of(store: Store, st: ContainerState) -> ContainerState:
    """The owner of the pod ``st`` is in (itself if it owns its VM)."""
    if not st.sandbox:
        return st
    owner = _live(store, st.sandbox)
    if owner is None:
        raise BonnevilleError(f"the pod of container {st.id} (sandbox {st.sandbox}) is not running")
    return owner


def _annotated_sandbox(spec: Spec) -> tuple[bool, str]:
    """(whether CRI annotations decide, the sandbox to join or "" for a sandbox)."""
    annotations = spec.annotations
    for type_key, sandbox_key in ((CRI_TYPE, CRI_SANDBOX), (CRIO_TYPE, CRIO_SANDBOX)):
        kind = annotations.get(type_key)
        if kind == "sandbox":
            return True, ""
        if kind == "container":
            sandbox = annotations.get(sandbox_key, "")
            if not sandbox:
                raise BonnevilleError(
                    f"config.json: annotation {type_key}=container without {sandbox_key}"
                )
            return True, sandbox
    return False, ""


def place(store: Store, spec: Spec) -> Placement:
    """Decide where a container with config ``spec`` runs (see the module's docstring)."""
    linux = spec.linux
    decided, sandbox = _annotated_sandbox(spec)
    owner: ContainerState | None = None
    if sandbox:
        found = _live(store, sandbox)
        if found is None:
            raise BonnevilleError(
                f"sandbox container {sandbox} does not exist or is not running"
                " (a pod's containers run in its sandbox's VM)"
            )
        owner = _pod_of(store, found)
    net = linux.namespace("network")
    if not decided and net is not None and net.path:
        holder = _container_of_path(store, net.path, "net")
        if holder is not None:
            owner = _pod_of(store, holder)
    namespaces: dict[str, str] = {}
    for kind, oci in (("pid", "pid"), ("ipc", "ipc"), ("uts", "uts")):
        entry = linux.namespace(oci)
        if entry is None:
            namespaces[kind] = "vm"
        elif not entry.path:
            namespaces[kind] = "new"
        else:
            holder = _container_of_path(store, entry.path, kind)
            if holder is None:
                # A VM cannot share a namespace of the host: the container's own is closest.
                namespaces[kind] = "new"
                continue
            pod = _pod_of(store, holder)
            if owner is None and decided:
                namespaces[kind] = "new"  # a sandbox makes its pod: it joins no one's
                continue
            if owner is None:
                raise BonnevilleError(
                    f"joining the {kind} namespace of container {holder.id} needs its network"
                    " namespace too: containers that share a VM share its network"
                )
            if owner is not None and pod.id != owner.id:
                raise BonnevilleError(
                    f"the {kind} namespace to join is container {holder.id}'s, in another pod"
                    f" than the one this container joins ({owner.id})"
                )
            namespaces[kind] = f"container:{holder.id}"
    return Placement(owner.id if owner is not None else "", namespaces)
