"""vSphere backend logic without a server: spec golden files (tests/golden/vsphere/, the SOAP XML
pyVmomi sends), settings, the TCP serial transport's handshake, boot media and root disk."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import threading
from collections.abc import Callable
from functools import partial
from pathlib import Path

import pytest

from bonneville.backends.vsphere import config as vconfig
from bonneville.backends.vsphere import media, specs
from bonneville.backends.vsphere.transport import SerialListener, new_token, preamble
from bonneville.guest import channel as agent
from bonneville.guest import rootdisk
from bonneville.guest.mode import Mode
from bonneville.spec.errors import BackendError, ConfigError
from tests.golden_files import compare_golden, golden

pytest.importorskip("pyVmomi")

TOKEN = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"


def moref(kind: str, moid: str) -> object:
    from pyVmomi import vim

    cls = getattr(vim, kind)
    return cls(moid)


TEMPLATE = specs.TemplatePlan(
    name="bonneville-template-0123456789abcdef",
    datastore="LocalDS_0",
    iso_path="[LocalDS_0] bonneville/boot-0123456789abcdef.iso",
    image_key="39fc734fa38087d9957e8c74f7ae8e54",
)
CONTAINER = specs.ContainerPlan(
    container_id="c1",
    vm_folder_path="[LocalDS_0] bnv-c1-0f1e2d3c",
    disk_path="[LocalDS_0] bnv-c1-0f1e2d3c/root.vmdk",
    channel_uri="tcp://192.0.2.10:40001",
    token=TOKEN,
    memory_mib=384,
    vcpus=2,
    image_key="39fc734fa38087d9957e8c74f7ae8e54",
)


TEMPLATE_PLANS = {
    "template.xml": TEMPLATE,
    "template_portgroup.xml": specs.TemplatePlan(
        **{**TEMPLATE.__dict__, "network": specs.NetworkRef("VM Network")}
    ),
    "template_dvportgroup.xml": specs.TemplatePlan(
        **{
            **TEMPLATE.__dict__,
            "network": specs.NetworkRef(
                "DC0_DVPG0",
                "fe 4c 1b 50 00 11 22 33-44 55 66 77 88 99 aa bb",
                "dvportgroup-13",
            ),
        }
    ),
}


def template_xml(plan: specs.TemplatePlan) -> str:
    return specs.to_xml(specs.template_config(plan))


def clone_specs() -> dict[str, Callable[[], str]]:
    """The clone specs' golden texts, by file name (made only when asked: they need pyVmomi)."""
    return {
        "linked_clone.xml": lambda: specs.to_xml(
            specs.linked_clone_spec(
                moref("vm.Snapshot", "snapshot-40"),
                moref("ResourcePool", "resgroup-15"),
                moref("Datastore", "datastore-20"),
            )
        ),
        "full_clone.xml": lambda: specs.to_xml(
            specs.full_clone_spec(
                moref("ResourcePool", "resgroup-15"), moref("Datastore", "datastore-20")
            )
        ),
        "instant_clone.xml": lambda: specs.to_xml(
            specs.instant_clone_spec(
                "bnv-c1-0f1e2d3c",
                moref("ResourcePool", "resgroup-15"),
                moref("Datastore", "datastore-20"),
                moref("Folder", "folder-3"),
                TOKEN,
            )
        ),
    }


ISOLINUX_ARGS = ("console=ttyS0", "quiet", *specs.ISO_KERNEL_ARGS)
GOLDEN = {
    **{
        name: golden("vsphere", name, partial(template_xml, plan))
        for name, plan in TEMPLATE_PLANS.items()
    },
    "container.xml": golden(
        "vsphere",
        "container.xml",
        lambda: specs.to_xml(specs.container_config(CONTAINER, scsi_key=1000)),
    ),
    # An instant clone's: its template's serial ports edited, its size left as it is.
    "container_instant.xml": golden(
        "vsphere",
        "container_instant.xml",
        lambda: specs.to_xml(
            specs.container_config(
                specs.ContainerPlan(
                    **{
                        **CONTAINER.__dict__,
                        "serial_keys": (("channel", 9001), ("console", 9000)),
                        "resize": False,
                    }
                ),
                scsi_key=1000,
            )
        ),
    ),
    **{name: golden("vsphere", name, make) for name, make in clone_specs().items()},
    "root.vmdk": golden(
        "vsphere",
        "root.vmdk",
        lambda: specs.vmdk_descriptor("root-flat.vmdk", 96 << 20, 0x1234ABCD),
    ),
    "isolinux.cfg": golden("vsphere", "isolinux.cfg", lambda: media.isolinux_config(ISOLINUX_ARGS)),
}


@pytest.mark.parametrize("name", sorted(TEMPLATE_PLANS))
def test_template_config_golden(name: str) -> None:
    compare_golden(GOLDEN[name])


