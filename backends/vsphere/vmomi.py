"""Lazy access to pyVmomi."""

from __future__ import annotations

from typing import Any

from bonneville.spec.errors import BackendError


def vmomi(name: str = "pyVmomi") -> Any:
    """A pyVmomi/pyVim module, imported now (only the vSphere backend pays for it). Through
    importlib on purpose: pyVmomi's partial stubs make mypy --strict reject most calls, so its
    objects are Any here and checked against vcsim instead."""
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise BackendError(
            f"the vsphere backend needs pyVmomi (pip extra 'vsphere'): {exc}"
        ) from exc
