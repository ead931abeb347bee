"""An instant clone's guest side for real, with QEMU standing in for ESXi's VMFork.

QEMU boots the vSphere boot ISO as the backend's template VM is booted: no root disk, ttyS1 a
TCP client of the template's listener. The agent parks (docs/backends.md, "Instant clone").
Then the test forks it as QEMU can, which is how InstantClone_Task forks a running VM: the
template's state is saved (QMP ``migrate``) and resumed in a second QEMU whose VM generation ID
differs (vmgenid writes the new GUID on load and raises the ACPI notification ESXi raises) and
whose serial port is a client of a new monitor's listener; the clone then gets its own root
disk (a hot-added PVSCSI disk whose ext4 UUID is the new token), as the backend's reconfigure
gives it one. The agent must see the fork, find the disk, prove the new token to the new
listener and run a container there; the template's listener never hears a valid preamble.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from bonneville.backends.image import ensure_image
from bonneville.backends.image.kernel import find_kernel
from bonneville.backends.qemu.qmp import QMPClient
from bonneville.backends.vsphere import media
from bonneville.backends.vsphere.transport import SerialListener, new_token
from bonneville.guest import protocol
from bonneville.shim.agent_client import AgentConnection
from integration.vsphere_qemu import BOOT_TIMEOUT, CALL_TIMEOUT, QEMU, collect
from tests.support import make_busybox_rootfs

pytestmark = pytest.mark.vm


def template_argv(iso: str, console: str, port: int, qmp: str, genid: str) -> list[str]:
    """A template VM as the backend makes it: the ISO, a PVSCSI controller without a disk, a
    vmxnet3 NIC, ttyS1 a TCP client; plus the VM generation ID device ESXi gives every VM.
    (A fork's QEMU gets the same devices, ``-incoming defer`` added.)"""
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
        "-chardev",
        f"socket,id=channel,host=127.0.0.1,port={port}",
        "-serial",
        "chardev:channel",
        "-device",
        "pvscsi,id=scsi0",
        "-netdev",
        "user,id=net0,restrict=on",
        "-device",
        "vmxnet3,netdev=net0,mac=52:54:00:12:34:56",
        "-device",
        f"vmgenid,id=genid,guid={genid}",
        "-qmp",
        f"unix:{qmp},server=on,wait=off",
    ]