def test_container_config_golden() -> None:
    compare_golden(GOLDEN["container.xml"])
    compare_golden(GOLDEN["container_instant.xml"])


def test_clone_specs_golden() -> None:
    for name in clone_specs():
        compare_golden(GOLDEN[name])


def test_vmdk_descriptor_golden() -> None:
    compare_golden(GOLDEN["root.vmdk"])
    with pytest.raises(ValueError):
        specs.vmdk_descriptor("x-flat.vmdk", 1000, 1)


def test_isolinux_config_golden() -> None:
    compare_golden(GOLDEN["isolinux.cfg"])
    args = ISOLINUX_ARGS
    # The ISO's name changes with the image and with its kernel arguments.
    assert media.iso_key("a", args) != media.iso_key("b", args)
    assert media.iso_key("a", args) != media.iso_key("a", args[:-1])


# ---- settings -------------------------------------------------------------------------------


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_settings_from_file_and_environment(tmp_path: Path) -> None:
    secret = write(tmp_path / "pw", "s3cret\n")
    cfg_file = write(
        tmp_path / "config.toml",
        f'[vsphere]\nurl = "https://vc.example/sdk"\nusername = "u"\npassword_file = "{secret}"\n'
        'datastore = "ds1"\nnetwork = "VM Network"\n',
    )
    env = {"BONNEVILLE_CONFIG": str(cfg_file), "BONNEVILLE_VSPHERE_DATASTORE": "ds2"}
    cfg = vconfig.load(env)
    assert (cfg.url, cfg.username, cfg.password) == ("https://vc.example/sdk", "u", "s3cret")
    assert cfg.datastore == "ds2"  # the environment wins over the file
    assert cfg.network == "VM Network"
    assert not cfg.insecure and not cfg.thumbprint and not cfg.ca_file  # system CAs
    assert cfg.agent_timeout == 120.0 and cfg.clone_mode == "auto"
    assert (cfg.host, cfg.port, cfg.scheme, cfg.path) == ("vc.example", 443, "https", "/sdk")
    assert "s3cret" not in repr(cfg)
    env["BONNEVILLE_VSPHERE_PASSWORD"] = "fromenv"
    assert vconfig.load(env).password == "fromenv"


@pytest.mark.parametrize(
    ("body", "env", "message"),
    [
        ("", {}, "vsphere.url is not set"),
        ('url = "ftp://x"\nusername = "u"\n', {}, "is not an http(s) URL"),
        ('url = "https://u:p@x/sdk"\nusername = "u"\n', {}, "must not carry credentials"),
        ('url = "https://x/sdk"\n', {}, "vsphere.username is not set"),
        ('url = "https://x/sdk"\nusername = "u"\n', {}, "no vSphere password"),
        (
            'url = "https://x/sdk"\nusername = "u"\npassword = "p"\n',
            {},
            "not read from the config file",
        ),
        (
            'url = "https://x/sdk"\nusername = "u"\npassword_file = "/nonexistent/pw"\n',
            {},
            "cannot read the vSphere password file",
        ),
        (
            'url = "https://x/sdk"\nusername = "u"\nclone_mode = "magic"\n',
            {"BONNEVILLE_VSPHERE_PASSWORD": "p"},
            "clone_mode must be one of",
        ),
        (
            'url = "https://x/sdk"\nusername = "u"\nverify_tls = "maybe"\n',
            {"BONNEVILLE_VSPHERE_PASSWORD": "p"},
            "must be true or false",
        ),
        (
            'url = "https://x/sdk"\nusername = "u"\nca_file = "/nonexistent/ca.pem"\n',
            {"BONNEVILLE_VSPHERE_PASSWORD": "p"},
            "does not exist",
        ),
    ],
)
def test_settings_errors(tmp_path: Path, body: str, env: dict[str, str], message: str) -> None:
    cfg_file = write(tmp_path / "config.toml", "[vsphere]\n" + body)
    with pytest.raises(ConfigError, match=re.escape(message)):
        vconfig.load({"BONNEVILLE_CONFIG": str(cfg_file), **env})


# ---- the serial transport's handshake -------------------------------------------------------


def connect_and_send(port: int, data: bytes, close: bool = False) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(data)
    if close:
        sock.close()
    return sock


def test_listener_takes_the_connection_with_the_token_and_drops_others() -> None:
    token = new_token()
    listener = SerialListener("127.0.0.1")
    try:
        assert listener.uri("192.0.2.1") == f"tcp://192.0.2.1:{listener.port}"
        assert listener.uri("2001:db8::1") == f"tcp://[2001:db8::1]:{listener.port}"
        intruder = connect_and_send(listener.port, preamble(new_token()))
        silent = connect_and_send(listener.port, b"")
        guest = connect_and_send(listener.port, b"\x00noise\r\n" + preamble(token) + b"FRAMES")
        conn = listener.accept(token, timeout=10)
        # Nothing past the preamble was consumed: the frames are the agent connection's.
        assert conn.recv(6) == b"FRAMES"
        assert intruder.recv(1) == b""  # dropped
        conn.close()
        for sock in (intruder, silent, guest):
            sock.close()
    finally:
        listener.close()


