"""What every part of the image builder shares: its error, and reading a file whole."""

from __future__ import annotations

from bonneville.spec.errors import BackendError


class ImageError(BackendError):
    """The guest image cannot be built (missing kernel, modules, interpreter…)."""


def read_file(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()
