"""The host-side limits of a container's cgroup. They are not the container's own (the guest
kernel enforces those on the container's cgroup inside the VM, spec/resources.py) but the VM's:
its RAM plus what QEMU, the monitor and exec proxies need beyond it, its vCPUs' worth of CPU time
plus QEMU's own threads, a bound on tasks (docs/reliability.md, "Host-side limits", has the
measurements)."""

from __future__ import annotations

import errno
import os
from typing import NamedTuple

from bonneville.shim.cgroups.files import read, write
from bonneville.spec.errors import BonnevilleError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable
    from typing import Any

DEFAULT_CPU_PERIOD_US = 100_000
MIB = 1 << 20

# What a VM's host processes hold beyond its guest RAM, in MiB, each about twice what was
# measured under TCG with a guest that had touched all its RAM: QEMU's translation cache (at most
# 128 MiB for a boot, a template's included, 64 for a clone: backends/qemu/cmdline.py), QEMU's
# heap and mapped binary and libraries and the kernel's memory for it (53 MiB measured), the
# monitor's allocations after it joined (most of its 23 MiB were made before), a dozen exec
# proxies (~2 MiB each charged here).
TB_CACHE_MIB = 128
QEMU_OVERHEAD_MIB = 64
MONITOR_MIB = 32
EXEC_PROXIES_MIB = 32
VM_OVERHEAD_MIB = TB_CACHE_MIB + QEMU_OVERHEAD_MIB + MONITOR_MIB + EXEC_PROXIES_MIB
# A pod member's cgroup holds only its monitor (a relay) and its exec proxies.
MEMBER_MEMORY_MIB = MONITOR_MIB + EXEC_PROXIES_MIB
# CPU beyond the vCPUs for QEMU's own threads (main loop, 9p workers), in cores: 0.41 measured
# with four parallel 9p streams on one vCPU.
CPU_ALLOWANCE = 0.5
# Host tasks: QEMU's thread pool stops at 64 workers; with its other threads, a vCPU thread each
# and the monitor a VM needs under 100; the rest is room for exec proxies (one task each).
PIDS_LIMIT = 512


class Limits(NamedTuple):
    """Host-side limits of a container's cgroup; None leaves a limit as it is."""

    memory: int | None = None  # bytes
    cpu_quota: int | None = None  # µs of CPU time per period
    cpu_period: int = DEFAULT_CPU_PERIOD_US
    cpu_shares: int | None = None  # cgroup v1 shares (cpu.weight is derived on v2)
    pids: int | None = None


def cpu_fields(resources: dict[str, Any]) -> tuple[int | None, int | None, int | None]:
    """(quota, period, shares) of OCI ``resources``, each None where not given."""
    cpu = resources.get("cpu") if isinstance(resources, dict) else None
    if not isinstance(cpu, dict):
        return None, None, None

    def number(key: str) -> int | None:
        value = cpu.get(key)
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    return number("quota"), number("period"), number("shares")


def cpu_quota(vcpus: int, quota: int | None, period: int | None) -> tuple[int, int]:
    """(quota, period) in µs for a VM with ``vcpus`` whose container may use ``quota`` per
    ``period`` (none: all its vCPUs): that budget, at most the vCPUs, plus QEMU's allowance."""
    period = period if period and period > 0 else DEFAULT_CPU_PERIOD_US
    cores = float(max(vcpus, 1))
    if quota is not None and quota > 0:
        cores = min(cores, quota / period)
    return round((cores + CPU_ALLOWANCE) * period), period


def vm_limits(
    memory_mib: int, vcpus: int, resources: dict[str, Any], shares: bool = True
) -> Limits:
    """The limits of the cgroup that holds a VM of ``memory_mib`` and ``vcpus`` running a
    container with OCI ``resources``. ``shares=False`` leaves the CPU weight alone (a pod's
    sandbox: its config's weight is the pause process's, but the cgroup holds the pod's VM)."""
    quota, period, cpu_shares = cpu_fields(resources)
    host_quota, host_period = cpu_quota(vcpus, quota, period)
    return Limits(
        memory=(memory_mib + VM_OVERHEAD_MIB) * MIB,
        cpu_quota=host_quota,
        cpu_period=host_period,
        cpu_shares=cpu_shares if shares and cpu_shares else None,
        pids=PIDS_LIMIT,
    )


