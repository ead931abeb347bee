"""What the host sees of a container VM (shim/cgroups/): its monitor and QEMU in the cgroup the
caller named, `docker stats`, `ctr task metrics` and CRI's ContainerStats showing the VM's real
cost, host limits that never kill a guest using its whole RAM, nothing left after a delete.

The QEMU backend (the default); docs/docker.md says what libvirtd's VMs show instead.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import statistics
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from bonneville.backends import procfs
from bonneville.shim.cgroups import hierarchy, limits, paths, tree
from integration.cri import (
    CNI_BIN_DIR,
    Containerd,
    CriClient,
    cri_client_fixture,
    cri_containerd_fixture,
    cri_images_fixture,
    poll,
)
from integration.test_containerd import IMAGE as CTR_IMAGE
from integration.test_containerd import Ctr, containerd
from tests.support import Docker, private_dockerd

# Fixtures from elsewhere: imported, pytest finds them here.
FIXTURES = [cri_images_fixture, cri_containerd_fixture, cri_client_fixture, containerd]

pytestmark = [
    pytest.mark.vm,
    pytest.mark.skipif(shutil.which("dockerd") is None, reason="dockerd is not installed"),
    pytest.mark.skipif(hierarchy.Host.read().mode == "none", reason="no cgroup is mounted"),
]

IMAGE = "bonneville-busybox:test"
MIB = 1 << 20
READY = ["sh", "-c", "echo ready; exec sleep 100000"]


@pytest.fixture(scope="module")
def docker() -> Iterator[Docker]:
    """A private dockerd whose `bonneville` runtime runs QEMU VMs (its default cgroup driver,
    cgroupfs: cgroupsPath /docker/<id>)."""
    bonneville = shutil.which("bonneville")
    assert bonneville
    with private_dockerd({"bonneville": {"path": bonneville}}, IMAGE) as client:
        yield client


def run_detached(docker: Docker, *args: str) -> str:
    return docker.ok("run", "-d", "--runtime", docker.runtime, *args).strip()


def wait_log(docker: Docker, cid: str, text: str) -> None:
    poll(lambda: text in docker.ok("logs", cid), what=f"{text!r} in the logs of {cid}")


def dirs_of(cgroups_path: str, cid: str) -> dict[str, str]:
    """The directories runc's rules give ``cgroups_path`` on this host."""
    return paths.place(hierarchy.Host.read(), cgroups_path, cid, systemd=False).dirs


def host_processes(monitor: int) -> list[int]:
    """The container's host processes: its monitor (the pid-file PID) and what it started."""
    return [monitor, *procfs.descendants(monitor)]


def cgroup_paths(pid: int) -> set[str]:
    """The cgroup paths of ``pid`` in every hierarchy (one path if it sits in one place)."""
    text = Path(f"/proc/{pid}/cgroup").read_text()
    return set(hierarchy.parse_proc_cgroup(text).values())


def pss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no Pss in /proc/{pid}/smaps_rollup")


