"""The guest kernel: the host's Debian kernel as a PVH-bootable ELF, its command line, its modules.

The modules go into the initramfs uncompressed and unsigned, with the lists /init loads in
dependency order and a modules.dep for busybox's modprobe.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from bonneville.backends.image.common import ImageError, read_file

TYPE_CHECKING = False
if TYPE_CHECKING:
    from bonneville.backends.image.cpio import Tree

KERNEL_ENV = "BONNEVILLE_KERNEL"
BOOT_DIR = "/boot"
MODULES_ROOT = "/lib/modules"

# Kernel command line for the guest. Every entry was kept because it measurably helps under TCG
# (see integration/test_image_boot.py for how boot time was measured):
KERNEL_ARGS: tuple[str, ...] = (
    "console=ttyS0",  # the serial port is the log; there is no screen
    "quiet",  # printk to a TCG-emulated UART costs ~0.5 s per boot
    "panic=-1",  # a dead PID 1 reboots at once, and -no-reboot turns that into QEMU exiting
    "tsc=reliable",  # skip the clocksource watchdog and TSC calibration against the PIT
    "no_timer_check",  # skip the IO-APIC timer check (a busy wait under TCG)
    "i8042.noaux",  # no PS/2 controller probing: there is no keyboard or mouse
    "i8042.nokbd",
    "i8042.nopnp",
    "cryptomgr.notests",  # no crypto self-tests at boot
    # No DMA bounce buffers: virtio DMAs anywhere (no IOMMU), and with the hot-plug region above
    # 4 GiB (a pod's VM grows) the kernel would set 64 MiB of the guest's RAM aside for them.
    "swiotlb=noforce",
    # The KDF108 self-test runs regardless of cryptomgr.notests and hashes under TCG: 0.47 s of
    # a 4 s boot with initcall_debug. It registers nothing: only that test is skipped.
    "initcall_blacklist=crypto_kdf108_init",
    "rdinit=/init",
)

# Modules /init loads (plus their dependencies from modules.dep). Names as modprobe spells them.
KERNEL_MODULES: tuple[str, ...] = (
    "virtio_ring",
    "virtio",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_pci",
    "virtio_console",
    "9pnet",
    "9pnet_virtio",
    "netfs",
    "fscache",
    "9p",
    "failover",
    "net_failover",
    "virtio_net",
)
# Loaded when the kernel has them, skipped silently otherwise: microvm's virtio transport and
# the entropy device the backends attach.
OPTIONAL_KERNEL_MODULES: tuple[str, ...] = ("virtio_mmio", "virtio_rng")
# Not loaded at boot: the kernel asks busybox's modprobe for them when a container needs one (a
# privileged container's `brctl addbr`, `ip link add … type veth|dummy|vlan|macvlan`, a tun
# device, an overlay mount), as a host loads them for runc's containers. modules.dep in the
# image lists every module it holds.
ON_DEMAND_KERNEL_MODULES: tuple[str, ...] = (
    "bridge",
    "veth",
    "dummy",
    "8021q",
    "macvlan",
    "ipvlan",
    "tun",
    "overlay",
)
# Loaded by /init only with `bonneville.root=disk` (the vSphere backend's ext4 root disk on
# VMware's PVSCSI, as in the QEMU serial test; virtio-blk for QEMU): 9p boots pay nothing for them.
# ext4 asks the crypto API for "crc32c" (metadata checksums); without modprobe in the guest
# nothing would load it on demand, and the mount fails with ENOENT. vmxnet3 is the NIC vSphere
# gives the VM on a port group.
DISK_KERNEL_MODULES: tuple[str, ...] = (
    "virtio_blk",
    "vmw_pvscsi",
    "sd_mod",
    "crc32c_generic",
    "ext4",
    "vmxnet3",
)


XZ_MAGIC = b"\xfd7zXZ\x00"
GZIP_MAGIC = b"\x1f\x8b\x08"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
ELF_MAGIC = b"\x7fELF"


@dataclass(frozen=True)
class Kernel:
    path: str  # the vmlinuz (bzImage)
    release: str
    modules_dir: str


# --------------------------------------------------------------------------------------------
# Kernel


def kernel_release_of(path: str) -> str | None:
    """The release a bzImage announces in its setup header (None if it is not a bzImage)."""
    try:
        with open(path, "rb") as f:
            head = f.read(0x240)
            if len(head) < 0x210 or head[0x202:0x206] != b"HdrS":
                return None
            offset = int.from_bytes(head[0x20E:0x210], "little")
            if not offset:
                return None
            f.seek(offset + 0x200)
            version = f.read(256).split(b"\0", 1)[0].decode("ascii", "replace")
    except OSError:
        return None
    return version.split(" ", 1)[0] or None


def _version_key(release: str) -> list[tuple[int, str]]:
    return [(int(p), "") if p.isdigit() else (-1, p) for p in re.split(r"[.\-+~]", release)]


def find_kernel() -> Kernel:
    """The kernel to boot: $BONNEVILLE_KERNEL, else the newest /boot/vmlinuz-* with modules."""
    override = os.environ.get(KERNEL_ENV)
    if override:
        if not os.path.isfile(override):
            raise ImageError(f"{KERNEL_ENV}={override}: no such file")
        release = kernel_release_of(override) or _release_from_name(override)
        if not release:
            raise ImageError(f"{KERNEL_ENV}={override}: cannot tell the kernel release")
        modules_dir = os.path.join(MODULES_ROOT, release)
        if not os.path.isfile(os.path.join(modules_dir, "modules.dep")):
            raise ImageError(f"{override}: no modules for release {release} under {MODULES_ROOT}")
        return Kernel(override, release, modules_dir)
    candidates: list[Kernel] = []
    with contextlib.suppress(FileNotFoundError):
        for name in os.listdir(BOOT_DIR):
            if not name.startswith("vmlinuz-"):
                continue
            path = os.path.join(BOOT_DIR, name)
            release = _release_from_name(path)
            modules_dir = os.path.join(MODULES_ROOT, release)
            if os.path.isfile(os.path.join(modules_dir, "modules.dep")):
                candidates.append(Kernel(path, release, modules_dir))
    if not candidates:
        raise ImageError(
            f"no kernel found under {BOOT_DIR} with modules in {MODULES_ROOT}: "
            "install linux-image-amd64"
        )
    return max(candidates, key=lambda k: _version_key(k.release))


def _release_from_name(path: str) -> str:
    name = os.path.basename(path)
    return name[len("vmlinuz-") :] if name.startswith("vmlinuz-") else ""


def _decompress_at(blob: bytes, offset: int) -> bytes | None:
    """The stream starting at ``offset`` decompressed, or None if it is not a valid one."""
    import lzma
    import shutil
    import subprocess
    import zlib

    magic = blob[offset : offset + 6]
    try:
        if magic.startswith(XZ_MAGIC):
            return lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(blob[offset:])
        if magic.startswith(GZIP_MAGIC):
            return zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(blob[offset:])
        if magic.startswith(ZSTD_MAGIC) and shutil.which("zstd"):
            proc = subprocess.run(
                ["zstd", "-dc"],
                input=blob[offset:],
                capture_output=True,
                close_fds=True,
                env={"PATH": "/usr/bin:/bin"},
                check=False,
            )
            return proc.stdout or None
    except (lzma.LZMAError, zlib.error, EOFError):
        return None
    return None


def extract_vmlinux(blob: bytes) -> bytes:
    """The ELF kernel inside a bzImage (found by its XZ, gzip or zstd magic)."""
    if blob.startswith(ELF_MAGIC):
        return blob
    for magic in (XZ_MAGIC, GZIP_MAGIC, ZSTD_MAGIC):
        start = blob.find(magic)
        while start >= 0:
            out = _decompress_at(blob, start)
            if out and out.startswith(ELF_MAGIC):
                return out
            start = blob.find(magic, start + 1)
    raise ImageError("no compressed ELF kernel found inside the bzImage")


# --------------------------------------------------------------------------------------------
# Kernel modules


def module_name(path: str) -> str:
    """modprobe's name for a module file: basename without .ko[.xz|.zst|.gz], '-' as '_'."""
    name = os.path.basename(path)
    name = re.sub(r"\.ko(\.(xz|zst|gz))?$", "", name)
    return name.replace("-", "_")


