"""The guest image: the distribution's kernel as a PVH-bootable ELF, and an initramfs for the agent.

The initramfs holds busybox (for /init, ``guest/init.sh``), the kernel modules for virtio, 9p and
networking, a minimal Python (the interpreter, its shared libraries and only the stdlib modules the
agent imports, precompiled) and the ``bonneville.guest`` agent package. Images are cached under
``/var/lib/bonneville/images/<key>/`` where the key hashes every input, so ``ensure_image()`` is a
few stat calls when nothing changed.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import stat
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

from bonneville.spec.errors import BackendError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from pathlib import Path
    from typing import Any, BinaryIO

# Every container's monitor looks up the current image (ensure_image): the modules only the
# builder needs (compression, subprocess, tempfile, shutil) are imported where it uses them.

IMAGE_DIR_ENV = "BONNEVILLE_IMAGE_DIR"
DEFAULT_IMAGE_DIR = "/var/lib/bonneville/images"
KERNEL_ENV = "BONNEVILLE_KERNEL"
BOOT_DIR = "/boot"
MODULES_ROOT = "/lib/modules"
PYTHON = "/usr/bin/python3.11"
BUSYBOX = "/bin/busybox"
GUEST_PYTHON_ROOT = "/opt/bonneville"  # sys.path entry holding the bonneville package in the VM

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

# Stdlib modules the agent needs whether or not agent.py exists yet (it is imported on top of
# these once it does): imports done lazily inside functions are only found through this list.
AGENT_BASELINE_IMPORTS: tuple[str, ...] = (
    "os",
    "sys",
    "json",
    "struct",
    "socket",
    "select",
    "selectors",
    "signal",
    "errno",
    "fcntl",
    "termios",
    "tty",
    "pty",
    "ctypes",
    "ctypes.util",
    "base64",
    "time",
    "resource",
    "traceback",
    "encodings",
    "encodings.aliases",
    "encodings.utf_8",
    "encodings.ascii",
    "encodings.latin_1",
)
# Compiled modules from Debian packages the agent imports (lazily, so they are named here):
# libseccomp's bindings (python3-seccomp) compile containers' seccomp profiles. They go into
# the image beside the bonneville package, with the shared libraries they need.
DIST_PACKAGES = "/usr/lib/python3/dist-packages"
GUEST_EXTENSIONS: tuple[str, ...] = ("seccomp",)
GUEST_PACKAGE = "bonneville.guest"
GUEST_REQUIRED_FILES = ("__init__.py", "protocol.py")
AGENT_MODULE = "bonneville.guest.agent"
# The image's /init: it runs in the guest, so it lives in the guest package beside the agent.
INIT_SCRIPT = "init.sh"

# Directories /init and the agent expect to exist before anything is mounted.
SKELETON_DIRS = ("proc", "sys", "dev", "run", "mnt", "root", "etc/bonneville", ".container")
# Uncompressed: gzip made the image 6.4 MB instead of 15.7 MB but cost ~0.3-0.9 s of TCG
# decompression per cold boot (QEMU reads the file at host speed either way).
COMPRESSION = "none"  # or "gzip"

XZ_MAGIC = b"\xfd7zXZ\x00"
GZIP_MAGIC = b"\x1f\x8b\x08"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
ELF_MAGIC = b"\x7fELF"


class ImageError(BackendError):
    """The guest image cannot be built (missing kernel, modules, interpreter…)."""


@dataclass(frozen=True)
class GuestImage:
    kernel: str
    initrd: str
    key: str
    kernel_args: tuple[str, ...]


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

    data = _read(path)
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


# --------------------------------------------------------------------------------------------
# cpio (newc) archive


@dataclass
class _Node:
    mode: int
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)


@dataclass
class Tree:
    """An in-memory file tree, written out as a newc cpio archive."""

    nodes: dict[str, _Node] = field(default_factory=dict)

    @staticmethod
    def _clean(path: str) -> str:
        clean = os.path.normpath("/" + path).lstrip("/")
        if not clean or clean == ".":
            raise ValueError(f"bad archive path {path!r}")
        return clean

    def canonical(self, path: str) -> str:
        """``path`` with symlinks already in the tree resolved in its parent directories."""
        parts = self._clean(path).split("/")
        out: list[str] = []
        for _ in range(40):
            for i, part in enumerate(parts[:-1]):
                cur = "/".join([*out, part])
                node = self.nodes.get(cur)
                if node is not None and stat.S_ISLNK(node.mode):
                    target = node.data.decode()
                    base = "/" + target if target.startswith("/") else "/".join(["", *out, target])
                    parts = [*self._clean(base).split("/"), *parts[i + 1 :]]
                    out = []
                    break
                out.append(part)
            else:
                return "/".join([*out, parts[-1]])
        raise ValueError(f"too many symlinks resolving {path!r}")

    def _add(self, path: str, node: _Node) -> str:
        name = self.canonical(path)
        parent = os.path.dirname(name)
        if parent:
            self.directory(parent)
        existing = self.nodes.get(name)
        if existing is not None and stat.S_ISDIR(existing.mode):
            if stat.S_ISDIR(node.mode):
                return name
            if any(n.startswith(name + "/") for n in self.nodes):
                raise ValueError(f"cannot replace non-empty directory {name!r}")
        self.nodes[name] = node
        return name

    def directory(self, path: str, mode: int = 0o755) -> str:
        return self._add(path, _Node(stat.S_IFDIR | mode))

    def file(self, path: str, data: bytes, mode: int = 0o644) -> str:
        return self._add(path, _Node(stat.S_IFREG | mode, data))

    def symlink(self, path: str, target: str) -> str:
        return self._add(path, _Node(stat.S_IFLNK | 0o777, target.encode()))

    def chardev(self, path: str, major: int, minor: int, mode: int = 0o600) -> str:
        return self._add(path, _Node(stat.S_IFCHR | mode, rdev=(major, minor)))

    def copy_host_path(self, path: str, _depth: int = 0) -> None:
        """Copy a host file into the same path, recreating every symlink on the way."""
        if _depth > 40:
            raise ImageError(f"too many symlinks resolving {path}")
        from pathlib import PurePosixPath

        parts = PurePosixPath(os.path.normpath(path)).parts[1:]
        cur = "/"
        for i, part in enumerate(parts):
            here = os.path.join(cur, part)
            if os.path.islink(here):
                target = os.readlink(here)
                self.symlink(here, target)
                resolved = os.path.normpath(os.path.join(cur, target))
                self.copy_host_path(os.path.join(resolved, *parts[i + 1 :]), _depth + 1)
                return
            cur = here
        st = os.stat(cur)
        if stat.S_ISDIR(st.st_mode):
            self.directory(cur, stat.S_IMODE(st.st_mode))
        else:
            self.file(cur, _read(cur), stat.S_IMODE(st.st_mode))

    def total_size(self) -> int:
        return sum(len(n.data) for n in self.nodes.values())

    def write_cpio(self, out: BinaryIO) -> None:
        """The tree as a newc cpio archive: parents before children, fixed owners and times."""
        for ino, name in enumerate(sorted(self.nodes), start=1):
            node = self.nodes[name]
            _write_cpio_entry(out, name, node.mode, node.data, ino, node.rdev)
        _write_cpio_entry(out, "TRAILER!!!", 0, b"", 0, (0, 0))
        pad = -out.tell() % 512
        out.write(b"\0" * pad)


def _write_cpio_entry(
    out: BinaryIO, name: str, mode: int, data: bytes, ino: int, rdev: tuple[int, int]
) -> None:
    encoded = name.encode() + b"\0"
    nlink = 2 if stat.S_ISDIR(mode) else 1
    fields = (ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rdev[0], rdev[1], len(encoded), 0)
    header = b"070701" + b"".join(b"%08X" % v for v in fields)
    out.write(header + encoded + b"\0" * (-(len(header) + len(encoded)) % 4))
    out.write(data + b"\0" * (-len(data) % 4))


def read_cpio(data: bytes) -> dict[str, tuple[int, bytes]]:
    """Parse a newc archive into {name: (mode, data)} (for tests and `image ls`)."""
    entries: dict[str, tuple[int, bytes]] = {}
    pos = 0
    while pos + 110 <= len(data):
        if data[pos : pos + 6] != b"070701":
            raise ValueError(f"bad cpio magic at {pos}")
        values = [int(data[pos + 6 + 8 * i : pos + 14 + 8 * i], 16) for i in range(13)]
        mode, size, namesize = values[1], values[6], values[11]
        name = data[pos + 110 : pos + 110 + namesize - 1].decode()
        pos += 110 + namesize
        pos += -pos % 4
        if name == "TRAILER!!!":
            break
        entries[name] = (mode, data[pos : pos + size])
        pos += size
        pos += -pos % 4
    return entries


# --------------------------------------------------------------------------------------------
# Python


# The lookup (ensure_image and what it calls) runs in every container's monitor: it uses os.path,
# not pathlib (~0.7 MiB more in each monitor); the builder's functions import pathlib themselves.


def guest_package_dir() -> str:
    import bonneville.guest

    return os.path.dirname(os.path.abspath(bonneville.guest.__file__))


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def guest_sources(package_dir: str | os.PathLike[str]) -> dict[str, bytes]:
    """The guest package's modules that may go into the image, by file name."""
    sources: dict[str, bytes] = {}
    for name in sorted(os.listdir(package_dir)):
        path = os.path.join(package_dir, name)
        if name.endswith(".py") and not os.path.isdir(path):
            sources[name] = _read(path)
    for name in GUEST_REQUIRED_FILES:
        if name not in sources:
            raise ImageError(f"{package_dir}/{name} is missing")
    return sources


