"""The guest image: the distribution's kernel as a PVH-bootable ELF, and an initramfs for the agent.

The initramfs holds busybox (for /init, ``guest/init.sh``), the kernel modules for virtio, 9p and
networking, a minimal Python (the interpreter, its shared libraries and only the stdlib modules the
agent imports, precompiled) and the ``bonneville.guest`` agent package. Images are cached under
``/var/lib/bonneville/images/<key>/`` where the key hashes every input, so ``ensure_image()`` is a
few stat calls when nothing changed.

This module is the cache and its key; ``build`` makes one image's files, from ``kernel`` (the
kernel, its command line and modules), ``python`` (the agent's interpreter and package) and
``cpio`` (the archive).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass

from bonneville.backends.image import build, python
from bonneville.backends.image.common import ImageError, read_file
from bonneville.backends.image.kernel import (
    DISK_KERNEL_MODULES,
    KERNEL_ARGS,
    KERNEL_MODULES,
    ON_DEMAND_KERNEL_MODULES,
    OPTIONAL_KERNEL_MODULES,
    Kernel,
    find_kernel,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

# Every container's monitor looks up the current image (ensure_image): the modules only the
# builder needs (compression, subprocess, tempfile, shutil) are imported where it uses them, and
# the lookup uses os.path, not pathlib (~0.7 MiB more in each monitor); the builder's functions
# import pathlib themselves.

IMAGE_DIR_ENV = "BONNEVILLE_IMAGE_DIR"
DEFAULT_IMAGE_DIR = "/var/lib/bonneville/images"


@dataclass(frozen=True)
class GuestImage:
    kernel: str
    initrd: str
    key: str
    kernel_args: tuple[str, ...]


def image_dir() -> str:
    return os.environ.get(IMAGE_DIR_ENV) or DEFAULT_IMAGE_DIR


def _stat_id(path: str) -> list[Any]:
    try:
        st = os.stat(path)
    except OSError as exc:
        raise ImageError(f"{path}: {exc.strerror}") from exc
    return [path, st.st_size, st.st_mtime_ns]


def builder_sources() -> dict[str, str]:
    """Every module of this package, hashed by file name: a changed builder makes a new image."""
    here = os.path.dirname(os.path.abspath(__file__))
    return {
        name: hashlib.sha256(read_file(os.path.join(here, name))).hexdigest()
        for name in sorted(os.listdir(here))
        if name.endswith(".py")
    }


def compute_key(
    kernel: Kernel, package_dir: str | os.PathLike[str] | None = None
) -> tuple[str, dict[str, Any]]:
    """The cache key over every input, and the inputs themselves (for the manifest).

    Big binaries enter by path, size and mtime (reading them on every container start costs too
    much); sources are hashed by content.
    """
    package_dir = package_dir or python.guest_package_dir()
    sources = python.guest_sources(package_dir)
    inputs: dict[str, Any] = {
        "format": 1,
        "kernel": _stat_id(kernel.path),
        "release": kernel.release,
        "modules_dep": _stat_id(os.path.join(kernel.modules_dir, "modules.dep")),
        "python": _stat_id(python.PYTHON),
        "busybox": _stat_id(build.BUSYBOX),
        "builder": builder_sources(),
        "init": hashlib.sha256(build.init_script(package_dir)).hexdigest(),
        "guest": {n: hashlib.sha256(d).hexdigest() for n, d in sources.items()},
        "modules": [*KERNEL_MODULES, *OPTIONAL_KERNEL_MODULES],
        "disk_modules": list(DISK_KERNEL_MODULES),
        "on_demand_modules": list(ON_DEMAND_KERNEL_MODULES),
        "imports": list(python.AGENT_BASELINE_IMPORTS),
        "extensions": {n: _stat_id(p) for n, p in python.extension_files().items()},
        "kernel_args": list(KERNEL_ARGS),
        "compression": build.COMPRESSION,
    }
    digest = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()
    return digest[:32], inputs


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
    package_dir = python.guest_package_dir()
    key, inputs = compute_key(kernel, package_dir)
    directory = image_dir()
    with _locked(directory):
        final = os.path.join(directory, key)
        if os.path.isfile(os.path.join(final, "manifest.json")) and not force:
            image = _image_for(directory, key)
        else:
            tmp = Path(tempfile.mkdtemp(prefix=f".build-{key}-", dir=directory))
            try:
                build.build_into(tmp, kernel, package_dir, key, inputs)
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
            manifest = json.loads(read_file(os.path.join(directory, key, "manifest.json")))
            status["built_at"] = manifest.get("built_at")
            status["python_modules"] = len(manifest.get("python_modules", []))
            status["kernel_modules"] = manifest.get("kernel_modules", [])
    return status
