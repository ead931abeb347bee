"""The vSphere guest path for real, with QEMU standing in for ESXi.

QEMU boots exactly what the vSphere backend uploads: the boot ISO (ISOLINUX, the distribution's
bzImage, our initramfs, `bonneville.channel=ttyS1 bonneville.root=disk`) and the root disk (ext4
of a busybox rootfs, UUID = token, behind our hand-written ESXi VMDK descriptor) on VMware's
PVSCSI controller, which QEMU emulates. ttyS0 is the console (a file), ttyS1 a TCP client
connecting to the monitor-side `SerialListener`, as ESXi's network serial port does. The test
then drives the agent over that link: hello, setup, a process fed binary stdin through `cat`,
its exit status, a file written to the disk root (read back from the image afterwards), and the
power-off.
"""

from __future__ import annotations

import os
import select
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from bonneville.backends.image import ensure_image
from bonneville.backends.image.kernel import find_kernel
from bonneville.backends.vsphere import media
from bonneville.backends.vsphere.transport import SerialListener, new_token
from bonneville.guest import protocol
from bonneville.shim.agent_client import AgentConnection
from tests.support import make_busybox_rootfs

pytestmark = pytest.mark.vm

BOOT_TIMEOUT = 240.0  # ISOLINUX + a bzImage cold boot under TCG on a shared, busy host
CALL_TIMEOUT = 60.0
QEMU = "qemu-system-x86_64"


def qemu_argv(iso: str, disk: str, console: str, port: int) -> list[str]:
    return [
        QEMU,
        "-machine",
        "pc",
        "-accel",
        "tcg",
        "-m",
        "256",
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
        "-cdrom",
        iso,
        "-boot",
        "d",
        "-chardev",
        f"file,id=console,path={console}",
        "-serial",
        "chardev:console",
        # ESXi's network serial port in client direction: QEMU connects to our listener.
        "-chardev",
        f"socket,id=channel,host=127.0.0.1,port={port}",
        "-serial",
        "chardev:channel",
        "-device",
        "pvscsi,id=scsi0",
        "-drive",
        f"file={disk},format=vmdk,if=none,id=root",
        "-device",
        "scsi-hd,drive=root,bus=scsi0.0",
    ]


@pytest.fixture
def vm_parts(tmp_path: Path) -> Iterator[tuple[media.BootISO, media.RootDisk, str]]:
    if shutil.which(QEMU) is None:
        pytest.fail(f"{QEMU} is missing (install.sh installs qemu-system-x86)")
    image = ensure_image()
    iso = media.ensure_boot_iso(
        image.key,
        os.path.dirname(image.kernel),
        find_kernel().path,
        image.initrd,
        image.kernel_args,
    )
    # The disk holds the container's tree, as the backend builds it: the root beside its binds.
    make_busybox_rootfs(tmp_path / "tree" / "root")
    token = new_token()
    disk = media.make_root_disk(str(tmp_path / "tree"), str(tmp_path), token)
    yield iso, disk, token


def collect(agent: AgentConnection, stream: int, timeout: float) -> tuple[bytes, dict[str, object]]:
    """Stdout of process ``stream`` until its exit message."""
    out = b""
    frames = agent.take_backlog()
    while True:
        for ftype, sid, payload in frames:
            if ftype == protocol.STDOUT and sid == stream:
                out += payload
            elif ftype == protocol.CONTROL:
                message = protocol.decode_control(payload)
                if message.get("op") == "exit" and message.get("id") == stream:
                    return out, message
        ready, _, _ = select.select([agent.sock], [], [], timeout)
        assert ready, f"no exit from process {stream} within {timeout} s (got {out!r})"
        frames = agent.receive()
        assert not agent.closed, "the agent closed the serial channel"


def test_container_process_over_a_tcp_serial_link(
    tmp_path: Path, vm_parts: tuple[media.BootISO, media.RootDisk, str]
) -> None:
    iso, disk, token = vm_parts
    console = tmp_path / "console.log"
    listener = SerialListener("127.0.0.1")
    qemu = subprocess.Popen(
        qemu_argv(iso.path, disk.descriptor, str(console), listener.port),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=open(tmp_path / "qemu.err", "wb"),  # noqa: SIM115
        close_fds=True,
    )
    try:
        try:
            channel = listener.accept(token, BOOT_TIMEOUT)
        except Exception:
            raise AssertionError(
                f"no agent on the serial link; console:\n{console.read_text(errors='replace')}"
                f"\nqemu: {(tmp_path / 'qemu.err').read_text(errors='replace')}"
            ) from None
        agent = AgentConnection(channel)
        hello = agent.call("hello", CALL_TIMEOUT, version=protocol.VERSION)
        assert hello["pid"] == 1 and hello["kernel"] == find_kernel().release
        agent.call(
            "create",
            CALL_TIMEOUT,
            container="c1",
            stream=1,
            config={
                "hostname": "serial",
                "readonly": False,
                "mounts": [
                    {"destination": "/proc", "type": "proc", "source": "proc", "options": []},
                ],
            },
            namespaces={},
            process={"args": ["/bin/sleep", "1000"], "cwd": "/", "env": ["PATH=/bin"]},
        )
        agent.call("start", CALL_TIMEOUT, container="c1")
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
        assert qemu.wait(timeout=60) == 0
        written = subprocess.run(
            ["/usr/sbin/debugfs", "-R", "cat /root/written", disk.flat],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert written == "serial\n"
    finally:
        listener.close()
        if qemu.poll() is None:
            qemu.kill()
        qemu.wait()
