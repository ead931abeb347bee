"""Faults with real QEMU VMs: QEMU killed, monitor killed, guest kernel panic. Each leaves the
container `stopped` with exit 137 (as its waiter, a subreaper like containerd's shim, sees it),
and `delete` leaves no process, mount or state. Fast variants: tests/test_faults.py."""

from __future__ import annotations

import json
import os
import signal
import uuid
from pathlib import Path

import pytest

from tests.faults import Waiter, assert_clean, vm_pid, wait_until
from tests.support import Runtime, default_config, write_bundle

pytestmark = pytest.mark.vm


def _start(
    runtime: Runtime, tmp_path: Path, args: list[str], **changes: object
) -> tuple[str, Waiter]:
    config = default_config(args)
    config.update(changes)
    cid = f"vmfault-{uuid.uuid4().hex[:8]}"
    waiter = Waiter(runtime, write_bundle(tmp_path / "bundle", config), cid)
    runtime("start", cid, check=True)
    return cid, waiter


def _stopped_137_and_clean(runtime: Runtime, cid: str, waiter: Waiter, qemu: int) -> None:
    try:
        assert waiter.exit_status(timeout=120) == 137
    finally:
        waiter.close()
    assert runtime.state(cid)["status"] == "stopped"
    listed = json.loads(runtime("list", "--format", "json", check=True).stdout)
    assert [(c["id"], c["status"]) for c in listed] == [(cid, "stopped")]
    runtime("delete", cid, check=True)
    assert wait_until(lambda: not os.path.exists(f"/proc/{qemu}"), 10)
    assert_clean(runtime, cid)


def test_qemu_killed(runtime: Runtime, tmp_path: Path) -> None:
    cid, waiter = _start(runtime, tmp_path, ["sleep", "1000"])
    qemu = vm_pid(runtime, cid)
    os.kill(qemu, signal.SIGKILL)
    _stopped_137_and_clean(runtime, cid, waiter, qemu)


def test_monitor_killed_takes_qemu_with_it(runtime: Runtime, tmp_path: Path) -> None:
    cid, waiter = _start(runtime, tmp_path, ["sleep", "1000"])
    qemu = vm_pid(runtime, cid)
    os.kill(waiter.pid, signal.SIGKILL)
    assert wait_until(lambda: not os.path.exists(f"/proc/{qemu}"), 10), "QEMU outlived its monitor"
    _stopped_137_and_clean(runtime, cid, waiter, qemu)


def test_guest_kernel_panic(runtime: Runtime, tmp_path: Path) -> None:
    """The container crashes the guest kernel (sysrq 'c'; the default config forbids it, so this
    one lifts /proc/sysrq-trigger from readonlyPaths): the VM ends, the container is killed."""
    config = default_config(["true"])
    linux = config["linux"]
    assert isinstance(linux, dict)
    linux["readonlyPaths"] = [p for p in linux["readonlyPaths"] if p != "/proc/sysrq-trigger"]
    cid, waiter = _start(
        runtime,
        tmp_path,
        ["sh", "-c", "sleep 1; echo c > /proc/sysrq-trigger; sleep 1000"],
        linux=linux,
    )
    qemu = vm_pid(runtime, cid)
    _stopped_137_and_clean(runtime, cid, waiter, qemu)
