"""QEMU's confinement, checked on a real container VM: seccomp sandbox on, no default devices,
and no descriptor it should not hold (the caller's stdio, the runtime's state files)."""

from __future__ import annotations

import os
import subprocess
import uuid
from pathlib import Path

import pytest

from tests.faults import vm_pid
from tests.support import Runtime, default_config, write_bundle

pytestmark = pytest.mark.vm


def test_qemu_is_sandboxed_and_holds_no_stray_descriptors(runtime: Runtime, tmp_path: Path) -> None:
    bundle = write_bundle(tmp_path / "bundle", default_config(["sleep", "1000"]))
    cid = f"qemu-{uuid.uuid4().hex[:8]}"
    read_end, write_end = os.pipe()
    try:
        # The caller's stdout is a pipe, as containerd's is: the monitor may hold it (it is the
        # container's stdout), QEMU must not.
        subprocess.run(
            runtime.argv("create", "--bundle", str(bundle), cid),
            stdin=subprocess.DEVNULL,
            stdout=write_end,
            stderr=subprocess.DEVNULL,
            check=True,
            timeout=240,
        )
        qemu = vm_pid(runtime, cid)
        argv = Path(f"/proc/{qemu}/cmdline").read_bytes().split(b"\0")
        assert b"-nodefaults" in argv
        assert argv[argv.index(b"-sandbox") + 1].startswith(b"on,")
        status = Path(f"/proc/{qemu}/status").read_text()
        assert "Seccomp:\t2" in status, "the seccomp filter is not in force"
        pipe = os.fstat(write_end)
        state_dir = str(runtime.root / cid)
        targets = {}
        for fd in os.listdir(f"/proc/{qemu}/fd"):
            path = f"/proc/{qemu}/fd/{fd}"
            try:
                st, target = os.stat(path), os.readlink(path)
            except FileNotFoundError:
                continue
            targets[int(fd)] = target
            assert (st.st_dev, st.st_ino) != (pipe.st_dev, pipe.st_ino), f"fd {fd} is our pipe"
            if target.startswith(state_dir):
                # Its log, the serial console file and the 9p export: nothing else of ours.
                allowed = target.endswith(("/qemu.log", "/console.log"))
                allowed |= target == f"{state_dir}/share" or target.startswith(
                    f"{state_dir}/share/"
                )
                assert allowed, f"fd {fd}: {target}"
        assert targets[0] == "/dev/null" and targets[1] == "/dev/null"
        assert targets[2].endswith("/qemu.log")
    finally:
        os.close(read_end)
        os.close(write_end)
        runtime("delete", "--force", cid)
