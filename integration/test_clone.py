"""Instant clone for real: templates built once under a lock, clones that are distinct machines,
the fallback to a cold boot, and `bonneville template`. Each container here is a QEMU VM."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from bonneville.backends.base import VMConfig
from bonneville.backends.qemu import template as templates
from bonneville.backends.qemu.backend import QemuBackend
from bonneville.backends.qemu.machine import QemuVM
from tests.support import Runtime, default_config, write_bundle
from tests.test_lifecycle import make_bundle

pytestmark = pytest.mark.vm


@pytest.fixture(scope="module")
def template_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A template directory of this module's own, so the build-once case starts empty."""
    path = tmp_path_factory.mktemp("templates")
    saved = os.environ.get(templates.TEMPLATE_DIR_ENV)
    os.environ[templates.TEMPLATE_DIR_ENV] = str(path)
    yield path
    if saved is None:
        del os.environ[templates.TEMPLATE_DIR_ENV]
    else:
        os.environ[templates.TEMPLATE_DIR_ENV] = saved


@pytest.fixture
def backend_name(template_dir: Path) -> str:
    """`runtime` on QEMU, with this module's template directory."""
    return "qemu"


def monitor_log(rt: Runtime, cid: str) -> str:
    return (rt.root / cid / "monitor.log").read_text()


def test_concurrent_creates_build_one_template_and_clone_it(
    runtime: Runtime, tmp_path: Path, template_dir: Path
) -> None:
    bundle = make_bundle(tmp_path, ["sleep", "1000"])
    ids = ["k1", "k2", "k3"]
    results = {}

    def create(cid: str) -> None:
        results[cid] = runtime("create", "-b", str(bundle), cid)

    threads = [threading.Thread(target=create, args=(cid,)) for cid in ids]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(r.returncode == 0 for r in results.values()), results
    logs = [monitor_log(runtime, cid) for cid in ids]
    assert sum("built template" in text for text in logs) == 1
    assert all("cloned from template" in text for text in logs)
    (template,) = templates.list_templates(str(template_dir))
    assert (template.manifest["memory_mib"], template.manifest["nics"]) == (256, 0)
    # Three distinct machines: the kernel's boot id is generated after the clone, per VM.
    boot_ids = set()
    for cid in ids:
        runtime("start", cid, check=True)
        result = runtime("exec", cid, "cat", "/proc/sys/kernel/random/boot_id", check=True)
        boot_ids.add(result.stdout.strip())
    assert len(boot_ids) == 3
    for cid in ids:
        runtime("delete", "--force", cid, check=True)


def test_each_clone_gets_a_new_generation_id(tmp_path: Path, template_dir: Path) -> None:
    """vmgenid: a new GUID per clone, which makes the guest kernel reseed its RNG."""
    from bonneville.backends.image import ensure_image

    image = ensure_image()
    backend = QemuBackend(clone=True)
    vms: list[QemuVM] = []
    try:
        for n in (1, 2):
            share = tmp_path / f"share{n}"
            share.mkdir()
            config = VMConfig(
                container_id=f"g{n}",
                memory_mib=256,
                vcpus=1,
                share_dir=str(share),
                run_dir=str(tmp_path / f"run{n}"),
                kernel=image.kernel,
                initrd=image.initrd,
                kernel_args=tuple(image.kernel_args),
            )
            vm = backend.launch(config)
            assert isinstance(vm, QemuVM)
            vms.append(vm)
        guids = {vm.qmp.execute("query-vm-generation-id")["guid"] for vm in vms}
        assert len(guids) == 2
    finally:
        for vm in vms:
            vm.stop(timeout=2)


