"""The lifecycle cases of tests/test_lifecycle.py, each container a real VM.

Every case runs once per backend: QEMU driven directly, libvirt's embedded driver
(``qemu:///embed``, no daemon) and, where libvirtd can run, libvirt through it
(``qemu:///system``, integration/libvirtd.py starts a private instance for the session).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from bonneville.backends.qemu.backend import detect_accel
from integration.backends import BACKENDS, use_backend
from integration.support import in_netns
from tests.support import Runtime, default_config, write_bundle
from tests.test_lifecycle import *  # noqa: F403 - the same cases, another backend
from tests.test_lifecycle import make_bundle, wait_status

pytestmark = pytest.mark.vm


@pytest.fixture(params=BACKENDS)
def backend_name(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    return use_backend(request, monkeypatch)


def test_the_container_runs_in_a_vm(runtime: Runtime, tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path, ["uname", "-r"])
    result = runtime("run", "-b", str(bundle), "vm1")
    assert result.returncode == 0, result.stderr
    guest_release = result.stdout.decode().strip()
    assert guest_release and guest_release != os.uname().release


def test_resources_shape_the_vm(runtime: Runtime, tmp_path: Path) -> None:
    linux = default_config(["true"])["linux"]
    assert isinstance(linux, dict)
    bundle = make_bundle(
        tmp_path,
        ["sh", "-c", "grep MemTotal /proc/meminfo; nproc"],
        linux={
            **linux,
            "resources": {
                "memory": {"limit": 384 * 1024 * 1024},
                "cpu": {"quota": 200000, "period": 100000},
            },
        },
    )
    result = runtime("run", "-b", str(bundle), "vm2")
    assert result.returncode == 0, result.stderr
    mem_line, nproc = result.stdout.decode().splitlines()
    mem_kib = int(mem_line.split()[1])
    assert 300 * 1024 < mem_kib <= 384 * 1024
    assert nproc.strip() == str(min(2, os.cpu_count() or 1))


def test_the_guest_cpu_runs_x86_64_v3_binaries_and_has_no_erms(
    runtime: Runtime, tmp_path: Path
) -> None:
    """Newer distributions' glibc needs x86-64-v2 (RHEL 9) or v3 (RHEL 10); ERMS is left out
    under TCG, which copies `rep movsb` a byte at a time (backends/qemu/cmdline.cpu_model)."""
    bundle = make_bundle(tmp_path, ["grep", "-m1", "^flags", "/proc/cpuinfo"])
    result = runtime("run", "-b", str(bundle), "cpu1")
    assert result.returncode == 0, result.stderr
    flags = set(result.stdout.decode().split(":", 1)[1].split())
    v2 = {"cx16", "lahf_lm", "popcnt", "sse4_1", "sse4_2", "ssse3"}
    v3 = {"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave"}
    assert v2 | v3 <= flags, sorted((v2 | v3) - flags)
    if detect_accel() == "tcg":
        assert "erms" not in flags


@pytest.mark.parametrize("path", [None, "/proc/self/ns/net"])
def test_host_network_runs_on_a_user_mode_nic(
    runtime: Runtime, tmp_path: Path, path: str | None
) -> None:
    """No network namespace of its own (or the host's by path): the VM gets a user-mode NIC on
    the host's networks and the host's own NICs are never touched (no tap, no qdisc)."""
    config = default_config(["sh", "-c", "ip -o -4 addr show; ip route"])
    linux = config["linux"]
    assert isinstance(linux, dict)
    namespaces = [n for n in linux["namespaces"] if n["type"] != "network"]
    if path is not None:
        namespaces.append({"type": "network", "path": path})
    linux["namespaces"] = namespaces
    bundle = write_bundle(tmp_path / "bundle", config)
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, check=True).stdout
    before = subprocess.run(["tc", "qdisc", "show"], capture_output=True, check=True).stdout
    result = runtime("run", "-b", str(bundle), "h1")
    assert result.returncode == 0, result.stderr
    assert b"inet 10.0.2.15/24" in result.stdout and b"default via 10.0.2.2" in result.stdout
    after = subprocess.run(["tc", "qdisc", "show"], capture_output=True, check=True).stdout
    assert after == before
    assert subprocess.run(["ip", "-o", "link"], capture_output=True, check=True).stdout == links


def test_a_network_namespace_the_caller_keeps(
    runtime: Runtime, tmp_path: Path, container_netns: str
) -> None:
    """CNI (and a pod) keep the namespace beyond the container: a create that fails there
    leaves no NIC of ours in it. A second container in it (docker's `--network container:…`)
    joins the first one's VM, the first one's NIC untouched; a VM this runtime's root does not
    know (another --root's) cannot be joined: refused in one line."""

    def links() -> list[str]:
        shown = subprocess.run(
            ["ip", "-n", os.path.basename(container_netns), "-br", "link"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        return sorted(line.split()[0].partition("@")[0] for line in shown.splitlines())

    def filters() -> str:
        veth = next(name for name in bare if name != "lo")
        netns = os.path.basename(container_netns)
        shown = subprocess.run(
            ["tc", "-n", netns, "filter", "show", "dev", veth, "ingress"],
            capture_output=True,
            text=True,
            check=True,
        )
        return shown.stdout

    bare = links()
    # Fails in the guest's setup, after the VM and its NIC exist: a sysctl it does not have.
    config = in_netns(default_config(["true"]), container_netns)
    assert isinstance(config["linux"], dict)
    config["linux"]["sysctl"] = {"net.ipv4.no_such_setting": "1"}
    failed = runtime("create", "-b", str(write_bundle(tmp_path / "bad", config)), "n0")
    assert failed.returncode == 1 and b"no_such_setting" in failed.stderr, failed
    assert links() == bare
    first = write_bundle(
        tmp_path / "first", in_netns(default_config(["sleep", "1000"]), container_netns)
    )
    runtime("create", "-b", str(first), "n1", check=True)
    try:
        runtime("start", "n1", check=True)
        held, mirrored = links(), filters()
        boot_id = ["cat", "/proc/sys/kernel/random/boot_id"]
        second = write_bundle(
            tmp_path / "second", in_netns(default_config(boot_id), container_netns)
        )
        joined = runtime("run", "-b", str(second), "n2")
        assert joined.returncode == 0, joined
        in_first = runtime("exec", "n1", *boot_id, check=True).stdout
        assert joined.stdout == in_first, "the second container ran in the first one's VM"
        assert not (runtime.root / "n2").exists()
        assert (links(), filters()) == (held, mirrored)
        assert runtime.state("n1")["status"] == "running"
        stranger = Runtime(tmp_path / "other-root", runtime.backend)
        result = stranger("create", "-b", str(second), "n3")
        assert result.returncode == 1
        assert b"containers cannot share a network namespace" in result.stderr, result
        assert result.stderr.count(b"\n") == 1
        assert not (stranger.root / "n3").exists()
        assert (links(), filters()) == (held, mirrored)
    finally:
        runtime("delete", "--force", "n1", check=True)


def test_limits_update_and_events_inside_the_vm(runtime: Runtime, tmp_path: Path) -> None:
    """Limits from config.json apply in the guest's cgroup, `update` changes them live, and
    `events --stats` reports them in runc's format."""
    linux = default_config(["true"])["linux"]
    assert isinstance(linux, dict)
    bundle = make_bundle(
        tmp_path,
        ["sleep", "1000"],
        linux={**linux, "resources": {"pids": {"limit": 20}, "cpu": {"quota": 50000}}},
    )
    runtime("create", "-b", str(bundle), "u1", check=True)
    runtime("start", "u1", check=True)

    def cgroup(name: str) -> str:
        result = runtime("exec", "u1", "cat", f"/sys/fs/cgroup/{name}", check=True)
        return result.stdout.decode().strip()

    assert (cgroup("pids.max"), cgroup("cpu.max")) == ("20", "50000 100000")
    resources = json.dumps({"memory": {"limit": 100 * 1024 * 1024}, "pids": {"limit": 6}})
    runtime("update", "--resources", "-", "u1", input=resources.encode(), check=True)
    runtime("update", "--cpu-quota", "-1", "u1", check=True)
    assert cgroup("memory.max") == str(100 * 1024 * 1024)
    assert (cgroup("pids.max"), cgroup("cpu.max")) == ("6", "max 100000")
    # The limit holds: the sixth process cannot be forked.
    forks = runtime("exec", "u1", "sh", "-c", "for i in 1 2 3 4 5 6; do sleep 60 & done; wait")
    assert forks.returncode != 0 and b"can't fork" in forks.stderr, forks.stderr
    event = json.loads(runtime("events", "--stats", "u1", check=True).stdout)
    assert event["type"] == "stats" and event["id"] == "u1"
    assert event["data"]["pids"]["limit"] == 6
    assert event["data"]["memory"]["usage"]["limit"] == 100 * 1024 * 1024
    assert event["data"]["memory"]["usage"]["usage"] > 0
    assert event["data"]["cpu"]["usage"]["total"] > 0
    runtime("kill", "u1", "KILL", check=True)
    wait_status(runtime, "u1", "stopped")
    runtime("delete", "u1", check=True)