def wait_for(path: Path, text: str, timeout: float, qemu: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in path.read_text(errors="replace"):
            return
        assert qemu.poll() is None, f"QEMU ended; console:\n{path.read_text(errors='replace')}"
        time.sleep(0.2)
    raise AssertionError(f"no {text!r} on the console:\n{path.read_text(errors='replace')}")


def qmp_client(path: Path) -> QMPClient:
    deadline = time.monotonic() + 30
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(str(path))
            break
        except OSError:
            sock.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    client = QMPClient(sock)
    client.handshake()
    return client


def wait_migration(client: QMPClient, timeout: float = 120) -> None:
    """Until an outgoing or incoming migration has completed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = client.execute("query-migrate").get("status")
        if status == "completed":
            return
        assert status in (None, "setup", "active", "device", "pre-switchover"), status
        time.sleep(0.1)
    raise AssertionError("the migration did not complete")


@pytest.fixture
def template_iso() -> Iterator[media.BootISO]:
    if shutil.which(QEMU) is None:
        pytest.fail(f"{QEMU} is missing (install.sh installs qemu-system-x86)")
    image = ensure_image()
    yield media.ensure_boot_iso(
        image.key,
        str(Path(image.kernel).parent),
        find_kernel().path,
        image.initrd,
        image.kernel_args,
    )


def test_a_forked_template_finds_its_disk_and_serves_its_new_monitor(
    tmp_path: Path, template_iso: media.BootISO
) -> None:
    console = tmp_path / "console.log"
    console.touch()
    qmp_path = tmp_path / "qmp.sock"
    template_listener = SerialListener("127.0.0.1")
    clone_listener = SerialListener("127.0.0.1")
    qemu = subprocess.Popen(
        template_argv(
            template_iso.path,
            str(console),
            template_listener.port,
            str(qmp_path),
            str(uuid.uuid4()),
        ),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=open(tmp_path / "qemu.err", "wb"),  # noqa: SIM115
        close_fds=True,
    )
    clone: subprocess.Popen[bytes] | None = None
    clients: list[QMPClient] = []
    try:
        # The template: booted, no disk, parked; it has said nothing on its serial port.
        parked = "parked as a template (watching the VM generation ID)"
        wait_for(console, parked, BOOT_TIMEOUT, qemu)
        template = qmp_client(qmp_path)
        clients.append(template)

        # The fork: the template's state resumed in a VM with its own generation ID and channel.
        state = tmp_path / "template.state"
        template.execute("migrate", uri=f"exec:cat > {state}")
        wait_migration(template)
        clone_console = tmp_path / "clone-console.log"
        clone_console.touch()
        clone_qmp_path = tmp_path / "clone-qmp.sock"
        clone = subprocess.Popen(
            [
                *template_argv(
                    template_iso.path,
                    str(clone_console),
                    clone_listener.port,
                    str(clone_qmp_path),
                    str(uuid.uuid4()),
                ),
                "-incoming",
                "defer",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=open(tmp_path / "clone.err", "wb"),  # noqa: SIM115
            close_fds=True,
        )
        fork = qmp_client(clone_qmp_path)
        clients.append(fork)
        fork.execute("migrate-incoming", uri=f"exec:cat {state}")
        wait_migration(fork)
        fork.execute("cont")
        # Its own disk, as the backend's reconfigure adds it to the clone: after the fork.
        wait_for(clone_console, "this VM was forked (new VM generation ID)", CALL_TIMEOUT, clone)
        make_busybox_rootfs(tmp_path / "tree" / "root")
        token = new_token()
        disk = media.make_root_disk(str(tmp_path / "tree"), str(tmp_path), token)
        fork.execute(
            "blockdev-add",
            **{
                "node-name": "root",
                "driver": "vmdk",
                "file": {"driver": "file", "filename": disk.descriptor},
            },
        )
        fork.execute("device_add", driver="scsi-hd", drive="root", bus="scsi0.0", id="rootdisk")

        try:
            channel = clone_listener.accept(token, CALL_TIMEOUT)
        except Exception:
            raise AssertionError(
                "no agent on the clone's listener; console:\n"
                + clone_console.read_text(errors="replace")
            ) from None
        text = clone_console.read_text(errors="replace")
        assert "this VM was forked (new VM generation ID)" in text
        assert "NICs re-probed (eth0)" in text
        agent = AgentConnection(channel)
        hello = agent.call("hello", CALL_TIMEOUT, version=protocol.VERSION, time=time.time())
        assert hello["pid"] == 1
        agent.call(
            "create",
            CALL_TIMEOUT,
            container="c1",
            stream=1,
            config={
                "hostname": "forked",
                "readonly": False,
                "mounts": [
                    {"destination": "/proc", "type": "proc", "source": "proc", "options": []},
                ],
            },
            namespaces={},
            process={"args": ["/bin/sleep", "1000"], "cwd": "/", "env": ["PATH=/bin"]},
        )
        agent.call("start", CALL_TIMEOUT, container="c1")
        agent.call(
            "exec",
            CALL_TIMEOUT,
            container="c1",
            id=2,
            process={
                "args": ["/bin/sh", "-c", "hostname; grep ' / ext4 ' /proc/mounts | wc -l"],
                "cwd": "/",
                "env": ["PATH=/bin"],
            },
        )
        out, exit_message = collect(agent, 2, CALL_TIMEOUT)
        assert exit_message["status"] == 0
        assert out.split() == [b"forked", b"1"]
        # Nothing valid ever reached the template's own listener.
        with pytest.raises(Exception, match="did not connect"):
            template_listener.accept(new_token(), 0.5)
        agent.call("shutdown", CALL_TIMEOUT)
        assert clone.wait(timeout=60) == 0
    finally:
        for client in clients:
            client.close()
        template_listener.close()
        clone_listener.close()
        for vm in (qemu, clone):
            if vm is not None:
                if vm.poll() is None:
                    vm.kill()
                vm.wait()
