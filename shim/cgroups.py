"""A container's cgroup on the host: where its monitor, its VM's QEMU and its exec proxies
live, placed where runc would place the container, and bounded so that a VM cannot hurt the
host while a healthy one is never killed.

Paths follow runc's rules (opencontainers/cgroups: ``fs/paths.go``, ``fs2/defaultpath.go``,
``systemd/common.go``; runc's ``specconv.CreateCgroupConfig``):

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
  asks it); without systemd, the same directories are made directly.
- The hierarchies: every v1 hierarchy of a controller runc knows, and ``name=systemd``; on a
  hybrid host the v2 mount too (``/sys/fs/cgroup/unified``), as runc joins it; on a v2 host the
  one tree, with every available controller enabled down to the container's parent.

The host-side limits are not the container's own (the guest kernel enforces those on the
container's cgroup inside the VM, spec/resources.py) but the VM's: its RAM plus what QEMU, the
monitor and exec proxies need beyond it, its vCPUs' worth of CPU time plus QEMU's own threads,
a bound on tasks (docs/reliability.md, "Host-side limits", has the measurements).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import posixpath
import time
from typing import NamedTuple

from bonneville.spec.errors import BonnevilleError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable
    from typing import Any

log = logging.getLogger("bonneville")

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
DEFAULT_SLICE = "system.slice"
DEFAULT_SCOPE_PREFIX = "runc"
DEFAULT_CPU_PERIOD_US = 100_000
MIB = 1 << 20

# ---- the host-side limits (measured: docs/reliability.md, "Host-side limits") ----------------
# What a VM's host processes hold beyond its guest RAM, in MiB, each about twice what was
# measured under TCG with a guest that had touched all its RAM: QEMU's translation cache (at most
# 128 MiB for a boot, a template's included, 64 for a clone: backends/qemu/cmdline.py), QEMU's
# heap and mapped binary and libraries and the kernel's memory for it (53 MiB measured), the
# monitor's allocations after it joined (most of its 23 MiB were made before), a dozen exec
# proxies (~2 MiB each charged here).
TB_CACHE_MIB = 128
QEMU_OVERHEAD_MIB = 64
MONITOR_MIB = 32
EXEC_PROXIES_MIB = 32
VM_OVERHEAD_MIB = TB_CACHE_MIB + QEMU_OVERHEAD_MIB + MONITOR_MIB + EXEC_PROXIES_MIB
# A pod member's cgroup holds only its monitor (a relay) and its exec proxies.
MEMBER_MEMORY_MIB = MONITOR_MIB + EXEC_PROXIES_MIB
# CPU beyond the vCPUs for QEMU's own threads (main loop, 9p workers), in cores: 0.41 measured
# with four parallel 9p streams on one vCPU.
CPU_ALLOWANCE = 0.5
# Host tasks: QEMU's thread pool stops at 64 workers; with its other threads, a vCPU thread each
# and the monitor a VM needs under 100; the rest is room for exec proxies (one task each).
PIDS_LIMIT = 512


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


# ---- where the container's cgroup is ---------------------------------------------------------


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


# ---- making, joining, removing ----------------------------------------------------------------


def _write(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def _read(path: str) -> str:
    with open(path, encoding="ascii", errors="replace") as f:
        return f.read().strip()


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
            controllers = " ".join("+" + c for c in _read(f"{point}/cgroup.controllers").split())
    components = relative.split("/") if relative else []
    for component in components:
        if enable_controllers and controllers:
            try:
                _write(f"{current}/cgroup.subtree_control", controllers)
            except OSError:
                for one in controllers.split():
                    with contextlib.suppress(OSError):
                        _write(f"{current}/cgroup.subtree_control", one)
        parent, current = current, f"{current}/{component}"
        with contextlib.suppress(FileExistsError):
            os.mkdir(current, 0o755)
        if mount.version == 1 and "cpuset" in mount.controllers:
            for name in ("cpuset.cpus", "cpuset.mems"):
                if not _read(f"{current}/{name}"):
                    _write(f"{current}/{name}", _read(f"{parent}/{name}"))


def create(placement: Placement, host: Host, pid: int) -> None:
    """Make the container's cgroup and move ``pid`` (with all its threads) into it; a child it
    forks from then on is born there. With systemd, the scope is its transient unit first."""
    if placement.unit:
        _start_unit(placement.unit, placement.slice, pid)
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
            _write(f"{directory}/cgroup.procs", str(pid))
        except OSError as exc:
            raise BonnevilleError(
                f"cannot move process {pid} into cgroup {directory}: {exc.strerror}"
            ) from exc


def processes(dirs: dict[str, str]) -> list[int]:
    """The PIDs in the container's cgroup (every hierarchy lists the same; [] without one)."""
    for directory in dirs.values():
        with contextlib.suppress(OSError):
            return [int(pid) for pid in _read(f"{directory}/cgroup.procs").split()]
    return []


