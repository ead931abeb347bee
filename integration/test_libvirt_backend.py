"""What only the libvirt backend has: domains in libvirt, embed roots, libvirtd's own life.

The lifecycle, docker and containerd cases run on libvirt too (their suites are parametrized
over backends); here are the edge cases of the issue: a domain destroyed behind our back, a
monitor killed while its embedded QEMU runs, libvirtd restarted under running containers,
names, bad URIs and a missing daemon, and what is left on the host afterwards.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from bonneville.backends import procfs
from bonneville.backends.libvirt import uri as uris
from integration.backends import URIS, use_backend
from integration.support import Libvirtd, in_netns
from tests.support import (
    Runtime,
    default_config,
    host_links_of_ours,
    kill_monitor_during_create,
    leftover_processes,
    write_bundle,
)
from tests.test_lifecycle import make_bundle, wait_for, wait_status

pytestmark = pytest.mark.vm

LIBVIRT_QEMU_LOGS = "/var/log/libvirt/qemu"  # libvirtd's log of each domain's QEMU


@pytest.fixture(params=["libvirt-embed", "libvirt-system"])
def backend_name(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """`runtime` on libvirt, embedded and through libvirtd; once its containers are deleted,
    no host link of ours may be left."""
    yield use_backend(request, monkeypatch)
    assert host_links_of_ours() == []


def virsh(*args: str) -> str:
    result = subprocess.run(
        ["virsh", "-c", "qemu:///system", *args], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def backend_state(rt: Runtime, cid: str) -> dict[str, object]:
    data = json.loads((rt.root / cid / "state.json").read_text())
    blob = data["backend_state"]
    assert isinstance(blob, dict)
    return blob


def start_sleeper(
    rt: Runtime, tmp_path: Path, cid: str = "c1", netns: str | None = None
) -> dict[str, object]:
    config = default_config(["sleep", "1000"])
    bundle = write_bundle(tmp_path / f"bundle-{cid}", in_netns(config, netns) if netns else config)
    rt("create", "-b", str(bundle), cid, check=True)
    rt("start", cid, check=True)
    return backend_state(rt, cid)


def exit_status(rt: Runtime, cid: str) -> int:
    path = rt.root / cid / "exit.json"
    wait_for(path.exists)
    status = json.loads(path.read_text())["status"]
    assert isinstance(status, int)
    return status


def test_the_vm_is_a_domain_with_our_name_and_uri(runtime: Runtime, tmp_path: Path) -> None:
    blob = start_sleeper(runtime, tmp_path)
    uri = os.environ["BONNEVILLE_LIBVIRT_URI"]
    assert blob["uri"] == uri
    name = str(blob["name"])
    assert re.fullmatch(r"bonneville-c1-[0-9a-f]{12}", name)
    assert procfs.is_alive(int(blob["pid"]), blob["start_time"])  # type: ignore[call-overload]
    if uris.parse(uri).embedded:
        root = Path(str(blob["root"]))
        assert root.parent == Path(uris.DEFAULT_EMBED_BASE)
        # The embedded QEMU is a child of the monitor (its subreaper): `ps` lists it.
        pids = json.loads(runtime("ps", "--format", "json", "c1", check=True).stdout)
        assert blob["pid"] in pids
        # The host-wide copy of QEMU's probed capabilities seeds (and matches) every root.
        seeded = sorted(p.name for p in (root / uris.CAPS_SUBDIR).glob("*.xml"))
        assert seeded and seeded == sorted(p.name for p in Path(uris.CAPS_SEED_DIR).glob("*.xml"))
        for name in seeded:
            seed = Path(uris.CAPS_SEED_DIR, name).read_bytes()
            assert (root / uris.CAPS_SUBDIR / name).read_bytes() == seed
    else:
        assert name in virsh("list", "--name").split()
        assert "<bonneville:container" in virsh("dumpxml", name)
    runtime("delete", "--force", "c1", check=True)
    assert not procfs.is_alive(int(blob["pid"]), blob["start_time"])  # type: ignore[call-overload]
    if "root" in blob:
        assert not Path(str(blob["root"])).exists()
    else:
        wait_for(lambda: name not in virsh("list", "--all", "--name").split(), timeout=30)
        assert name not in virsh("list", "--all", "--name").split()
        # Our SIGKILL (libvirtd sees QEMU crash), not libvirt's destroy, whose SIGTERM and 200 ms
        # polls take 1.2-2.0 s here (docs/backends.md, "Destroy"): QEMU logs that SIGTERM.
        log = Path(LIBVIRT_QEMU_LOGS, f"{name}.log").read_text()
        assert "shutting down, reason=crashed" in log and "terminating on signal" not in log


def test_a_domain_destroyed_behind_our_back_stops_the_container(
    runtime: Runtime, tmp_path: Path
) -> None:
    blob = start_sleeper(runtime, tmp_path)
    if "root" in blob:
        os.kill(int(blob["pid"]), signal.SIGKILL)  # type: ignore[call-overload]
    else:
        virsh("destroy", str(blob["name"]))
    assert wait_status(runtime, "c1", "stopped")["status"] == "stopped"
    assert exit_status(runtime, "c1") == 137
    runtime("delete", "c1", check=True)
    assert not (runtime.root / "c1").exists()


def test_a_launch_that_probes_qemu_leaves_the_monitor_no_zombie(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With no probed capabilities to seed from (a new host, a changed QEMU or libvirt), the
    embedded driver probes QEMU: a daemonized QEMU that it stops and waits to see gone. That
    QEMU must not become the monitor's (a subreaper's) child: unreaped, libvirt waited ~80 s
    for it, and its zombies stayed the container's."""
    monkeypatch.setenv("BONNEVILLE_LIBVIRT_URI", URIS["libvirt-embed"])
    rt = Runtime(tmp_path / "state", "libvirt")
    aside = tmp_path / "seed"
    if os.path.isdir(uris.CAPS_SEED_DIR):
        shutil.move(uris.CAPS_SEED_DIR, aside)
    try:
        blob = start_sleeper(rt, tmp_path)
        assert os.listdir(uris.CAPS_SEED_DIR)  # what this launch probed seeds the next
        monitor = int(rt.state("c1")["pid"])  # type: ignore[call-overload]
        children = [
            int(child)
            for task in os.listdir(f"/proc/{monitor}/task")
            for child in Path(f"/proc/{monitor}/task/{task}/children").read_text().split()
        ]
        assert children == [int(blob["pid"])]  # type: ignore[call-overload]
        rt("delete", "--force", "c1", check=True)
    finally:
        rt.cleanup()
        if aside.exists():
            shutil.rmtree(uris.CAPS_SEED_DIR, ignore_errors=True)
            shutil.move(aside, uris.CAPS_SEED_DIR)
    assert leftover_processes(str(rt.root)) == []


