"""The guest's side of an instant clone (guest/fork.py, guest/rootdisk.py): the logic, on the
host. integration/test_vsphere_fork.py forks the real guest in QEMU."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from bonneville.guest import fork, rootdisk
from bonneville.guest.rootdisk import EXT4_MAGIC, EXT4_SUPER_OFFSET


def ext4_head(label: str, uuid_hex: str) -> bytes:
    head = bytearray(4096)
    sb = EXT4_SUPER_OFFSET
    head[sb + 56 : sb + 58] = EXT4_MAGIC.to_bytes(2, "little")
    head[sb + 104 : sb + 120] = bytes.fromhex(uuid_hex)
    head[sb + 120 : sb + 120 + len(label)] = label.encode()
    return bytes(head)


def test_the_root_disk_is_the_one_with_our_label(tmp_path: Path) -> None:
    block, dev = tmp_path / "block", tmp_path / "dev"
    block.mkdir()
    dev.mkdir()
    assert rootdisk.root_disk_now(str(block), str(dev)) is None
    for name, head in (
        ("sda", ext4_head("other", "11" * 16)),
        ("sdb", b"\0" * 4096),  # not ext4
        ("sdc", ext4_head(rootdisk.LABEL, "0123456789abcdef0123456789abcdef")),
    ):
        (block / name).mkdir()
        (dev / name).write_bytes(head)
    (block / "sr0").mkdir()  # listed, no device node: skipped
    found = rootdisk.root_disk_now(str(block), str(dev))
    assert found == (f"{dev}/sdc", "01234567-89ab-cdef-0123-456789abcdef")


def test_a_fork_is_seen_in_the_kernel_log_once(tmp_path: Path) -> None:
    read_end, write_end = os.pipe()
    try:
        watch = fork.ForkWatch(f"/proc/self/fd/{read_end}", uevents=False)
        assert watch.fds and not watch.forked()
        os.write(write_end, b"6,812,91234,-;random: crng init done\n")
        assert not watch.forked()
        os.write(write_end, b"5,813,99871,-;random: crng reseeded due to virtual machine fork\n")
        assert watch.forked()
        assert not watch.forked()  # read once: the next call waits for the next fork
        watch.close()
        assert watch.fds and watch.kmsg == -1
    finally:
        os.close(read_end)
        os.close(write_end)


def test_without_a_kernel_log_a_parked_vm_still_polls_its_disks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No event source at all: the disk is found by polling, after the VM parked."""
    real = fork.ForkWatch
    monkeypatch.setattr(fork, "ForkWatch", lambda: real(str(tmp_path / "none"), False))
    appeared = threading.Event()
    monkeypatch.setattr(
        fork, "root_disk_now", lambda: ("/dev/sdb", "u") if appeared.is_set() else None
    )
    lines: list[str] = []
    threading.Timer(0.3, appeared.set).start()
    started = time.monotonic()
    found = fork.await_root_disk(lambda level, msg: lines.append(msg), grace=0.1, poll_ms=20)
    assert found == ("/dev/sdb", "u") and time.monotonic() - started < 10
    assert lines[0].startswith(f"no disk labelled {rootdisk.LABEL}: parked as a template")
    assert "polling the disks" in lines[0]
    assert lines[-1] == "root disk /dev/sdb appeared: this VM is its container's now"


def test_a_disk_present_at_boot_is_taken_without_parking(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fork, "root_disk_now", lambda: ("/dev/sda", "t"))
    lines: list[str] = []
    assert fork.await_root_disk(lambda level, msg: lines.append(msg)) == ("/dev/sda", "t")
    assert lines == []
