"""OCI resources → guest cgroup v2 files, and the stats a VM reports back (runc's formats)."""

from __future__ import annotations

import pytest

from bonneville.spec.resources import (
    UnsupportedResource,
    oom_kill_count,
    parse_size,
    stats_from_cgroup,
    to_cgroup,
)

MIB = 1024 * 1024


@pytest.mark.parametrize(
    ("text", "size"),
    [("1048576", MIB), ("512k", 512 * 1024), ("100M", 100 * MIB), ("1g", 1024 * MIB), ("-1", -1)],
)
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


def test_parse_size_rejects_garbage() -> None:
    with pytest.raises(UnsupportedResource, match="invalid size"):
        parse_size("lots")


def test_docker_update_resources() -> None:
    """What `docker update --memory 128m --cpus 0.5 --pids-limit 50` sends through containerd."""
    resources = {
        "memory": {"limit": 128 * MIB, "swap": 256 * MIB, "reservation": 0},
        "cpu": {"shares": 0, "quota": 50000, "period": 100000, "cpus": "", "mems": ""},
        "pids": {"limit": 50},
        "blockIO": {"weight": 0},
    }
    assert to_cgroup(resources, vm_memory_mib=256, strict=True) == {
        "memory.max": str(128 * MIB),
        "memory.low": "0",
        "memory.swap.max": str(128 * MIB),
        "cpu.max": "50000 100000",
        "pids.max": "50",
    }


def test_unlimited_values() -> None:
    resources = {"memory": {"limit": -1, "swap": -1}, "cpu": {"quota": -1}, "pids": {"limit": 0}}
    assert to_cgroup(resources, vm_memory_mib=256, strict=True) == {
        "memory.max": "max",
        "memory.swap.max": "max",
        "cpu.max": "max 100000",
        "pids.max": "max",
    }


def test_cpu_shares_become_weight() -> None:
    assert to_cgroup({"cpu": {"shares": 1024}}, vm_memory_mib=256, strict=True) == {
        "cpu.weight": "39"
    }
    assert to_cgroup({"cpu": {"shares": 2}}, vm_memory_mib=256, strict=True) == {"cpu.weight": "1"}


@pytest.mark.parametrize(
    ("resources", "named"),
    [
        ({"cpu": {"cpus": "0-1"}}, "cpu.cpus"),
        ({"cpu": {"realtimeRuntime": 1000}}, "cpu.realtimeRuntime"),
        ({"blockIO": {"weight": 300}}, "blockIO"),
        ({"hugepageLimits": [{"pageSize": "2MB", "limit": 1}]}, "hugepageLimits"),
        ({"memory": {"kernel": MIB}}, "memory.kernel"),
        ({"unified": {"io.max": "8:0 rbps=1"}}, "unified"),
    ],
)
def test_update_refuses_what_a_vm_cannot_honour(resources: dict[str, object], named: str) -> None:
    with pytest.raises(UnsupportedResource, match=f"cannot update {named}: a VM cannot honour it"):
        to_cgroup(resources, vm_memory_mib=256, strict=True)


def test_create_skips_what_a_vm_cannot_honour_with_a_warning() -> None:
    warnings: list[str] = []
    files = to_cgroup(
        {"cpu": {"cpus": "0", "quota": 20000}, "blockIO": {"weight": 10}},
        vm_memory_mib=256,
        strict=False,
        warn=warnings.append,
    )
    assert files == {"cpu.max": "20000 100000"}
    assert warnings == ["not applied inside the VM: cpu.cpus, blockIO"]


def test_memory_above_the_vm_is_refused_on_update_and_capped_on_create() -> None:
    big = {"memory": {"limit": 512 * MIB}}
    with pytest.raises(UnsupportedResource, match="the VM has 256 MiB, fixed when it started"):
        to_cgroup(big, vm_memory_mib=256, strict=True)
    assert to_cgroup(big, vm_memory_mib=256, strict=False) == {"memory.max": str(256 * MIB)}


@pytest.mark.parametrize(
    ("resources", "message"),
    [
        ({"memory": {"swap": MIB}}, "memory.swap needs memory.limit"),
        ({"memory": {"limit": 2 * MIB, "swap": MIB}}, "must not be below memory.limit"),
        ({"pids": {"limit": "10"}}, "pids.limit must be an integer"),
        ([], "resources must be a JSON object"),
    ],
)
def test_invalid_values(resources: object, message: str) -> None:
    with pytest.raises(UnsupportedResource, match=message):
        to_cgroup(resources, vm_memory_mib=256, strict=True)  # type: ignore[arg-type]


def test_stats_in_runc_format() -> None:
    files = {
        "cpu.stat": "usage_usec 1500\nuser_usec 1000\nsystem_usec 500\nnr_periods 4\n"
        "nr_throttled 1\nthrottled_usec 20",
        "memory.current": "4096",
        "memory.max": "max",
        "memory.stat": "anon 1024\nfile 2048",
        "memory.events": "low 0\nhigh 0\nmax 3\noom 1\noom_kill 2",
        "pids.current": "3",
        "pids.max": "50",
    }
    stats = stats_from_cgroup(files)
    assert stats["cpu"]["usage"] == {"total": 1_500_000, "kernel": 500_000, "user": 1_000_000}
    assert stats["cpu"]["throttling"] == {
        "periods": 4,
        "throttledPeriods": 1,
        "throttledTime": 20_000,
    }
    assert stats["memory"]["usage"]["usage"] == 4096
    assert stats["memory"]["usage"]["limit"] == 2**64 - 1
    assert stats["memory"]["usage"]["failcnt"] == 3
    assert stats["memory"]["raw"] == {"anon": 1024, "file": 2048}
    assert stats["pids"] == {"current": 3, "limit": 50}
    assert oom_kill_count(files) == 2
