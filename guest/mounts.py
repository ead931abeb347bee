"""A container's filesystem inside the guest: its mounts (runc's option parsing), default
devices, masked and read-only paths, and the switch of its mount namespace onto its root.
Standard library only: this module goes into the guest image."""

from __future__ import annotations

import errno
import os
import stat

from bonneville.guest import linux
from bonneville.guest.common import Log, errtext
from bonneville.guest.linux import (
    MS_BIND,
    MS_DIRSYNC,
    MS_LAZYTIME,
    MS_MANDLOCK,
    MS_MOVE,
    MS_NOATIME,
    MS_NODEV,
    MS_NODIRATIME,
    MS_NOEXEC,
    MS_NOSUID,
    MS_PRIVATE,
    MS_RDONLY,
    MS_REC,
    MS_RELATIME,
    MS_REMOUNT,
    MS_SHARED,
    MS_SILENT,
    MS_SLAVE,
    MS_STRICTATIME,
    MS_SYNCHRONOUS,
    MS_UNBINDABLE,
    mount,
)
from bonneville.guest.paths import resolve_in_root
from bonneville.guest.proc import mountinfo

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

# statvfs f_flag bits share the MS_ values; these must survive a read-only bind remount.
KEPT_ON_REMOUNT = MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_NOATIME | MS_NODIRATIME | MS_RELATIME

# option → (flags to set, flags to clear), as runc's parseMountOptions.
MOUNT_FLAGS: dict[str, tuple[int, int]] = {
    "ro": (MS_RDONLY, 0),
    "rw": (0, MS_RDONLY),
    "nosuid": (MS_NOSUID, 0),
    "suid": (0, MS_NOSUID),
    "nodev": (MS_NODEV, 0),
    "dev": (0, MS_NODEV),
    "noexec": (MS_NOEXEC, 0),
    "exec": (0, MS_NOEXEC),
    "sync": (MS_SYNCHRONOUS, 0),
    "async": (0, MS_SYNCHRONOUS),
    "dirsync": (MS_DIRSYNC, 0),
    "mand": (MS_MANDLOCK, 0),
    "nomand": (0, MS_MANDLOCK),
    "atime": (0, MS_NOATIME),
    "noatime": (MS_NOATIME, 0),
    "diratime": (0, MS_NODIRATIME),
    "nodiratime": (MS_NODIRATIME, 0),
    "relatime": (MS_RELATIME, 0),
    "norelatime": (0, MS_RELATIME),
    "strictatime": (MS_STRICTATIME, 0),
    "nostrictatime": (0, MS_STRICTATIME),
    "lazytime": (MS_LAZYTIME, 0),
    "nolazytime": (0, MS_LAZYTIME),
    "silent": (MS_SILENT, 0),
    "loud": (0, MS_SILENT),
    "bind": (MS_BIND, 0),
    "rbind": (MS_BIND | MS_REC, 0),
    "defaults": (0, 0),
}
PROPAGATION_FLAGS = {
    "private": MS_PRIVATE,
    "rprivate": MS_PRIVATE | MS_REC,
    "shared": MS_SHARED,
    "rshared": MS_SHARED | MS_REC,
    "slave": MS_SLAVE,
    "rslave": MS_SLAVE | MS_REC,
    "unbindable": MS_UNBINDABLE,
    "runbindable": MS_UNBINDABLE | MS_REC,
}
# runc extensions that are not kernel options, and "idmap"-style ones we do not support.
IGNORED_OPTIONS = frozenset({"tmpcopyup"})

# runc's default devices on a tmpfs /dev: name, major, minor (used when the agent's own /dev
# lacks the node to copy the numbers from).
DEFAULT_DEVICES = (
    ("null", 1, 3),
    ("zero", 1, 5),
    ("full", 1, 7),
    ("random", 1, 8),
    ("urandom", 1, 9),
    ("tty", 5, 0),
)
DEV_SYMLINKS = (
    ("fd", "/proc/self/fd"),
    ("stdin", "/proc/self/fd/0"),
    ("stdout", "/proc/self/fd/1"),
    ("stderr", "/proc/self/fd/2"),
)


