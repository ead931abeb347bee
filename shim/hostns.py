"""Host-side namespaces and mounts of the monitor (ctypes: Python 3.11 has no os.mount/unshare).

The monitor lives in a private mount namespace: the container's shared directory and its bind
mounts exist only there, so they vanish with the monitor and can never leak onto the host.
"""

from __future__ import annotations

import os

from bonneville.spec.errors import BonnevilleError

TYPE_CHECKING = False
if TYPE_CHECKING:
    import ctypes

CLONE_NEWNS = 0x00020000
CLONE_NEWNET = 0x40000000

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19
# Mount options asking for host-to-container propagation (container-to-host cannot cross a VM).
PROPAGATING = frozenset({"rslave", "slave", "rshared", "shared"})

_FLAG_OPTIONS = {
    "ro": MS_RDONLY,
    "nosuid": MS_NOSUID,
    "nodev": MS_NODEV,
    "noexec": MS_NOEXEC,
}

_libc: ctypes.CDLL | None = None


def _lib() -> ctypes.CDLL:
    # ctypes is imported here, not at the top: most CLI commands never call libc (start-up
    # time), and the interpreter's own symbols include libc's (find_library would run ldconfig).
    global _libc
    if _libc is None:
        import ctypes

        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc


def _check(result: int, what: str) -> None:
    if result != 0:
        import ctypes

        err = ctypes.get_errno()
        raise BonnevilleError(f"{what}: {os.strerror(err)}")


def unshare(flags: int) -> None:
    _check(_lib().unshare(flags), "unshare")


def setns(path: str, nstype: int) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise BonnevilleError(f"cannot open namespace {path}: {exc.strerror}") from exc
    try:
        _check(_lib().setns(fd, nstype), f"setns {path}")
    finally:
        os.close(fd)


def mount(
    source: str, target: str, fstype: str | None, flags: int, data: str | None = None
) -> None:
    import ctypes

    result = _lib().mount(
        source.encode(),
        target.encode(),
        fstype.encode() if fstype else None,
        ctypes.c_ulong(flags),
        data.encode() if data else None,
    )
    _check(result, f"mount {source} on {target}")


def namespace_id(path: str) -> tuple[int, int]:
    """Identity of the namespace at ``path`` (two paths name the same one iff these match)."""
    st = os.stat(path)
    return (st.st_dev, st.st_ino)


def make_private_mount_namespace() -> None:
    """A mount namespace of our own, every mount a slave of the host's: nothing we mount
    reaches the host, while a host mount under a volume whose config asks for propagation
    (``rslave``, CRI's HOST_TO_CONTAINER) still reaches the container (shim/monitor/share.py)."""
    unshare(CLONE_NEWNS)
    mount("none", "/", None, MS_REC | MS_SLAVE)


def bind(source: str, target: str, recursive: bool, flags: int) -> None:
    """Bind ``source`` on ``target``, then apply ro/nosuid/nodev/noexec (needs a remount)."""
    mount(source, target, None, MS_BIND | (MS_REC if recursive else 0))
    if flags:
        mount("none", target, None, MS_BIND | MS_REMOUNT | flags)


def option_flags(options: tuple[str, ...] | list[str]) -> int:
    flags = 0
    for option in options:
        flags |= _FLAG_OPTIONS.get(option, 0)
    return flags