def member_limits(resources: dict[str, Any]) -> Limits:
    """The limits of a pod member's cgroup: it holds that container's monitor (a relay; the
    container runs in the pod's VM, in the owner's cgroup) and its exec proxies."""
    _, _, cpu_shares = cpu_fields(resources)
    return Limits(memory=MEMBER_MEMORY_MIB * MIB, cpu_shares=cpu_shares or None, pids=PIDS_LIMIT)


def shares_to_weight(shares: int) -> int:
    """cgroup v1 shares [2, 262144] as a v2 weight [1, 10000] (runc's conversion)."""
    return 1 + ((max(2, min(shares, 262144)) - 2) * 9999) // 262142


def apply(dirs: dict[str, str] | Iterable[str], limits: Limits, raise_only: bool = False) -> None:
    """Write ``limits`` to whichever of the container's directories has each controller (v1:
    memory, cpu, pids each in its own hierarchy; v2: all in one). ``raise_only``: a memory or
    CPU limit already above the new one stays. A controller not mounted here is skipped."""
    directories = list(dirs.values()) if isinstance(dirs, dict) else list(dirs)
    for directory in directories:
        try:
            _apply_one(directory, limits, raise_only)
        except OSError as exc:
            raise BonnevilleError(
                f"cannot set the limits of cgroup {directory}: {exc.strerror}"
            ) from exc


def _apply_one(directory: str, limits: Limits, raise_only: bool) -> None:
    if limits.memory is not None:
        for name in ("memory.limit_in_bytes", "memory.max"):  # v1, v2
            if os.path.exists(f"{directory}/{name}"):
                text = read(f"{directory}/{name}")
                limit = 1 << 63 if text == "max" else int(text or 0)
                if not (raise_only and limit >= limits.memory):
                    write(f"{directory}/{name}", str(limits.memory))
                break
    if limits.cpu_quota is not None:
        wanted = limits.cpu_quota / limits.cpu_period
        if os.path.exists(f"{directory}/cpu.cfs_quota_us"):
            quota = int(read(f"{directory}/cpu.cfs_quota_us") or -1)
            period = int(read(f"{directory}/cpu.cfs_period_us") or DEFAULT_CPU_PERIOD_US)
            if not (raise_only and (quota < 0 or quota / period >= wanted)):
                _write_v1_bandwidth(directory, limits.cpu_quota, limits.cpu_period)
        elif os.path.exists(f"{directory}/cpu.max"):
            quota_text, _, period_text = read(f"{directory}/cpu.max").partition(" ")
            unlimited = quota_text == "max"
            if not (raise_only and (unlimited or int(quota_text) / int(period_text) >= wanted)):
                write(f"{directory}/cpu.max", f"{limits.cpu_quota} {limits.cpu_period}")
    if limits.cpu_shares is not None:
        if os.path.exists(f"{directory}/cpu.shares"):
            write(f"{directory}/cpu.shares", str(limits.cpu_shares))
        elif os.path.exists(f"{directory}/cpu.weight"):
            write(f"{directory}/cpu.weight", str(shares_to_weight(limits.cpu_shares)))
    if limits.pids is not None and os.path.exists(f"{directory}/pids.max"):
        write(f"{directory}/pids.max", str(limits.pids))


def _write_v1_bandwidth(directory: str, quota: int, period: int) -> None:
    """cpu.cfs_period_us then cpu.cfs_quota_us, or the other way round when the kernel refuses
    the period against the old quota (runc's order)."""
    try:
        write(f"{directory}/cpu.cfs_period_us", str(period))
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
        write(f"{directory}/cpu.cfs_quota_us", str(quota))
        write(f"{directory}/cpu.cfs_period_us", str(period))
        return
    write(f"{directory}/cpu.cfs_quota_us", str(quota))


def raise_vm_limits(dirs: dict[str, str], memory_mib: int, vcpus: int) -> None:
    """For the owner monitor, after its VM grew (memory or vCPU hotplug): lift the cgroup's
    memory and CPU bounds to the VM's new size (``memory_mib`` of RAM and ``vcpus`` now, the
    totals, not the increments); never lowers them. ``dirs``: ``MonitorConfig.cgroup``."""
    if not dirs:
        return
    quota, period = cpu_quota(vcpus, None, None)
    apply(
        dirs,
        Limits(memory=(memory_mib + VM_OVERHEAD_MIB) * MIB, cpu_quota=quota, cpu_period=period),
        raise_only=True,
    )
