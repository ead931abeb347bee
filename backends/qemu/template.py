"""Templates: VMs booted once, saved, and cloned copy-on-write for every container (instant clone).

A template is a directory ``<template dir>/<key>/`` holding the guest RAM of a VM that booted to
its agent's ready line (``memory``, the file its RAM was backed by), QEMU's device state at that
moment (``state``, a migration stream without RAM: x-ignore-shared) and ``manifest.json``. The key
hashes everything that shapes the VM: the guest image's kernel and initramfs, the kernel
arguments, RAM size, vCPUs, NIC count, the QEMU options and the QEMU binary itself. Change any of
them and a different template is used (built on first use); old ones stay until `bonneville
template rm` (or `prune`) removes them.

A template holds no container data: it is booted with an empty share and no setup, before any
container exists. Each clone gets its own identity after restore (vmgenid reseeds the guest
kernel's RNG; the host adds entropy, hostname, MAC and clock in `setup`).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass

from bonneville.backends.qemu.cmdline import QemuOptions, cpu_model
from bonneville.spec.errors import BackendError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

TEMPLATE_DIR_ENV = "BONNEVILLE_TEMPLATE_DIR"
DEFAULT_TEMPLATE_DIR = "/var/lib/bonneville/templates"
MEMORY_FILE = "memory"
STATE_FILE = "state"
MANIFEST_FILE = "manifest.json"
# Bumped whenever what a template contains or how it is built changes: old ones are not reused.
FORMAT = 3  # 2: the CPU model is `max,erms=off` (was `max`); 3: NICs have no option ROM


def template_dir(environ: Mapping[str, str] | None = None) -> str:
    environ = os.environ if environ is None else environ
    return environ.get(TEMPLATE_DIR_ENV) or DEFAULT_TEMPLATE_DIR


def _file_identity(path: str) -> dict[str, Any]:
    """What changes when a file is replaced: cheaper than hashing 60 MiB on every create."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise BackendError(f"template input {path}: {exc.strerror}") from exc
    return {"path": os.path.realpath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _which(binary: str) -> str:
    if "/" in binary:
        return binary
    # Not shutil.which: every clone's monitor computes the key, and shutil (with the bz2 and
    # lzma modules it imports) would stay in its memory for the container's life.
    for directory in ("/usr/sbin", "/usr/bin", "/sbin", "/bin"):
        path = os.path.join(directory, binary)
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    raise BackendError(f"{binary} not found")


@dataclass(frozen=True)
class TemplateSpec:
    """Everything a template's memory and device state depend on."""

    kernel: str
    initrd: str
    kernel_args: tuple[str, ...]
    memory_mib: int
    vcpus: int
    nics: int
    options: QemuOptions
    max_vcpus: int = 0

    def inputs(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "kernel": _file_identity(self.kernel),
            "initrd": _file_identity(self.initrd) if self.initrd else None,
            "kernel_args": list(self.kernel_args),
            "memory_mib": self.memory_mib,
            "vcpus": self.vcpus,
            "max_vcpus": max(self.vcpus, self.max_vcpus),
            "nics": self.nics,
            "options": asdict(self.options),
            # The CPU model the VM gets (a default changing in cmdline.py re-keys templates).
            "cpu": cpu_model(self.options),
            # A QEMU upgrade changes the binary (and with it the device state format).
            "qemu": _file_identity(_which(self.options.binary)),
        }

    def key(self) -> str:
        text = json.dumps(self.inputs(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:32]


@dataclass(frozen=True)
class Template:
    key: str
    path: str
    manifest: dict[str, Any]

    @property
    def memory_path(self) -> str:
        return os.path.join(self.path, MEMORY_FILE)

    @property
    def state_path(self) -> str:
        return os.path.join(self.path, STATE_FILE)

    def disk_usage(self) -> int:
        """Bytes the template occupies on disk (its memory file is sparse)."""
        total = 0
        for name in (MEMORY_FILE, STATE_FILE, MANIFEST_FILE):
            with contextlib.suppress(OSError):
                total += os.stat(os.path.join(self.path, name)).st_blocks * 512
        return total


def _load(path: str, key: str) -> Template | None:
    """The template at ``path`` if it is complete, else None."""
    try:
        with open(os.path.join(path, MANIFEST_FILE), encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        return None
    template = Template(key, path, manifest if isinstance(manifest, dict) else {})
    if not (os.path.isfile(template.memory_path) and os.path.isfile(template.state_path)):
        return None
    return template


@contextlib.contextmanager
def _locked(base: str, key: str) -> Iterator[None]:
    """One builder (or remover) per key at a time, across processes."""
    os.makedirs(base, 0o755, exist_ok=True)
    fd = os.open(os.path.join(base, f".{key}.lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def find(spec: TemplateSpec, base: str | None = None) -> Template | None:
    base = base or template_dir()
    key = spec.key()
    return _load(os.path.join(base, key), key)


Builder = Callable[[TemplateSpec, str], None]


def ensure(spec: TemplateSpec, build: Builder, base: str | None = None) -> tuple[Template, bool]:
    """The template for ``spec``, built now by ``build(spec, directory)`` if missing (under a
    lock, so concurrent creates build it once); and whether this call built it."""
    base = base or template_dir()
    key = spec.key()
    final = os.path.join(base, key)
    template = _load(final, key)
    if template is not None:
        return template, False
    with _locked(base, key):
        template = _load(final, key)  # built while we waited for the lock
        if template is not None:
            return template, False
        _remove_tree(final)  # an incomplete one from a crashed build
        work = os.path.join(base, f".{key}.build")
        _remove_tree(work)  # its builder held the lock, so it is dead
        os.mkdir(work, 0o755)
        try:
            started = time.monotonic()
            build(spec, work)
            manifest = {
                "key": key,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "build_seconds": round(time.monotonic() - started, 2),
                "memory_mib": spec.memory_mib,
                "vcpus": spec.vcpus,
                "nics": spec.nics,
                "inputs": spec.inputs(),
            }
            with open(os.path.join(work, MANIFEST_FILE), "w", encoding="utf-8") as f:
                json.dump(manifest, f, indent=1, sort_keys=True)
            os.rename(work, final)
        except BaseException:
            _remove_tree(work)
            raise
    template = _load(final, key)
    if template is None:
        raise BackendError(f"template {key} is incomplete after its build")
    return template, True


def _remove_tree(path: str) -> None:
    import shutil  # only templates are removed: see _which

    shutil.rmtree(path, ignore_errors=True)


def list_templates(base: str | None = None) -> list[Template]:
    base = base or template_dir()
    try:
        names = sorted(os.listdir(base))
    except FileNotFoundError:
        return []
    templates = []
    for name in names:
        if name.startswith("."):
            continue
        template = _load(os.path.join(base, name), name)
        if template is not None:
            templates.append(template)
    return templates


def remove(key: str, base: str | None = None) -> None:
    """Delete one template. Running clones keep their private mapping of its memory file."""
    base = base or template_dir()
    if not key or "/" in key or key.startswith("."):
        raise BackendError(f"invalid template key {key!r}")
    path = os.path.join(base, key)
    if not os.path.isdir(path):
        raise BackendError(f"template {key} does not exist")
    with _locked(base, key):
        _remove_tree(path)
    with contextlib.suppress(OSError):
        os.unlink(os.path.join(base, f".{key}.lock"))


def stale_reason(template: Template) -> str | None:
    """Why ``template`` can never be chosen again (a file it was built from was replaced or is
    gone: a new guest image, a QEMU upgrade), or None while it may still be."""
    inputs = template.manifest.get("inputs")
    if not isinstance(inputs, dict) or inputs.get("format") != FORMAT:
        return "built by another version of bonneville"
    for name in ("kernel", "initrd", "qemu"):
        recorded = inputs.get(name)
        if not isinstance(recorded, dict):
            continue  # no initrd
        path = str(recorded.get("path", ""))
        try:
            current = _file_identity(path)
        except BackendError:
            return f"its {name} {path} is gone"
        if current != recorded:
            return f"its {name} {path} was replaced"
    return None


def prune(base: str | None = None) -> list[tuple[str, str]]:
    """Remove every stale template; (key, reason) of each removed. Running clones keep their
    private mapping of a removed template's memory, so this is safe while containers run."""
    removed = []
    for template in list_templates(base):
        reason = stale_reason(template)
        if reason is not None:
            with contextlib.suppress(BackendError):  # removed meanwhile by someone else
                remove(template.key, base)
                removed.append((template.key, reason))
    return removed