_UNITS = {"B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "kB": 1000, "MB": 10**6}


def size(text: str) -> int:
    match = re.fullmatch(r"([\d.]+)\s*([A-Za-z]+)", text.strip())
    assert match, text
    return int(float(match.group(1)) * _UNITS[match.group(2)])


def stats(docker: Docker, cid: str) -> tuple[int, int, float]:
    """`docker stats`' memory use, memory limit and CPU % of a container."""
    shown = json.loads(docker.ok("stats", "--no-stream", "--format", "{{json .}}", cid))
    used, _, limit = shown["MemUsage"].partition(" / ")
    return size(used), size(limit), float(shown["CPUPerc"].rstrip("%"))


def procs_file(dirs: dict[str, str]) -> Path:
    """The cgroup's process list (every hierarchy of a container lists the same ones)."""
    return Path(next(iter(dirs.values())), "cgroup.procs")


def memory_file(dirs: dict[str, str], v1: str, v2: str) -> Path:
    return Path(dirs["memory"], v1) if "memory" in dirs else Path(dirs[""], v2)


def oom_kills(dirs: dict[str, str]) -> int:
    """How many processes the host's OOM killer took from the cgroup."""
    text = memory_file(dirs, "memory.oom_control", "memory.events").read_text()
    return int(re.search(r"^oom_kill (\d+)$", text, re.M).group(1))  # type: ignore[union-attr]


def test_the_vm_lives_in_the_containers_cgroup_and_leaves_nothing(docker: Docker) -> None:
    cid = run_detached(docker, IMAGE, *READY)
    try:
        wait_log(docker, cid, "ready")
        monitor = int(docker.ok("inspect", "-f", "{{.State.Pid}}", cid))
        processes = host_processes(monitor)
        commands = [Path(f"/proc/{pid}/comm").read_text().strip() for pid in processes]
        assert any(c.startswith("qemu-system") for c in commands), commands
        for pid in processes:
            assert cgroup_paths(pid) == {f"/docker/{cid}"}, (pid, commands)
        # An exec's host proxy joins too.
        docker.ok("exec", "-d", cid, "sleep", "1000")
        dirs = dirs_of(f"/docker/{cid}", cid)
        procs = procs_file(dirs).read_text().split()
        assert len(procs) > len(processes), (procs, processes)
    finally:
        docker.ok("rm", "-f", cid)
    assert [d for d in dirs.values() if os.path.exists(d)] == []


def test_cgroup_parent_is_honoured(docker: Docker) -> None:
    parent = f"/bvtest-parent-{os.getpid()}"
    cid = run_detached(docker, "--cgroup-parent", parent, IMAGE, *READY)
    try:
        wait_log(docker, cid, "ready")
        monitor = int(docker.ok("inspect", "-f", "{{.State.Pid}}", cid))
        for pid in host_processes(monitor):
            assert cgroup_paths(pid) == {f"{parent}/{cid}"}
    finally:
        docker.ok("rm", "-f", cid)
        assert [d for d in dirs_of(f"{parent}/{cid}", cid).values() if os.path.exists(d)] == []
        tree.remove(dirs_of(parent, cid), timeout=5)


def test_docker_stats_shows_the_vms_cost(docker: Docker) -> None:
    """Idle: memory within 2x of the monitor's and QEMU's PSS, CPU under 5 %; a spinning
    container over 50 % (of one core, docker's scale). The two run side by side, as clones of
    one template do on any host (alone, a clone's PSS counts every template page it maps)."""
    idle = run_detached(docker, IMAGE, *READY)
    busy = run_detached(docker, IMAGE, "sh", "-c", "yes > /dev/null")
    try:
        wait_log(docker, idle, "ready")
        monitor = int(docker.ok("inspect", "-f", "{{.State.Pid}}", idle))
        proportional = sum(pss(pid) for pid in host_processes(monitor))
        samples = [stats(docker, idle) for _ in range(3)]
        used = statistics.median(s[0] for s in samples)
        assert proportional / 2 <= used <= proportional * 2, (used, proportional)
        assert samples[0][1] == (256 + limits.VM_OVERHEAD_MIB) * MIB  # the host's bound
        assert statistics.median(s[2] for s in samples) < 5, samples
        spinning: list[float] = []

        def spins() -> bool:
            spinning.append(stats(docker, busy)[2])
            return spinning[-1] > 50

        poll(spins, timeout=120, what=f"the spinning container's CPU over 50 % ({spinning})")
    finally:
        docker.ok("rm", "-f", idle, busy)


def test_a_guest_using_all_its_memory_is_not_killed_by_the_host(docker: Docker) -> None:
    # dd's buffers, each filled from /dev/zero, up to more than the VM has: the guest's OOM
    # killer ends the biggest; every guest page is touched on the way.
    fill = (
        "for round in 1 2 3; do for mib in 200 240 260 280 300; do"
        " dd if=/dev/zero of=/dev/null bs=${mib}M count=1 2>/dev/null; done; done;"
        " echo filled; exec sleep 100000"
    )
    cid = run_detached(docker, "--memory", "300m", IMAGE, "sh", "-c", fill)
    try:
        monitor = int(docker.ok("inspect", "-f", "{{.State.Pid}}", cid))
        vm = [pid for pid in host_processes(monitor) if pid != monitor]
        poll(lambda: "filled" in docker.ok("logs", cid), timeout=300, what="the guest filled")
        dirs = dirs_of(f"/docker/{cid}", cid)
        assert oom_kills(dirs) == 0
        state = docker.ok("inspect", "-f", "{{.State.Status}} {{.State.OOMKilled}}", cid)
        assert state.split() == ["running", "false"]
        assert [pid for pid in host_processes(monitor) if pid != monitor] == vm
        assert docker.ok("exec", cid, "echo", "alive").strip() == "alive"
        assert stats(docker, cid)[1] == (300 + limits.VM_OVERHEAD_MIB) * MIB
        limit = memory_file(dirs, "memory.limit_in_bytes", "memory.max").read_text()
        assert int(limit) == (300 + limits.VM_OVERHEAD_MIB) * MIB
    finally:
        docker.ok("rm", "-f", cid)


def test_update_moves_the_host_bound_with_the_guests(docker: Docker) -> None:
    cid = run_detached(docker, IMAGE, *READY)
    try:
        wait_log(docker, cid, "ready")
        dirs = dirs_of(f"/docker/{cid}", cid)
        cpu = next(d for d in dirs.values() if os.path.exists(f"{d}/cpu.cfs_quota_us"))
        quota = Path(cpu, "cpu.cfs_quota_us")
        assert quota.read_text().strip() == "150000"  # 1 vCPU + QEMU's 0.5
        docker.ok("update", "--cpus", "0.5", cid)
        assert quota.read_text().strip() == "100000"
        assert docker.ok("exec", cid, "cat", "/sys/fs/cgroup/cpu.max").split() == [
            "50000",
            "100000",
        ]
    finally:
        docker.ok("rm", "-f", cid)


# ---- containerd: ctr and the CRI plugin ----------------------------------------------------


def test_ctr_task_metrics(containerd: Ctr) -> None:
    ctr = Ctr(containerd.address, containerd.base)
    started = ctr("run", "-d", "--runc-binary", ctr.binary, CTR_IMAGE, "m1", *READY)
    assert started.returncode == 0, started.stderr
    try:
        poll(lambda: "RUNNING" in ctr("task", "ls").stdout.decode(), what="m1 running")
        shown = ctr("task", "metrics", "--format", "json", "m1")
        assert shown.returncode == 0, shown.stderr
        metrics = json.loads(shown.stdout)
        monitor = int(ctr("task", "ls").stdout.decode().split("m1")[1].split()[0])
        proportional = sum(pss(pid) for pid in host_processes(monitor))
        if "memory" in metrics and "usage" in metrics["memory"]:  # cgroup v1's figures
            used = metrics["memory"]["usage"]["usage"] - metrics["memory"].get(
                "total_inactive_file", 0
            )
            assert metrics["memory"]["usage"]["limit"] == (256 + limits.VM_OVERHEAD_MIB) * MIB
            assert metrics["cpu"]["usage"]["total"] > 0
        else:  # v2's
            used = metrics["memory"]["usage"] - metrics["memory"].get("inactive_file", 0)
            assert metrics["memory"]["usage_limit"] == (256 + limits.VM_OVERHEAD_MIB) * MIB
        assert used <= proportional * 2, (used, proportional)
        assert used >= 32 * MIB, "a VM's memory, not just a process's"
    finally:
        ctr("task", "kill", "-s", "KILL", "m1")
        poll(lambda: "STOPPED" in ctr("task", "ls").stdout.decode(), what="m1 stopped")
        ctr("task", "delete", "m1")
        ctr("containers", "delete", "m1")


@pytest.fixture
def cri(cri_client: CriClient, cri_containerd: Containerd) -> Iterator[CriClient]:
    if not Path(CNI_BIN_DIR, "bridge").exists():
        pytest.skip("containernetworking-plugins missing")
    yield cri_client
    for sandbox in cri_client.list_pod_sandbox():
        cri_client.stop_pod_sandbox(sandbox.id)
        cri_client.remove_pod_sandbox(sandbox.id)


def test_a_pod_vm_sits_in_the_pod_cgroup_and_stats_stay_truthful(
    cri: CriClient, cri_containerd: Containerd, tmp_path: Path
) -> None:
    """As kubelet runs a pod: the pod cgroup as the sandbox's parent (containerd 1.6 gives the
    sandbox and each container <parent>/<id>). The VM is the sandbox's: its cost lands in
    the pod cgroup; a container's own cgroup holds its monitor, a relay."""
    uid = uuid.uuid4().hex
    parent = f"/bvtest-kubepods-{os.getpid()}/pod{uid}"
    config = cri.pod_config("stats", tmp_path / "logs")
    config.linux.cgroup_parent = parent
    pod = cri.run_pod_sandbox(config, "bonneville")
    container = cri.container_config("app", READY, config)
    cid = cri.create_container(pod, container, config)
    cri.start_container(cid)
    try:
        poll(
            lambda: "ready" in Path(cri.container_status(cid).log_path).read_text(),
            what="the app's log",
        )
        sandbox_dirs = dirs_of(f"{parent}/{pod}", pod)
        sandbox_procs = [int(p) for p in procs_file(sandbox_dirs).read_text().split()]
        commands = [Path(f"/proc/{p}/comm").read_text().strip() for p in sandbox_procs]
        assert any(c.startswith("qemu-system") for c in commands), commands
        app_dirs = dirs_of(f"{parent}/{cid}", cid)
        app_procs = procs_file(app_dirs).read_text().split()
        assert app_procs, "the app's monitor is in its own cgroup"
        qemu = next(p for p, c in zip(sandbox_procs, commands, strict=True) if "qemu" in c)
        assert cgroup_paths(qemu) == {f"{parent}/{pod}"}
        # The pod cgroup (kubelet's, here made by the runtime as runc would) holds the VM.
        pod_memory = memory_file(dirs_of(parent, pod), "memory.usage_in_bytes", "memory.current")
        assert int(pod_memory.read_text()) >= 32 * MIB
        figures = cri.runtime.ContainerStats(
            cri.api.ContainerStatsRequest(container_id=cid), timeout=60
        ).stats
        assert figures.memory.working_set_bytes.value > 0
        assert figures.memory.working_set_bytes.value < limits.MEMBER_MEMORY_MIB * MIB
        assert figures.cpu.usage_core_nano_seconds.value > 0
    finally:
        cri.stop_pod_sandbox(pod)
        cri.remove_pod_sandbox(pod)
    for gone in (f"{parent}/{pod}", f"{parent}/{cid}"):
        assert [d for d in dirs_of(gone, "x").values() if os.path.exists(d)] == []
    tree.remove(dirs_of(parent, "x"), timeout=5)
    tree.remove(dirs_of(os.path.dirname(parent), "x"), timeout=5)
