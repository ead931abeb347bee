"""The vSphere backend's control plane against a real vcsim (govmomi's vCenter simulator).

`bonneville --backend vsphere` runs as dockerd would run it; the VM it makes is inspected
through the API (devices, annotation, extraConfig, files on the datastore, the uploaded root
disk), and every way out — delete, agent never connecting, bad credentials, missing datastore or
network, a VM powered off behind our back — must leave no VM and no file behind. vcsim runs
nothing inside its VMs: integration/vsphere_env.py's StandInGuest plays the guest over the real
TCP serial transport; integration/test_vsphere_serial.py boots the real guest in QEMU.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bonneville.backends.base import JOURNAL_FILE
from bonneville.backends.vsphere import clone
from bonneville.backends.vsphere.addressing import LEASES_FILE
from bonneville.backends.vsphere.backend import VSphereBackend
from bonneville.backends.vsphere.connection import session, wait_task
from bonneville.backends.vsphere.inventory import find_vm
from bonneville.guest.rootdisk import LABEL as ROOT_DISK_LABEL
from bonneville.guest.rootdisk import ext4_identity
from integration.vsphere_env import (
    StandInGuest,
    Vcsim,
    container_vm,
    datastore_dir,
    datastore_files,
    leftovers,
    reap_guests,
    vcsim,
    vms,
)
from tests.support import (
    Runtime,
    default_config,
    kill_monitor_during_create,
    write_bundle,
)

__all__ = ["vcsim"]  # the session fixture, imported so pytest finds it here


def write_config(path: Path, vc: Vcsim, **overrides: Any) -> Path:
    password_file = path.parent / "vsphere-password"
    password_file.write_text(overrides.pop("password", vc.password) + "\n")
    password_file.chmod(0o600)
    values: dict[str, Any] = {
        "url": vc.url,
        "username": vc.username,
        "password_file": str(password_file),
        "listen_host": "127.0.0.1",
        "advertise_host": "127.0.0.1",
        "agent_timeout": 60,
    }
    values.update(overrides)
    lines = ["[vsphere]"]
    for key, value in values.items():
        lines.append(f"{key} = {json.dumps(value)}")
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def backend_name(tmp_path: Path, vcsim: Vcsim, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """`runtime` on vSphere, configured for vcsim; once its containers are deleted, no VM and
    no datastore file of theirs may be left."""
    monkeypatch.setenv("BONNEVILLE_CONFIG", str(write_config(tmp_path / "config.toml", vcsim)))
    yield "vsphere"
    reap_guests()
    assert leftovers(vcsim) == ([], [])


def make_bundle(tmp_path: Path, args: list[str]) -> Path:
    config = default_config(args)
    linux = config["linux"]
    assert isinstance(linux, dict)
    linux["resources"] = {
        "memory": {"limit": 384 << 20},
        "cpu": {"quota": 200000, "period": 100000},
    }
    return write_bundle(tmp_path / "bundle", config)


def wait_status(rt: Runtime, cid: str, wanted: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while (status := rt.state(cid)["status"]) != wanted:
        assert time.monotonic() < deadline, f"{cid} still {status}, wanted {wanted}"
        time.sleep(0.1)


def test_create_makes_the_vm_from_the_template_start_runs_delete_removes_all(
    runtime: Runtime, vcsim: Vcsim, tmp_path: Path
) -> None:
    bundle = make_bundle(tmp_path, ["sh", "-c", "echo ran > /ran; sleep 30"])
    rootfs = bundle / "rootfs"
    with StandInGuest(vcsim, "c1", rootfs) as guest:
        runtime("create", "--bundle", str(bundle), "c1", check=True)
    assert guest.error is None, guest.error
    assert runtime.state("c1")["status"] == "created"

    with session(vcsim.settings()) as si:
        vm = container_vm(si, "c1")
        assert vm is not None and str(vm.runtime.powerState) == "poweredOn"
        assert vm.config.hardware.numCPU == 2
        assert vm.config.hardware.memoryMB == 384
        assert "Bonneville container c1" in vm.config.annotation
        extra = {o.key: str(o.value) for o in vm.config.extraConfig}
        token = extra["guestinfo.bonneville.token"]
        assert extra["bonneville.role"] == "container"
        assert extra["guestinfo.bonneville.channel"].startswith("tcp://127.0.0.1:")
        devices = {type(d).__name__.rsplit(".", 1)[-1]: d for d in vm.config.hardware.device}
        cdrom = devices["VirtualCdrom"]
        assert cdrom.backing.fileName.startswith("[LocalDS_0] bonneville/boot-")
        folder = vm.config.files.vmPathName.rsplit("/", 1)[0]
        disk = devices["VirtualDisk"]
        assert disk.backing.fileName == f"{folder}/root.vmdk"
        assert devices["ParaVirtualSCSIController"].key == disk.controllerKey
        ports = sorted(
            (d for d in vm.config.hardware.device if "SerialPort" in type(d).__name__),
            key=lambda d: d.unitNumber,
        )
        assert [p.unitNumber for p in ports] == [0, 1]
        assert ports[0].backing.fileName == f"{folder}/console.log"
        assert ports[1].backing.serviceURI == extra["guestinfo.bonneville.channel"]
        assert ports[1].backing.direction == "client"
        vm_name = vm.name
        vm_moref = vm._moId

    # The root disk on the datastore is the ext4 image the guest mounts: label and UUID (the
    # token) as the agent reads them, the bundle's files in it.
    files = datastore_files(vcsim)
    assert f"{vm_name}/root.vmdk" in files and f"{vm_name}/root-flat.vmdk" in files
    flat = datastore_dir(vcsim) / vm_name / "root-flat.vmdk"
    with open(flat, "rb") as f:
        assert ext4_identity(f.read(4096)) == (ROOT_DISK_LABEL, token)
    descriptor = (datastore_dir(vcsim) / vm_name / "root.vmdk").read_text()
    assert f'RW {flat.stat().st_size // 512} VMFS "root-flat.vmdk"' in descriptor

    # Nothing secret in the state directory or its logs.
    for path in (runtime.root / "c1").rglob("*"):
        if path.is_file():
            assert vcsim.password.encode() not in path.read_bytes(), path
    private = json.loads((runtime.root / "c1" / "state.json").read_text())["backend_state"]
    assert private == {
        "vm": vm_moref,
        "name": vm_name,
        "datacenter": "DC0",
        "datastore": "LocalDS_0",
        "folder": vm_name,
        "clone": "linked clone",  # vcsim speaks API 6.5: no InstantClone, so the fallback
    }
    monitor_log = (runtime.root / "c1" / "monitor.log").read_text()
    assert "has no InstantClone (needs 6.7): skipping it" in monitor_log
    assert f"VM {vm_name} made by linked clone of bonneville-template-" in monitor_log

    runtime("start", "c1", check=True)
    deadline = time.monotonic() + 30
    while not (rootfs / "ran").exists():
        assert time.monotonic() < deadline, "the container's process never ran"
        time.sleep(0.1)
    assert runtime.state("c1")["status"] == "running"
    runtime("kill", "c1", "KILL", check=True)
    wait_status(runtime, "c1", "stopped")
    runtime("delete", "c1", check=True)
    assert leftovers(vcsim) == ([], [])
    assert not (runtime.root / "c1").exists()


def test_run_relays_output_and_leaves_nothing(
    runtime: Runtime, vcsim: Vcsim, tmp_path: Path
) -> None:
    bundle = make_bundle(tmp_path, ["sh", "-c", "echo out; echo err >&2; exit 3"])
    with StandInGuest(vcsim, "r1", bundle / "rootfs") as guest:
        result = runtime("run", "--bundle", str(bundle), "r1")
    assert guest.error is None, guest.error
    assert (result.returncode, result.stdout, result.stderr) == (3, b"out\n", b"err\n")
    assert not (runtime.root / "r1").exists()
    assert leftovers(vcsim) == ([], [])


def test_the_iso_is_uploaded_once_and_replaced_when_broken(
    runtime: Runtime, vcsim: Vcsim, tmp_path: Path
) -> None:
    bundle = make_bundle(tmp_path, ["true"])
    with StandInGuest(vcsim, "i1", bundle / "rootfs"):
        runtime("create", "--bundle", str(bundle), "i1", check=True)
    runtime("delete", "--force", "i1", check=True)
    isos = list((datastore_dir(vcsim) / "bonneville").glob("boot-*.iso"))
    assert len(isos) == 1
    iso = isos[0]
    first = iso.stat()
    with StandInGuest(vcsim, "i2", bundle / "rootfs"):
        runtime("create", "--bundle", str(bundle), "i2", check=True)
    runtime("delete", "--force", "i2", check=True)
    assert iso.stat().st_mtime_ns == first.st_mtime_ns, "an unchanged ISO was uploaded again"
    # A broken upload (another size) is replaced on the next create.
    with open(iso, "r+b") as f:
        f.truncate(4096)
    with StandInGuest(vcsim, "i3", bundle / "rootfs"):
        runtime("create", "--bundle", str(bundle), "i3", check=True)
    runtime("delete", "--force", "i3", check=True)
    assert iso.stat().st_size == first.st_size


def test_agent_that_never_connects_fails_create_and_leaves_nothing(
    runtime: Runtime, vcsim: Vcsim, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BONNEVILLE_VSPHERE_AGENT_TIMEOUT", "3")
    bundle = make_bundle(tmp_path, ["true"])
    result = runtime("create", "--bundle", str(bundle), "n1")
    assert result.returncode == 1
    assert b"did not connect" in result.stderr, result.stderr
    assert not (runtime.root / "n1").exists()
    assert leftovers(vcsim) == ([], [])


def test_a_monitor_killed_during_create_leaves_nothing(
    runtime: Runtime, vcsim: Vcsim, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed while waiting for the agent, before create recorded the VM: the VM and its folder
    are destroyed from the launch journal."""
    monkeypatch.setenv("BONNEVILLE_VSPHERE_AGENT_TIMEOUT", "120")
    bundle = make_bundle(tmp_path, ["true"])
    seen = []

    def cloned(journal: dict[str, Any]) -> bool:
        with session(vcsim.settings()) as si:
            seen.append(find_vm(si, str(journal["vm"])) is not None)
        return True

    kill_monitor_during_create(runtime, bundle, "j1", cloned)
    assert seen == [True]  # the VM existed when its monitor was killed
    assert leftovers(vcsim) == ([], [])