def test_unusable_template_falls_back_to_a_cold_boot(
    runtime: Runtime, tmp_path: Path, template_dir: Path
) -> None:
    bundle = make_bundle(tmp_path, ["echo", "still works"])
    assert runtime("run", "-b", str(bundle), "w1").stdout == b"still works\n"  # template exists
    found = templates.list_templates(str(template_dir))
    # The CLI's (its VMs may grow to the host's vCPUs), not another test's direct launch.
    (template,) = [
        t
        for t in found
        if t.manifest["nics"] == 0 and t.manifest["inputs"]["max_vcpus"] == os.cpu_count()
    ]
    state = Path(template.state_path)
    state.chmod(0o600)
    state.write_bytes(b"not a migration stream")
    runtime("create", "-b", str(bundle), "w2", check=True)
    text = monitor_log(runtime, "w2")
    assert f"cold boot: template {template.key} is unusable" in text
    assert not Path(template.path).exists()
    runtime("start", "w2", check=True)
    runtime("delete", "--force", "w2", check=True)
    # The next create builds a fresh template again.
    runtime("create", "-b", str(bundle), "w3", check=True)
    assert "built template" in monitor_log(runtime, "w3")
    runtime("delete", "--force", "w3", check=True)


def test_cloning_can_be_turned_off(
    runtime: Runtime, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BONNEVILLE_CLONE", "0")
    bundle = make_bundle(tmp_path, ["uname", "-r"])
    runtime("create", "-b", str(bundle), "cold", check=True)
    assert "cold boot: cloning is disabled" in monitor_log(runtime, "cold")
    runtime("delete", "--force", "cold", check=True)


def test_template_command(template_dir: Path) -> None:
    rt = Runtime(template_dir / "unused-root", "qemu")
    listed = rt("template", "ls", "-q", check=True).stdout.split()
    assert listed and all(len(key) == 32 for key in listed)
    table = rt("template", "ls", check=True).stdout.decode()
    assert table.splitlines()[0].split()[:4] == ["KEY", "MEMORY", "VCPUS", "NICS"]
    removed = rt("template", "rm", listed[0].decode(), check=True).stdout.split()
    assert removed == [listed[0]]
    assert listed[0] not in rt("template", "ls", "-q", check=True).stdout.split()
    missing = rt("template", "rm", "0" * 32)
    assert missing.returncode == 1
    assert missing.stderr == f"bonneville: template {'0' * 32} does not exist\n".encode()
    assert rt("template", "rm").returncode == 1
    # The templates left were built from the current image and QEMU: none is stale.
    assert rt("template", "prune", check=True).stdout == b""
    assert rt("template", "ls", "-q", check=True).stdout.split() == listed[1:]


def test_the_clone_starts_during_the_prestart_hooks(runtime: Runtime, tmp_path: Path) -> None:
    """With hooks to wait for, the monitor clones the VM while the CLI runs them (as for
    dockerd's libnetwork-setkey); a bad bind mount still fails create, after the hooks, with
    its own one-line message."""
    marker = tmp_path / "hook-state"
    hooks = {"prestart": [{"path": "/bin/sh", "args": ["sh", "-c", f"cat > {marker}"]}]}
    bundle = make_bundle(tmp_path, ["echo", "hi"], name="ok", hooks=hooks)
    runtime("create", "--bundle", str(bundle), "h1", check=True)
    log = monitor_log(runtime, "h1")
    assert log.index("agent answered") < log.index("hooks done")
    assert json.loads(marker.read_text())["id"] == "h1"
    runtime("start", "h1", check=True)
    runtime("delete", "--force", "h1", check=True)

    config = default_config(["true"])
    config["hooks"] = hooks
    mounts = config["mounts"]
    assert isinstance(mounts, list)
    mounts.append({"destination": "/data", "type": "bind", "source": "/no/such/dir"})
    broken = write_bundle(tmp_path / "broken", config)
    result = runtime("create", "--bundle", str(broken), "h2")
    assert result.returncode == 1
    assert result.stderr == b"bonneville: mount source /no/such/dir for /data does not exist\n"
    assert not (runtime.root / "h2").exists()
