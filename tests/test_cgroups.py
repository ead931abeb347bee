"""The container's host cgroup (shim/cgroups/): runc's path rules on cgroup v1, hybrid and v2
hosts (pure, from mountinfo and /proc/self/cgroup texts), the limits, and on this host's real
hierarchies the whole round trip through the CLI with the fake backend."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from bonneville.backends import procfs
from bonneville.shim.cgroups import limits, paths, tree
from bonneville.shim.cgroups.hierarchy import Host, parse_mountinfo, parse_proc_cgroup
from bonneville.shim.cgroups.paths import place
from bonneville.shim.cgroups.systemd import unit_argv
from bonneville.spec.errors import BonnevilleError
from tests.support import Runtime, default_config, write_bundle

MIB = 1 << 20

# This machine's layout (Debian, hybrid): v1 controllers one per mount, systemd's named
# hierarchy, the v2 mount at /sys/fs/cgroup/unified.
HYBRID_MOUNTINFO = """\
30 24 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec - tmpfs tmpfs ro,mode=755
31 30 0:27 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
32 30 0:28 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,xattr,name=systemd
33 30 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct
34 30 0:30 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
35 30 0:31 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
36 30 0:32 / /sys/fs/cgroup/net_cls,net_prio rw,relatime - cgroup cgroup rw,net_cls,net_prio
37 30 0:33 / /sys/fs/cgroup/cpuset rw,relatime - cgroup cgroup rw,cpuset
"""
HYBRID_OWN = """\
12:pids:/user.slice/user-0.slice/session-1.scope
8:memory:/user.slice/user-0.slice/session-1.scope
4:cpu,cpuacct:/user.slice
3:net_cls,net_prio:/
2:cpuset:/
1:name=systemd:/user.slice/user-0.slice/session-1.scope
0::/user.slice/user-0.slice/session-1.scope
"""
V1_MOUNTINFO = "\n".join(line for line in HYBRID_MOUNTINFO.splitlines() if "cgroup2" not in line)
V2_MOUNTINFO = "29 24 0:25 / /sys/fs/cgroup rw,relatime - cgroup2 cgroup2 rw\n"
V2_OWN = "0::/user.slice/user-0.slice/session-1.scope\n"


def host(mountinfo: str, own: str = HYBRID_OWN, systemd: bool = False) -> Host:
    return Host(tuple(parse_mountinfo(mountinfo)), parse_proc_cgroup(own), systemd)


HYBRID, V1, V2 = host(HYBRID_MOUNTINFO), host(V1_MOUNTINFO), host(V2_MOUNTINFO, V2_OWN)


def test_mountinfo_names_each_hierarchy_and_its_controllers() -> None:
    mounts = parse_mountinfo(HYBRID_MOUNTINFO)
    assert [(m.mountpoint, m.version, m.key) for m in mounts] == [
        ("/sys/fs/cgroup/unified", 2, ""),
        ("/sys/fs/cgroup/systemd", 1, "name=systemd"),
        ("/sys/fs/cgroup/cpu,cpuacct", 1, "cpu,cpuacct"),
        ("/sys/fs/cgroup/memory", 1, "memory"),
        ("/sys/fs/cgroup/pids", 1, "pids"),
        ("/sys/fs/cgroup/net_cls,net_prio", 1, "net_cls,net_prio"),
        ("/sys/fs/cgroup/cpuset", 1, "cpuset"),
    ]
    escaped = "40 30 0:40 /sub /mnt/my\\040cgroups rw - cgroup cgroup rw,memory\n"
    (mount,) = parse_mountinfo(escaped)
    assert (mount.mountpoint, mount.root) == ("/mnt/my cgroups", "/sub")


def test_modes() -> None:
    assert (HYBRID.mode, V1.mode, V2.mode, host("").mode) == ("hybrid", "v1", "v2", "none")
    # A v2 host with a leftover v1 named hierarchy mounted is still a v2 host.
    odd = host(V2_MOUNTINFO + "40 29 0:40 / /run/x rw - cgroup cgroup rw,name=x\n", V2_OWN)
    assert odd.mode == "v2" and [m.key for m in odd.hierarchies()] == [""]


def test_v1_absolute_path_under_each_mount_point() -> None:
    dirs = place(V1, "/docker/abc", "abc", systemd=False).dirs
    assert dirs == {
        "name=systemd": "/sys/fs/cgroup/systemd/docker/abc",
        "cpu,cpuacct": "/sys/fs/cgroup/cpu,cpuacct/docker/abc",
        "memory": "/sys/fs/cgroup/memory/docker/abc",
        "pids": "/sys/fs/cgroup/pids/docker/abc",
        "net_cls,net_prio": "/sys/fs/cgroup/net_cls,net_prio/docker/abc",
        "cpuset": "/sys/fs/cgroup/cpuset/docker/abc",
    }


def test_hybrid_joins_the_v2_mount_too() -> None:
    dirs = place(HYBRID, "/kubepods/besteffort/pod1234/abc", "abc", systemd=False).dirs
    assert dirs[""] == "/sys/fs/cgroup/unified/kubepods/besteffort/pod1234/abc"
    assert dirs["memory"] == "/sys/fs/cgroup/memory/kubepods/besteffort/pod1234/abc"
    assert len(dirs) == 7


def test_relative_and_default_paths_start_at_the_callers_own_cgroup() -> None:
    # runc's default (no cgroupsPath) is the container id, relative.
    dirs = place(HYBRID, "", "abc", systemd=False).dirs
    assert dirs["memory"] == "/sys/fs/cgroup/memory/user.slice/user-0.slice/session-1.scope/abc"
    assert dirs["cpu,cpuacct"] == "/sys/fs/cgroup/cpu,cpuacct/user.slice/abc"
    assert dirs["cpuset"] == "/sys/fs/cgroup/cpuset/abc"
    # In hybrid mode runc's v1 manager takes the v2 mount as another hierarchy: own cgroup.
    assert dirs[""] == "/sys/fs/cgroup/unified/user.slice/user-0.slice/session-1.scope/abc"
    relative = place(HYBRID, "kubepods/pod1/abc", "abc", systemd=False).dirs
    assert relative["pids"].endswith("/session-1.scope/kubepods/pod1/abc")
    # On a v2 host the caller's parent: its own cgroup has processes (no controllers below).
    assert place(V2, "", "abc", systemd=False).dirs == {
        "": "/sys/fs/cgroup/user.slice/user-0.slice/abc"
    }
    assert place(V2, "/docker/abc", "abc", systemd=False).dirs == {"": "/sys/fs/cgroup/docker/abc"}


def test_a_mount_of_a_sub_tree_is_taken_relative_to_its_root() -> None:
    # A container's view of its host: the mount shows the hierarchy from /docker/outer.
    mounted = host(
        "34 30 0:30 /docker/outer /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n",
        "8:memory:/docker/outer/inner\n",
    )
    assert place(mounted, "", "abc", systemd=False).dirs == {
        "memory": "/sys/fs/cgroup/memory/inner/abc"
    }


def test_paths_are_cleaned_and_cannot_climb_out() -> None:
    assert paths.clean_path("/a/../../b//c/.") == "/b/c"
    assert paths.clean_path("../../etc") == "etc"
    assert paths.clean_path("//docker/x") == "/docker/x"
    assert paths.clean_path(".") == ""
    dirs = place(V2, "../../../escape", "abc", systemd=False).dirs
    assert dirs == {"": "/sys/fs/cgroup/user.slice/user-0.slice/escape"}
    # "." cleans to nothing: runc's default, the id.
    assert place(V2, ".", "abc", systemd=False).dirs[""].endswith("/abc")


def test_the_root_cgroup_is_refused() -> None:
    for path in ("/", "/..", "/docker/.."):
        with pytest.raises(BonnevilleError, match="names the root cgroup"):
            place(HYBRID, path, "abc", systemd=False)


def test_systemd_form_on_a_host_without_systemd() -> None:
    placed = place(HYBRID, "system.slice:docker:abc", "abc", systemd=True)
    assert placed.dirs["memory"] == "/sys/fs/cgroup/memory/system.slice/docker-abc.scope"
    assert placed.dirs[""] == "/sys/fs/cgroup/unified/system.slice/docker-abc.scope"
    assert placed.unit == ""  # no systemd to make it: the directories are made directly
    # containerd's CRI plugin with the systemd driver: the pod's slice, nested as systemd does.
    pod = place(V2, "kubepods-besteffort-pod12.slice:cri-containerd:abc", "abc", systemd=True)
    assert pod.dirs == {
        "": "/sys/fs/cgroup/kubepods.slice/kubepods-besteffort.slice/"
        "kubepods-besteffort-pod12.slice/cri-containerd-abc.scope"
    }
    # Empty: runc's default scope; an empty slice is system.slice; a name ending in .slice is
    # itself the unit.
    assert place(V2, "", "abc", systemd=True).dirs[""] == (
        "/sys/fs/cgroup/system.slice/runc-abc.scope"
    )
    assert place(V2, ":p:abc", "abc", systemd=True).dirs[""] == (
        "/sys/fs/cgroup/system.slice/p-abc.scope"
    )
    assert place(V2, "a.slice:p:a-b.slice", "x", systemd=True).dirs[""] == (
        "/sys/fs/cgroup/a.slice/a-b.slice"
    )
    with pytest.raises(BonnevilleError, match='format "slice:prefix:name"'):
        place(V2, "/docker/abc", "abc", systemd=True)


def test_systemd_form_where_systemd_runs_is_a_transient_unit() -> None:
    with_systemd = host(V2_MOUNTINFO, V2_OWN, systemd=True)
    placed = place(with_systemd, "system.slice:docker:abc", "abc", systemd=True)
    assert (placed.unit, placed.slice) == ("docker-abc.scope", "system.slice")
    argv = unit_argv(placed.unit, placed.slice, 4242)
    assert argv[:9] == [
        "busctl",
        "call",
        "org.freedesktop.systemd1",
        "/org/freedesktop/systemd1",
        "org.freedesktop.systemd1.Manager",
        "StartTransientUnit",
        "ssa(sv)a(sa(sv))",
        "docker-abc.scope",
        "replace",
    ]
    properties = argv[10:-1]
    assert int(argv[9]) == 8  # Description Slice Delegate PIDs 3×Accounting DefaultDependencies
    assert properties[properties.index("PIDs") :][:4] == ["PIDs", "au", "1", "4242"]
    assert properties[properties.index("Slice") :][:3] == ["Slice", "s", "system.slice"]
    assert argv[-1] == "0"  # no auxiliary units


def test_expand_slice() -> None:
    assert paths.expand_slice("system.slice") == "/system.slice"
    assert paths.expand_slice("test-a-b.slice") == "/test.slice/test-a.slice/test-a-b.slice"
    assert paths.expand_slice("-.slice") == "/"
    for bad in ("test--a.slice", "-test.slice", "test", ".slice", "a/b.slice"):
        with pytest.raises(BonnevilleError, match="invalid slice name"):
            paths.expand_slice(bad)


def test_vm_limits() -> None:
    plain = limits.vm_limits(256, 1, {})
    assert plain.memory == (256 + limits.VM_OVERHEAD_MIB) * MIB
    assert (plain.cpu_quota, plain.cpu_period) == (150_000, 100_000)  # one vCPU + 0.5 core
    assert (plain.cpu_shares, plain.pids) == (None, limits.PIDS_LIMIT)
    half = limits.vm_limits(128, 1, {"cpu": {"quota": 25_000, "period": 50_000, "shares": 512}})
    assert (half.cpu_quota, half.cpu_period, half.cpu_shares) == (50_000, 50_000, 512)
    # A quota beyond the vCPUs the VM has is bounded by them; -1 is no quota.
    assert limits.vm_limits(256, 2, {"cpu": {"quota": 400_000}}).cpu_quota == 250_000
    assert limits.vm_limits(256, 2, {"cpu": {"quota": -1}}).cpu_quota == 250_000
    assert limits.vm_limits(256, 1, {"cpu": {"shares": 2}}, shares=False).cpu_shares is None
    member = limits.member_limits({"memory": {"limit": 1 << 30}})
    assert member.memory == limits.MEMBER_MEMORY_MIB * MIB and member.cpu_quota is None


def test_the_vm_limits_use_the_size_the_monitor_gives_the_vm() -> None:
    from bonneville.shim.monitor.vm import DEFAULT_MEMORY_MIB
    from bonneville.spec.config import Resources

    # lifecycle sizes the cgroup as vm.py sizes the VM, without importing the monitor.
    assert Resources().memory_mib() == DEFAULT_MEMORY_MIB


def fake_cgroup(directory: Path, files: dict[str, str]) -> Path:
    directory.mkdir(parents=True)
    for name, text in files.items():
        (directory / name).write_text(text + "\n")
    return directory


def test_limits_written_to_v1_and_v2_files(tmp_path: Path) -> None:
    v1_memory = fake_cgroup(tmp_path / "memory", {"memory.limit_in_bytes": "9223372036854771712"})
    v1_cpu = fake_cgroup(
        tmp_path / "cpu",
        {"cpu.cfs_quota_us": "-1", "cpu.cfs_period_us": "100000", "cpu.shares": "1024"},
    )
    v1_pids = fake_cgroup(tmp_path / "pids", {"pids.max": "max"})
    v2 = fake_cgroup(
        tmp_path / "v2",
        {"memory.max": "max", "cpu.max": "max 100000", "cpu.weight": "100", "pids.max": "max"},
    )
    dirs = {"memory": str(v1_memory), "cpu": str(v1_cpu), "pids": str(v1_pids), "": str(v2)}
    bounds = limits.Limits(
        memory=512 * MIB, cpu_quota=150_000, cpu_period=100_000, cpu_shares=512, pids=512
    )
    limits.apply(dirs, bounds)
    assert (v1_memory / "memory.limit_in_bytes").read_text() == str(512 * MIB)
    assert (v1_cpu / "cpu.cfs_quota_us").read_text() == "150000"
    assert (v1_cpu / "cpu.shares").read_text() == "512"
    assert (v1_pids / "pids.max").read_text() == "512"
    assert (v2 / "memory.max").read_text() == str(512 * MIB)
    assert (v2 / "cpu.max").read_text() == "150000 100000"
    assert (v2 / "cpu.weight").read_text() == str(limits.shares_to_weight(512))
    # After a hotplug the bounds only grow: a smaller VM size changes nothing.
    limits.raise_vm_limits(dirs, 128, 1)
    assert (v1_memory / "memory.limit_in_bytes").read_text() == str(512 * MIB)
    assert (v2 / "cpu.max").read_text() == "150000 100000"
    limits.raise_vm_limits(dirs, 1024, 2)
    assert (v1_memory / "memory.limit_in_bytes").read_text() == str(
        (1024 + limits.VM_OVERHEAD_MIB) * MIB
    )
    assert (v1_cpu / "cpu.cfs_quota_us").read_text() == "250000"
    assert (v2 / "cpu.max").read_text() == "250000 100000"
    limits.raise_vm_limits({}, 1024, 2)  # a container without a cgroup of its own


def test_update_moves_the_host_cpu_bound_with_the_guest_limit(tmp_path: Path) -> None:
    from bonneville.shim.lifecycle import hostcgroup
    from bonneville.shim.lifecycle.context import Context
    from bonneville.shim.state import ContainerState, Store

    cpu = fake_cgroup(
        tmp_path / "cpu", {"cpu.cfs_quota_us": "150000", "cpu.cfs_period_us": "100000"}
    )
    memory = fake_cgroup(tmp_path / "memory", {"memory.limit_in_bytes": str(512 * MIB)})
    ctx = Context(store=Store(str(tmp_path / "root")))
    st = ContainerState(
        id="c1",
        bundle="",
        rootfs="",
        backend="qemu",
        cgroup={"cpu": str(cpu), "memory": str(memory)},
        vm_vcpus=2,
    )
    hostcgroup.update_limits(ctx, st, {"cpu": {"quota": 50_000, "period": 100_000}})
    assert (cpu / "cpu.cfs_quota_us").read_text() == "100000"  # half a core + QEMU's
    hostcgroup.update_limits(ctx, st, {"cpu": {"quota": 900_000}})
    assert (cpu / "cpu.cfs_quota_us").read_text() == "250000"  # no more than its 2 vCPUs
    # Memory stays: the VM's RAM is fixed at boot, a guest limit only moves below it.
    hostcgroup.update_limits(ctx, st, {"memory": {"limit": 64 * MIB}})
    assert (memory / "memory.limit_in_bytes").read_text().strip() == str(512 * MIB)
    # A pod member's cgroup holds only its relay.
    member = ContainerState(
        id="m1", bundle="", rootfs="", backend="qemu", sandbox="c1", cgroup=st.cgroup
    )
    hostcgroup.update_limits(ctx, member, {"cpu": {"quota": 10_000}})
    assert (cpu / "cpu.cfs_quota_us").read_text() == "250000"


# ---- on this host's hierarchies ----------------------------------------------------------------

needs_cgroups = pytest.mark.skipif(
    os.geteuid() != 0 or Host.read().mode == "none", reason="needs root and mounted cgroups"
)


@pytest.fixture
def parent() -> Iterator[str]:
    """A cgroupsPath parent of the test's own, gone afterwards in every hierarchy (ask for it
    before `runtime`: its containers must be gone first)."""
    name = f"bonneville-test-{os.getpid()}"
    yield f"/{name}"
    for mount in Host.read().hierarchies():
        tree.remove({"": f"{mount.mountpoint}/{name}"}, timeout=5)


def cgroup_of(pid: int) -> dict[str, str]:
    return parse_proc_cgroup(Path(f"/proc/{pid}/cgroup").read_text())


def memory_limit(dirs: dict[str, str]) -> int:
    """The memory limit of a container's cgroup (v1's memory hierarchy, else v2's)."""
    if "memory" in dirs:
        return int(Path(dirs["memory"], "memory.limit_in_bytes").read_text())
    return int(Path(dirs[""], "memory.max").read_text())


