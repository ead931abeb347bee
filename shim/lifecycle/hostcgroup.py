"""The container's host cgroup as the commands use it (the cgroup itself: shim/cgroups/):
placed and entered by create, bounded by the VM's size or a member's relay, joined by exec
proxies, its CPU bound moved by update."""

from __future__ import annotations

import contextlib
import logging
import os
from typing import TYPE_CHECKING, Any

from bonneville.shim.cgroups import hierarchy, limits, paths, tree
from bonneville.shim.lifecycle.context import Context, refresh
from bonneville.shim.state import ContainerState
from bonneville.shim.status import Status
from bonneville.spec.errors import BonnevilleError

if TYPE_CHECKING:
    from bonneville.spec.config import Bundle

log = logging.getLogger("bonneville")


def place(ctx: Context, container_id: str, spec: Any) -> paths.Placement | None:
    """Where the container's host cgroup goes (runc's rules); None where no cgroup hierarchy
    is mounted. A cgroupsPath runc refuses is refused here, before anything exists."""
    host = hierarchy.Host.read()
    if host.mode == "none":
        return None
    return paths.place(host, spec.linux.cgroups_path, container_id, ctx.systemd_cgroup)


def enter(
    st: ContainerState, placement: paths.Placement, bundle: Bundle, pid: int, member: bool
) -> None:
    """Make the container's cgroup, bound it (shim/cgroups/limits.py, the VM's size or a member's
    relay) and move the monitor into it. runc's default place (no cgroupsPath) is a courtesy:
    where it cannot be made (a read-only /sys/fs/cgroup), the container runs without it."""
    spec = bundle.spec
    raw = (bundle.raw.get("linux") or {}).get("resources") or {}
    raw = raw if isinstance(raw, dict) else {}
    if member:
        bounds = limits.member_limits(raw)
    else:
        bounds = limits.vm_limits(
            spec.linux.resources.memory_mib(),
            st.vm_vcpus,
            raw,
            shares=not _is_pod_sandbox(spec.annotations),
        )
    try:
        tree.create(placement, hierarchy.Host.read(), pid)
        limits.apply(placement.dirs, bounds)
    except BonnevilleError as exc:
        if spec.linux.cgroups_path:
            raise
        log.warning("container %s runs without a cgroup of its own: %s", st.id, exc)
        tree.remove(st.cgroup, st.cgroup_unit, timeout=0)
        st.cgroup, st.cgroup_unit = {}, ""


def _is_pod_sandbox(annotations: dict[str, str]) -> bool:
    """A CRI sandbox: its config's CPU weight is the pause process's (2 shares), but its
    cgroup holds the whole pod's VM, so the host cgroup keeps the default weight."""
    from bonneville.shim.pod import CRI_TYPE, CRIO_TYPE

    return "sandbox" in (annotations.get(CRI_TYPE), annotations.get(CRIO_TYPE))


def join_as_proxy(st: ContainerState) -> None:
    """Join the container's cgroup, as runc's exec'd process does: the proxy is the host
    process that stands for the guest one (with --detach, the child forked from here). It
    offers itself first to the host's OOM killer, so an exec storm that fills the cgroup costs
    proxies, not the VM."""
    if not st.cgroup:
        return
    try:
        tree.join(st.cgroup, os.getpid())
    except BonnevilleError as exc:
        log.warning("exec in %s: the proxy stays outside its cgroup: %s", st.id, exc)
        return
    with contextlib.suppress(OSError), open("/proc/self/oom_score_adj", "w") as f:
        f.write("1000")


def update_limits(ctx: Context, st: ContainerState, resources: dict[str, Any]) -> None:
    """The host's bound on the VM follows the guest's new limits: CPU bandwidth is the new
    quota (at most the vCPUs) plus QEMU's allowance, the weight the new shares. Memory and
    pids stay: the VM's RAM is fixed at boot (a guest limit moves only below it) and guest
    processes are not host tasks. A pod member's cgroup holds only its relay; a pod's owner
    with members keeps the bound its grown VM was given."""
    if not st.cgroup or st.sandbox:
        return
    quota, period, shares = limits.cpu_fields(resources)
    host_quota: int | None = None
    host_period = limits.DEFAULT_CPU_PERIOD_US
    if (quota is not None or period is not None) and not _has_members(ctx, st.id):
        host_quota, host_period = limits.cpu_quota(st.vm_vcpus, quota, period)
    bounds = limits.Limits(
        cpu_quota=host_quota,
        cpu_period=host_period,
        cpu_shares=shares if shares and not _is_pod_sandbox(st.annotations) else None,
    )
    limits.apply(st.cgroup, bounds)


def _has_members(ctx: Context, owner: str) -> bool:
    """Whether a container of this root runs in ``owner``'s VM."""
    for container_id in ctx.store.ids():
        with contextlib.suppress(BonnevilleError):
            other = ctx.store.load(container_id)
            if other.sandbox == owner and refresh(ctx, other) is not Status.STOPPED:
                return True
    return False
