"""Files replaced whole: a reader sees the old content or the new, never half of either.

The state store (shim/state.py), the monitor's exit record, --pid-file and a backend's launch
journal (backends/base.py) are all written this way.
"""

from __future__ import annotations

import contextlib
import os


def atomic_write(path: str, data: bytes, mode: int = 0o600) -> None:
    """Write to a temp file in the same directory, then rename: readers never see halves.

    No fsync (as runc's state): everything written here describes processes and VMs that a
    host crash ends too, and an fsync costs ~8 ms on a disk-backed --root, several per create.
    """
    directory = os.path.dirname(path) or "."
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)
    try:
        os.rename(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