def remove(dirs: dict[str, str], unit: str = "", timeout: float = 10.0) -> list[str]:
    """Remove the container's cgroup (its sub-cgroups first); the directories still there.

    Called once the monitor is gone: QEMU (which dies with it) and exec proxies (which end
    when its socket closes) may take a moment to leave, so a busy cgroup is retried until
    ``timeout``. Nothing is killed: a directory other processes hold is left, and named.
    """
    if unit:
        _stop_unit(unit)
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


# ---- systemd's transient units (where systemd runs) ------------------------------------------


def unit_argv(unit: str, slice_name: str, pid: int) -> list[str]:
    """busctl's StartTransientUnit call for ``unit``, as runc asks systemd over D-Bus: a scope
    in ``slice_name`` holding ``pid`` with delegation and accounting on (a slice: wanted by its
    parent), no default dependencies."""
    properties: list[str] = ["Description", "s", f"bonneville container {unit}"]
    if unit.endswith(".slice"):
        properties += ["Wants", "as", "1", slice_name]
    else:
        properties += ["Slice", "s", slice_name, "Delegate", "b", "true"]
    if pid > 0:
        properties += ["PIDs", "au", "1", str(pid)]
    for accounting in ("MemoryAccounting", "CPUAccounting", "TasksAccounting"):
        properties += [accounting, "b", "true"]
    properties += ["DefaultDependencies", "b", "false"]
    return [
        "busctl",
        "call",
        "org.freedesktop.systemd1",
        "/org/freedesktop/systemd1",
        "org.freedesktop.systemd1.Manager",
        "StartTransientUnit",
        "ssa(sv)a(sa(sv))",
        unit,
        "replace",
        str(_property_count(properties)),
        *properties,
        "0",
    ]


def _property_count(properties: list[str]) -> int:
    """How many (name, signature, value…) triples ``properties`` holds (arrays: a length too)."""
    count, i = 0, 0
    while i < len(properties):
        signature = properties[i + 1]
        i += 2 + (2 if signature in ("as", "au") else 1)
        count += 1
    return count


def _busctl(argv: list[str]) -> None:
    import subprocess

    result = subprocess.run(
        argv,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        close_fds=True,
        env={"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")},
        timeout=30,
        check=False,
    )
    if result.returncode != 0:
        raise BonnevilleError(result.stderr.decode(errors="replace").strip() or "busctl failed")


def _start_unit(unit: str, slice_name: str, pid: int) -> None:
    try:
        _busctl(unit_argv(unit, slice_name, pid))
    except (OSError, BonnevilleError) as exc:
        raise BonnevilleError(f"systemd did not start unit {unit}: {exc}") from exc


def _stop_unit(unit: str) -> None:
    with contextlib.suppress(OSError, BonnevilleError):
        _busctl(
            [
                "busctl",
                "call",
                "org.freedesktop.systemd1",
                "/org/freedesktop/systemd1",
                "org.freedesktop.systemd1.Manager",
                "StopUnit",
                "ss",
                unit,
                "replace",
            ]
        )


# ---- limits -----------------------------------------------------------------------------------


class Limits(NamedTuple):
    """Host-side limits of a container's cgroup; None leaves a limit as it is."""

    memory: int | None = None  # bytes
    cpu_quota: int | None = None  # µs of CPU time per period
    cpu_period: int = DEFAULT_CPU_PERIOD_US
    cpu_shares: int | None = None  # cgroup v1 shares (cpu.weight is derived on v2)
    pids: int | None = None


def cpu_fields(resources: dict[str, Any]) -> tuple[int | None, int | None, int | None]:
    """(quota, period, shares) of OCI ``resources``, each None where not given."""
    cpu = resources.get("cpu") if isinstance(resources, dict) else None
    if not isinstance(cpu, dict):
        return None, None, None

    def number(key: str) -> int | None:
        value = cpu.get(key)
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    return number("quota"), number("period"), number("shares")


