"""QEMU standing in for ESXi, shared by the tests of the vSphere guest path
(integration/test_vsphere_serial.py, integration/test_vsphere_net.py).

QEMU boots exactly what the vSphere backend uploads: the boot ISO (ISOLINUX, the distribution's
bzImage, our initramfs, `bonneville.channel=ttyS1 bonneville.root=disk`) and the root disk (ext4
of a busybox rootfs, UUID = token, behind our hand-written ESXi VMDK descriptor) on VMware's
PVSCSI controller, which QEMU emulates. ttyS0 is the console (a file), ttyS1 a TCP client
connecting to the monitor-side `SerialListener`, as ESXi's network serial port does; a vmxnet3
NIC on a tap stands in for the port group when asked.
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from bonneville.backends.image import ensure_image
from bonneville.backends.image.kernel import find_kernel
from bonneville.backends.vsphere import media
from bonneville.backends.vsphere.connection import in_netns
from bonneville.backends.vsphere.transport import SerialListener, new_token
from bonneville.guest import protocol
from bonneville.shim.agent_client import AgentConnection
from tests.support import make_busybox_rootfs

BOOT_TIMEOUT = 240.0  # ISOLINUX + a bzImage cold boot under TCG on a shared, busy host
CALL_TIMEOUT = 60.0
QEMU = "qemu-system-x86_64"


@dataclass(frozen=True)
class VMParts:
    iso: media.BootISO
    disk: media.RootDisk
    token: str


@dataclass(frozen=True)
class Nic:
    """A vmxnet3 NIC on tap ``tap`` (which must exist where QEMU runs) with ``mac``."""

    tap: str
    mac: str


def qemu_argv(iso: str, disk: str, console: str, port: int, nic: Nic | None = None) -> list[str]:
    argv = [
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
    if nic is not None:
        argv += [
            "-netdev",
            f"tap,id=net0,ifname={nic.tap},script=no,downscript=no",
            "-device",
            f"vmxnet3,netdev=net0,mac={nic.mac}",
        ]
    return argv


def make_vm_parts(tmp_path: Path) -> VMParts:
    """The boot ISO and a root disk holding a busybox container tree, as the backend makes them."""
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
    return VMParts(iso, disk, token)


@dataclass
class Booted:
    qemu: subprocess.Popen[bytes]
    agent: AgentConnection


@contextlib.contextmanager
def boot(
    tmp_path: Path, parts: VMParts, nic: Nic | None = None, netns: str = ""
) -> Iterator[Booted]:
    """QEMU running the parts, its agent greeted; QEMU and the listener are gone afterwards,
    whatever happened. With ``netns`` (a name under /run/netns) QEMU and the listener run
    in that network namespace (where the NIC's tap is)."""
    console = tmp_path / "console.log"
    errors = tmp_path / "qemu.err"
    netns_fd = os.open(f"/run/netns/{netns}", os.O_RDONLY | os.O_CLOEXEC) if netns else -1
    try:
        listener = in_netns(netns_fd, lambda: SerialListener("127.0.0.1"))
    finally:
        if netns_fd >= 0:
            os.close(netns_fd)
    prefix = ["ip", "netns", "exec", netns] if netns else []
    qemu = None
    try:
        with open(errors, "wb") as err:
            qemu = subprocess.Popen(
                [
                    *prefix,
                    *qemu_argv(
                        parts.iso.path, parts.disk.descriptor, str(console), listener.port, nic
                    ),
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
                close_fds=True,
            )
        try:
            channel = listener.accept(parts.token, BOOT_TIMEOUT)
        except Exception:
            raise AssertionError(
                f"no agent on the serial link; console:\n{console.read_text(errors='replace')}"
                f"\nqemu: {errors.read_text(errors='replace')}"
            ) from None
        agent = AgentConnection(channel)
        hello = agent.call("hello", CALL_TIMEOUT, version=protocol.VERSION)
        assert hello["pid"] == 1 and hello["kernel"] == find_kernel().release
        yield Booted(qemu, agent)
    finally:
        listener.close()
        if qemu is not None:
            if qemu.poll() is None:
                qemu.kill()
            qemu.wait()


def create_container(agent: AgentConnection, hostname: str = "serial") -> None:
    """Container ``c1`` (stream 1) from the disk's tree, its init a long sleep, started."""
    agent.call(
        "create",
        CALL_TIMEOUT,
        container="c1",
        stream=1,
        config={
            "hostname": hostname,
            "readonly": False,
            "mounts": [
                {"destination": "/proc", "type": "proc", "source": "proc", "options": []},
            ],
        },
        namespaces={},
        process={"args": ["/bin/sleep", "1000"], "cwd": "/", "env": ["PATH=/bin"]},
    )
    agent.call("start", CALL_TIMEOUT, container="c1")


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


def run_in_container(agent: AgentConnection, stream: int, script: str) -> tuple[str, int]:
    """``sh -c script`` in container c1: its stdout and exit status."""
    agent.call(
        "exec",
        CALL_TIMEOUT,
        container="c1",
        id=stream,
        process={"args": ["/bin/sh", "-c", script], "cwd": "/", "env": ["PATH=/bin"]},
    )
    out, message = collect(agent, stream, CALL_TIMEOUT)
    status = message["status"]
    assert isinstance(status, int)
    return out.decode(errors="replace"), status
