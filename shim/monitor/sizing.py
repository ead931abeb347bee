"""How big a pod's VM must be: room for every container's limits (a pure computation).

A container alone is sized from its own limits at launch (spec/config.py, ``Resources``). A pod
grows as containers join: like Kata, the VM holds its sandbox's RAM and vCPUs plus the sum of
its members' limits, so each member's memory limit is honoured by the guest's cgroup (never
capped below what its config says), and the guest kernel's OOM killer, not the host's, meets a
container that goes beyond it. RAM is added in 128 MiB blocks and never taken back while the
pod lives; vCPUs up to the host's. docs/docker.md, "Kubernetes", has the rule for users.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from bonneville.backends.base import HOTPLUG_BLOCK_MIB
from bonneville.spec.resources import DEFAULT_CPU_PERIOD_US

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


@dataclass(frozen=True)
class Demand:
    """What one member's limits ask of the VM: RAM (MiB) and vCPUs (0: no limit)."""

    memory_mib: int = 0
    vcpus: int = 0


def demand(resources: dict[str, Any]) -> Demand:
    """A member's demand from its OCI ``linux.resources``."""
    memory = resources.get("memory") or {}
    cpu = resources.get("cpu") or {}
    limit = memory.get("limit") if isinstance(memory, dict) else None
    quota = cpu.get("quota") if isinstance(cpu, dict) else None
    period = cpu.get("period") if isinstance(cpu, dict) else None
    mib = -(-limit // (1 << 20)) if isinstance(limit, int) and limit > 0 else 0
    vcpus = 0
    if isinstance(quota, int) and quota > 0:
        vcpus = math.ceil(
            quota / (period if isinstance(period, int) and period > 0 else DEFAULT_CPU_PERIOD_US)
        )
    return Demand(mib, vcpus)


@dataclass(frozen=True)
class Growth:
    add_memory_mib: int  # a multiple of HOTPLUG_BLOCK_MIB, 0 if none
    vcpus: int  # the vCPU count the VM should have (>= its current)


def growth(
    base: Demand, members: list[Demand], memory_mib: int, vcpus: int, max_vcpus: int
) -> Growth:
    """What to plug into a VM that has ``memory_mib`` and ``vcpus`` so it holds ``base`` (the
    sandbox's own) plus every member's demand."""
    wanted_mib = base.memory_mib + sum(m.memory_mib for m in members)
    add = 0
    if wanted_mib > memory_mib:
        add = -(-(wanted_mib - memory_mib) // HOTPLUG_BLOCK_MIB) * HOTPLUG_BLOCK_MIB
    wanted_vcpus = base.vcpus + sum(m.vcpus for m in members)
    return Growth(add, max(vcpus, min(wanted_vcpus, max_vcpus)))
