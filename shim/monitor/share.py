"""The host side of a pod's shared filesystem.

The VM has one 9p export, fixed at boot (templates need it; 9p devices cannot be hot-plugged):
``<root>/<owner>/share``, a small tmpfs in the owner monitor's private mount namespace with one
directory per container of the pod. Each holds that container's *tree*: its bundle's rootfs
with every bind mount of its config placed beneath (destinations resolved inside the rootfs,
never through a symlink out of it), remounted ``nosuid,nodev`` (and read-only for
``root.readonly``), so nothing a guest writes there is a device or setuid file on the host. The
owner builds its own container's tree in place; a member builds its tree in its own mount
namespace, where containerd mounted its rootfs, and hands it over as a detached mount (an
``open_tree`` descriptor) that the owner attaches, even to a VM running for minutes (the guest
sees it at once). Everything lives only in the monitors' namespaces: it vanishes with them.
"""

from __future__ import annotations

import contextlib
import os

from bonneville.guest import linux
from bonneville.shim import hostns
from bonneville.spec.errors import BonnevilleError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from bonneville.spec.config import Bundle

# The export holds only mount points: a guest that writes there fills 1 MiB at most.
EXPORT_OPTIONS = "size=1m,mode=0755"


class ShareError(BonnevilleError):
    pass


def make_export(path: str) -> None:
    """The pod's export: an empty directory on a small tmpfs of its own."""
    os.mkdir(path, 0o755)
    hostns.mount(
        "bonneville-share",
        path,
        "tmpfs",
        hostns.MS_NOSUID | hostns.MS_NODEV | hostns.MS_NOEXEC,
        EXPORT_OPTIONS,
    )


def build_tree(target: str, bundle: Bundle) -> None:
    """Make ``target`` (an existing directory) the container's tree (see the module's
    docstring)."""
    spec = bundle.spec
    hostns.bind(bundle.rootfs, target, recursive=True, flags=0)
    hostns.mount("none", target, None, hostns.MS_REC | hostns.MS_PRIVATE)
    for m in spec.mounts:
        is_dir = True
        source = ""
        if m.is_bind:
            source = m.source if os.path.isabs(m.source) else os.path.join(bundle.path, m.source)
            if not os.path.exists(source):
                raise ShareError(f"mount source {m.source} for {m.destination} does not exist")
            is_dir = os.path.isdir(source)
        mountpoint = hostns.make_mountpoint(target, m.destination, is_dir)
        if m.is_bind:
            flags = hostns.option_flags(m.options)
            hostns.bind(source, mountpoint, "rbind" in m.options, flags | hostns.MS_NOSUID)
            # runc's default is rprivate; a propagating volume stays a slave of the host's
            # mount, so what the host mounts under it later shows in the guest over 9p.
            propagation = (
                hostns.MS_SLAVE if hostns.PROPAGATING & set(m.options) else (hostns.MS_PRIVATE)
            )
            hostns.mount("none", mountpoint, None, hostns.MS_REC | propagation)
    # Device nodes or setuid files a guest creates must be inert on the host.
    flags = hostns.MS_NOSUID | hostns.MS_NODEV
    if spec.root.readonly:
        flags |= hostns.MS_RDONLY
    hostns.mount("none", target, None, hostns.MS_BIND | hostns.MS_REMOUNT | flags)


def detached_tree(target: str, bundle: Bundle) -> int:
    """Build the container's tree at ``target`` and return it as a detached mount (a
    close-on-exec descriptor) for the pod's owner to attach."""
    os.mkdir(target, 0o700)
    build_tree(target, bundle)
    try:
        return linux.open_tree(target, recursive=True)
    except OSError as exc:
        raise ShareError(f"cannot hand the container's root over: {exc.strerror}") from exc


def container_dir(export: str, container_id: str) -> str:
    return os.path.join(export, container_id)


def attach(export: str, container_id: str, tree_fd: int) -> None:
    """Attach a member's tree (from detached_tree) as its directory of the export."""
    path = container_dir(export, container_id)
    os.mkdir(path, 0o755)
    try:
        linux.move_mount(tree_fd, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.rmdir(path)
        raise ShareError(f"cannot attach the container's root: {exc.strerror}") from exc


def detach(export: str, container_id: str) -> None:
    """Take a container's tree out of the export (after the guest let go of it)."""
    path = container_dir(export, container_id)
    with contextlib.suppress(OSError):
        linux.umount(path, linux.MNT_DETACH)
    with contextlib.suppress(OSError):
        os.rmdir(path)
