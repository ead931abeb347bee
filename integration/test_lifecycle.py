"""The lifecycle cases of tests/test_lifecycle.py, each container a real VM.

Every case runs once per backend: QEMU driven directly, libvirt's embedded driver
(``qemu:///embed``, no daemon) and, where libvirtd can run, libvirt through it
(``qemu:///system``, integration/libvirtd.py starts a private instance for the session).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from conftest import Runtime, default_config, write_bundle
from integration.backends import BACKENDS, use_backend
from tests.test_lifecycle import *  # noqa: F403 - the same cases, another backend
from tests.test_lifecycle import make_bundle

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


@pytest.mark.parametrize("path", [None, "/proc/self/ns/net"])
def test_host_network_namespace_is_refused(
    runtime: Runtime, tmp_path: Path, path: str | None
) -> None:
    """A VM cannot share the host's stack; wiring taps there would hijack the host's NICs."""
    config = default_config(["true"])
    linux = config["linux"]
    assert isinstance(linux, dict)
    namespaces = [n for n in linux["namespaces"] if n["type"] != "network"]
    if path is not None:
        namespaces.append({"type": "network", "path": path})
    linux["namespaces"] = namespaces
    bundle = write_bundle(tmp_path / "bundle", config)
    before = subprocess.run(["tc", "qdisc", "show"], capture_output=True, check=True).stdout
    result = runtime("create", "-b", str(bundle), "h1")
    assert result.returncode == 1
    assert b"cannot share the host's network stack" in result.stderr
    assert not (runtime.root / "h1").exists()
    after = subprocess.run(["tc", "qdisc", "show"], capture_output=True, check=True).stdout
    assert after == before
