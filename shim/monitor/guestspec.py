"""A container's config as the agent's ``create`` takes it (docs/protocol.md): the one place
where config.json becomes the guest's view of a container."""

from __future__ import annotations

import logging
import os

from bonneville.guest.proc import mountinfo
from bonneville.shim.monitor import share
from bonneville.spec.resources import to_cgroup

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from bonneville.spec.config import Bundle

log = logging.getLogger("bonneville.monitor")


def raw_resources(bundle: Bundle) -> dict[str, Any]:
    """The config's OCI ``linux.resources`` as written (the agent's limits come from it)."""
    resources = (bundle.raw.get("linux") or {}).get("resources")
    return resources if isinstance(resources, dict) else {}


def cgroup_files(resources: dict[str, Any], vm_memory_mib: int, strict: bool) -> dict[str, str]:
    """OCI resources as the guest cgroup's files (spec/resources.py)."""
    return to_cgroup(
        resources,
        vm_memory_mib=vm_memory_mib,
        strict=strict,
        warn=lambda text: log.warning("resources %s", text),
    )


def _bind_source(bundle: Bundle, source: str) -> str:
    return source if os.path.isabs(source) else os.path.join(bundle.path, source)


def _rw_submounts(source: str) -> list[str]:
    """Paths, relative to ``source``, of the writable mounts beneath it (this namespace's)."""
    prefix = os.path.realpath(source).rstrip("/") + "/"
    try:
        mounts = mountinfo()
    except OSError:
        return []
    found = {
        point[len(prefix) :]
        for point, options in mounts
        if point.startswith(prefix) and "ro" not in options
    }
    return sorted(found)


def create_request(
    container_id: str,
    stream: int,
    bundle: Bundle,
    namespaces: dict[str, str],
    vm_memory_mib: int | None,
) -> dict[str, Any]:
    """The fields of the agent's ``create`` for this container: its build (``config``), its
    namespaces' plan, and its init process (prepared up to execve until ``start``). Without
    ``vm_memory_mib`` (a member, whose owner knows the VM) the limits are left out."""
    spec = bundle.spec
    linux = spec.linux
    mounts = []
    for index, m in enumerate(spec.mounts):
        entry: dict[str, Any] = {
            "destination": m.destination,
            "type": m.type,
            "source": m.source,
            "options": list(m.options),
        }
        if m.is_bind:
            entry["treeSource"] = share.bind_name(index, m.source)
        if m.is_bind and "ro" in m.options and "rbind" in m.options and "rro" not in m.options:
            # Read-only is not recursive (runc's rule): the host's writable mounts under the
            # source stay writable in the guest too, which sees them as plain directories.
            entry["rwSubmounts"] = _rw_submounts(_bind_source(bundle, m.source))
        mounts.append(entry)
    config: dict[str, Any] = {
        "hostname": spec.hostname,
        "domainname": spec.domainname,
        "readonly": spec.root.readonly,
        "mounts": mounts,
        "maskedPaths": list(linux.masked_paths),
        "readonlyPaths": list(linux.readonly_paths),
        "sysctl": dict(linux.sysctl),
        "seccomp": linux.seccomp,
    }
    if vm_memory_mib is not None:
        config["resources"] = cgroup_files(raw_resources(bundle), vm_memory_mib, strict=False)
    return {
        "container": container_id,
        "stream": stream,
        "config": config,
        "namespaces": dict(namespaces),
        "process": bundle.raw.get("process") or {},
    }