def cpu_quota(vcpus: int, quota: int | None, period: int | None) -> tuple[int, int]:
    """(quota, period) in µs for a VM with ``vcpus`` whose container may use ``quota`` per
    ``period`` (none: all its vCPUs): that budget, at most the vCPUs, plus QEMU's allowance."""
    period = period if period and period > 0 else DEFAULT_CPU_PERIOD_US
    cores = float(max(vcpus, 1))
    if quota is not None and quota > 0:
        cores = min(cores, quota / period)
    return round((cores + CPU_ALLOWANCE) * period), period


def vm_limits(
    memory_mib: int, vcpus: int, resources: dict[str, Any], shares: bool = True
) -> Limits:
    """The limits of the cgroup that holds a VM of ``memory_mib`` and ``vcpus`` running a
    container with OCI ``resources``. ``shares=False`` leaves the CPU weight alone (a pod's
    sandbox: its config's weight is the pause process's, but the cgroup holds the pod's VM)."""
    quota, period, cpu_shares = cpu_fields(resources)
    host_quota, host_period = cpu_quota(vcpus, quota, period)
    return Limits(
        memory=(memory_mib + VM_OVERHEAD_MIB) * MIB,
        cpu_quota=host_quota,
        cpu_period=host_period,
        cpu_shares=cpu_shares if shares and cpu_shares else None,
        pids=PIDS_LIMIT,
    )


def member_limits(resources: dict[str, Any]) -> Limits:
    """The limits of a pod member's cgroup: it holds that container's monitor (a relay; the
    container runs in the pod's VM, in the owner's cgroup) and its exec proxies."""
    _, _, cpu_shares = cpu_fields(resources)
    return Limits(memory=MEMBER_MEMORY_MIB * MIB, cpu_shares=cpu_shares or None, pids=PIDS_LIMIT)


def shares_to_weight(shares: int) -> int:
    """cgroup v1 shares [2, 262144] as a v2 weight [1, 10000] (runc's conversion)."""
    return 1 + ((max(2, min(shares, 262144)) - 2) * 9999) // 262142


def apply(dirs: dict[str, str] | Iterable[str], limits: Limits, raise_only: bool = False) -> None:
    """Write ``limits`` to whichever of the container's directories has each controller (v1:
    memory, cpu, pids each in its own hierarchy; v2: all in one). ``raise_only``: a memory or
    CPU limit already above the new one stays. A controller not mounted here is skipped."""
    directories = list(dirs.values()) if isinstance(dirs, dict) else list(dirs)
    for directory in directories:
        try:
            _apply_one(directory, limits, raise_only)
        except OSError as exc:
            raise BonnevilleError(
                f"cannot set the limits of cgroup {directory}: {exc.strerror}"
            ) from exc


def _exists(path: str) -> bool:
    return os.path.exists(path)


def _apply_one(directory: str, limits: Limits, raise_only: bool) -> None:
    if limits.memory is not None:
        for name in ("memory.limit_in_bytes", "memory.max"):  # v1, v2
            if _exists(f"{directory}/{name}"):
                text = _read(f"{directory}/{name}")
                limit = 1 << 63 if text == "max" else int(text or 0)
                if not (raise_only and limit >= limits.memory):
                    _write(f"{directory}/{name}", str(limits.memory))
                break
    if limits.cpu_quota is not None:
        wanted = limits.cpu_quota / limits.cpu_period
        if _exists(f"{directory}/cpu.cfs_quota_us"):
            quota = int(_read(f"{directory}/cpu.cfs_quota_us") or -1)
            period = int(_read(f"{directory}/cpu.cfs_period_us") or DEFAULT_CPU_PERIOD_US)
            if not (raise_only and (quota < 0 or quota / period >= wanted)):
                _write_v1_bandwidth(directory, limits.cpu_quota, limits.cpu_period)
        elif _exists(f"{directory}/cpu.max"):
            quota_text, _, period_text = _read(f"{directory}/cpu.max").partition(" ")
            unlimited = quota_text == "max"
            if not (raise_only and (unlimited or int(quota_text) / int(period_text) >= wanted)):
                _write(f"{directory}/cpu.max", f"{limits.cpu_quota} {limits.cpu_period}")
    if limits.cpu_shares is not None:
        if _exists(f"{directory}/cpu.shares"):
            _write(f"{directory}/cpu.shares", str(limits.cpu_shares))
        elif _exists(f"{directory}/cpu.weight"):
            _write(f"{directory}/cpu.weight", str(shares_to_weight(limits.cpu_shares)))
    if limits.pids is not None and _exists(f"{directory}/pids.max"):
        _write(f"{directory}/pids.max", str(limits.pids))


