"""The real guest image, built from the host's kernel, busybox and Python, booted under QEMU TCG.

The kernel argument ``bonneville.selftest=1`` makes /init check what the agent relies on (the
virtio-serial port named ``bonneville.agent``, the 9p share, every Python module the agent
imports, ctypes) and power off, printing one line per check on the serial console.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bonneville.backends import image
from bonneville.backends.image import GuestImage
from bonneville.backends.image.cpio import read_cpio
from bonneville.backends.image.kernel import find_kernel, module_name
from bonneville.backends.qemu.cmdline import QemuOptions, cpu_model

pytestmark = pytest.mark.vm

DEADLINE = 120.0  # a hang guard only: a boot takes ~5 s under TCG, more on a busy host
QEMU = "qemu-system-x86_64"
TCG = QemuOptions(accel="tcg")  # the guest CPU the QEMU backend gives a VM under TCG


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[GuestImage, Path]]:
    if shutil.which(QEMU) is None:
        pytest.skip(f"{QEMU} not installed")
    images = tmp_path_factory.mktemp("images")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(image.IMAGE_DIR_ENV, str(images))
        built = image.ensure_image()
        yield built, images


def boot(guest: GuestImage, workdir: Path, machine: str = "q35") -> tuple[str, float, int]:
    """Boot the selftest; return the console output, seconds to the OK line and QEMU's status."""
    share = workdir / "share"
    share.mkdir()
    (share / "selftest-in").write_text("hello from the host\n")
    log = workdir / "console.log"
    pci = machine != "microvm"
    args = [
        QEMU,
        *("-nodefaults", "-no-user-config", "-display", "none", "-no-reboot"),
        *("-accel", "tcg", "-machine", machine, "-cpu", cpu_model(TCG), "-m", "256"),
        *("-kernel", guest.kernel, "-initrd", guest.initrd),
        *("-append", " ".join([*guest.kernel_args, "bonneville.selftest=1"])),
        *("-chardev", f"file,id=console,path={log}", "-serial", "chardev:console"),
        *("-device", f"virtio-serial-{'pci' if pci else 'device'},id=vser0"),
        *("-chardev", "null,id=agent"),
        *("-device", "virtserialport,bus=vser0.0,chardev=agent,name=bonneville.agent"),
        *("-fsdev", f"local,id=fs0,path={share},security_model=passthrough"),
        *("-device", f"virtio-9p-{'pci' if pci else 'device'},fsdev=fs0,mount_tag=bonneville-root"),
    ]
    started = time.monotonic()
    proc = subprocess.Popen(
        args,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        close_fds=True,
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
    )
    try:
        _, stderr = proc.communicate(timeout=DEADLINE)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail(f"QEMU did not exit within {DEADLINE} s:\n{log.read_text(errors='replace')}")
    elapsed = time.monotonic() - started
    console = log.read_text(errors="replace")
    assert proc.returncode == 0, f"QEMU failed ({proc.returncode}): {stderr.decode()}\n{console}"
    return console, elapsed, proc.returncode


def test_image_layout(built: tuple[GuestImage, Path]) -> None:
    guest, _ = built
    assert Path(guest.kernel).read_bytes()[:4] == b"\x7fELF"
    entries = read_cpio(Path(guest.initrd).read_bytes())
    for name in (
        "init",
        "usr/bin/busybox",
        "usr/bin/python3.11",
        "usr/bin/python3",
        "usr/lib/x86_64-linux-gnu/libc.so.6",
        "lib64",
        "usr/lib/python3.11/os.pyc",
        "usr/lib/python3.11/json/__init__.pyc",
        "opt/bonneville/bonneville/__init__.py",
        "opt/bonneville/bonneville/guest/protocol.py",
        "etc/bonneville/modules",
        "dev/console",
    ):
        assert name in entries, name
    # Only the guest package goes in: the builder (bonneville.backends.image) is host code.
    packed = {n.split("/")[3] for n in entries if n.startswith("opt/bonneville/bonneville/")}
    assert packed == {"__init__.py", "__pycache__", "guest"}, packed
    modules = entries["etc/bonneville/modules"][1].decode().split()
    loaded = [module_name(m) for m in modules]
    assert loaded.index("virtio_ring") < loaded.index("virtio") < loaded.index("virtio_console")
    assert loaded.index("netfs") < loaded.index("fscache") < loaded.index("9p")
    status = image.image_status()
    assert status["built"] and status["key"] == guest.key
    assert status["initrd_size"] == os.path.getsize(guest.initrd)


def test_ensure_image_fast_path_does_not_rebuild(built: tuple[GuestImage, Path]) -> None:
    guest, images = built
    mtime = os.stat(guest.initrd).st_mtime_ns
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(image.IMAGE_DIR_ENV, str(images))
        again = image.ensure_image()
    assert again == guest
    assert os.stat(guest.initrd).st_mtime_ns == mtime


def test_selftest_boots_and_powers_off(built: tuple[GuestImage, Path], tmp_path: Path) -> None:
    guest, _ = built
    console, elapsed, _ = boot(guest, tmp_path)
    release = find_kernel().release
    assert "BONNEVILLE SELFTEST PORT OK bonneville.agent" in console, console
    assert "BONNEVILLE SELFTEST 9P OK bonneville-root" in console, console
    assert "BONNEVILLE SELFTEST 9P READ hello from the host" in console, console
    assert re.search(r"BONNEVILLE SELFTEST PYTHON OK \d+ modules", console), console
    assert f"BONNEVILLE SELFTEST OK {release}" in console, console
    assert "FAIL" not in console, console
    # The guest wrote through the share: the rootfs really is shared live.
    assert (tmp_path / "share" / "selftest-out").read_text().strip() == release
    print(f"selftest boot: {elapsed:.2f} s to QEMU exit")