@needs_cgroups
def test_create_join_limit_remove_on_this_host(parent: str) -> None:
    here = Host.read()
    placed = place(here, f"{parent}/c1", "c1", systemd=False)
    child = subprocess.Popen(["sleep", "1000"])
    try:
        tree.create(placed, here, child.pid)
        limits.apply(placed.dirs, limits.vm_limits(256, 1, {}))
        own = cgroup_of(child.pid)
        for key in placed.dirs:
            controller = key.split(",")[0]
            assert own[controller] == f"{parent}/c1", (key, own)
        assert memory_limit(placed.dirs) == (256 + limits.VM_OVERHEAD_MIB) * MIB
    finally:
        child.kill()
        child.wait()
    assert tree.remove(placed.dirs) == []
    assert not any(os.path.exists(d) for d in placed.dirs.values())


def make_bundle(tmp_path: Path, cgroups_path: str, name: str = "bundle") -> Path:
    config = default_config(["sleep", "1000"])
    linux = config["linux"]
    assert isinstance(linux, dict)
    linux["cgroupsPath"] = cgroups_path
    linux["resources"] = {"memory": {"limit": 300 * MIB}, "cpu": {"quota": 50_000}}
    return write_bundle(tmp_path / name, config)


def container_state(rt: Runtime, cid: str) -> dict[str, object]:
    data = json.loads((rt.root / cid / "state.json").read_text())
    assert isinstance(data, dict)
    return data