def test_a_wrong_token_is_refused(
    runtime: Runtime, vcsim: Vcsim, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BONNEVILLE_VSPHERE_AGENT_TIMEOUT", "5")
    bundle = make_bundle(tmp_path, ["true"])
    with StandInGuest(vcsim, "t1", bundle / "rootfs", token="0" * 36):
        result = runtime("create", "--bundle", str(bundle), "t1")
    assert result.returncode == 1
    assert b"connections without its token: 127.0.0.1" in result.stderr, result.stderr
    assert leftovers(vcsim) == ([], [])


def test_vm_powered_off_behind_our_back_stops_the_container(
    runtime: Runtime, vcsim: Vcsim, tmp_path: Path
) -> None:
    bundle = make_bundle(tmp_path, ["sleep", "60"])
    with StandInGuest(vcsim, "p1", bundle / "rootfs"):
        runtime("create", "--bundle", str(bundle), "p1", check=True)
    runtime("start", "p1", check=True)
    with session(vcsim.settings()) as si:
        vm = container_vm(si, "p1")
        wait_task(vm.PowerOffVM_Task(), "power off")
    wait_status(runtime, "p1", "stopped")
    runtime("delete", "p1", check=True)
    assert leftovers(vcsim) == ([], [])


@pytest.mark.parametrize(
    ("setting", "value", "message"),
    [
        ("password", "wrong", b"incorrect user name or password"),
        ("datastore", "NoSuchDS", b"datastore 'NoSuchDS' not found in datacenter DC0"),
        ("network", "NoSuchNet", b"network 'NoSuchNet' not found in datacenter DC0"),
        ("datacenter", "DC9", b"datacenter 'DC9' not found in the inventory"),
        ("cluster", "C9", b"cluster 'C9' not found in datacenter DC0"),
    ],
)
def test_bad_settings_fail_create_with_one_clear_line(
    runtime: Runtime,
    vcsim: Vcsim,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    setting: str,
    value: str,
    message: bytes,
) -> None:
    config = write_config(tmp_path / "bad.toml", vcsim, **{setting: value})
    monkeypatch.setenv("BONNEVILLE_CONFIG", str(config))
    bundle = make_bundle(tmp_path, ["true"])
    result = runtime("create", "--bundle", str(bundle), "b1")
    assert result.returncode == 1
    lines = result.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and message.decode() in lines[0], result.stderr
    assert vcsim.password.encode() not in result.stderr
    assert not (runtime.root / "b1").exists()
    assert leftovers(vcsim) == ([], [])


def test_clone_mode_full_and_instant_on_a_server_without_it(
    runtime: Runtime, vcsim: Vcsim, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bundle = make_bundle(tmp_path, ["true"])
    monkeypatch.setenv("BONNEVILLE_VSPHERE_CLONE_MODE", "full")
    with StandInGuest(vcsim, "f1", bundle / "rootfs"):
        runtime("create", "--bundle", str(bundle), "f1", check=True)
    state = json.loads((runtime.root / "f1" / "state.json").read_text())
    assert state["backend_state"]["clone"] == "full clone"
    runtime("delete", "--force", "f1", check=True)
    assert leftovers(vcsim) == ([], [])

    monkeypatch.setenv("BONNEVILLE_VSPHERE_CLONE_MODE", "instant")
    result = runtime("create", "--bundle", str(bundle), "f2")
    assert result.returncode == 1
    assert b"clone_mode=instant needs vSphere API 6.7+, the server speaks 6.5" in result.stderr
    assert not (runtime.root / "f2").exists()
    assert leftovers(vcsim) == ([], [])


def test_the_template_is_made_once_with_its_snapshot(
    runtime: Runtime, vcsim: Vcsim, tmp_path: Path
) -> None:
    bundle = make_bundle(tmp_path, ["true"])
    for cid in ("s1", "s2"):
        with StandInGuest(vcsim, cid, bundle / "rootfs"):
            runtime("create", "--bundle", str(bundle), cid, check=True)
    with session(vcsim.settings()) as si:
        templates = [vm for name, vm in vms(si).items() if name.startswith("bonneville-template-")]
        assert len(templates) == 1
        template = templates[0]
        assert [n.name for n in template.snapshot.rootSnapshotList] == ["bonneville-base"]
        assert str(template.runtime.powerState) == "poweredOff"  # no instant clones here
        devices = [type(d).__name__.rsplit(".", 1)[-1] for d in template.config.hardware.device]
        assert "VirtualCdrom" in devices and "ParaVirtualSCSIController" in devices
        assert "VirtualDisk" not in devices  # each container brings its own root disk
    for cid in ("s1", "s2"):
        runtime("delete", "--force", cid, check=True)


def launch_config(tmp_path: Path, rootfs: Path, container_id: str) -> Any:
    """A VMConfig for the backend's launch() called in-process: the guest image, a run
    directory, and the export with the one container's tree (its root a copy of ``rootfs``)."""
    from bonneville.backends.base import VMConfig
    from bonneville.backends.image import ensure_image

    image = ensure_image()
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    share = tmp_path / "share"  # the export: a directory per container (here one)
    shutil.copytree(rootfs, share / container_id / "root", symlinks=True)
    return VMConfig(
        container_id=container_id,
        memory_mib=256,
        vcpus=1,
        share_dir=str(share),
        run_dir=str(run_dir),
        kernel=image.kernel,
        initrd=image.initrd,
        kernel_args=image.kernel_args,
    )


def test_instant_clone_refused_by_the_server_falls_back_to_a_linked_clone(
    vcsim: Vcsim, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, busybox_rootfs: Path
) -> None:
    """vcsim speaks API 6.5; claiming 6.7 makes `auto` call InstantClone_Task for real, and
    the server's own fault (MethodNotFound) must send the backend down the chain."""
    monkeypatch.setattr(clone, "api_version", lambda si: (6, 7))
    backend = VSphereBackend(vcsim.settings(agent_timeout=60))
    config = launch_config(tmp_path, busybox_rootfs, "ic1")
    run_dir = Path(config.run_dir)
    with StandInGuest(vcsim, "ic1", busybox_rootfs):
        vm = backend.launch(config)
    try:
        assert vm.private_state()["clone"] == "linked clone"
        with session(vcsim.settings()) as si:
            template = next(v for n, v in vms(si).items() if n.startswith("bonneville-template-"))
            # The instant path needs a running source: the template was powered on for it.
            assert str(template.runtime.powerState) == "poweredOn"
            wait_task(template.PowerOffVM_Task(), "powering the template off again")
    finally:
        vm.stop()
        reap_guests()
    assert leftovers(vcsim) == ([], [])
    # The local disk image went after its upload; the launch journal stays until delete.
    assert sorted(os.listdir(run_dir)) == [JOURNAL_FILE]


def test_an_instant_clone_whose_agent_never_connects_falls_back_to_a_linked_clone(
    vcsim: Vcsim, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, busybox_rootfs: Path
) -> None:
    """`auto`: an instant clone the server made but whose guest never calls back (not
    fork-aware) is destroyed after INSTANT_AGENT_TIMEOUT and a linked clone takes its place.
    vcsim has no InstantClone_Task: the first clone is made linked and reported instant."""
    from bonneville.backends.vsphere import backend as vsb_backend

    real_make_vm = vsb_backend.make_vm
    paths: list[str] = []
    silent: set[str] = set()

    def make_vm(*args: Any) -> tuple[Any, str]:
        *rest, allow_instant = args
        vm, path = real_make_vm(*rest, False)
        if allow_instant:
            path = clone.INSTANT
            silent.add(vm._moId)  # before it powers on: the stand-in never answers in it
        paths.append(path)
        return vm, path

    monkeypatch.setattr(vsb_backend, "make_vm", make_vm)
    monkeypatch.setattr(vsb_backend, "INSTANT_AGENT_TIMEOUT", 3.0)
    backend = VSphereBackend(vcsim.settings(agent_timeout=60))
    config = launch_config(tmp_path, busybox_rootfs, "fb1")
    with StandInGuest(vcsim, "fb1", busybox_rootfs, ignore_vms=silent) as guest:
        vm = backend.launch(config)
    try:
        assert paths == [clone.INSTANT, "linked clone"]
        assert vm.private_state()["clone"] == "linked clone"
        with session(vcsim.settings()) as si:
            # The silent instant clone is gone; the one VM of the container is the linked one.
            assert [n for n in vms(si) if "fb1" in n] == [guest.vm_seen["name"]]
            assert len(silent) == 1 and vm.private_state()["vm"] not in silent
    finally:
        vm.stop()
        reap_guests()
    assert leftovers(vcsim) == ([], [])


def test_delete_after_the_monitor_died_destroys_the_vm_through_the_api(
    runtime: Runtime, vcsim: Vcsim, tmp_path: Path
) -> None:
    bundle = make_bundle(tmp_path, ["sleep", "60"])
    with StandInGuest(vcsim, "k1", bundle / "rootfs"):
        runtime("create", "--bundle", str(bundle), "k1", check=True)
    monitor = int(str(runtime.state("k1")["pid"]))
    os.kill(monitor, signal.SIGKILL)
    wait_status(runtime, "k1", "stopped")
    with session(vcsim.settings()) as si:
        assert container_vm(si, "k1") is not None  # nobody has cleaned up yet
    runtime("delete", "k1", check=True)  # backend.destroy(private state) from the CLI
    assert leftovers(vcsim) == ([], [])


def leases(runtime: Runtime) -> dict[str, Any]:
    path = runtime.root / LEASES_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def test_static_addresses_are_leased_per_container_and_always_given_back(
    runtime: Runtime, vcsim: Vcsim, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 23: one address per running container, released by delete, by a failed create
    and by create's cleanup after its monitor was killed; a full range fails create in one
    line; a malformed one fails it before anything is made."""
    config = write_config(
        tmp_path / "static.toml",
        vcsim,
        network="VM Network",
        net_mode="static",
        static_range="192.0.2.10-192.0.2.11/24",
        gateway="192.0.2.1",
        dns=["192.0.2.53"],
    )
    monkeypatch.setenv("BONNEVILLE_CONFIG", str(config))
    bundle = make_bundle(tmp_path, ["sleep", "60"])
    held = {}
    for cid in ("s1", "s2"):
        with StandInGuest(vcsim, cid, bundle / "rootfs"):
            runtime("create", "--bundle", str(bundle), cid, check=True)
        saved = json.loads((runtime.root / cid / "state.json").read_text())["backend_state"]
        held[cid] = saved["lease"]["address"]
        assert saved["net"]["mode"] == "static" and saved["net"]["mac"], saved
    assert sorted(held.values()) == ["192.0.2.10", "192.0.2.11"]
    assert {a: h["container"] for a, h in leases(runtime).items()} == {
        a: c for c, a in held.items()
    }

    full = runtime("create", "--bundle", str(bundle), "s3")
    lines = full.stderr.decode().strip().splitlines()
    assert full.returncode == 1 and len(lines) == 1, full.stderr
    assert "no free address in vsphere.static_range 192.0.2.10-192.0.2.11" in lines[0]
    assert not (runtime.root / "s3").exists()

    runtime("delete", "--force", "s1", check=True)
    assert set(leases(runtime)) == {held["s2"]}

    # A create that fails (no agent) and one whose monitor dies leave the lease free again.
    monkeypatch.setenv("BONNEVILLE_VSPHERE_AGENT_TIMEOUT", "3")
    failed = runtime("create", "--bundle", str(bundle), "s4")
    assert failed.returncode == 1 and b"did not connect" in failed.stderr, failed.stderr
    assert set(leases(runtime)) == {held["s2"]}
    monkeypatch.setenv("BONNEVILLE_VSPHERE_AGENT_TIMEOUT", "120")
    journal = kill_monitor_during_create(runtime, bundle, "s5", lambda j: "vm" in j)
    assert journal["lease"]["address"] == held["s1"]  # journaled with the VM
    assert set(leases(runtime)) == {held["s2"]}

    runtime("delete", "--force", "s2", check=True)
    assert leases(runtime) == {}

    monkeypatch.setenv("BONNEVILLE_VSPHERE_STATIC_RANGE", "192.0.2.11-192.0.2.10/24")
    bad = runtime("create", "--bundle", str(bundle), "s6")
    lines = bad.stderr.decode().strip().splitlines()
    assert bad.returncode == 1 and len(lines) == 1, bad.stderr
    assert "vsphere.static_range '192.0.2.11-192.0.2.10/24': 192.0.2.10 comes before" in lines[0]
    assert not (runtime.root / "s6").exists()
    assert leftovers(vcsim) == ([], [])
