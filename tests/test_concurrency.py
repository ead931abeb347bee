"""Concurrency on the fake backend: parallel commands on one container and parallel creates;
no lost update (the status the commands leave is the one the last of them made), no deadlock."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tests.support import Runtime, default_config, write_bundle


def test_fifty_parallel_commands_on_one_container(runtime: Runtime, tmp_path: Path) -> None:
    bundle = write_bundle(tmp_path / "bundle", default_config(["sleep", "1000"]))
    runtime("create", "--bundle", str(bundle), "c1", check=True)
    runtime("start", "c1", check=True)
    commands = [
        ["state", "c1"],
        ["kill", "c1", "0"],
        ["kill", "c1", "URG"],
        ["pause", "c1"],
        ["resume", "c1"],
        ["ps", "--format", "json", "c1"],
        ["list", "--format", "json"],
        ["kill", "c1", "WINCH"],
    ] * 8
    commands = commands[:50]
    with ThreadPoolExecutor(max_workers=50) as pool:
        results = list(pool.map(lambda args: runtime(*args, timeout=120), commands))
    for args, result in zip(commands, results, strict=True):
        if args[0] in ("pause", "resume"):
            # Racing each other, one may find the container already in the other state.
            assert (
                result.returncode == 0
                or b"paused" in result.stderr
                or (b"not running" in result.stderr)
            ), (args, result.stderr)
        else:
            assert result.returncode == 0, (args, result.stderr)
            assert b"Traceback" not in result.stderr
    # Whatever order they ran in, the file and the VM agree: resume leaves it running.
    status = runtime.state("c1")["status"]
    if status == "paused":
        runtime("resume", "c1", check=True)
    assert runtime.state("c1")["status"] == "running"
    assert runtime("exec", "c1", "true", timeout=60).returncode == 0
    runtime("kill", "c1", "KILL", check=True)
    runtime("delete", "--force", "c1", check=True)


def test_twenty_parallel_creates(runtime: Runtime, tmp_path: Path) -> None:
    bundle = write_bundle(tmp_path / "bundle", default_config(["sleep", "1000"]))
    ids = [f"c{i}" for i in range(20)]
    with ThreadPoolExecutor(max_workers=20) as pool:
        created = list(
            pool.map(lambda cid: runtime("create", "--bundle", str(bundle), cid, timeout=240), ids)
        )
    assert [r.returncode for r in created] == [0] * 20, [r.stderr for r in created]
    listed = json.loads(runtime("list", "--format", "json", check=True).stdout)
    assert sorted(c["id"] for c in listed) == sorted(ids)
    assert {c["status"] for c in listed} == {"created"}
    assert len({c["pid"] for c in listed}) == 20
    with ThreadPoolExecutor(max_workers=20) as pool:
        deleted = list(pool.map(lambda cid: runtime("delete", "--force", cid), ids))
    assert [r.returncode for r in deleted] == [0] * 20
    assert runtime("list", "--quiet", check=True).stdout == b""


def test_parallel_creates_of_one_id_make_exactly_one(runtime: Runtime, tmp_path: Path) -> None:
    bundle = write_bundle(tmp_path / "bundle", default_config(["sleep", "1000"]))
    with ThreadPoolExecutor(max_workers=10) as pool:
        results = list(
            pool.map(lambda _: runtime("create", "--bundle", str(bundle), "same"), range(10))
        )
    assert sorted(r.returncode for r in results) == [0] + [1] * 9
    assert all(b"exists" in r.stderr for r in results if r.returncode)
    assert runtime.state("same")["status"] == "created"
    runtime("delete", "same", check=True)


def test_fast_exec_never_loses_its_status(runtime: Runtime, tmp_path: Path) -> None:
    """`true` may end before its proxy has sent stdin's EOF: the monitor has closed the
    session by then, and the exit status must still be the process's (it was a Broken pipe)."""
    bundle = write_bundle(tmp_path / "bundle", default_config(["sleep", "1000"]))
    runtime("create", "--bundle", str(bundle), "c1", check=True)
    runtime("start", "c1", check=True)
    with ThreadPoolExecutor(max_workers=10) as pool:
        results = list(pool.map(lambda _: runtime("exec", "c1", "true", timeout=120), range(30)))
    assert [(r.returncode, r.stderr) for r in results] == [(0, b"")] * 30
    runtime("delete", "--force", "c1", check=True)
