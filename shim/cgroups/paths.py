"""Where a container's host cgroup goes, by runc's rules (opencontainers/cgroups:
``fs/paths.go``, ``fs2/defaultpath.go``, ``systemd/common.go``; runc's
``specconv.CreateCgroupConfig``):

- cgroupfs (no ``--systemd-cgroup``): ``linux.cgroupsPath`` cleaned lexically (``..`` cannot
  climb out of the hierarchy). An absolute path starts at each hierarchy's mount point
  (dockerd's ``/docker/<id>``, a kubelet pod's ``/kubepods/besteffort/pod<uid>/<id>``); a
  relative one, or the container id when the path is empty (runc's default), starts at the
  caller's own cgroup of that hierarchy, on a cgroup v2 host at its parent (a cgroup that holds
  processes cannot hand controllers to a child).
- ``--systemd-cgroup``: ``slice:prefix:name`` (empty: ``system.slice``, ``runc``, the id) is the
  scope ``prefix-name.scope`` (or the slice ``name``, if it ends in ``.slice``) in the slice
  expanded as systemd nests it (``a-b.slice`` → ``/a.slice/a-b.slice``), from each hierarchy's
  mount point. Where systemd runs the scope is a transient unit it starts (over D-Bus, as runc
  asks it: systemd.py); without systemd, the same directories are made directly (tree.py).
- The hierarchies: every v1 hierarchy of a controller runc knows, and ``name=systemd``; on a
  hybrid host the v2 mount too (``/sys/fs/cgroup/unified``), as runc joins it; on a v2 host the
  one tree, with every available controller enabled down to the container's parent.
"""

from __future__ import annotations

import posixpath
from typing import NamedTuple

from bonneville.shim.cgroups.hierarchy import Host
from bonneville.spec.errors import BonnevilleError

DEFAULT_SLICE = "system.slice"
DEFAULT_SCOPE_PREFIX = "runc"


def clean_path(path: str) -> str:
    """runc's CleanPath: absolute paths normalised, relative ones kept inside their base."""
    if not path:
        return ""
    if path.startswith("/"):
        return "/" + posixpath.normpath(path).lstrip("/")
    cleaned = posixpath.normpath("/" + path).lstrip("/")
    return cleaned


def expand_slice(name: str) -> str:
    """systemd's nesting of a slice name: ``test-a-b.slice`` → ``/test.slice/test-a.slice/
    test-a-b.slice``; ``-.slice`` is the root."""
    suffix = ".slice"
    if not name.endswith(suffix) or name == suffix or "/" in name:
        raise BonnevilleError(f"invalid slice name: {name}")
    base = name[: -len(suffix)]
    if base == "-":
        return "/"
    path, prefix = "", ""
    for component in base.split("-"):
        if not component:
            raise BonnevilleError(f"invalid slice name: {name}")
        path += f"/{prefix}{component}{suffix}"
        prefix += component + "-"
    return path


class Placement(NamedTuple):
    """The container's cgroup: a directory per hierarchy (keyed as :attr:`Mount.key`), and the
    systemd unit that holds it when systemd makes it ("" otherwise)."""

    dirs: dict[str, str]
    unit: str = ""
    slice: str = ""


def place(host: Host, cgroups_path: str, container_id: str, systemd: bool) -> Placement:
    """Where the container with ``linux.cgroupsPath`` = ``cgroups_path`` goes (runc's rules, in
    the module's docstring). Raises BonnevilleError for a path runc refuses, or one that names
    a hierarchy's root (the host's own cgroup: never ours to limit or remove)."""
    hierarchies = host.hierarchies()
    dirs: dict[str, str] = {}
    unit = slice_name = ""
    if systemd:
        slice_name, prefix, name = DEFAULT_SLICE, DEFAULT_SCOPE_PREFIX, container_id
        if cgroups_path:
            parts = cgroups_path.split(":")
            if len(parts) != 3:
                raise BonnevilleError(
                    'expected cgroupsPath to be of format "slice:prefix:name" for systemd'
                    f" cgroups, got {cgroups_path!r} instead"
                )
            slice_name, prefix, name = parts
            slice_name = slice_name or DEFAULT_SLICE
        unit = name if name.endswith(".slice") else f"{prefix}-{name}.scope"
        if "/" in unit:
            raise BonnevilleError(f"invalid systemd unit name: {unit}")
        inner = posixpath.join(expand_slice(slice_name), unit)
        for mount in hierarchies:
            dirs[mount.key] = posixpath.join(mount.mountpoint, inner.lstrip("/"))
    else:
        inner = clean_path(cgroups_path) or container_id
        for mount in hierarchies:
            if inner.startswith("/"):
                base = mount.mountpoint
            else:
                own = host.own_path(mount)
                if host.mode == "v2":
                    own = posixpath.dirname(own)
                base = posixpath.join(mount.mountpoint, own.lstrip("/"))
            dirs[mount.key] = posixpath.normpath(posixpath.join(base, inner.lstrip("/")))
    for key, directory in dirs.items():
        mount = next(m for m in hierarchies if m.key == key)
        if posixpath.normpath(directory) == posixpath.normpath(mount.mountpoint):
            raise BonnevilleError(
                f"cgroupsPath {cgroups_path!r} names the root cgroup of {mount.mountpoint}"
            )
    return Placement(dirs, unit if systemd and host.systemd else "", slice_name)