def test_delete_kills_the_vm_of_a_killed_monitor(runtime: Runtime, tmp_path: Path) -> None:
    """An embedded QEMU does not die with its monitor: delete must kill it, and only it."""
    blob = start_sleeper(runtime, tmp_path)
    other = start_sleeper(runtime, tmp_path, "c2")
    monitor = int(runtime.state("c1")["pid"])  # type: ignore[call-overload]
    os.kill(monitor, signal.SIGKILL)
    assert wait_status(runtime, "c1", "stopped")["status"] == "stopped"
    runtime("delete", "c1", check=True)
    assert not procfs.is_alive(int(blob["pid"]), blob["start_time"])  # type: ignore[call-overload]
    assert procfs.is_alive(int(other["pid"]), other["start_time"])  # type: ignore[call-overload]
    assert runtime.state("c2")["status"] == "running"
    result = runtime("exec", "c2", "echo", "still here")
    assert (result.returncode, result.stdout) == (0, b"still here\n")
    runtime("delete", "--force", "c2", check=True)


def test_a_monitor_killed_during_create_leaves_nothing(
    runtime: Runtime, tmp_path: Path, container_netns: str
) -> None:
    """The monitor dies after libvirt started QEMU (and, under qemu:///system, after the host
    links exist) but before create recorded the VM: what the launch journalled is destroyed."""
    bundle = write_bundle(tmp_path / "bundle", in_netns(default_config(["true"]), container_netns))
    # libvirt cold-boots: the guest takes seconds to answer, long after QEMU's pid is known.
    blob = kill_monitor_during_create(runtime, bundle, "c1", lambda journal: "pid" in journal)
    assert not procfs.is_alive(int(blob["pid"]), blob["start_time"])
    if "links" in blob:
        assert blob["links"] and host_links_of_ours() == []


