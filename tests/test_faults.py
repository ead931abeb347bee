"""Faults with the fake backend: whatever dies, the container's status stays truthful, `delete`
cleans everything and `list` never crashes. The same faults with QEMU: integration/test_faults.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.faults import Waiter, assert_clean, state_file, vm_pid, wait_until
from tests.support import Runtime, default_config, write_bundle


def _id() -> str:
    return f"fault-{uuid.uuid4().hex[:12]}"


def _bundle(tmp_path: Path, args: list[str], **changes: object) -> Path:
    config = default_config(args)
    config.update(changes)
    return write_bundle(tmp_path / "bundle", config)


def _status(runtime: Runtime, cid: str) -> str:
    return str(runtime.state(cid)["status"])


def _listed(runtime: Runtime) -> dict[str, str]:
    result = runtime("list", "--format", "json", check=True)
    return {c["id"]: c["status"] for c in json.loads(result.stdout)}


@pytest.fixture
def running(runtime: Runtime, tmp_path: Path) -> Iterator[tuple[str, Waiter]]:
    cid = _id()
    waiter = Waiter(runtime, _bundle(tmp_path, ["sleep", "1000"]), cid)
    runtime("start", cid, check=True)
    yield cid, waiter
    waiter.close()


def test_monitor_sigkill_is_stopped_137_and_delete_cleans(
    runtime: Runtime, running: tuple[str, Waiter]
) -> None:
    cid, waiter = running
    agent = vm_pid(runtime, cid)
    os.kill(waiter.pid, signal.SIGKILL)
    assert waiter.exit_status() == 137
    assert _status(runtime, cid) == "stopped"
    assert _listed(runtime) == {cid: "stopped"}
    runtime("delete", cid, check=True)
    assert wait_until(lambda: not os.path.exists(f"/proc/{agent}"), 10)
    assert_clean(runtime, cid)


def test_vm_killed_is_stopped_137_and_delete_cleans(
    runtime: Runtime, running: tuple[str, Waiter]
) -> None:
    cid, waiter = running
    os.kill(vm_pid(runtime, cid), signal.SIGKILL)
    assert waiter.exit_status() == 137
    assert _status(runtime, cid) == "stopped"
    exit_record = json.loads((runtime.root / cid / "exit.json").read_text())
    assert exit_record["status"] == 137
    runtime("delete", cid, check=True)
    assert_clean(runtime, cid)


def test_wedged_agent_cannot_block_sigkill(runtime: Runtime, running: tuple[str, Waiter]) -> None:
    """An agent that stops answering (a hung guest): SIGKILL still ends the container."""
    cid, waiter = running
    agent = vm_pid(runtime, cid)
    os.kill(agent, signal.SIGSTOP)
    try:
        runtime("kill", cid, "KILL", check=True, timeout=60)
        assert waiter.exit_status() == 137
        assert _status(runtime, cid) == "stopped"
        runtime("delete", cid, check=True)
        assert_clean(runtime, cid)
    finally:
        if os.path.exists(f"/proc/{agent}"):
            os.kill(agent, signal.SIGCONT)


def test_create_killed_midway_leaves_a_stopped_entry_delete_cleans(
    runtime: Runtime, tmp_path: Path
) -> None:
    """A create that crashes while its prestart hook runs: state says stopped, delete cleans."""
    started = tmp_path / "hook-started"
    hook = {"path": "/bin/sh", "args": ["sh", "-c", f"echo $$ > {started}; exec sleep 1000"]}
    bundle = _bundle(tmp_path, ["true"], hooks={"prestart": [hook]})
    cid = _id()
    create = subprocess.Popen(
        runtime.argv("create", "--bundle", str(bundle), cid),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert wait_until(lambda: started.exists() and started.read_text().strip() != "")
        monitor = int(state_file(runtime, cid)["pid"])  # type: ignore[call-overload]
        assert _status(runtime, cid) == "creating"
        create.kill()
        create.wait()
        assert _status(runtime, cid) == "stopped"
        assert _listed(runtime) == {cid: "stopped"}
        # The monitor notices its creator is gone and takes the half-made VM down itself.
        assert wait_until(lambda: not os.path.exists(f"/proc/{monitor}"), 30)
        runtime("delete", cid, check=True)
        assert_clean(runtime, cid)
    finally:
        create.kill()
        create.wait()
        if started.exists():  # the hook, orphaned by create's death (it is ours to end)
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(started.read_text()), signal.SIGKILL)


DAMAGED = {
    "no state file": None,
    "empty": b"",
    "truncated": b'{"id": "x", "bundle": "/b',
    "not an object": b"[1, 2, 3]",
    "wrong types": json.dumps({"id": 5, "bundle": [], "pid": "12", "created_done": "yes"}).encode(),
    "missing fields": json.dumps({"pid": 1}).encode(),
    "binary": bytes(range(256)),
    "huge pid": json.dumps(
        {"id": "x", "bundle": "/", "rootfs": "/", "backend": "fake", "pid": 2**70}
    ).encode(),
    "unknown backend": json.dumps(
        {
            "id": "x",
            "bundle": "/",
            "rootfs": "/",
            "backend": "nonesuch",
            "pid": 1,
            "pid_start": 0,
            "created_done": True,
            "backend_state": {"pid": 1},
        }
    ).encode(),
}


@pytest.mark.parametrize("case", sorted(DAMAGED))
def test_damaged_entry_never_crashes_list_and_delete_removes_it(
    runtime: Runtime, tmp_path: Path, case: str
) -> None:
    healthy = _id()
    bundle = _bundle(tmp_path, ["sleep", "1000"])
    runtime("create", "--bundle", str(bundle), healthy, check=True)
    damaged = _id()
    (runtime.root / damaged).mkdir()
    content = DAMAGED[case]
    if content is not None:
        (runtime.root / damaged / "state.json").write_bytes(content)
    listed = _listed(runtime)
    assert listed[healthy] == "created"
    assert listed.get(damaged, "stopped") == "stopped"
    table = runtime("list")
    assert table.returncode == 0 and table.stderr == b"", table.stderr
    state = runtime("state", damaged)
    if state.returncode != 0:
        lines = state.stderr.decode().splitlines()
        assert len(lines) == 1 and lines[0].startswith("bonneville: "), lines
    else:
        assert json.loads(state.stdout)["status"] == "stopped"
    deleted = runtime("delete", damaged)
    assert deleted.returncode == 0, deleted.stderr
    assert not (runtime.root / damaged).exists()
    runtime("delete", "--force", healthy, check=True)
    assert_clean(runtime, healthy)


def _tmpfs(path: Path, size: str) -> None:
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)


def _fill(directory: Path) -> None:
    with open(directory / "filler", "wb") as f:
        try:
            while True:
                f.write(b"\0" * (1 << 16))
                f.flush()
        except OSError:
            pass


def test_full_root_disk(tmp_path: Path) -> None:
    """--root on a full filesystem: create fails with one line and leaves nothing; a container
    created before the disk filled still stops truthfully and deletes cleanly."""
    root = tmp_path / "root"
    _tmpfs(root, "4m")
    runtime = Runtime(root / "state", "fake")
    try:
        early = _id()
        runtime("create", "--bundle", str(_bundle(tmp_path, ["sleep", "1000"])), early, check=True)
        runtime("start", early, check=True)
        _fill(root)
        late = _id()
        result = runtime("create", "--bundle", str(tmp_path / "bundle"), late)
        assert result.returncode == 1
        lines = result.stderr.decode().splitlines()
        assert len(lines) == 1 and lines[0].startswith("bonneville: "), lines
        assert "No space left on device" in lines[0]
        assert not (runtime.root / late).exists()
        assert _status(runtime, early) == "running"
        runtime("kill", early, "KILL", check=True)
        assert wait_until(lambda: _status(runtime, early) == "stopped")
        assert _listed(runtime) == {early: "stopped"}
        runtime("delete", early, check=True)
        assert_clean(runtime, early)
    finally:
        runtime.cleanup()
        subprocess.run(["umount", "-l", str(root)], check=False)