def _write_v1_bandwidth(directory: str, quota: int, period: int) -> None:
    """cpu.cfs_period_us then cpu.cfs_quota_us, or the other way round when the kernel refuses
    the period against the old quota (runc's order)."""
    try:
        _write(f"{directory}/cpu.cfs_period_us", str(period))
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
        _write(f"{directory}/cpu.cfs_quota_us", str(quota))
        _write(f"{directory}/cpu.cfs_period_us", str(period))
        return
    _write(f"{directory}/cpu.cfs_quota_us", str(quota))


def raise_vm_limits(dirs: dict[str, str], memory_mib: int, vcpus: int) -> None:
    """For the owner monitor, after its VM grew (memory or vCPU hotplug): lift the cgroup's
    memory and CPU bounds to the VM's new size (``memory_mib`` of RAM and ``vcpus`` now, the
    totals, not the increments); never lowers them. ``dirs``: ``MonitorConfig.cgroup``."""
    if not dirs:
        return
    quota, period = cpu_quota(vcpus, None, None)
    apply(
        dirs,
        Limits(memory=(memory_mib + VM_OVERHEAD_MIB) * MIB, cpu_quota=quota, cpu_period=period),
        raise_only=True,
    )


# ---- an OOM kill, told the way runc's callers hear it ---------------------------------------

OOM_HEADROOM = 4 * MIB  # above the cgroup's usage while the OOM is provoked
OOM_ALLOCATION_LIMIT = 512 * MIB  # the victim gives up (and exits) past this


def _memory_files(dirs: dict[str, str]) -> tuple[str, str, str] | None:
    """(limit file, usage file, swap limit file or "") of the container's memory cgroup."""
    for directory in dirs.values():
        if _exists(f"{directory}/memory.max"):  # v2
            swap = f"{directory}/memory.swap.max"
            return (
                f"{directory}/memory.max",
                f"{directory}/memory.current",
                swap if _exists(swap) else "",
            )
        if _exists(f"{directory}/memory.limit_in_bytes"):  # v1
            return (
                f"{directory}/memory.limit_in_bytes",
                f"{directory}/memory.usage_in_bytes",
                "",
            )
    return None


def report_oom(dirs: dict[str, str], timeout: float = 10.0) -> bool:
    """Make the host kernel OOM-kill a process in the container's memory cgroup, for a container
    the guest's OOM killer ended: containerd's shim learns of OOMs only from the cgroup of the
    PID it waits on (v1: memory.oom_control's eventfd; v2: memory.events' oom_kill), which is
    how `docker inspect` reads OOMKilled and the CRI reason "OOMKilled". The victim is a child of
    the caller (in that cgroup) with oom_score_adj 1000, so the kernel picks it over anything
    else there; the cgroup's limit drops to its usage plus a little while the child allocates,
    and is put back after. True if the kernel killed it."""
    files = _memory_files(dirs)
    if files is None:
        return False
    limit_file, usage_file, swap_file = files
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the victim
        try:
            os.close(ready_r)
            os.close(go_w)
            with open("/proc/self/oom_score_adj", "w") as f:
                f.write("1000")
            os.write(ready_w, b"r")
            if os.read(go_r, 1) == b"g":
                held: list[bytes] = []
                while len(held) * MIB < OOM_ALLOCATION_LIMIT:
                    held.append(b"\x01" * MIB)  # written, so charged: calloc'd pages are not
        finally:
            os._exit(0)
    os.close(ready_w)
    os.close(go_r)
    old_limit = old_swap = ""
    killed = False
    try:
        if os.read(ready_r, 1) != b"r":
            return False
        old_limit = _read(limit_file)
        if swap_file:
            old_swap = _read(swap_file)
            _write(swap_file, "0")  # swapped out, the victim would never run out
        _write(limit_file, str(int(_read(usage_file)) + OOM_HEADROOM))
        os.write(go_w, b"g")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                pid = 0
                killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == 9
                break
            time.sleep(0.01)
    except OSError as exc:
        log.warning("cannot report the OOM kill to the host cgroup: %s", exc)
    finally:
        for fd in (ready_r, go_w):
            os.close(fd)
        if pid:
            with contextlib.suppress(OSError):
                os.kill(pid, 9)
            with contextlib.suppress(OSError):
                os.waitpid(pid, 0)
        with contextlib.suppress(OSError):
            if old_limit:
                _write(limit_file, old_limit)
            if old_swap:
                _write(swap_file, old_swap)
    return killed
