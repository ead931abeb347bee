"""The host side of a pod's shared filesystem.

The VM has one 9p export, fixed at boot (templates need it; 9p devices cannot be hot-plugged):
``<root>/<owner>/share``, a small tmpfs in the owner monitor's private mount namespace with one
directory per container of the pod. Each holds that container's *tree*: ``root/``, its bundle's
rootfs, and ``binds/<n>/<name>``, bind mount ``n`` of its config under its source's name (the
agent binds each to its destination inside the guest, where a symlink in the rootfs can only
lead inside the container: no path inside the untrusted rootfs is resolved on the host), all
``nosuid,nodev`` (the root read-only for ``root.readonly``), so nothing a guest writes there is
a device or setuid file on the host. The owner builds its own container's tree in place; a
member builds its tree in its own mount namespace, where containerd mounted its rootfs, and
hands it over as a detached mount (an ``open_tree`` descriptor) that the owner attaches, even
to a VM running for minutes (the guest sees it at once). Everything lives only in the
monitors' namespaces: it vanishes with them.
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
# A container's tree: its rootfs, and each bind mount of its config by its index.
ROOT = "root"
BINDS = "binds"


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


def bind_name(index: int, source: str) -> str:
    """Where bind mount ``index`` of the config sits in a container's tree: under a directory
    named as its source is (what the guest's mountinfo then shows as the mount's root, as
    runc's containers show it)."""
    name = os.path.basename(os.path.normpath(source)) or "volume"
    return f"{BINDS}/{index}/{name}"


def build_tree(target: str, bundle: Bundle) -> None:
    """Make ``target`` (an empty directory on a tmpfs of ours) the container's tree (see the
    module's docstring): ``root/`` and ``binds/<n>/<name>``."""
    spec = bundle.spec
    root = os.path.join(target, ROOT)
    os.mkdir(root, 0o755)
    hostns.bind(bundle.rootfs, root, recursive=True, flags=0)
    hostns.mount("none", root, None, hostns.MS_REC | hostns.MS_PRIVATE)
    # Device nodes or setuid files a guest creates must be inert on the host. (A read-only
    # root stays writable until the guest made its mount points in it: seal_root.)
    flags = hostns.MS_NOSUID | hostns.MS_NODEV
    hostns.mount("none", root, None, hostns.MS_BIND | hostns.MS_REMOUNT | flags)
    for index, m in enumerate(spec.mounts):
        if ".." in m.destination.split("/"):
            raise ShareError(f"mount destination {m.destination!r} must not contain '..'")
        if not m.is_bind:
            continue
        source = m.source if os.path.isabs(m.source) else os.path.join(bundle.path, m.source)
        if not os.path.exists(source):
            raise ShareError(f"mount source {m.source} for {m.destination} does not exist")
        mountpoint = os.path.join(target, bind_name(index, m.source))
        os.makedirs(os.path.dirname(mountpoint), 0o755, exist_ok=True)
        if os.path.isdir(source):
            os.mkdir(mountpoint, 0o755)
        else:
            os.close(os.open(mountpoint, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644))
        hostns.bind(
            source, mountpoint, "rbind" in m.options, hostns.option_flags(m.options) | flags
        )
        # runc's default is rprivate; a propagating volume stays a slave of the host's
        # mount, so what the host mounts under it later shows in the guest over 9p.
        propagation = hostns.MS_SLAVE if hostns.PROPAGATING & set(m.options) else hostns.MS_PRIVATE
        hostns.mount("none", mountpoint, None, hostns.MS_REC | propagation)


def seal_root(export: str, container_id: str) -> None:
    """Make a read-only root read-only on the host side too, once the guest built the
    container (runc also makes mount points in a read-only root before remounting it)."""
    root = os.path.join(container_dir(export, container_id), ROOT)
    flags = hostns.MS_NOSUID | hostns.MS_NODEV | hostns.MS_RDONLY
    hostns.mount("none", root, None, hostns.MS_BIND | hostns.MS_REMOUNT | flags)


def detached_tree(target: str, bundle: Bundle) -> int:
    """Build the container's tree at ``target`` and return it as a detached mount (a
    close-on-exec descriptor) for the pod's owner to attach."""
    os.mkdir(target, 0o700)
    hostns.mount(
        "bonneville-tree",
        target,
        "tmpfs",
        hostns.MS_NOSUID | hostns.MS_NODEV | hostns.MS_NOEXEC,
        EXPORT_OPTIONS,
    )
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