def parse_modules_dep(text: str) -> dict[str, tuple[str, tuple[str, ...]]]:
    """modules.dep as {name: (relative path, dependency paths)}."""
    table: dict[str, tuple[str, tuple[str, ...]]] = {}
    for line in text.splitlines():
        if ":" not in line:
            continue
        path, _, deps = line.partition(":")
        path = path.strip()
        table[module_name(path)] = (path, tuple(deps.split()))
    return table


def parse_modules_builtin(text: str) -> set[str]:
    return {module_name(line.strip()) for line in text.splitlines() if line.strip()}


def resolve_modules(
    wanted: Iterable[str],
    deps: Mapping[str, tuple[str, tuple[str, ...]]],
    builtin: Iterable[str] = (),
    optional: Iterable[str] = (),
) -> list[str]:
    """Module paths in load order (each after its dependencies); built-in ones are skipped."""
    builtin_set = {n.replace("-", "_") for n in builtin}
    optional_set = {n.replace("-", "_") for n in optional}
    order: list[str] = []
    done: set[str] = set()
    visiting: set[str] = set()

    def visit(name: str) -> None:
        if name in done:
            return
        if name in visiting:
            raise ImageError(f"kernel module dependency cycle through {name}")
        if name not in deps:
            if name in builtin_set or name in optional_set:
                done.add(name)
                return
            raise ImageError(f"kernel module {name} is neither a module nor built in")
        visiting.add(name)
        path, requires = deps[name]
        for dep in requires:
            visit(module_name(dep))
        visiting.discard(name)
        done.add(name)
        order.append(path)

    for name in [*wanted, *optional]:
        visit(name.replace("-", "_"))
    return order