def test_listener_deadline_names_the_dropped_peers() -> None:
    listener = SerialListener("127.0.0.1")
    try:
        bad = connect_and_send(listener.port, preamble("wrong"))
        with pytest.raises(
            BackendError, match=r"within 0.5 s \(connections without its token: 127"
        ):
            listener.accept(new_token(), timeout=0.5)
        bad.close()
    finally:
        listener.close()


def test_listener_port_in_use_is_a_backend_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        with pytest.raises(BackendError, match="cannot listen"):
            SerialListener("127.0.0.1", taken.getsockname()[1])


# ---- guest side: kernel switches, the root disk's identity, the raw UART ----------------------


def test_kernel_options_and_mode_switches() -> None:
    options = agent.kernel_options(
        "console=ttyS0 quiet bonneville.channel=ttyS1 bonneville.root=disk bonneville.token=T x=1"
    )
    assert options == {
        "bonneville.channel": "ttyS1",
        "bonneville.root": "disk",
        "bonneville.token": "T",
    }
    mode = Mode(True, None, None, options)
    assert (mode.serial, mode.root_disk, mode.token, mode.reconnects) == ("ttyS1", True, "T", False)
    plain = Mode(True, None, None, {})
    assert (plain.serial, plain.root_disk, plain.reconnects) == ("", False, True)
    # Host mode (fake backend, tests) ignores the switches: its channel and root are given.
    host = Mode(False, 5, "/tmp/root", options)
    assert (host.serial, host.root_disk) == ("", False)


def test_root_disk_is_ext4_of_the_share_with_the_token_as_uuid(
    tmp_path: Path, busybox_rootfs: Path
) -> None:
    token = new_token()
    disk = media.make_root_disk(str(busybox_rootfs), str(tmp_path), token)
    with open(disk.flat, "rb") as f:
        assert rootdisk.ext4_identity(f.read(4096)) == (rootdisk.LABEL, token)
    assert os.path.getsize(disk.flat) == disk.size and disk.size % (1 << 20) == 0
    listing = subprocess.run(
        ["/usr/sbin/debugfs", "-R", "stat /bin/busybox", disk.flat], capture_output=True, text=True
    ).stdout
    assert f"Size: {os.path.getsize(busybox_rootfs / 'bin' / 'busybox')}" in listing
    descriptor = Path(disk.descriptor).read_text()
    assert f'RW {disk.size // 512} VMFS "root-flat.vmdk"' in descriptor
    # qemu-img reads the descriptor as the VMDK it is, with the raw image as its extent.
    info = subprocess.run(
        ["qemu-img", "info", "--output=json", disk.descriptor], capture_output=True, text=True
    )
    assert '"format": "vmdk"' in info.stdout and f'"virtual-size": {disk.size}' in info.stdout
    assert rootdisk.ext4_identity(b"\0" * 4096) is None


def test_root_disk_failure_removes_its_files(tmp_path: Path) -> None:
    with pytest.raises(BackendError, match="building the root disk"):
        media.make_root_disk(str(tmp_path / "missing"), str(tmp_path), new_token())
    assert list(tmp_path.iterdir()) == []


def test_serial_channel_is_raw_and_eight_bit_clean() -> None:
    import pty

    master, slave = pty.openpty()
    name = os.ttyname(slave)
    try:
        fd = agent.open_serial(name.removeprefix("/dev/"))
        try:
            payload = bytes(range(256)) + b"\r\n\x03\x04\x11\x13"
            os.write(master, payload)
            got = b""
            while len(got) < len(payload):
                got += os.read(fd, 4096)
            assert got == payload  # no CR/NL mapping, no signals, no flow control, no echo
            os.write(fd, b"\n\xff")
            assert os.read(master, 16) == b"\n\xff"  # no NL -> CRNL on output
        finally:
            os.close(fd)
    finally:
        os.close(master)
        os.close(slave)


def test_the_channel_writes_the_preamble_first(tmp_path: Path) -> None:
    import pty

    master, slave = pty.openpty()
    name = os.ttyname(slave).removeprefix("/dev/")
    try:
        mode = Mode(False, None, None, {})
        mode.serial, mode.token = name, TOKEN
        channel = agent.Channel(mode)
        result: list[bytes] = []
        reader = threading.Thread(target=lambda: result.append(os.read(master, 256)))
        reader.start()
        channel.open(lambda level, msg: None)
        reader.join(10)
        assert result == [preamble(TOKEN)]
        assert channel.connected
        os.close(channel.fd)
    finally:
        os.close(master)
        os.close(slave)
