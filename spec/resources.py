"""OCI ``linux.resources`` → the cgroup v2 files the guest agent writes for the container.

Inside its VM a container is the only tenant, so the limits a VM can honour are the ones the
guest kernel enforces on the container's cgroup: memory (below the VM's RAM), CPU bandwidth and
weight, and the number of processes. What depends on host hardware the VM does not see (cpusets,
real-time budgets, block-device weights, huge pages, RDMA, net classes) cannot be honoured: `create`
ignores those with a log line (docker sets some by default), `update` refuses them by name.
The conversions follow runc's for cgroup v2 (libcontainer/cgroups/fs2).
"""

from __future__ import annotations

import re
from collections.abc import Callable

from bonneville.spec.errors import BonnevilleError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

DEFAULT_CPU_PERIOD_US = 100_000
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgtp]?)(i?b?)\s*$", re.IGNORECASE)


class UnsupportedResource(BonnevilleError):
    """An update asks for a limit a VM cannot honour, or for an impossible value."""


def parse_size(text: str) -> int:
    """A byte count as runc's flags take it: ``1048576``, ``512k``, ``100M``, ``1g``; -1 is
    "unlimited"."""
    if text.strip() == "-1":
        return -1
    match = _SIZE.match(text)
    if not match:
        raise UnsupportedResource(f"invalid size: {text!r}")
    number, unit, _ = match.groups()
    scale = 1024 ** " kmgtp".index(unit.lower() or " ")
    return int(float(number) * scale)


