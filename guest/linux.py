"""Linux system calls Python 3.11 lacks, and their constants: the one home of our ctypes code.

Shared by the agent (guest) and the host (the monitor's namespaces and mounts, QEMU's launch).
Errors are OSError with the errno, as ``os`` raises them. ctypes is loaded on first use: most CLI
commands never make one of these calls, and each saves the import. Standard library only: this
module goes into the guest image.
"""

from __future__ import annotations

import os

TYPE_CHECKING = False
if TYPE_CHECKING:
    import ctypes

# mount(2) flags (linux/mount.h).
MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_SYNCHRONOUS = 0x10
MS_REMOUNT = 0x20
MS_MANDLOCK = 0x40
MS_DIRSYNC = 0x80
MS_NOATIME = 0x400
MS_NODIRATIME = 0x800
MS_BIND = 0x1000
MS_MOVE = 0x2000
MS_REC = 0x4000
MS_SILENT = 0x8000
MS_UNBINDABLE = 0x20000
MS_PRIVATE = 0x40000
MS_SLAVE = 0x80000
MS_SHARED = 0x100000
MS_RELATIME = 0x200000
MS_STRICTATIME = 0x1000000
MS_LAZYTIME = 0x2000000
MNT_DETACH = 0x2

# Namespace flags (linux/sched.h), for unshare(2) and setns(2).
CLONE_NEWNS = 0x20000
CLONE_NEWCGROUP = 0x2000000
CLONE_NEWUTS = 0x4000000
CLONE_NEWIPC = 0x8000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
# /proc/PID/ns/<name> of each namespace flag.
NS_NAMES = {
    CLONE_NEWNS: "mnt",
    CLONE_NEWUTS: "uts",
    CLONE_NEWIPC: "ipc",
    CLONE_NEWPID: "pid",
    CLONE_NEWNET: "net",
    CLONE_NEWCGROUP: "cgroup",
}

# prctl(2) options.
PR_SET_PDEATHSIG = 1
PR_SET_KEEPCAPS = 8
PR_CAPBSET_DROP = 24
PR_SET_CHILD_SUBREAPER = 36
PR_SET_NO_NEW_PRIVS = 38
PR_SET_THP_DISABLE = 41
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_RAISE = 2
LINUX_CAPABILITY_VERSION_3 = 0x20080522

RB_POWER_OFF = 0x4321FEDC

# The new mount API (x86_64 numbers; Linux 5.2+): a mount tree as a file descriptor.
SYS_OPEN_TREE = 428
SYS_MOVE_MOUNT = 429
OPEN_TREE_CLONE = 1
OPEN_TREE_CLOEXEC = os.O_CLOEXEC
AT_FDCWD = -100
AT_RECURSIVE = 0x8000
MOVE_MOUNT_F_EMPTY_PATH = 0x4

_libc: ctypes.CDLL | None = None


def libc() -> ctypes.CDLL:
    """The C library (the interpreter's own symbols: find_library would run ldconfig)."""
    global _libc
    if _libc is None:
        import ctypes

        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc


def _fail(what: str | None) -> None:
    import ctypes

    err = ctypes.get_errno()
    raise OSError(err, os.strerror(err), what)


def _c(text: str | None) -> bytes | None:
    return os.fsencode(text) if text is not None else None


def mount(source: str | None, target: str, fstype: str | None, flags: int, data: str = "") -> None:
    """mount(2)."""
    import ctypes

    result = libc().mount(
        _c(source), _c(target), _c(fstype), ctypes.c_ulong(flags), _c(data) if data else None
    )
    if result != 0:
        _fail(target)


def umount(target: str, flags: int = 0) -> None:
    """umount2(2)."""
    import ctypes

    if libc().umount2(_c(target), ctypes.c_int(flags)) != 0:
        _fail(target)


def unshare(flags: int) -> None:
    """unshare(2)."""
    import ctypes

    if libc().unshare(ctypes.c_int(flags)) != 0:
        _fail("unshare")


def setns(fd: int, nstype: int) -> None:
    """setns(2) with a namespace file descriptor."""
    import ctypes

    if libc().setns(ctypes.c_int(fd), ctypes.c_int(nstype)) != 0:
        _fail(f"setns {NS_NAMES.get(nstype, hex(nstype))}")


def prctl(option: int, arg2: int = 0, arg3: int = 0) -> None:
    """prctl(2) with up to two arguments."""
    import ctypes

    zero = ctypes.c_ulong(0)
    if libc().prctl(ctypes.c_int(option), ctypes.c_ulong(arg2), ctypes.c_ulong(arg3), zero, zero):
        _fail("prctl")


def capset(effective: int, permitted: int, inheritable: int) -> None:
    """capset(2) for this thread with 64-bit sets (version 3: two 32-bit halves)."""
    import ctypes

    low, high = 0xFFFFFFFF, 32
    header = (ctypes.c_uint32 * 2)(LINUX_CAPABILITY_VERSION_3, 0)
    data = (ctypes.c_uint32 * 6)(
        effective & low,
        permitted & low,
        inheritable & low,
        effective >> high,
        permitted >> high,
        inheritable >> high,
    )
    if libc().capset(header, data) != 0:
        _fail("capset")


def power_off() -> None:
    """reboot(2) with RB_POWER_OFF."""
    import ctypes

    if libc().reboot(ctypes.c_int(RB_POWER_OFF)) != 0:
        _fail("reboot")


def open_tree(path: str, recursive: bool = True) -> int:
    """A detached copy of the mount tree at ``path``, as a close-on-exec descriptor: it can be
    sent to another process and attached (move_mount) in that process's mount namespace."""
    import ctypes

    flags = OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC | (AT_RECURSIVE if recursive else 0)
    fd = int(
        libc().syscall(
            ctypes.c_long(SYS_OPEN_TREE), ctypes.c_int(AT_FDCWD), _c(path), ctypes.c_uint(flags)
        )
    )
    if fd < 0:
        _fail(path)
    return fd


def move_mount(tree_fd: int, target: str) -> None:
    """Attach the detached tree ``tree_fd`` (from open_tree) at ``target``."""
    import ctypes

    result = libc().syscall(
        ctypes.c_long(SYS_MOVE_MOUNT),
        ctypes.c_int(tree_fd),
        b"",
        ctypes.c_int(AT_FDCWD),
        _c(target),
        ctypes.c_uint(MOVE_MOUNT_F_EMPTY_PATH),
    )
    if result != 0:
        _fail(target)


def malloc_trim() -> None:
    """Give free heap pages back to the kernel (glibc only; elsewhere a no-op)."""
    try:
        libc().malloc_trim(0)
    except AttributeError:
        pass
