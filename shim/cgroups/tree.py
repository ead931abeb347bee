"""Making the container's cgroup (paths.py says where), moving processes into it, listing
them, and removing it after the container."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import time

from bonneville.shim.cgroups import systemd
from bonneville.shim.cgroups.files import read, write
from bonneville.shim.cgroups.hierarchy import Host, Mount
from bonneville.shim.cgroups.paths import Placement
from bonneville.spec.errors import BonnevilleError

log = logging.getLogger("bonneville")


def create(placement: Placement, host: Host, pid: int) -> None:
    """Make the container's cgroup and move ``pid`` (with all its threads) into it; a child it
    forks from then on is born there. With systemd, the scope is its transient unit first."""
    if placement.unit:
        systemd.start_unit(placement.unit, placement.slice, pid)
    enable = host.mode == "v2" and not placement.unit
    for directory in placement.dirs.values():
        mount = _mount_of(directory, host)
        if mount is None:
            raise BonnevilleError(f"{directory} is in no cgroup hierarchy mounted here")
        try:
            _make_dirs(directory, mount, enable)
        except OSError as exc:
            raise BonnevilleError(f"cannot make cgroup {directory}: {exc.strerror}") from exc
    join(placement.dirs, pid)


def join(dirs: dict[str, str], pid: int) -> None:
    """Move ``pid`` into the container's existing cgroup (an exec proxy joins this way)."""
    for directory in dirs.values():
        try:
            write(f"{directory}/cgroup.procs", str(pid))
        except OSError as exc:
            raise BonnevilleError(
                f"cannot move process {pid} into cgroup {directory}: {exc.strerror}"
            ) from exc


def processes(dirs: dict[str, str]) -> list[int]:
    """The PIDs in the container's cgroup (every hierarchy lists the same; [] without one)."""
    for directory in dirs.values():
        with contextlib.suppress(OSError):
            return [int(pid) for pid in read(f"{directory}/cgroup.procs").split()]
    return []


def remove(dirs: dict[str, str], unit: str = "", timeout: float = 10.0) -> list[str]:
    """Remove the container's cgroup (its sub-cgroups first); the directories still there.

    Called once the monitor is gone: QEMU (which dies with it) and exec proxies (which end
    when its socket closes) may take a moment to leave, so a busy cgroup is retried until
    ``timeout``. Nothing is killed: a directory other processes hold is left, and named.
    """
    if unit:
        systemd.stop_unit(unit)
    deadline = time.monotonic() + timeout
    left = []
    for directory in dirs.values():
        while True:
            try:
                _remove_tree(directory)
                break
            except OSError as exc:
                if exc.errno != errno.EBUSY or time.monotonic() >= deadline:
                    log.warning("cgroup %s not removed: %s", directory, exc.strerror)
                    left.append(directory)
                    break
            time.sleep(0.02)  # a poll, until the last task has left (there is no event in v1)
    return left


def _mount_of(directory: str, host: Host) -> Mount | None:
    best: Mount | None = None
    for mount in host.hierarchies():
        point = mount.mountpoint.rstrip("/")
        inside = directory == point or directory.startswith(point + "/")
        if inside and (best is None or len(point) > len(best.mountpoint)):
            best = mount
    return best


def _make_dirs(directory: str, mount: Mount, enable_controllers: bool) -> None:
    """mkdir -p from the mount point down, as runc does per hierarchy: a v1 cpuset level gets
    its parent's CPUs and memory nodes (it is empty otherwise and takes no task); on a v2 host
    each level above the leaf hands its children every controller it has."""
    point = mount.mountpoint.rstrip("/")
    relative = directory[len(point) :].strip("/")
    current = point
    controllers = ""
    if enable_controllers:
        with contextlib.suppress(OSError):
            controllers = " ".join("+" + c for c in read(f"{point}/cgroup.controllers").split())
    components = relative.split("/") if relative else []
    for component in components:
        if enable_controllers and controllers:
            try:
                write(f"{current}/cgroup.subtree_control", controllers)
            except OSError:
                for one in controllers.split():
                    with contextlib.suppress(OSError):
                        write(f"{current}/cgroup.subtree_control", one)
        parent, current = current, f"{current}/{component}"
        with contextlib.suppress(FileExistsError):
            os.mkdir(current, 0o755)
        if mount.version == 1 and "cpuset" in mount.controllers:
            for name in ("cpuset.cpus", "cpuset.mems"):
                if not read(f"{current}/{name}"):
                    write(f"{current}/{name}", read(f"{parent}/{name}"))


def _remove_tree(directory: str) -> None:
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return
    for entry in entries:
        if entry.is_dir(follow_symlinks=False):
            _remove_tree(entry.path)
    with contextlib.suppress(FileNotFoundError):
        os.rmdir(directory)