def _number(value: Any, name: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise UnsupportedResource(f"{name} must be an integer, not {value!r}")
    return value


def _is_set(value: Any) -> bool:
    """Whether a field asks for something (zero, empty and null are docker's "unset")."""
    if isinstance(value, dict):
        return any(_is_set(v) for v in value.values())
    if isinstance(value, list | str):
        return bool(value)
    return value not in (None, 0, False)


def _unsupported(resources: dict[str, Any], strict: bool) -> list[str]:
    """Names of the fields that ask for something a VM cannot give."""
    names = []
    cpu = resources.get("cpu") or {}
    for key in ("cpus", "mems", "realtimeRuntime", "realtimePeriod", "idle"):
        if _is_set(cpu.get(key)):
            names.append(f"cpu.{key}")
    memory = resources.get("memory") or {}
    for key in ("kernel", "kernelTCP", "swappiness", "disableOOMKiller", "useHierarchy"):
        if _is_set(memory.get(key)):
            names.append(f"memory.{key}")
    for key in ("blockIO", "hugepageLimits", "rdma", "network", "unified"):
        if _is_set(resources.get(key)):
            names.append(key)
    if strict and _is_set(resources.get("devices")):
        # Every config carries device rules; in a VM the container sees only the guest's devices,
        # so create has nothing to warn about. Changing them later is not something we can do.
        names.append("devices")
    return names


def to_cgroup(
    resources: dict[str, Any],
    *,
    vm_memory_mib: int,
    strict: bool,
    warn: Callable[[str], None] | None = None,
) -> dict[str, str]:
    """The cgroup v2 file values for ``resources``; only the fields it sets.

    ``strict`` (update): a field the VM cannot honour is an error; otherwise (create) it is
    reported through ``warn`` and skipped. A memory limit above the VM's RAM is an error on
    update (RAM is fixed at boot) and capped on create (the VM was sized from it).
    """
    if not isinstance(resources, dict):
        raise UnsupportedResource("resources must be a JSON object")
    unsupported = _unsupported(resources, strict)
    if unsupported:
        text = ", ".join(unsupported)
        if strict:
            raise UnsupportedResource(f"cannot update {text}: a VM cannot honour it")
        if warn:
            warn(f"not applied inside the VM: {text}")
    files: dict[str, str] = {}
    memory = resources.get("memory") or {}
    limit = _number(memory.get("limit"), "memory.limit")
    if limit is not None:
        vm_bytes = vm_memory_mib * 1024 * 1024
        if limit > vm_bytes:
            if strict:
                raise UnsupportedResource(
                    f"cannot raise the memory limit to {limit} bytes: the VM has "
                    f"{vm_memory_mib} MiB, fixed when it started"
                )
            limit = vm_bytes
        files["memory.max"] = "max" if limit <= 0 else str(limit)
    reservation = _number(memory.get("reservation"), "memory.reservation")
    if reservation is not None:
        files["memory.low"] = "max" if reservation < 0 else str(reservation)
    swap = _number(memory.get("swap"), "memory.swap")
    if swap is not None:
        # v1's swap is memory+swap; v2 limits swap alone (runc's ConvertMemorySwapToCgroupV2).
        if swap < 0:
            files["memory.swap.max"] = "max"
        elif swap > 0:
            if limit is None or limit <= 0:
                raise UnsupportedResource("memory.swap needs memory.limit")
            if swap < limit:
                raise UnsupportedResource("memory.swap must not be below memory.limit")
            files["memory.swap.max"] = str(swap - limit)
    cpu = resources.get("cpu") or {}
    quota = _number(cpu.get("quota"), "cpu.quota")
    period = _number(cpu.get("period"), "cpu.period")
    if quota is not None or period:
        quota_text = "max" if quota is None or quota <= 0 else str(quota)
        files["cpu.max"] = f"{quota_text} {period or DEFAULT_CPU_PERIOD_US}"
    shares = _number(cpu.get("shares"), "cpu.shares")
    if shares:
        # runc's ConvertCPUSharesToCgroupV2Value: [2, 262144] → [1, 10000].
        files["cpu.weight"] = str(1 + ((max(2, min(shares, 262144)) - 2) * 9999) // 262142)
    pids = resources.get("pids") or {}
    pids_limit = _number(pids.get("limit"), "pids.limit")
    if pids_limit is not None:
        files["pids.max"] = "max" if pids_limit <= 0 else str(pids_limit)
    return files


def _keyed(text: str | None) -> dict[str, int]:
    values = {}
    for line in (text or "").splitlines():
        key, _, value = line.partition(" ")
        if value.strip().lstrip("-").isdigit():
            values[key] = int(value)
    return values


def _scalar(text: str | None) -> int:
    """A single-value cgroup file; "max" (no limit) is reported as runc does, the max uint64."""
    text = (text or "").strip()
    if text == "max":
        return 2**64 - 1
    return int(text) if text.isdigit() else 0


def stats_from_cgroup(files: dict[str, str]) -> dict[str, Any]:
    """runc's ``events`` stats object (types.Stats) from the guest cgroup's file contents."""
    cpu = _keyed(files.get("cpu.stat"))
    memory_stat = _keyed(files.get("memory.stat"))
    memory_events = _keyed(files.get("memory.events"))
    return {
        "cpu": {
            "usage": {
                "total": cpu.get("usage_usec", 0) * 1000,
                "kernel": cpu.get("system_usec", 0) * 1000,
                "user": cpu.get("user_usec", 0) * 1000,
            },
            "throttling": {
                "periods": cpu.get("nr_periods", 0),
                "throttledPeriods": cpu.get("nr_throttled", 0),
                "throttledTime": cpu.get("throttled_usec", 0) * 1000,
            },
        },
        "memory": {
            "usage": {
                "usage": _scalar(files.get("memory.current")),
                "limit": _scalar(files.get("memory.max")),
                "max": _scalar(files.get("memory.peak")),
                "failcnt": memory_events.get("max", 0),
            },
            "swap": {
                "usage": _scalar(files.get("memory.swap.current")),
                "limit": _scalar(files.get("memory.swap.max")),
            },
            "raw": memory_stat,
        },
        "pids": {
            "current": _scalar(files.get("pids.current")),
            "limit": _scalar(files.get("pids.max")) if files.get("pids.max") != "max" else 0,
        },
    }


def oom_kill_count(files: dict[str, str]) -> int:
    """How many processes the guest's OOM killer has killed in the container so far."""
    return _keyed(files.get("memory.events")).get("oom_kill", 0)
