"""One image's files: vmlinux, the initramfs and the manifest that says what went in.

The initramfs tree is a skeleton of directories and devices, the kernel modules, busybox,
``guest/init.sh`` as /init and the guest's Python.
"""

from __future__ import annotations

import json
import os
import time

from bonneville.backends.image.common import ImageError, read_file
from bonneville.backends.image.cpio import Tree
from bonneville.backends.image.kernel import (
    KERNEL_ARGS,
    Kernel,
    add_kernel_modules,
    extract_vmlinux,
)
from bonneville.backends.image.python import add_python, python_env, shared_libraries

TYPE_CHECKING = False
if TYPE_CHECKING:
    from pathlib import Path
    from typing import Any

BUSYBOX = "/bin/busybox"
# The image's /init: it runs in the guest, so it lives in the guest package beside the agent.
INIT_SCRIPT = "init.sh"

# Directories /init and the agent expect to exist before anything is mounted.
SKELETON_DIRS = ("proc", "sys", "dev", "run", "mnt", "root", "etc/bonneville", ".container")
# Uncompressed: gzip made the image 6.4 MB instead of 15.7 MB but cost ~0.3-0.9 s of TCG
# decompression per cold boot (QEMU reads the file at host speed either way).
COMPRESSION = "none"  # or "gzip"


def init_script(package_dir: str | os.PathLike[str]) -> bytes:
    """/init: ``init.sh`` of the guest package the image is built from."""
    return read_file(os.path.join(package_dir, INIT_SCRIPT))


def build_into(
    out: Path, kernel: Kernel, package_dir: str, key: str, inputs: dict[str, Any]
) -> None:
    """Write vmlinux, initramfs.img and, last, manifest.json into ``out``."""
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

    modules = add_kernel_modules(tree, kernel)
    _add_busybox(tree)
    init = init_script(package_dir)
    tree.file("init", init, 0o755)
    with tempfile.TemporaryDirectory(prefix="bonneville-image-") as work:
        python_modules = add_python(tree, Path(work), package_dir)

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
            env=python_env(),
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        raise ImageError(f"{BUSYBOX} --list-full failed: {exc}") from exc
    for applet in listing.split():
        name = tree.canonical(applet)
        if name not in tree.nodes and name != busybox_in_image:
            tree.symlink(name, "/" + busybox_in_image)