def remount_readonly(path: str, extra: int = MS_RDONLY) -> None:
    """Make the mount at ``path`` read-only (or add ``extra`` flags), keeping its other flags."""
    try:
        flags = os.statvfs(path).f_flag
    except OSError:
        # statfs of a device node over 9p makes QEMU open the node on the host, which the
        # nodev share refuses (EACCES) or no driver backs (ENXIO): a bind of the path onto
        # itself carries its parent mount's flags.
        flags = os.statvfs(os.path.dirname(path.rstrip("/")) or "/").f_flag
    kept = flags & KEPT_ON_REMOUNT
    mount(None, path, None, MS_BIND | MS_REMOUNT | kept | extra)


def parse_mount_options(options: list[str]) -> tuple[int, int, str]:
    """OCI mount options → (mount flags, propagation flags, data string)."""
    flags = propagation = 0
    data: list[str] = []
    for option in options:
        if option in MOUNT_FLAGS:
            add, clear = MOUNT_FLAGS[option]
            flags = (flags | add) & ~clear
        elif option in PROPAGATION_FLAGS:
            propagation |= PROPAGATION_FLAGS[option]
        elif option not in IGNORED_OPTIONS:
            data.append(option)
    return flags, propagation, ",".join(data)


def make_mountpoint(path: str, like: str) -> None:
    """Create ``path`` as a directory, or an empty file if ``like`` is not a directory."""
    if os.path.lexists(path):
        return
    if os.path.isdir(like):
        os.makedirs(path, 0o755, exist_ok=True)
        return
    os.makedirs(os.path.dirname(path), 0o755, exist_ok=True)
    with open(path, "a"):
        pass


def mount_one(root: str, entry: dict[str, Any], log: Log, tree: str | None = None) -> None:
    """Make one entry of ``mounts`` inside the root. Bind mounts are the host's, placed in the
    container's ``tree`` in the share (``treeSource``): each is bound from there to its
    destination, resolved inside the root as runc resolves it, so an earlier mount over its
    parent (a tmpfs /dev over CRI's /dev/shm) cannot hide it; its flags and propagation are
    applied here."""
    dest = str(entry["destination"])
    mtype = str(entry.get("type") or "")
    options = [str(o) for o in entry.get("options") or []]
    flags, propagation, data = parse_mount_options(options)
    target = resolve_in_root(root, dest)
    if mtype in ("bind", "rbind") or flags & MS_BIND:
        extra = flags & (MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)
        # 9p shows the bind as a plain directory: binding it makes it a mount point of its own
        # that keeps its flags (rw under a read-only root, or ro, nosuid…).
        rel = str(entry.get("treeSource") or "")
        if tree is None or not rel or ".." in rel.split("/"):
            raise OSError(errno.EINVAL, "a bind mount without its place in the share", dest)
        source = os.path.join(tree, rel)
        make_mountpoint(target, source)
        mount(source, target, None, MS_BIND | MS_REC)
        if extra:
            remount_readonly(target, extra)
        if extra & MS_RDONLY:
            # Read-only is not recursive: the host's writable mounts beneath the source (which
            # the guest sees as plain directories) stay writable, each a bind of its own.
            for rel in entry.get("rwSubmounts") or []:
                inner = resolve_in_root(target, str(rel))
                if os.path.isdir(inner) and inner != target:
                    mount(inner, inner, None, MS_BIND)
                    flags_now = os.statvfs(inner).f_flag & KEPT_ON_REMOUNT
                    mount(None, inner, None, MS_BIND | MS_REMOUNT | flags_now)
        if propagation:
            mount(None, target, None, propagation)
        return
    source = str(entry.get("source") or mtype)
    if mtype in ("cgroup", "cgroup2"):
        # The VM's cgroup v2 hierarchy as the container's cgroup namespace sees it: rooted at
        # the container's cgroup (as with a private cgroup namespace under runc on a v2 host).
        try:
            os.makedirs(target, 0o755, exist_ok=True)
            mount("cgroup2", target, "cgroup2", flags & ~MS_BIND, "")
        except OSError as exc:
            log("warning", f"mount cgroup2 on {dest} skipped: {errtext(exc)}")
        return
    if mtype == "devpts":
        # A private instance whose ptmx anyone may open, as runc's containers have.
        for needed in ("newinstance", "ptmxmode=0666"):
            if needed.split("=")[0] not in data:
                data = f"{data},{needed}" if data else needed
    os.makedirs(target, 0o755, exist_ok=True)
    mount(source, target, mtype, flags, data)
    if propagation:
        mount(None, target, None, propagation)