@needs_cgroups
def test_monitor_vm_and_exec_proxy_live_in_the_containers_cgroup(
    parent: str, runtime: Runtime, tmp_path: Path
) -> None:
    bundle = make_bundle(tmp_path, f"{parent}/c1")
    runtime("create", "--bundle", str(bundle), "c1", check=True)
    runtime("start", "c1", check=True)
    monitor = int(str(runtime.state("c1")["pid"]))
    dirs = container_state(runtime, "c1")["cgroup"]
    assert isinstance(dirs, dict) and dirs
    # The monitor, and the "VM" it launched after joining (the fake backend's agent).
    for pid in (monitor, *procfs.descendants(monitor)):
        assert set(cgroup_of(pid).values()) == {f"{parent}/c1"}, pid
    assert memory_limit(dirs) == (300 + limits.VM_OVERHEAD_MIB) * MIB
    # An exec proxy joins (--detach: the pid-file names the forked proxy), OOM-first.
    pid_file = tmp_path / "exec.pid"
    process = tmp_path / "process.json"
    process.write_text(json.dumps({"args": ["sleep", "1000"], "cwd": "/", "env": ["PATH=/bin"]}))
    runtime(
        "exec", "--detach", "--pid-file", str(pid_file), "--process", str(process), "c1", check=True
    )
    proxy = int(pid_file.read_text())
    assert set(cgroup_of(proxy).values()) == {f"{parent}/c1"}
    assert Path(f"/proc/{proxy}/oom_score_adj").read_text().strip() == "1000"
    # `ps` (docker top) lists the cgroup's processes, as runc does: the proxy too.
    listed = json.loads(runtime("ps", "--format", "json", "c1", check=True).stdout)
    assert listed[0] == monitor and proxy in listed
    runtime("delete", "--force", "c1", check=True)
    assert not any(os.path.exists(d) for d in dirs.values())


