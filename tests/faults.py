"""Helpers for fault tests (tests/ with the fake backend, integration/ with QEMU): a waiter that
plays containerd's shim, and a check that a container left nothing behind."""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
from pathlib import Path

from tests.support import Runtime, leftover_processes

# A subreaper that runs `create` and then waits for the pid-file PID, as containerd's shim does:
# the only honest way to see the monitor's exit status (the container's, as the caller sees it).
_WAITER = r"""
import ctypes, os, subprocess, sys
if ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0) != 0:  # PR_SET_CHILD_SUBREAPER
    sys.exit("prctl failed")
pid_file, argv = sys.argv[1], sys.argv[2:]
with open(os.devnull, "r+b") as null:
    rc = subprocess.run(argv, stdin=null, stdout=null, stderr=null).returncode
if rc != 0:
    print(f"create {rc}", flush=True)
    sys.exit(0)
pid = int(open(pid_file).read())
print(f"pid {pid}", flush=True)
while True:
    reaped, status = os.waitpid(-1, 0)
    if reaped == pid:
        code = os.waitstatus_to_exitcode(status)
        print(f"exit {128 - code if code < 0 else code}", flush=True)
        break
"""


class Waiter:
    """`create` run under a subreaper that reports the monitor's exit status."""

    def __init__(self, runtime: Runtime, bundle: Path, container_id: str) -> None:
        self.pid_file = bundle.parent / f"{container_id}.pid"
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                _WAITER,
                str(self.pid_file),
                *runtime.argv("create", "--bundle", str(bundle), "--pid-file", str(self.pid_file)),
                container_id,
            ],
            stdout=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
        )
        line = self._line(timeout=240)
        assert line.startswith("pid "), f"create failed: {line}"
        self.pid = int(line.split()[1])

    def _line(self, timeout: float) -> str:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        assert ready, "the waiter did not answer in time"
        return self.proc.stdout.readline().decode().strip()

    def exit_status(self, timeout: float = 60) -> int:
        """The monitor's exit status as its waiter saw it."""
        line = self._line(timeout)
        assert line.startswith("exit "), line
        self.proc.wait(timeout=10)
        return int(line.split()[1])

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def state_file(runtime: Runtime, container_id: str) -> dict[str, object]:
    data = json.loads((runtime.root / container_id / "state.json").read_text())
    assert isinstance(data, dict)
    return data


def vm_pid(runtime: Runtime, container_id: str) -> int:
    backend_state = state_file(runtime, container_id)["backend_state"]
    assert isinstance(backend_state, dict)
    return int(backend_state["pid"])


def wait_until(condition: object, timeout: float = 60) -> bool:
    """Poll ``condition()`` until true or the deadline (a hang guard, not a sleep)."""
    assert callable(condition)
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def assert_clean(runtime: Runtime, container_id: str) -> None:
    """Nothing of the container is left: state directory, processes, mounts."""
    assert not (runtime.root / container_id).exists()
    assert leftover_processes(str(runtime.root)) == []
    with open("/proc/self/mounts") as f:
        assert str(runtime.root) not in f.read()
    assert os.path.isdir(runtime.root) or not runtime.root.exists()
