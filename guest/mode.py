"""Everything that differs between the agent as PID 1 of a VM and in host mode (the fake
backend and the tests run it as an ordinary root process on the host). Standard library only:
this module goes into the guest image."""

from __future__ import annotations

import fcntl
import os
import signal
import socket
import stat
import struct
import time

from bonneville.guest import linux, protocol, syscallfilter
from bonneville.guest.channel import CHANNEL_ARG, ROOT_ARG, TOKEN_ARG
from bonneville.guest.common import Log, Refused, errtext, write_file
from bonneville.guest.netconfig import guest_nics, set_ipv6
from bonneville.guest.netlink import Netlink
from bonneville.guest.proc import descendants
from bonneville.guest.rootdisk import LABEL

# Where the pod's share (the 9p export: a directory per container, docs/protocol.md) is
# mounted in the VM; with bonneville.root=disk (vSphere) the one container's root disk is.
SHARE_MOUNT = "/run/bonneville/share"
# A directory of the initramfs (never of a tmpfs: see mounts.enter_root) where each container's
# root is mounted inside the container's own mount namespace before it becomes its "/".
ROOT_MOUNTPOINT = "/.container"
NINEP_OPTIONS = "trans=virtio,version=9p2000.L,msize=512000,cache=mmap,access=client"
# The guest's cgroup v2 hierarchy: each container's cgroup is CGROUP_PREFIX + its id.
CGROUP_ROOT = "/sys/fs/cgroup"
CGROUP_CONTROLLERS = ("cpu", "memory", "pids")
CGROUP_PREFIX = "ctr-"
RNDADDENTROPY = 0x40085203


