"""Container paths taken inside a root directory, shared by the agent (guest) and the monitor
(host): a rootfs whose /data links to /etc must never make either of them act on the real /etc.
Standard library only: this module goes into the guest image."""

from __future__ import annotations

import errno
import os
import stat


def resolve_in_root(root: str, path: str) -> str:
    """The host path of container path ``path``: symlinks resolve inside ``root``, ``..`` stops
    at it (as filepath-securejoin does for runc). Missing components are kept literally."""
    pending = [p for p in path.split("/") if p not in ("", ".")]
    resolved: list[str] = []
    links = 0
    while pending:
        part = pending.pop(0)
        if part == "..":
            if resolved:
                resolved.pop()
            continue
        candidate = os.path.join(root, *resolved, part)
        try:
            st = os.lstat(candidate)
        except (FileNotFoundError, NotADirectoryError):
            resolved.append(part)
            continue
        if stat.S_ISLNK(st.st_mode):
            links += 1
            if links > 255:
                raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), path)
            target = os.readlink(candidate)
            if target.startswith("/"):
                resolved = []
            pending[:0] = [p for p in target.split("/") if p not in ("", ".")]
            continue
        resolved.append(part)
    return os.path.join(root, *resolved)
