"""What the vSphere VM boots from and runs on, built on the runtime's host.

- The boot ISO: the guest image's kernel (the distribution's bzImage: ISOLINUX cannot boot the
  ELF vmlinux the QEMU backend uses through PVH) and initramfs, with the kernel arguments that
  switch the agent to the serial channel and the disk root. Built once per guest image, cached
  beside it; its name on the datastore carries its key, so a changed image uploads a new ISO.
- The root disk: an ext4 file system made from the monitor's share directory (the bundle's
  rootfs with every bind mount beneath it) by `mkfs.ext4 -d`, labelled for the agent, its UUID
  the container's token; a hand-written VMDK descriptor makes the raw image an ESXi flat disk.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from bonneville.backends.vsphere import specs
from bonneville.spec.errors import BackendError

ISOLINUX_BIN = "/usr/lib/ISOLINUX/isolinux.bin"
LDLINUX_C32 = "/usr/lib/syslinux/modules/bios/ldlinux.c32"
XORRISO = "xorriso"
MKFS_EXT4 = "mkfs.ext4"
ROOT_DISK_LABEL = "bonneville-root"  # guest/rootdisk.py LABEL
ISO_FORMAT = 1  # bump when the ISO layout changes
MIB = 1 << 20
_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"}


@dataclass(frozen=True)
class BootISO:
    path: str
    key: str
    kernel_args: tuple[str, ...]

    @property
    def datastore_name(self) -> str:
        return f"bonneville/boot-{self.key}.iso"


def _run(argv: list[str], what: str) -> None:
    try:
        result = subprocess.run(
            argv, capture_output=True, text=True, close_fds=True, env=_ENV, check=False
        )
    except OSError as exc:
        raise BackendError(f"{what}: cannot run {argv[0]}: {exc.strerror}") from exc
    if result.returncode != 0:
        detail = " ".join((result.stderr or result.stdout).split())[-400:]
        raise BackendError(f"{what}: {argv[0]} failed: {detail}")


def iso_key(image_key: str, kernel_args: tuple[str, ...]) -> str:
    blob = "\0".join([str(ISO_FORMAT), image_key, *kernel_args]).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def isolinux_config(kernel_args: tuple[str, ...]) -> str:
    return (
        "DEFAULT bonneville\n"
        "PROMPT 0\n"
        "TIMEOUT 0\n"
        "LABEL bonneville\n"
        "  KERNEL /boot/vmlinuz\n"
        f"  APPEND initrd=/boot/initrd.img {' '.join(kernel_args)}\n"
    )


def ensure_boot_iso(
    image_key: str, image_dir: str, bzimage: str, initrd: str, base_args: tuple[str, ...]
) -> BootISO:
    """The cached boot ISO of this guest image, built now if missing."""
    kernel_args = (*base_args, *specs.ISO_KERNEL_ARGS)
    key = iso_key(image_key, kernel_args)
    path = os.path.join(image_dir, f"boot-vsphere-{key}.iso")
    iso = BootISO(path, key, kernel_args)
    if os.path.isfile(path):
        return iso
    for needed in (ISOLINUX_BIN, LDLINUX_C32):
        if not os.path.isfile(needed):
            raise BackendError(f"{needed} is missing: install isolinux and syslinux-common")
    lock_fd = os.open(
        os.path.join(image_dir, ".vsphere-iso.lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644
    )
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX)
        if os.path.isfile(path):
            return iso
        with tempfile.TemporaryDirectory(prefix="bonneville-iso-", dir=image_dir) as work:
            stage = Path(work) / "stage"
            (stage / "isolinux").mkdir(parents=True)
            (stage / "boot").mkdir()
            for src, dest in (
                (ISOLINUX_BIN, "isolinux/isolinux.bin"),
                (LDLINUX_C32, "isolinux/ldlinux.c32"),
                (bzimage, "boot/vmlinuz"),
                (initrd, "boot/initrd.img"),
            ):
                # Copies, never links: -boot-info-table patches isolinux.bin in the tree.
                _copy(src, stage / dest)
            (stage / "isolinux" / "isolinux.cfg").write_text(isolinux_config(kernel_args))
            tmp = Path(work) / "boot.iso"
            _run(
                [
                    XORRISO,
                    "-as",
                    "mkisofs",
                    "-quiet",
                    "-o",
                    str(tmp),
                    "-b",
                    "isolinux/isolinux.bin",
                    "-c",
                    "isolinux/boot.cat",
                    "-no-emul-boot",
                    "-boot-load-size",
                    "4",
                    "-boot-info-table",
                    "-V",
                    "BONNEVILLE",
                    "-R",
                    "-J",
                    str(stage),
                ],
                "building the boot ISO",
            )
            os.rename(tmp, path)
    finally:
        os.close(lock_fd)
    return iso


def _copy(src: str, dest: Path) -> None:
    import shutil

    try:
        shutil.copyfile(src, dest)
    except OSError as exc:
        raise BackendError(f"cannot copy {src}: {exc.strerror}") from exc


def disk_size(used_bytes: int) -> int:
    """Room for the files, ext4's own metadata and some growth, in whole MiB."""
    size = used_bytes + used_bytes // 4 + 64 * MIB
    return (size + MIB - 1) // MIB * MIB


def _used_bytes(directory: str) -> int:
    """Bytes the tree below ``directory`` occupies, bind mounts included (no -x)."""
    total = 0
    for root, dirs, files in os.walk(directory):
        for name in dirs + files:
            with contextlib.suppress(OSError):
                st = os.lstat(os.path.join(root, name))
                total += max(st.st_blocks * 512, 4096)
    return total


@dataclass(frozen=True)
class RootDisk:
    descriptor: str  # local path of NAME.vmdk
    flat: str  # local path of NAME-flat.vmdk (the raw ext4 image)
    size: int


def make_root_disk(source_dir: str, out_dir: str, token: str, name: str = "root") -> RootDisk:
    """An ext4 image of ``source_dir`` (UUID ``token``) as a VMDK descriptor + flat extent."""
    flat = os.path.join(out_dir, f"{name}-flat.vmdk")
    descriptor = os.path.join(out_dir, f"{name}.vmdk")
    size = disk_size(_used_bytes(source_dir))
    try:
        with open(flat, "wb") as f:
            f.truncate(size)
        _run(
            [
                MKFS_EXT4,
                "-q",
                "-F",
                "-L",
                ROOT_DISK_LABEL,
                "-U",
                token,
                "-E",
                "lazy_itable_init=1",
                "-d",
                source_dir,
                flat,
            ],
            f"building the root disk from {source_dir}",
        )
        cid = int(hashlib.sha256(token.encode()).hexdigest()[:8], 16)
        with open(descriptor, "w") as f:
            f.write(specs.vmdk_descriptor(os.path.basename(flat), size, cid))
    except BaseException:
        for path in (flat, descriptor):
            with contextlib.suppress(OSError):
                os.unlink(path)
        raise
    return RootDisk(descriptor, flat, size)