class Mode:
    """PID 1 in a VM, or host mode (fake backend, tests)."""

    def __init__(
        self,
        pid1: bool,
        channel_fd: int | None,
        root: str | None,
        options: dict[str, str] | None = None,
    ) -> None:
        self.pid1 = pid1
        self.channel_fd = channel_fd
        options = options or {}
        # A UART (e.g. "ttyS1") carrying the channel instead of the virtio port; its token.
        self.serial = options.get(CHANNEL_ARG, "") if channel_fd is None else ""
        self.token = options.get(TOKEN_ARG, "")
        self.root_disk = options.get(ROOT_ARG) == "disk" and root is None
        self.root_device = ""  # that disk, once the channel found it (fork.await_root_disk)
        # Host mode: the share is the given directory; in a VM it is the 9p export (or disk).
        self.share = root if root is not None else SHARE_MOUNT
        self.mount_share = root is None
        self.share_mounted = not self.mount_share
        # The clock, sysctls and the entropy count belong to the whole kernel: never a host's.
        self.guest_wide = pid1
        # A virtio port outlives host disconnects (snapshot/restore); a socket's EOF is final.
        # (A UART does not see its host go: it never reads EOF, so there is nothing to redo.)
        self.reconnects = channel_fd is None and not self.serial
        # Cgroups are the VM's own; a host's are never ours to change (PID 1 of a pid namespace
        # on a host, as in tests, is not in a VM: it was given a root).
        self.cgroups = pid1 and root is None

    def start(self, log: Log) -> None:
        """In a VM: what every container needs, done before the agent reports ready (so a
        template has it done for all its clones). Host mode: private mount/UTS/IPC namespaces
        so nothing we mount or set leaks, and subreaping so the containers' orphans come to us
        as they would to PID 1."""
        if not self.pid1:
            linux.unshare(linux.CLONE_NEWNS | linux.CLONE_NEWUTS | linux.CLONE_NEWIPC)
            linux.mount(None, "/", None, linux.MS_REC | linux.MS_PRIVATE)
            linux.prctl(linux.PR_SET_CHILD_SUBREAPER, 1)
            return
        try:
            # The initramfs is read-only from now on: a container process that escapes its
            # root (chroot is all that holds it, see mounts.enter_root) can change nothing.
            linux.mount(None, "/", None, linux.MS_REMOUNT | linux.MS_RDONLY)
        except OSError as exc:
            log("warning", f"cannot make the initramfs read-only: {errtext(exc)}")
        syscallfilter.preload()
        if not self.cgroups:
            return
        try:
            self.prepare_cgroups()
            with Netlink() as nl:
                nl.set_link(socket.if_nametoindex("lo"))
                # The NICs too (opening one fills its queues: kernel work that TCG would
                # translate afresh in every clone), but without IPv6 until the network is
                # configured with the container's MAC: clones must not share a link-local
                # address derived from their template's.
                for name in guest_nics().values():
                    set_ipv6(name, False)
                    nl.set_link(socket.if_nametoindex(name))
        except OSError as exc:
            log("warning", f"early setup: {errtext(exc)} (retried at create)")

    def prepare_cgroups(self) -> None:
        """The cgroup v2 hierarchy, with the controllers containers' limits need."""
        if not self.cgroups or os.path.exists(f"{CGROUP_ROOT}/cgroup.controllers"):
            return
        linux.mount(
            "cgroup2",
            CGROUP_ROOT,
            "cgroup2",
            linux.MS_NOSUID | linux.MS_NODEV | linux.MS_NOEXEC,
        )
        write_file(
            f"{CGROUP_ROOT}/cgroup.subtree_control",
            " ".join(f"+{name}" for name in CGROUP_CONTROLLERS),
        )

    def cgroup_of(self, container_id: str) -> str | None:
        """The cgroup of a container, or None where cgroups are not ours (host mode)."""
        return f"{CGROUP_ROOT}/{CGROUP_PREFIX}{container_id}" if self.cgroups else None

    def ensure_share(self) -> None:
        """Mount the pod's share (the 9p export, or vSphere's root disk) once, at first use: a
        template is saved before any container exists and each clone exports its own."""
        if self.share_mounted:
            return
        os.makedirs(self.share, 0o755, exist_ok=True)
        if self.root_disk:
            if not self.root_device:
                raise Refused(f"no disk labelled {LABEL} (the root of this VM's container)")
            linux.mount(self.root_device, self.share, "ext4", 0)
        else:
            linux.mount(protocol.ROOT_TAG, self.share, "9p", 0, NINEP_OPTIONS)
        self.share_mounted = True

    def container_dir(self, container_id: str) -> str:
        """Where a container's tree is in the share: ``root/`` and ``binds/<n>/<name>``."""
        if self.root_disk:
            return self.share  # the disk holds the one container's tree
        return os.path.join(self.share, container_id)

    def root_mountpoint(self, container_id: str) -> str:
        """Where a container's root is mounted in its own namespace before it becomes "/"."""
        if self.pid1:
            return ROOT_MOUNTPOINT
        path = os.path.join(self.share, ".roots", container_id)
        os.makedirs(path, 0o755, exist_ok=True)
        return path

    def kill_everything(self, sig: int) -> None:
        """Signal every process but the agent (shutdown)."""
        if self.pid1:
            try:
                os.kill(-1, sig)  # from PID 1: every process but itself
            except ProcessLookupError:
                pass
            return
        # A host has other processes: signal our descendants only, again for fresh forks.
        seen: set[int] = set()
        for _ in range(3):
            fresh = [p for p in descendants(os.getpid()) if p not in seen]
            if not fresh:
                break
            for pid in fresh:
                seen.add(pid)
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            if sig != signal.SIGKILL:
                break

    def set_clock(self, when: float) -> None:
        """The guest's clock (a clone wakes with its template's time)."""
        if self.guest_wide:
            time.clock_settime(time.CLOCK_REALTIME, when)

    def add_entropy(self, data: bytes) -> None:
        """Mix host randomness into the pool; in a VM credit it so early readers do not block."""
        fd = os.open("/dev/urandom", os.O_WRONLY)
        try:
            if self.guest_wide:
                request = struct.pack("ii", len(data) * 8, len(data)) + data
                try:
                    fcntl.ioctl(fd, RNDADDENTROPY, request)
                    return
                except OSError:
                    pass  # not permitted or unsupported: a plain write still mixes it in
            os.write(fd, data)
        finally:
            os.close(fd)

    def set_limits(self, cgroup: str | None, files: dict[str, object]) -> None:
        """Write cgroup limits (names checked against the protocol's list)."""
        if cgroup is None:
            raise Refused("resource limits are enforced only inside a VM (host mode)")
        for name, value in files.items():
            if name not in protocol.CGROUP_LIMIT_FILES:
                raise Refused(f"not a cgroup limit the agent writes: {name!r}")
            path = f"{cgroup}/{name}"
            if name == "memory.swap.max" and not os.path.exists(path):
                continue  # no swap accounting in this kernel: the VM has no swap to limit
            try:
                write_file(path, str(value))
            except OSError as exc:
                raise Refused(f"set {name} to {value}: {errtext(exc)}") from exc

    def power_off(self) -> None:
        """Sync and power the VM off; in host mode the caller just exits."""
        os.sync()
        if self.pid1:
            linux.power_off()

    def open_log(self) -> int:
        """Where diagnostic lines go: stderr (under /init, the console); as PID 1 without a
        real stderr, /dev/console."""
        try:
            null = os.stat("/dev/null").st_rdev
            useless = stat.S_ISCHR(os.fstat(2).st_mode) and os.fstat(2).st_rdev == null
        except OSError:
            useless = True
        if self.pid1 and useless:
            try:
                return os.open("/dev/console", os.O_WRONLY | os.O_NOCTTY)
            except OSError:
                pass
        return 2