def make_default_devices(root: str) -> None:
    """runc's default /dev on a tmpfs: device nodes, the fd symlinks, ptmx → pts/ptmx."""
    dev = resolve_in_root(root, "/dev")
    for name, major, minor in DEFAULT_DEVICES:
        path = os.path.join(dev, name)
        if os.path.lexists(path):
            continue
        try:
            rdev = os.stat(f"/dev/{name}").st_rdev
        except OSError:
            rdev = os.makedev(major, minor)
        try:
            os.mknod(path, stat.S_IFCHR | 0o666, rdev)
            os.chmod(path, 0o666)  # mknod's mode went through the umask
        except PermissionError:
            # No CAP_MKNOD (or a nodev /dev): bind the agent's node, as runc does.
            with open(path, "w"):
                pass
            mount(f"/dev/{name}", path, None, MS_BIND)
    links = list(DEV_SYMLINKS)
    if os.path.exists("/proc/kcore"):
        links.append(("core", "/proc/kcore"))
    for name, target in links:
        path = os.path.join(dev, name)
        if not os.path.lexists(path):
            os.symlink(target, path)
    ptmx = os.path.join(dev, "ptmx")
    if os.path.lexists(ptmx):
        os.unlink(ptmx)
    os.symlink("pts/ptmx", ptmx)


def mask_path(root: str, path: str) -> None:
    """Hide a path: /dev/null over a file, an empty read-only tmpfs over a directory."""
    target = resolve_in_root(root, path)
    try:
        st = os.stat(target)
    except (FileNotFoundError, NotADirectoryError):
        return
    if stat.S_ISDIR(st.st_mode):
        mount("tmpfs", target, "tmpfs", MS_RDONLY)
    else:
        mount("/dev/null", target, None, MS_BIND)


def readonly_path(root: str, path: str) -> None:
    """Bind a path onto itself and make that read-only."""
    target = resolve_in_root(root, path)
    if not os.path.lexists(target):
        return
    mount(target, target, None, MS_BIND | MS_REC)
    remount_readonly(target)


def detach_all_but(keep: str) -> None:
    """Lazily unmount every mount of this (private) namespace but ``/`` and the tree at
    ``keep``: a container's namespace holds only its own tree, none of the agent's mounts (the
    pod's share, /dev, /proc, /run). Parents go first; their submounts go with them."""
    prefix = keep.rstrip("/") + "/"
    for point in sorted({point for point, _ in mountinfo()}, key=lambda p: (p.count("/"), p)):
        if point == "/" or point == keep or point.startswith(prefix):
            continue
        try:
            linux.umount(point, linux.MNT_DETACH)
        except OSError:
            pass  # gone with a parent already


def enter_root(root: str) -> None:
    """Make ``root`` (a mount point) this mount namespace's root and ours, as runc does where
    pivot_root cannot work (the guest runs from its initramfs, which cannot be pivoted away):
    the mount is moved onto ``/`` and we chroot into it. A process that later joins the
    namespace (setns) lands on it too: the kernel follows mounts stacked on the namespace's
    root."""
    os.chdir(root)
    mount(".", "/", None, MS_MOVE)
    os.chroot(".")
    os.chdir("/")
