"""runtime-spec runtime.md's MUST-errors not already covered by test_lifecycle.py: each error is
one line and exit 1, and it has no effect on the container (fake backend)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.faults import wait_until
from tests.support import Runtime, default_config, write_bundle


def _one_error_line(result: object) -> str:
    assert getattr(result, "returncode", None) == 1
    lines = getattr(result, "stderr", b"").decode().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bonneville: "), lines
    return str(lines[0])


def _status(runtime: Runtime, cid: str) -> str:
    return str(runtime.state(cid)["status"])


def test_start_of_a_stopped_container(runtime: Runtime, tmp_path: Path) -> None:
    bundle = write_bundle(tmp_path / "b", default_config(["true"]))
    runtime("create", "--bundle", str(bundle), "c1", check=True)
    runtime("start", "c1", check=True)
    assert wait_until(lambda: _status(runtime, "c1") == "stopped")
    assert "stopped" in _one_error_line(runtime("start", "c1"))
    assert _status(runtime, "c1") == "stopped"
    runtime("delete", "c1", check=True)


def test_kill_and_delete_errors_have_no_effect(runtime: Runtime, tmp_path: Path) -> None:
    bundle = write_bundle(tmp_path / "b", default_config(["sleep", "1000"]))
    runtime("create", "--bundle", str(bundle), "c1", check=True)
    runtime("start", "c1", check=True)
    assert "not stopped" in _one_error_line(runtime("delete", "c1"))
    assert _status(runtime, "c1") == "running"
    runtime("kill", "c1", "KILL", check=True)
    assert wait_until(lambda: _status(runtime, "c1") == "stopped")
    assert "container not running" in _one_error_line(runtime("kill", "c1", "TERM"))
    assert _status(runtime, "c1") == "stopped"
    runtime("delete", "c1", check=True)


def test_failing_start_container_hook_stops_the_container(runtime: Runtime, tmp_path: Path) -> None:
    config = default_config(["sleep", "1000"])
    config["hooks"] = {"startContainer": [{"path": "/bin/false"}]}
    bundle = write_bundle(tmp_path / "b", config)
    runtime("create", "--bundle", str(bundle), "c1", check=True)
    _one_error_line(runtime("start", "c1"))
    assert wait_until(lambda: _status(runtime, "c1") == "stopped")
    runtime("delete", "c1", check=True)


def test_unknown_id_for_every_command(runtime: Runtime) -> None:
    for command in (["pause"], ["resume"], ["ps"], ["exec", "x", "true"]):
        args = [command[0], "ghost", *command[2:]] if command[0] == "exec" else [*command, "ghost"]
        line = _one_error_line(runtime(*args))
        assert "does not exist" in line, (command, line)


@pytest.mark.parametrize(
    "args", [["no-such-command"], ["state"], ["--no-such-flag", "list"], ["kill", "c1", "NOPE"]]
)
def test_usage_errors_are_one_line(runtime: Runtime, args: list[str]) -> None:
    """Also those click finds before the global options set up logging."""
    _one_error_line(runtime(*args))