def test_a_container_that_stopped_holds_no_vm_nor_host_links(
    runtime: Runtime, tmp_path: Path, container_netns: str
) -> None:
    """Its process cannot start: by the time `start` says so, QEMU and the host-side links are
    gone, before any delete (dockerd may send that late, or never if it goes away first)."""
    config = in_netns(default_config(["/no/such/binary"]), container_netns)
    runtime("create", "-b", str(write_bundle(tmp_path / "bundle", config)), "c1", check=True)
    blob = backend_state(runtime, "c1")
    if "root" not in blob:
        assert blob["links"] and sorted(host_links_of_ours()) == sorted(blob["links"])  # type: ignore[call-overload]
    result = runtime("start", "c1")
    assert result.returncode == 1 and b"/no/such/binary" in result.stderr
    assert not procfs.is_alive(int(blob["pid"]), blob["start_time"])  # type: ignore[call-overload]
    assert host_links_of_ours() == []
    runtime("delete", "c1", check=True)


@pytest.mark.may_skip(
    "a host whose own libvirtd runs: tests never restart it, and a second one cannot run beside"
    " it (the system driver's /run/libvirt is one per host); CI machines run none"
)
def test_containers_survive_a_libvirtd_restart(
    libvirtd: Libvirtd, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, container_netns: str
) -> None:
    if not libvirtd.owned:
        pytest.skip("the host's own libvirtd is never restarted by tests")
    monkeypatch.setenv("BONNEVILLE_LIBVIRT_URI", "qemu:///system")
    rt = Runtime(tmp_path / "state", "libvirt")
    try:
        blob = start_sleeper(rt, tmp_path, netns=container_netns)
        assert blob["links"] and sorted(host_links_of_ours()) == sorted(blob["links"])  # type: ignore[call-overload]
        libvirtd.restart()
        assert rt.state("c1")["status"] == "running"
        result = rt("exec", "c1", "echo", "after restart")
        assert (result.returncode, result.stdout) == (0, b"after restart\n")
        # libvirtd found the domain again: operators still see and manage it.
        assert str(blob["name"]) in virsh("list", "--name").split()
        rt("pause", "c1", check=True)
        assert rt.state("c1")["status"] == "paused"
        rt("resume", "c1", check=True)
        # Stopped while libvirtd is down: delete still works (the QEMU pid is enough), and
        # finds the host links without the daemon's namespace to go by.
        libvirtd.stop_libvirtd()
        rt("delete", "--force", "c1", check=True)
        assert not procfs.is_alive(int(blob["pid"]), blob["start_time"])  # type: ignore[call-overload]
        assert host_links_of_ours() == []
    finally:
        if libvirtd.libvirtd is None:
            libvirtd.start()
        rt.cleanup()
    assert leftover_processes(str(rt.root)) == []


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("xen:///system", "unsupported libvirt URI 'xen:///system'"),
        ("qemu+ssh://elsewhere/system", "a remote host cannot reach"),
        ("qemu:///embed?root=rel", "root must be an absolute path"),
        ("qemu+unix:///system?socket=/run/no-such-libvirtd", "libvirtd is not running"),
    ],
)
def test_bad_uris_and_a_missing_daemon_give_one_line(
    tmp_path: Path, uri: str, message: str
) -> None:
    rt = Runtime(tmp_path / "state", "libvirt")
    bundle = make_bundle(tmp_path, ["true"])
    links_before = host_links_of_ours()
    result = subprocess.run(
        [*rt.argv("--libvirt-uri", uri, "create", "-b", str(bundle), "c1")],
        capture_output=True,
        check=False,
    )
    assert result.returncode == 1
    lines = result.stderr.decode().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bonneville: ") and message in lines[0], lines
    assert not (rt.root / "c1").exists()
    assert host_links_of_ours() == links_before


def test_no_permission_on_libvirtd_gives_one_line(libvirtd: Libvirtd) -> None:
    """An unprivileged caller cannot reach libvirtd's socket: one line, nothing made."""
    base = Path(tempfile.mkdtemp(prefix="bv-perm-"))
    try:
        base.chmod(0o755)
        bundle = make_bundle(base, ["true"])
        state = base / "state"
        result = subprocess.run(
            [
                "setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                str(shutil.which("bonneville")), "--root", str(state), "--backend", "libvirt",
                "--libvirt-uri", "qemu:///system", "create", "-b", str(bundle), "p1",
            ],
            capture_output=True,
            check=False,
        )  # fmt: skip
        assert result.returncode == 1
        lines = result.stderr.decode().splitlines()
        assert lines == [
            "bonneville: libvirt URI qemu:///system: permission denied on "
            f"{uris.SYSTEM_SOCKETS[-1]} (run as root)"
        ], lines
        assert not (state / "p1").exists()
    finally:
        shutil.rmtree(base, ignore_errors=True)