@needs_cgroups
def test_delete_after_a_crash_removes_the_cgroup(
    parent: str, runtime: Runtime, tmp_path: Path
) -> None:
    bundle = make_bundle(tmp_path, f"{parent}/c1")
    runtime("create", "--bundle", str(bundle), "c1", check=True)
    dirs = container_state(runtime, "c1")["cgroup"]
    assert isinstance(dirs, dict)
    os.kill(int(str(runtime.state("c1")["pid"])), signal.SIGKILL)
    runtime("delete", "c1", check=True)
    assert not any(os.path.exists(d) for d in dirs.values())


@needs_cgroups
def test_systemd_form_without_systemd_and_a_refused_path(
    parent: str, runtime: Runtime, tmp_path: Path
) -> None:
    slice_name = f"{parent.strip('/').replace('-', '_')}.slice"
    bundle = make_bundle(tmp_path, f"{slice_name}:bvtest:c1")
    runtime("--systemd-cgroup", "create", "--bundle", str(bundle), "c1", check=True)
    try:
        dirs = container_state(runtime, "c1")["cgroup"]
        assert isinstance(dirs, dict)
        assert all(d.endswith(f"/{slice_name}/bvtest-c1.scope") for d in dirs.values())
        monitor = int(str(runtime.state("c1")["pid"]))
        assert set(cgroup_of(monitor).values()) == {f"/{slice_name}/bvtest-c1.scope"}
        runtime("delete", "--force", "c1", check=True)
        assert not any(os.path.exists(d) for d in dirs.values())
    finally:
        for mount in Host.read().hierarchies():
            tree.remove({"": f"{mount.mountpoint}/{slice_name}"}, timeout=5)
    # runc's refusal, before anything exists.
    bad = make_bundle(tmp_path, "/not/the/systemd/form", name="bad")
    refused = runtime("--systemd-cgroup", "create", "--bundle", str(bad), "c2")
    assert refused.returncode == 1
    assert b'format "slice:prefix:name"' in refused.stderr
    assert not (runtime.root / "c2").exists()