_DISCOVER = r"""
import sys
sys.path[:0] = sys.argv[1].split(":")
for name in sys.argv[2:]:
    __import__(name)
out = []
for name, mod in sorted(sys.modules.items()):
    spec = getattr(mod, "__spec__", None)
    if spec is None and name != "__main__":
        continue  # made at run time, not imported (Cython's cython_runtime): nothing to pack
    origin = getattr(spec, "origin", None) if spec is not None else None
    loader = type(getattr(mod, "__loader__", None)).__name__
    if isinstance(getattr(mod, "__loader__", None), type):
        loader = mod.__loader__.__name__
    out.append("%s\t%s\t%s" % (name, origin, loader))
sys.stdout.write("\n".join(out) + "\n")
"""

_COMPILE = r"""
import json, py_compile, sys
for src, dst, dfile in json.load(sys.stdin):
    py_compile.compile(src, cfile=dst, dfile=dfile, doraise=True,
                       invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)
"""


def _python_env() -> dict[str, str]:
    return {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C.UTF-8"}


def _run_python(args: list[str], stdin: str | None = None) -> str:
    import subprocess

    try:
        proc = subprocess.run(
            [PYTHON, "-I", "-S", "-B", *args],
            input=stdin,
            capture_output=True,
            text=True,
            close_fds=True,
            env=_python_env(),
            check=False,
        )
    except OSError as exc:
        raise ImageError(f"cannot run {PYTHON}: {exc}") from exc
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise ImageError(f"{PYTHON} failed while preparing the guest image: {last}")
    return proc.stdout


@dataclass(frozen=True)
class PythonModule:
    name: str
    origin: str  # file path, "built-in" or "frozen"
    loader: str


def discover_modules(stage: str, imports: Iterable[str]) -> list[PythonModule]:
    """Every module the guest interpreter ends up holding after importing ``imports``."""
    out = _run_python(["-c", _DISCOVER, stage, *imports])
    mods: list[PythonModule] = []
    for line in out.splitlines():
        name, origin, loader = line.split("\t")
        mods.append(PythonModule(name, origin, loader))
    return mods


def _stdlib_dir() -> str:
    return _run_python(["-c", "import sysconfig; print(sysconfig.get_path('stdlib'))"]).strip()


def shared_libraries(paths: Iterable[str]) -> list[str]:
    """Every shared library (and the dynamic loader) the ELF files at ``paths`` need."""
    import subprocess

    libs: set[str] = set()
    for path in paths:
        try:
            proc = subprocess.run(
                ["ldd", path],
                capture_output=True,
                text=True,
                close_fds=True,
                env=_python_env(),
                check=False,
            )
        except OSError as exc:
            raise ImageError(f"cannot run ldd: {exc}") from exc
        if "not a dynamic executable" in proc.stdout + proc.stderr:
            continue
        if proc.returncode != 0:
            raise ImageError(f"ldd {path} failed: {proc.stderr.strip()}")
        for line in proc.stdout.splitlines():
            line = line.strip()
            if "=>" in line:
                target = line.split("=>", 1)[1].strip().split(" ", 1)[0]
                if target == "not":
                    raise ImageError(f"{path}: missing shared library: {line}")
            else:
                target = line.split(" ", 1)[0]
            if target.startswith("/"):
                libs.add(target)
    return sorted(libs)


def _cache_tag() -> str:
    """The interpreter's .pyc tag (python3.11 -> cpython-311)."""
    return "cpython-" + os.path.basename(PYTHON).removeprefix("python").replace(".", "")


def _compile(jobs: list[tuple[str, str, str]]) -> None:
    if jobs:
        _run_python(["-c", _COMPILE], stdin=json.dumps(jobs))


# --------------------------------------------------------------------------------------------
# Cache key and image directory


def image_dir() -> str:
    return os.environ.get(IMAGE_DIR_ENV) or DEFAULT_IMAGE_DIR


def _stat_id(path: str) -> list[Any]:
    try:
        st = os.stat(path)
    except OSError as exc:
        raise ImageError(f"{path}: {exc.strerror}") from exc
    return [path, st.st_size, st.st_mtime_ns]


def _init_script(package_dir: str | os.PathLike[str]) -> bytes:
    return _read(os.path.join(package_dir, INIT_SCRIPT))


def compute_key(
    kernel: Kernel, package_dir: str | os.PathLike[str] | None = None
) -> tuple[str, dict[str, Any]]:
    """The cache key over every input, and the inputs themselves (for the manifest).

    Big binaries enter by path, size and mtime (reading them on every container start costs too
    much); sources are hashed by content.
    """
    package_dir = package_dir or guest_package_dir()
    sources = guest_sources(package_dir)
    builder = _read(__file__)
    inputs: dict[str, Any] = {
        "format": 1,
        "kernel": _stat_id(kernel.path),
        "release": kernel.release,
        "modules_dep": _stat_id(os.path.join(kernel.modules_dir, "modules.dep")),
        "python": _stat_id(PYTHON),
        "busybox": _stat_id(BUSYBOX),
        "builder": hashlib.sha256(builder).hexdigest(),
        "init": hashlib.sha256(_init_script(package_dir)).hexdigest(),
        "guest": {n: hashlib.sha256(d).hexdigest() for n, d in sources.items()},
        "modules": [*KERNEL_MODULES, *OPTIONAL_KERNEL_MODULES],
        "disk_modules": list(DISK_KERNEL_MODULES),
        "on_demand_modules": list(ON_DEMAND_KERNEL_MODULES),
        "imports": list(AGENT_BASELINE_IMPORTS),
        "extensions": {n: _stat_id(p) for n, p in _extension_files().items()},
        "kernel_args": list(KERNEL_ARGS),
        "compression": COMPRESSION,
    }
    digest = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()
    return digest[:32], inputs


def _extension_files() -> dict[str, str]:
    """GUEST_EXTENSIONS' files (module name → path); ImageError if one is not installed."""
    try:
        names = sorted(os.listdir(DIST_PACKAGES))
    except OSError:
        names = []
    found = {}
    for name in GUEST_EXTENSIONS:
        matches = [
            os.path.join(DIST_PACKAGES, n)
            for n in names
            if n.startswith(f"{name}.cpython-") and n.endswith(".so")
        ]
        if not matches:
            raise ImageError(f"{name}: no {DIST_PACKAGES}/{name}.*.so (install.sh installs it)")
        found[name] = matches[-1]
    return found


def _image_for(directory: str, key: str) -> GuestImage:
    return GuestImage(
        kernel=os.path.join(directory, key, "vmlinux"),
        initrd=os.path.join(directory, key, "initramfs.img"),
        key=key,
        kernel_args=KERNEL_ARGS,
    )


@contextlib.contextmanager
def _locked(directory: str) -> Iterator[None]:
    try:
        os.makedirs(directory, exist_ok=True)
        fd = os.open(os.path.join(directory, ".lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise ImageError(f"cannot use image directory {directory}: {exc.strerror}") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def ensure_image() -> GuestImage:
    """The current guest image, built first if its inputs changed."""
    kernel = find_kernel()
    key, _ = compute_key(kernel)
    directory = image_dir()
    if os.path.isfile(os.path.join(directory, key, "manifest.json")):
        return _image_for(directory, key)
    return build_image()


def build_image(force: bool = False, prune: bool = False) -> GuestImage:
    """Build the image for the current inputs (unless present and not ``force``)."""
    import shutil
    import tempfile
    from pathlib import Path

    kernel = find_kernel()
    package_dir = guest_package_dir()
    key, inputs = compute_key(kernel, package_dir)
    directory = image_dir()
    with _locked(directory):
        final = os.path.join(directory, key)
        if os.path.isfile(os.path.join(final, "manifest.json")) and not force:
            image = _image_for(directory, key)
        else:
            tmp = Path(tempfile.mkdtemp(prefix=f".build-{key}-", dir=directory))
            try:
                _build_into(tmp, kernel, package_dir, key, inputs)
                if os.path.exists(final):
                    old = os.path.join(directory, f".old-{key}-{os.getpid()}")
                    os.rename(final, old)
                    shutil.rmtree(old, ignore_errors=True)
                tmp.chmod(0o755)  # mkdtemp's 0700 would hide the image from an unprivileged QEMU
                tmp.rename(final)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            image = _image_for(directory, key)
        if prune:
            _prune_locked(directory, key)
    return image


def prune_images(keep: str | None = None) -> list[str]:
    """Remove every cached image but ``keep`` (default: the current key); returns removed keys.

    Templates saved from an older image still name its files: prune only when none is in use.
    """
    directory = image_dir()
    if keep is None:
        keep, _ = compute_key(find_kernel())
    with _locked(directory):
        return _prune_locked(directory, keep)


def _prune_locked(directory: str, keep: str) -> list[str]:
    import shutil

    removed: list[str] = []
    for entry in os.scandir(directory):
        if entry.name == keep or entry.name == ".lock" or not entry.is_dir():
            continue
        shutil.rmtree(entry.path, ignore_errors=True)
        removed.append(entry.name)
    return removed


def image_status() -> dict[str, Any]:
    """Key, paths, sizes and whether the current image is built (for `bonneville image ls`)."""
    kernel = find_kernel()
    key, _ = compute_key(kernel)
    directory = image_dir()
    image = _image_for(directory, key)
    status: dict[str, Any] = {
        "key": key,
        "directory": os.path.join(directory, key),
        "built": os.path.isfile(os.path.join(directory, key, "manifest.json")),
        "kernel_source": kernel.path,
        "release": kernel.release,
        "kernel": image.kernel,
        "initrd": image.initrd,
        "kernel_args": list(KERNEL_ARGS),
        "others": sorted(
            e.name
            for e in (os.scandir(directory) if os.path.isdir(directory) else [])
            if e.is_dir() and e.name != key and not e.name.startswith(".")
        ),
    }
    for label, path in (("kernel_size", image.kernel), ("initrd_size", image.initrd)):
        with contextlib.suppress(OSError):
            status[label] = os.path.getsize(path)
    if status["built"]:
        with contextlib.suppress(OSError, ValueError):
            manifest = json.loads(_read(os.path.join(directory, key, "manifest.json")))
            status["built_at"] = manifest.get("built_at")
            status["python_modules"] = len(manifest.get("python_modules", []))
            status["kernel_modules"] = manifest.get("kernel_modules", [])
    return status


# --------------------------------------------------------------------------------------------
# The build


def _build_into(
    out: Path, kernel: Kernel, package_dir: str, key: str, inputs: dict[str, Any]
) -> None:
    import gzip
    import shutil
    import tempfile
    from pathlib import Path

    started = time.monotonic()
    (out / "vmlinux").write_bytes(extract_vmlinux(Path(kernel.path).read_bytes()))
    tree = Tree()
    # The image mirrors the host's merged /usr (/bin, /sbin, /lib… as symlinks into /usr), set
    # up first so every later path lands in its canonical place.
    for d in ("/bin", "/sbin", "/lib", "/lib64"):
        if os.path.islink(d):
            tree.symlink(d, os.readlink(d))
    for d in SKELETON_DIRS:
        tree.directory(d)
    tree.directory("tmp", 0o1777)
    tree.chardev("dev/console", 5, 1)
    tree.chardev("dev/null", 1, 3, 0o666)

    modules = _add_kernel_modules(tree, kernel)
    _add_busybox(tree)
    init = _init_script(package_dir)
    tree.file("init", init, 0o755)
    with tempfile.TemporaryDirectory(prefix="bonneville-image-") as work:
        python_modules = _add_python(tree, Path(work), package_dir)

    cpio = out / "initramfs.cpio"
    with open(cpio, "wb") as f:
        tree.write_cpio(f)
    initrd = out / "initramfs.img"
    if COMPRESSION == "gzip":
        with open(cpio, "rb") as src, gzip.GzipFile(initrd, "wb", compresslevel=6, mtime=0) as dst:
            shutil.copyfileobj(src, dst)
        cpio.unlink()
    else:
        cpio.rename(initrd)

    manifest = {
        "key": key,
        "release": kernel.release,
        "kernel_source": kernel.path,
        "kernel_args": list(KERNEL_ARGS),
        "kernel_modules": modules,
        "python_modules": python_modules,
        "files": len(tree.nodes),
        "content_bytes": tree.total_size(),
        "vmlinux_bytes": (out / "vmlinux").stat().st_size,
        "initrd_bytes": initrd.stat().st_size,
        "compression": COMPRESSION,
        "build_seconds": round(time.monotonic() - started, 2),
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "inputs": inputs,
    }
    tmp_manifest = out / "manifest.json.tmp"
    tmp_manifest.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    for name in ("vmlinux", "initramfs.img", "manifest.json.tmp"):
        with open(out / name, "rb") as f:
            os.fsync(f.fileno())
    tmp_manifest.rename(out / "manifest.json")


def _add_kernel_modules(tree: Tree, kernel: Kernel) -> list[str]:
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


def _add_busybox(tree: Tree) -> None:
    import subprocess

    if not os.access(BUSYBOX, os.X_OK):
        raise ImageError(f"{BUSYBOX} not found: install busybox-static")
    if shared_libraries([BUSYBOX]):
        raise ImageError(f"{BUSYBOX} is dynamically linked: install busybox-static")
    tree.copy_host_path(BUSYBOX)
    busybox_in_image = tree.canonical(BUSYBOX)
    try:
        listing = subprocess.run(
            [BUSYBOX, "--list-full"],
            capture_output=True,
            text=True,
            close_fds=True,
            env=_python_env(),
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        raise ImageError(f"{BUSYBOX} --list-full failed: {exc}") from exc
    for applet in listing.split():
        name = tree.canonical(applet)
        if name not in tree.nodes and name != busybox_in_image:
            tree.symlink(name, "/" + busybox_in_image)


def _add_python(tree: Tree, work: Path, package_dir: str) -> list[str]:
    """Stage the agent package, find what it imports, add interpreter + modules; return names."""
    sources = guest_sources(package_dir)
    stage = work / "stage"
    (stage / "bonneville" / "guest").mkdir(parents=True)
    (stage / "bonneville" / "__init__.py").write_bytes(b"")
    for name, data in sources.items():
        (stage / "bonneville" / "guest" / name).write_bytes(data)
    imports = [f"{GUEST_PACKAGE}.protocol", *AGENT_BASELINE_IMPORTS, *GUEST_EXTENSIONS]
    if "agent.py" in sources:
        imports.append(AGENT_MODULE)
    mods = discover_modules(f"{stage}:{DIST_PACKAGES}", imports)

    stdlib = _stdlib_dir().rstrip("/") + "/"
    stage_prefix = str(stage) + "/"
    compile_jobs: list[tuple[str, str, str]] = []
    extensions: list[str] = []
    names: list[str] = []
    guest_files = {"__init__.py", *GUEST_REQUIRED_FILES}
    for mod in mods:
        if mod.name == "__main__":
            continue
        names.append(mod.name)
        origin = mod.origin
        if mod.loader in ("BuiltinImporter", "FrozenImporter") or not origin.startswith("/"):
            continue
        if origin.startswith(stage_prefix):
            if mod.name.startswith(GUEST_PACKAGE + "."):
                guest_files.add(os.path.basename(origin))
            continue
        if mod.name in GUEST_EXTENSIONS and origin.startswith(DIST_PACKAGES + "/"):
            extensions.append(origin)
            tree.file(f"{GUEST_PYTHON_ROOT}/{os.path.basename(origin)}", _read(origin), 0o755)
            continue
        if not origin.startswith(stdlib):
            raise ImageError(f"guest module {mod.name} comes from outside the stdlib: {origin}")
        if origin.endswith(".so"):
            extensions.append(origin)
            tree.copy_host_path(origin)
        elif origin.endswith(".py"):
            dest = work / "pyc" / (origin[len(stdlib) :] + "c")
            compile_jobs.append((origin, str(dest), origin))
        else:
            raise ImageError(f"guest module {mod.name}: unexpected file {origin}")
    # getpath looks for os.py(c) to find the stdlib even though os itself is frozen.
    compile_jobs.append((stdlib + "os.py", str(work / "pyc" / "os.pyc"), stdlib + "os.py"))
    # The agent package keeps its sources next to unchecked-hash .pycs: readable tracebacks.
    guest_dest = f"{GUEST_PYTHON_ROOT}/bonneville/guest"
    for name in sorted(guest_files):
        src = stage / "bonneville" / "guest" / name
        pyc = f"{name[:-3]}.{_cache_tag()}.pyc"
        compile_jobs.append(
            (str(src), str(work / "guest" / pyc), f"{guest_dest}/{name}"),
        )
        tree.file(f"{guest_dest}/{name}", src.read_bytes())
    compile_jobs.append(
        (str(stage / "bonneville" / "__init__.py"), str(work / "root-init.pyc"), "")
    )
    tree.file(f"{GUEST_PYTHON_ROOT}/bonneville/__init__.py", b"")
    _compile(compile_jobs)
    for source, compiled, _ in compile_jobs:
        data = _read(compiled)
        if source.startswith(stdlib):
            tree.file(source + "c", data)  # sourceless: the .pyc sits where the .py would
        elif compiled.endswith("root-init.pyc"):
            tree.file(
                f"{GUEST_PYTHON_ROOT}/bonneville/__pycache__/__init__.{_cache_tag()}.pyc", data
            )
        else:
            tree.file(f"{guest_dest}/__pycache__/{os.path.basename(compiled)}", data)
    # getpath also wants lib-dynload to exist to settle exec_prefix.
    tree.directory(stdlib + "lib-dynload")

    tree.copy_host_path(PYTHON)
    tree.symlink("/usr/bin/python3", os.path.basename(PYTHON))
    for lib in shared_libraries([PYTHON, *extensions]):
        tree.copy_host_path(lib)
    listed = sorted(n for n in names if n != "__main__")
    tree.file("etc/bonneville/python-modules", "".join(n + "\n" for n in listed).encode())
    return listed
