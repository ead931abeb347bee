"""The vSphere guest path for real, with QEMU standing in for ESXi (integration/vsphere_qemu.py):
the boot ISO and the PVSCSI root disk the backend uploads, ttyS1 a TCP client connecting to the
monitor-side `SerialListener`. The test drives the agent over that link: hello, setup, a process
fed binary stdin through `cat`, its exit status, a file written to the disk root (read back from
the image afterwards), and the power-off.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from bonneville.guest import protocol
from integration.vsphere_qemu import (
    CALL_TIMEOUT,
    VMParts,
    boot,
    collect,
    create_container,
    make_vm_parts,
)

pytestmark = pytest.mark.vm


@pytest.fixture
def vm_parts(tmp_path: Path) -> VMParts:
    return make_vm_parts(tmp_path)


def test_container_process_over_a_tcp_serial_link(tmp_path: Path, vm_parts: VMParts) -> None:
    with boot(tmp_path, vm_parts) as vm:
        agent = vm.agent
        create_container(agent)
        # Every byte value through the UART both ways: the link is 8-bit clean.
        payload = bytes(range(256)) * 16
        agent.call(
            "exec",
            CALL_TIMEOUT,
            container="c1",
            id=2,
            stdin=True,
            process={"args": ["/bin/cat"], "cwd": "/", "env": ["PATH=/bin"]},
        )
        agent.send_data(protocol.STDIN, 2, payload)
        agent.send_data(protocol.STDIN, 2, b"")
        out, exit_message = collect(agent, 2, CALL_TIMEOUT)
        assert out == payload
        assert exit_message["status"] == 0

        # The root is the ext4 disk, not a 9p share: what the process writes lands in the image.
        agent.call(
            "exec",
            CALL_TIMEOUT,
            container="c1",
            id=3,
            process={
                "args": [
                    "/bin/sh",
                    "-c",
                    "grep -q ' / ext4 ' /proc/mounts && hostname > /written && sync && exit 7",
                ],
                "cwd": "/",
                "env": ["PATH=/bin"],
            },
        )
        _, exit_message = collect(agent, 3, CALL_TIMEOUT)
        assert exit_message["status"] == 7
        agent.call("shutdown", CALL_TIMEOUT)
        assert vm.qemu.wait(timeout=60) == 0
    written = subprocess.run(
        ["/usr/sbin/debugfs", "-R", "cat /root/written", vm_parts.disk.flat],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert written == "serial\n"
