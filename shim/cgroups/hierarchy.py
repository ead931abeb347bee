"""The cgroup hierarchies mounted here (cgroup v1 controllers, ``name=systemd``, the v2 tree) and
the caller's own cgroup in each: what a placement (paths.py) depends on."""

from __future__ import annotations

import os
from typing import NamedTuple

CGROUP_ROOT = "/sys/fs/cgroup"
# The v1 controllers runc places a container in (opencontainers/cgroups fs.subsystems).
V1_CONTROLLERS = frozenset(
    {
        "cpuset",
        "devices",
        "memory",
        "cpu",
        "cpuacct",
        "pids",
        "blkio",
        "hugetlb",
        "net_cls",
        "net_prio",
        "perf_event",
        "freezer",
        "rdma",
        "misc",
    }
)
SYSTEMD_HIERARCHY = "name=systemd"
UNIFIED = ""  # the key of the cgroup v2 hierarchy, as runc names it in its paths map


class Mount(NamedTuple):
    """A mounted cgroup hierarchy: v1 (with its controllers, ``name=…`` included) or v2."""

    mountpoint: str
    root: str  # the mount's root inside the hierarchy ("/" unless a sub-tree is mounted)
    version: int
    controllers: frozenset[str] = frozenset()

    @property
    def key(self) -> str:
        """How the hierarchy is named in a container's paths: its controllers, "" for v2."""
        return UNIFIED if self.version == 2 else ",".join(sorted(self.controllers))


def _unescape(field: str) -> str:
    """A mountinfo field: spaces, tabs, newlines and backslashes are octal escapes."""
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1 : i + 4].isdigit() and len(field[i + 1 : i + 4]) == 3:
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def parse_mountinfo(text: str) -> list[Mount]:
    """The cgroup hierarchies in a /proc/<pid>/mountinfo text, in mount order."""
    found = []
    for line in text.splitlines():
        head, sep, tail = line.partition(" - ")
        if not sep:
            continue
        fields, extra = head.split(), tail.split()
        if len(fields) < 5 or len(extra) < 3:
            continue
        fstype, options = extra[0], extra[2].split(",")
        root, mountpoint = _unescape(fields[3]), _unescape(fields[4])
        if fstype == "cgroup2":
            found.append(Mount(mountpoint, root, 2))
        elif fstype == "cgroup":
            controllers = frozenset(
                o for o in options if o in V1_CONTROLLERS or o.startswith("name=")
            )
            if controllers:
                found.append(Mount(mountpoint, root, 1, controllers))
    return found


def parse_proc_cgroup(text: str) -> dict[str, str]:
    """A /proc/<pid>/cgroup text as {controller or ``name=…`` or "" (v2): path}."""
    paths: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if not controllers:
            paths[UNIFIED] = path
        for controller in controllers.split(","):
            if controller:
                paths[controller] = path
    return paths


class Host(NamedTuple):
    """What a placement depends on: the mounted hierarchies, the caller's own cgroups, and
    whether systemd runs (/run/systemd/system, as sd_booted(3) tells)."""

    mounts: tuple[Mount, ...]
    own: dict[str, str]
    systemd: bool = False

    @classmethod
    def read(cls) -> Host:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
            mounts = parse_mountinfo(f.read())
        with open("/proc/self/cgroup", encoding="utf-8", errors="surrogateescape") as f:
            own = parse_proc_cgroup(f.read())
        return cls(tuple(mounts), own, os.path.isdir("/run/systemd/system"))

    @property
    def mode(self) -> str:
        """The layout: "v2" (one tree), "hybrid" (v1 controllers and a v2 mount), "v1", "none"."""
        unified = [m for m in self.mounts if m.version == 2]
        legacy = [m for m in self.mounts if m.version == 1]
        if unified and (not legacy or any(m.mountpoint == CGROUP_ROOT for m in unified)):
            return "v2"
        if unified:
            return "hybrid"
        return "v1" if legacy else "none"

    def hierarchies(self) -> list[Mount]:
        """The hierarchies a container joins, one mount each (the first of a hierarchy's)."""
        mode = self.mode
        chosen: dict[str, Mount] = {}
        for mount in self.mounts:
            if mount.version == 2:
                if mode == "v1":
                    continue
                if mode == "v2" and chosen.get(UNIFIED) and mount.mountpoint != CGROUP_ROOT:
                    continue
                if mode == "v2" and mount.mountpoint == CGROUP_ROOT:
                    chosen[UNIFIED] = mount  # the tree, however many bind mounts precede it
                    continue
            elif mode == "v2" or not (
                mount.controllers & V1_CONTROLLERS or SYSTEMD_HIERARCHY in mount.controllers
            ):
                continue
            chosen.setdefault(mount.key, mount)
        return list(chosen.values())

    def own_path(self, mount: Mount) -> str:
        """The caller's cgroup in ``mount``'s hierarchy, relative to what the mount shows."""
        if mount.version == 2:
            path = self.own.get(UNIFIED, "/")
        else:
            path = next((self.own[c] for c in sorted(mount.controllers) if c in self.own), "/")
        root = mount.root.rstrip("/")
        if root and (path == root or path.startswith(root + "/")):
            path = path[len(root) :] or "/"
        return path