def read_module(path: str) -> bytes:
    """A module file's ELF bytes, decompressed if the distribution compressed it."""
    import gzip
    import lzma

    data = read_file(path)
    if path.endswith(".xz"):
        return lzma.decompress(data)
    if path.endswith(".gz"):
        return gzip.decompress(data)
    if path.endswith(".zst"):
        out = _decompress_at(data, 0)
        if out is None:
            raise ImageError(f"cannot decompress {path} (is zstd installed?)")
        return out
    return data


MODULE_SIG_MAGIC = b"~Module signature appended~\n"


def strip_module_signature(data: bytes) -> bytes:
    """A module without its appended signature (the kernel then skips the RSA check)."""
    if not data.endswith(MODULE_SIG_MAGIC):
        return data
    info_end = len(data) - len(MODULE_SIG_MAGIC)
    info = data[info_end - 12 : info_end]  # struct module_signature
    if len(info) < 12:
        return data
    signer_len, key_id_len, sig_len = info[3], info[4], int.from_bytes(info[8:12], "big")
    start = info_end - 12 - sig_len - signer_len - key_id_len
    return data[:start] if start > 0 else data


def _installed_module_name(path: str) -> str:
    """Where a module goes in the image: always uncompressed."""
    return re.sub(r"\.(xz|zst|gz)$", "", path)


def add_kernel_modules(tree: Tree, kernel: Kernel) -> list[str]:
    """Put the boot, disk and on-demand modules and their lists in ``tree``; the loaded names."""
    from pathlib import Path

    mdir = Path(kernel.modules_dir)
    try:
        deps = parse_modules_dep((mdir / "modules.dep").read_text())
    except OSError as exc:
        raise ImageError(f"cannot read {mdir}/modules.dep: {exc.strerror}") from exc
    builtin: set[str] = set()
    with contextlib.suppress(OSError):
        builtin = parse_modules_builtin((mdir / "modules.builtin").read_text())
    order = resolve_modules(KERNEL_MODULES, deps, builtin, OPTIONAL_KERNEL_MODULES)
    installed: list[str] = []
    for rel in order:
        dest = f"lib/modules/{kernel.release}/{_installed_module_name(rel)}"
        # Unsigned, the module skips the RSA/SHA-256 check that costs ~20 ms per insmod under
        # TCG (only a taint flag results: nothing enforces signatures in the guest).
        tree.file(dest, strip_module_signature(read_module(str(mdir / rel))))
        installed.append("/" + dest)
    tree.file("etc/bonneville/modules", "".join(p + "\n" for p in installed).encode())
    disk: list[str] = []
    for rel in resolve_modules(DISK_KERNEL_MODULES, deps, builtin):
        if rel in order:
            continue
        dest = f"lib/modules/{kernel.release}/{_installed_module_name(rel)}"
        tree.file(dest, strip_module_signature(read_module(str(mdir / rel))))
        disk.append("/" + dest)
    tree.file("etc/bonneville/modules-disk", "".join(p + "\n" for p in disk).encode())
    placed = set(order) | set(resolve_modules(DISK_KERNEL_MODULES, deps, builtin))
    on_demand = resolve_modules((), deps, builtin, ON_DEMAND_KERNEL_MODULES)
    for rel in on_demand:
        if rel not in placed:
            dest = f"lib/modules/{kernel.release}/{_installed_module_name(rel)}"
            tree.file(dest, strip_module_signature(read_module(str(mdir / rel))))
            placed.add(rel)
    # busybox modprobe's modules.dep: "path: dependency paths", relative to its directory.
    dep_lines = [
        f"{_installed_module_name(path)}:"
        + "".join(f" {_installed_module_name(d)}" for d in requires)
        for path, requires in (deps[module_name(rel)] for rel in sorted(placed))
    ]
    tree.file(f"lib/modules/{kernel.release}/modules.dep", "\n".join(dep_lines).encode() + b"\n")
    return [module_name(p) for p in installed + disk]
