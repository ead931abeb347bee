"""The guest agent: PID 1 in each container VM, serving the host over one framed channel.

It mounts the shared root, builds the container's filesystem (mounts, devices, masked and
read-only paths), starts, relays and reaps processes (docs/protocol.md). It imports only
standard-library modules, all at the top: the image builder packs what importing this module
loads. ``--fd N --root DIR`` runs it as an ordinary host process ("host mode") for the fake
backend and the tests; every difference between the two modes lives in ``Mode``.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import errno
import fcntl
import os
import resource
import select
import signal
import socket
import stat
import struct
import sys
import termios
import time
from collections import deque
from collections.abc import Callable

from bonneville.guest import protocol
from bonneville.guest.netlink import Netlink
from bonneville.guest.paths import resolve_in_root
from bonneville.guest.proc import descendants

# For the type checker only: importing typing costs a cold boot ~0.1 s under TCG.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

CONTAINER_ROOT = "/run/container/root"
# The guest's cgroup v2 hierarchy and the container's cgroup in it (limits, update, stats).
CGROUP_ROOT = "/sys/fs/cgroup"
CGROUP_CONTROLLERS = ("cpu", "memory", "pids")
# Kernel arguments that switch the agent to the vSphere-style channel and root (see
# backends/vsphere/transport.py): bonneville.channel=ttyS1 (a UART instead of the virtio port),
# bonneville.root=disk (the container root is the ext4 disk labelled ROOT_DISK_LABEL, not 9p),
# bonneville.token=T (the channel preamble's token; default: that disk's ext4 UUID).
CHANNEL_ARG = "bonneville.channel"
ROOT_ARG = "bonneville.root"
TOKEN_ARG = "bonneville.token"
ROOT_DISK_LABEL = "bonneville-root"
SERIAL_PREAMBLE = b"BONNEVILLE-AGENT "
EXT4_SUPER_OFFSET = 1024
EXT4_MAGIC = 0xEF53
NINEP_OPTIONS = "trans=virtio,version=9p2000.L,msize=512000,cache=mmap,access=client"

CHUNK = 64 * 1024  # one read from a child's pipe or pty
BACKPRESSURE = 1 << 20  # stop reading children while this much waits to go to the host
DRAIN_LIMIT = 8 << 20  # what a dead process's background writers may still add to its streams
RECONNECT_POLL_MS = 200  # how often a disconnected port is probed (it polls as always readable)
MAX_FD = 1 << 20  # closerange's end in a new child (close_range(2) makes it cheap)

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
MS_REC = 0x4000
MS_SILENT = 0x8000
MS_UNBINDABLE = 0x20000
MS_PRIVATE = 0x40000
MS_SLAVE = 0x80000
MS_SHARED = 0x100000
MS_RELATIME = 0x200000
MS_STRICTATIME = 0x1000000
MS_LAZYTIME = 0x2000000
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
IGNORED_OPTIONS = frozenset({"tmpcopyup"})  # runc extensions that are not kernel options

CLONE_NEWNS = 0x20000
CLONE_NEWUTS = 0x4000000
CLONE_NEWIPC = 0x8000000
CLONE_NEWCGROUP = 0x2000000

PR_SET_KEEPCAPS = 8
PR_CAPBSET_DROP = 24
PR_SET_CHILD_SUBREAPER = 36
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_RAISE = 2
LINUX_CAPABILITY_VERSION_3 = 0x20080522

RB_POWER_OFF = 0x4321FEDC
TIOCSPTLCK = 0x40045431
TIOCGPTPEER = 0x5441
RNDADDENTROPY = 0x40085203

CAP_NUMBERS = {name: number for number, name in enumerate(protocol.CAPABILITIES)}

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

_libc = ctypes.CDLL(None, use_errno=True)


Log = Callable[[str, str], None]


class Refused(Exception):
    """A request that cannot be done; its message is the reply's one-line error."""


class ExecError(Exception):
    """Why a process could not be started, worded as runc words it."""


# --- small system helpers -------------------------------------------------------------------


def errtext(exc: OSError) -> str:
    """An errno's text as Go (and so runc) prints it: "no such file or directory"."""
    if exc.errno:
        text = os.strerror(exc.errno)
        return text[:1].lower() + text[1:]
    return str(exc)


def one_line(text: str) -> str:
    """Replies and log lines are single lines."""
    return " ".join(text.split())


def describe(exc: BaseException) -> str:
    """An exception as one line with where it was raised (no traceback module in the guest)."""
    where = []
    tb = exc.__traceback__
    while tb is not None:
        where.append(f"{os.path.basename(tb.tb_frame.f_code.co_filename)}:{tb.tb_lineno}")
        tb = tb.tb_next
    return one_line(f"{type(exc).__name__}: {exc} (at {' > '.join(where[-4:])})")


def _raise_errno(what: str | None) -> None:
    err = ctypes.get_errno()
    raise OSError(err, os.strerror(err), what)


def _c(text: str | None) -> bytes | None:
    return os.fsencode(text) if text is not None else None


def mount(source: str | None, target: str, fstype: str | None, flags: int, data: str = "") -> None:
    """mount(2)."""
    result = _libc.mount(
        _c(source), _c(target), _c(fstype), ctypes.c_ulong(flags), _c(data) if data else None
    )
    if result != 0:
        _raise_errno(target)


def prctl(option: int, arg2: int = 0, arg3: int = 0) -> None:
    """prctl(2) with up to two arguments."""
    zero = ctypes.c_ulong(0)
    if _libc.prctl(ctypes.c_int(option), ctypes.c_ulong(arg2), ctypes.c_ulong(arg3), zero, zero):
        _raise_errno(None)


def unshare(flags: int) -> None:
    """unshare(2)."""
    if _libc.unshare(ctypes.c_int(flags)) != 0:
        _raise_errno(None)


def capset(effective: int, permitted: int, inheritable: int) -> None:
    """capset(2) for this thread with 64-bit sets (version 3: two 32-bit halves)."""
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
    if _libc.capset(header, data) != 0:
        _raise_errno(None)


def set_nonblocking(fd: int) -> None:
    """O_NONBLOCK on ``fd``: the loop never blocks on a child or the host."""
    os.set_blocking(fd, False)


def write_file(path: str, text: str) -> None:
    """Write ``text`` to an existing file (procfs knobs)."""
    with open(path, "w") as f:
        f.write(text)


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


# --- the two modes --------------------------------------------------------------------------


class Mode:
    """Everything that differs between PID 1 in a VM and host mode (fake backend, tests)."""

    def __init__(
        self,
        pid1: bool,
        channel_fd: int | None,
        root: str | None,
        options: dict[str, str] | None = None,
    ) -> None:
        self.pid1 = pid1
        self.channel_fd = channel_fd
        self.root = root if root is not None else CONTAINER_ROOT
        options = options or {}
        # A UART (e.g. "ttyS1") carrying the channel instead of the virtio port; its token.
        self.serial = options.get(CHANNEL_ARG, "") if channel_fd is None else ""
        self.token = options.get(TOKEN_ARG, "")
        self.root_disk = options.get(ROOT_ARG) == "disk" and root is None
        # Host mode: the share is the given directory; in a VM it is the 9p export.
        self.mount_share = root is None
        # The clock, sysctls and the entropy count belong to the whole kernel: never a host's.
        self.guest_wide = pid1
        # A virtio port outlives host disconnects (snapshot/restore); a socket's EOF is final.
        # (A UART does not see its host go: it never reads EOF, so there is nothing to redo.)
        self.reconnects = channel_fd is None and not self.serial
        # The container's cgroup inside the VM; a host's cgroups are never ours to change (PID 1
        # of a pid namespace on a host, as in tests, is not in a VM: it was given a root).
        self.cgroup: str | None = f"{CGROUP_ROOT}/container" if pid1 and root is None else None

    def start(self, log: Log) -> None:
        """In a VM: what every container needs, done before the agent reports ready (so a
        template has it done for all its clones). Host mode: private mount/UTS/IPC namespaces
        so nothing we mount or set leaks, and subreaping so the container's orphans come to us
        as they would to PID 1."""
        if self.pid1:
            if self.cgroup is not None:
                try:
                    self.prepare_cgroup()
                    with Netlink() as nl:
                        nl.set_link(socket.if_nametoindex("lo"))
                        # The NICs too (opening one fills its queues: kernel work that TCG
                        # would translate afresh in every clone), but without IPv6 until
                        # setup has given them the container's MAC: clones must not share
                        # a link-local address derived from their template's.
                        for name in _guest_nics().values():
                            _set_ipv6(name, False)
                            nl.set_link(socket.if_nametoindex(name))
                except OSError as exc:
                    log("warning", f"early setup: {errtext(exc)} (retried at setup)")
            return
        unshare(CLONE_NEWNS | CLONE_NEWUTS | CLONE_NEWIPC)
        mount(None, "/", None, MS_REC | MS_PRIVATE)
        prctl(PR_SET_CHILD_SUBREAPER, 1)

    def prepare_root(self) -> None:
        """Make the container root a mount point of its own, writable until setup ends."""
        if self.root_disk:
            os.makedirs(self.root, 0o755, exist_ok=True)
            device, _ = find_root_disk()
            mount(device, self.root, "ext4", 0)
        elif self.mount_share:
            os.makedirs(self.root, 0o755, exist_ok=True)
            mount(protocol.ROOT_TAG, self.root, "9p", 0, NINEP_OPTIONS)
        else:
            # A bind onto itself, so the root can be remounted read-only like the 9p mount.
            mount(self.root, self.root, None, MS_BIND | MS_REC)

    def prepare_cgroup(self) -> None:
        """The container's cgroup, with the controllers its limits need."""
        if self.cgroup is None or os.path.isdir(self.cgroup):
            return
        if not os.path.exists(f"{CGROUP_ROOT}/cgroup.controllers"):
            mount("cgroup2", CGROUP_ROOT, "cgroup2", MS_NOSUID | MS_NODEV | MS_NOEXEC)
        write_file(
            f"{CGROUP_ROOT}/cgroup.subtree_control",
            " ".join(f"+{name}" for name in CGROUP_CONTROLLERS),
        )
        os.mkdir(self.cgroup, 0o755)

    def set_limits(self, files: dict[str, Any]) -> None:
        """Write the container's cgroup limits (names checked against the protocol's list)."""
        if self.cgroup is None:
            raise Refused("resource limits are enforced only inside a VM (host mode)")
        for name, value in files.items():
            if name not in protocol.CGROUP_LIMIT_FILES:
                raise Refused(f"not a cgroup limit the agent writes: {name!r}")
            path = f"{self.cgroup}/{name}"
            if name == "memory.swap.max" and not os.path.exists(path):
                continue  # no swap accounting in this kernel: the VM has no swap to limit
            try:
                write_file(path, str(value))
            except OSError as exc:
                raise Refused(f"set {name} to {value}: {errtext(exc)}") from exc

    def container_pids(self) -> list[int]:
        """The container's processes: everything below the agent (PID 1 or the subreaper)."""
        return descendants(os.getpid())

    def kill_container(self, sig: int) -> None:
        """Signal every container process."""
        if self.pid1:
            try:
                os.kill(-1, sig)  # from PID 1: every process but itself, as at pid-ns end
            except ProcessLookupError:
                pass
            return
        # A host has other processes: signal our descendants only, again for fresh forks.
        seen: set[int] = set()
        for _ in range(3):
            fresh = [p for p in self.container_pids() if p not in seen]
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

    def power_off(self) -> None:
        """Sync and power the VM off; in host mode the caller just exits."""
        os.sync()
        if self.pid1 and _libc.reboot(ctypes.c_int(RB_POWER_OFF)) != 0:
            _raise_errno("reboot")

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


# --- the channel to the host ----------------------------------------------------------------


def find_port() -> str | None:
    """The device of the virtio-serial port named protocol.PORT_NAME, created if missing."""
    base = "/sys/class/virtio-ports"
    try:
        names = sorted(os.listdir(base))
    except FileNotFoundError:
        return None
    for name in names:
        try:
            with open(f"{base}/{name}/name") as f:
                if f.read().strip() != protocol.PORT_NAME:
                    continue
            device = f"/dev/{name}"
            if not os.path.exists(device):
                # No udev in the guest: make the node from sysfs's major:minor.
                with open(f"{base}/{name}/dev") as f:
                    major, minor = (int(x) for x in f.read().strip().split(":"))
                os.mknod(device, stat.S_IFCHR | 0o600, os.makedev(major, minor))
            return device
        except OSError:
            continue
    return None


def kernel_options(cmdline: str) -> dict[str, str]:
    """The ``bonneville.*=value`` kernel arguments."""
    options: dict[str, str] = {}
    for word in cmdline.split():
        key, sep, value = word.partition("=")
        if sep and key.startswith("bonneville."):
            options[key] = value
    return options


def ext4_identity(head: bytes) -> tuple[str, str] | None:
    """(label, UUID) of an ext4 superblock at the start of a device, or None."""
    sb = head[EXT4_SUPER_OFFSET : EXT4_SUPER_OFFSET + 136]
    if len(sb) < 136 or struct.unpack_from("<H", sb, 56)[0] != EXT4_MAGIC:
        return None
    raw = sb[104:120].hex()
    uuid = f"{raw[:8]}-{raw[8:12]}-{raw[12:16]}-{raw[16:20]}-{raw[20:]}"
    return sb[120:136].split(b"\0", 1)[0].decode(errors="replace"), uuid


def find_root_disk(timeout: float = 30.0) -> tuple[str, str]:
    """(device, UUID) of the ext4 disk labelled ROOT_DISK_LABEL, waiting for it to appear
    (SCSI and virtio disks are probed asynchronously after their modules load)."""
    deadline = time.monotonic() + timeout
    while True:
        for name in sorted(os.listdir("/sys/class/block")):
            device = f"/dev/{name}"
            try:
                with open(device, "rb") as f:
                    identity = ext4_identity(f.read(4096))
            except OSError:
                continue
            if identity is not None and identity[0] == ROOT_DISK_LABEL:
                return device, identity[1]
        if time.monotonic() > deadline:
            raise OSError(errno.ENODEV, f"no ext4 disk labelled {ROOT_DISK_LABEL}")
        time.sleep(0.05)


def open_serial(name: str) -> int:
    """The UART ``name`` in raw mode: 8-bit clean, no echo, no line discipline, no flow control."""
    fd = os.open(f"/dev/{name}", os.O_RDWR | os.O_NOCTTY)
    attrs = termios.tcgetattr(fd)
    attrs[0] = 0  # iflag: no ICRNL, IXON, ISTRIP, parity checks
    attrs[1] = 0  # oflag: no OPOST (no NL -> CRNL)
    attrs[2] = termios.CS8 | termios.CREAD | termios.CLOCAL  # 8N1, ignore modem lines
    attrs[3] = 0  # lflag: no ECHO, ICANON, ISIG, IEXTEN
    attrs[4] = attrs[5] = termios.B115200
    attrs[6][termios.VMIN] = 1
    attrs[6][termios.VTIME] = 0
    termios.tcsetattr(fd, termios.TCSANOW, attrs)
    termios.tcflush(fd, termios.TCIOFLUSH)
    return fd


class Channel:
    """The byte stream to the host, with a bounded queue of frames not yet written."""

    def __init__(self, mode: Mode) -> None:
        self.mode = mode
        self.fd = -1
        self.connected = False
        self.closed = False  # a socket whose peer went away: never comes back
        self.decoder = protocol.Decoder()
        self.queue: deque[memoryview] = deque()
        self.queued = 0

    def open(self, log: Log) -> None:
        """Open the virtio port (waiting for it to appear) or adopt the given socket."""
        if self.mode.channel_fd is not None:
            self.fd = self.mode.channel_fd
            os.set_inheritable(self.fd, False)
            self.connected = True
        elif self.mode.serial:
            # The host end is a TCP listener that takes this line as proof of who we are
            # (backends/vsphere/transport.py); frames follow, exactly as over virtio.
            token = self.mode.token or (find_root_disk()[1] if self.mode.root_disk else "")
            self.fd = open_serial(self.mode.serial)
            os.write(self.fd, SERIAL_PREAMBLE + token.encode() + b"\n")
            self.connected = True
        else:
            deadline = time.monotonic() + 5
            warned = False
            while (device := find_port()) is None:
                # No udev to wait on: the port shows up in sysfs when virtio_console probes it.
                if not warned and time.monotonic() > deadline:
                    log("warning", f"still waiting for virtio port {protocol.PORT_NAME}")
                    warned = True
                time.sleep(0.05)
            self.fd = os.open(device, os.O_RDWR | os.O_NOCTTY)
            self.connected = False  # probed on the first loop turn
        set_nonblocking(self.fd)
        self.decoder = protocol.Decoder()

    def reopen(self, log: Log) -> None:
        """Drop the current stream state and start over on a fresh descriptor."""
        if self.mode.reconnects:
            try:
                os.close(self.fd)
            except OSError:
                pass
            self.open(log)
        else:
            self.closed = True

    def receive(self) -> list[tuple[int, int, bytes]]:
        """Frames now readable. EOF/EIO on a port means "no host yet" (after a restore)."""
        try:
            data = os.read(self.fd, CHUNK)
        except BlockingIOError:
            self.connected = True
            return []
        except OSError as exc:
            if exc.errno not in (errno.EIO, errno.ECONNRESET, errno.EPIPE, errno.ENODEV):
                raise
            data = b""
        if not data:
            self._lost()
            return []
        self.connected = True
        return self.decoder.feed(data)

    def _lost(self) -> None:
        if self.connected or not self.mode.reconnects:
            self.decoder = protocol.Decoder()  # a half frame from the old host is garbage
        self.connected = False
        if not self.mode.reconnects:
            self.closed = True

    def send(self, frame: bytes) -> None:
        """Queue a frame and write what the host takes now."""
        self.queue.append(memoryview(frame))
        self.queued += len(frame)
        self.flush()

    def flush(self) -> None:
        """Write queued frames until the host stops taking them."""
        while self.queue and not self.closed:
            head = self.queue[0]
            try:
                written = os.write(self.fd, head)
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno not in (errno.EIO, errno.ECONNRESET, errno.EPIPE, errno.ENODEV):
                    raise
                self._lost()
                return
            self.queued -= written
            if written == len(head):
                self.queue.popleft()
            else:
                self.queue[0] = head[written:]

    def flush_blocking(self, timeout: float) -> None:
        """Write everything queued, waiting up to ``timeout`` for the host to take it."""
        deadline = time.monotonic() + timeout
        while self.queue and not self.closed:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            poller = select.poll()
            poller.register(self.fd, select.POLLOUT)
            poller.poll(int(remaining * 1000) + 1)
            self.flush()


# --- processes ------------------------------------------------------------------------------


class ExecSpec:
    """An OCI ``process`` object, checked in the agent before the fork."""

    def __init__(self, process: dict[str, Any], want_stdin: bool, cap_last: int) -> None:
        args = process.get("args")
        if not isinstance(args, list) or not args or not all(isinstance(a, str) for a in args):
            raise Refused("process.args must be a non-empty list of strings")
        self.args: list[str] = args
        self.env: dict[str, str] = {}
        for entry in process.get("env") or []:
            key, sep, value = str(entry).partition("=")
            if sep and key:
                self.env[key] = value
        self.cwd = str(process.get("cwd") or "/")
        self.terminal = bool(process.get("terminal"))
        self.want_stdin = want_stdin
        size = process.get("consoleSize") or {}
        self.rows = int(size.get("height") or 0)
        self.cols = int(size.get("width") or 0)
        user = process.get("user") or {}
        self.uid = int(user.get("uid") or 0)
        self.gid = int(user.get("gid") or 0)
        self.groups = [int(g) for g in user.get("additionalGids") or []]
        umask = user.get("umask")
        self.umask = 0o022 if umask is None else int(umask)
        self.rlimits: list[tuple[int, int, int, str]] = []
        for rlimit in process.get("rlimits") or []:
            name = str(rlimit.get("type"))
            number = getattr(resource, name, None)
            if not name.startswith("RLIMIT_") or not isinstance(number, int):
                raise Refused(f"unknown rlimit type {name!r}")
            self.rlimits.append(
                (number, self._limit(rlimit.get("soft")), self._limit(rlimit.get("hard")), name)
            )
        oom = process.get("oomScoreAdj")
        self.oom_score_adj = None if oom is None else int(oom)
        self.no_new_privileges = bool(process.get("noNewPrivileges"))
        caps = process.get("capabilities")
        # runc: no capabilities object means the process keeps what it has (all, as root).
        self.caps: dict[str, int] | None = None
        if caps is not None:
            self.caps = {
                kind: self._capmask(caps.get(kind), cap_last)
                for kind in ("bounding", "effective", "permitted", "inheritable", "ambient")
            }
        self.cap_last = cap_last

    @staticmethod
    def _limit(value: Any) -> int:
        number = int(value or 0)
        return resource.RLIM_INFINITY if number >= 1 << 63 else number

    @staticmethod
    def _capmask(names: Any, cap_last: int) -> int:
        mask = 0
        for name in names or []:
            number = CAP_NUMBERS.get(str(name).upper())
            # runc warns about and skips capabilities this kernel does not know.
            if number is not None and number <= cap_last:
                mask |= 1 << number
        return mask


class Child:
    """A forked child on its way to execve: its error pipe and our ends of its stdio."""

    def __init__(self, spec: ExecSpec, pid: int, err_r: int, parent_fds: list[int]) -> None:
        self.spec = spec
        self.pid = pid
        self.err_r = err_r
        self.parent_fds = parent_fds

    def discard(self) -> None:
        for fd in [self.err_r, *self.parent_fds]:
            with contextlib.suppress(OSError):
                os.close(fd)


class Proc:
    """A process the host started: its streams and the stdin bytes it has not read yet."""

    def __init__(self, ident: int, pid: int, terminal: bool) -> None:
        self.id = ident
        self.pid = pid
        self.terminal = terminal
        self.outputs: dict[int, int] = {}  # readable fd → STDOUT/STDERR
        self.stdin_fd: int | None = None  # a pipe, or the pty master (also in outputs)
        self.pending = bytearray()
        self.stdin_eof = False

    def close_stdin(self) -> None:
        """Stop writing stdin; close the pipe (the pty master stays for output)."""
        fd, self.stdin_fd = self.stdin_fd, None
        self.pending.clear()
        if fd is not None and fd not in self.outputs:
            os.close(fd)


def open_pty(root: str) -> tuple[int, int]:
    """A pty from the container's devpts instance, so ``tty`` names it inside the container;
    the agent's own devpts when the container has none."""
    try:
        master = os.open(resolve_in_root(root, "/dev/pts/ptmx"), os.O_RDWR | os.O_NOCTTY)
    except OSError:
        return os.openpty()
    try:
        fcntl.ioctl(master, TIOCSPTLCK, struct.pack("i", 0))
        # TIOCGPTPEER opens the slave without a path lookup, which a chroot would confuse.
        slave = fcntl.ioctl(master, TIOCGPTPEER, os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError:
        os.close(master)
        raise
    return master, slave


def set_winsize(fd: int, rows: int, cols: int) -> None:
    """TIOCSWINSZ."""
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def find_executable(path: str) -> str | None:
    """Go's exec.findExecutable: None if runnable, else the error text."""
    try:
        st = os.stat(path)
    except OSError as exc:
        return f"stat {path}: {errtext(exc)}"
    if stat.S_ISDIR(st.st_mode):
        return "is a directory"
    if st.st_mode & 0o111:
        return None
    return "permission denied"


def look_path(name: str, env: dict[str, str]) -> str:
    """Go's exec.LookPath with the container's PATH, with runc's error wording."""
    if "/" in name:
        problem = find_executable(name)
        if problem is not None:
            raise ExecError(f'exec: "{name}": {problem}')
        return name
    for directory in env.get("PATH", "").split(":"):
        candidate = os.path.join(directory or ".", name)
        if find_executable(candidate) is None:
            return candidate
    raise ExecError(f'exec: "{name}": executable file not found in $PATH')


def home_of(uid: int) -> str:
    """The uid's home in the container's /etc/passwd, "/" if none (runc's HOME default)."""
    try:
        with open("/etc/passwd") as f:
            for line in f:
                fields = line.rstrip("\n").split(":")
                if len(fields) >= 6 and fields[2] == str(uid):
                    return fields[5] or "/"
    except OSError:
        pass
    return "/"


def child_exec(
    spec: ExecSpec,
    root: str,
    stdio: tuple[int, int, int],
    slave: int | None,
    keep: int,
    cgroup: str | None = None,
    go: int | None = None,
) -> None:
    """In the forked child: become the container process, in runc's order, or raise.
    ``keep`` is the error pipe; every other descriptor beyond stdio is closed. With ``go``
    (a prepared init process), everything up to execve is done, then a byte read from ``go``
    starts the program (end of file: nobody will start it; exit)."""
    signal.set_wakeup_fd(-1)
    for sig in (signal.SIGCHLD, signal.SIGINT, signal.SIGPIPE, signal.SIGXFSZ):
        signal.signal(sig, signal.SIG_DFL)  # Python ignores SIGPIPE/SIGXFSZ; children must not
    signal.pthread_sigmask(signal.SIG_SETMASK, [])
    os.setsid()
    if slave is not None:
        fcntl.ioctl(slave, termios.TIOCSCTTY, 0)
        try:
            os.fchown(slave, spec.uid, -1)  # as login does: the tty belongs to its user
        except OSError:
            pass
    for target, fd in enumerate(stdio):
        os.dup2(fd, target)
    # Nothing of the agent's (the port, other processes' pipes) may leak into the container.
    low = 3
    for kept in sorted({keep} if go is None else {keep, go}):
        os.closerange(low, kept)
        low = kept + 1
    os.closerange(low, MAX_FD)
    if spec.oom_score_adj is not None:
        write_file("/proc/self/oom_score_adj", str(spec.oom_score_adj))
    if cgroup is not None:
        # Into the container's cgroup, which becomes the root of its own cgroup namespace.
        write_file(f"{cgroup}/cgroup.procs", "0")
        unshare(CLONE_NEWCGROUP)
    os.chroot(root)
    os.chdir("/")
    chdir_later = False
    try:
        os.chdir(spec.cwd)
    except PermissionError:
        chdir_later = True  # maybe the container user may enter it: retry after setuid
    except OSError as exc:
        raise ExecError(
            f'chdir to cwd ("{spec.cwd}") set in config.json failed: {errtext(exc)}'
        ) from exc
    for number, soft, hard, name in spec.rlimits:
        try:
            resource.setrlimit(number, (soft, hard))
        except (OSError, ValueError) as exc:
            text = errtext(exc) if isinstance(exc, OSError) else str(exc)
            raise ExecError(f"error setting rlimit type {name}: {text}") from exc
    caps = spec.caps
    if caps is not None:
        for number in range(spec.cap_last + 1):
            if not caps["bounding"] >> number & 1:
                prctl(PR_CAPBSET_DROP, number)
        prctl(PR_SET_KEEPCAPS, 1)
    env = dict(spec.env)
    if "HOME" not in env:
        env["HOME"] = home_of(spec.uid)
    os.setgroups(spec.groups)
    os.setgid(spec.gid)
    os.setuid(spec.uid)
    if chdir_later:
        try:
            os.chdir(spec.cwd)
        except OSError as exc:
            raise ExecError(
                f'chdir to cwd ("{spec.cwd}") set in config.json failed: {errtext(exc)}'
            ) from exc
    if caps is not None:
        prctl(PR_SET_KEEPCAPS, 0)
        capset(caps["effective"], caps["permitted"], caps["inheritable"])
        for number in range(spec.cap_last + 1):
            if caps["ambient"] >> number & 1:
                try:
                    prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, number)
                except OSError:
                    pass  # runc only warns: ambient needs the cap in permitted and inheritable
    os.umask(spec.umask)
    path = look_path(spec.args[0], env)
    if spec.no_new_privileges:
        prctl(PR_SET_NO_NEW_PRIVS, 1)
    if go is not None and not os.read(go, 1):
        os._exit(0)
    try:
        os.execve(path, spec.args, env)
    except OSError as exc:
        raise ExecError(f"exec {path}: {errtext(exc)}") from exc


# --- container setup ------------------------------------------------------------------------


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


def mount_one(root: str, entry: dict[str, Any], log: Log, cgroup: str | None = None) -> None:
    """Make one entry of ``mounts`` inside the root; bind mounts are the host's, only their
    flags are applied here."""
    dest = str(entry["destination"])
    mtype = str(entry.get("type") or "")
    options = [str(o) for o in entry.get("options") or []]
    flags, propagation, data = parse_mount_options(options)
    target = resolve_in_root(root, dest)
    if mtype in ("bind", "rbind") or flags & MS_BIND:
        extra = flags & (MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)
        # 9p shows the bind as a plain directory: bind it onto itself, so it is a mount point
        # of its own that keeps its flags (rw under a read-only root, or ro, nosuid…).
        mount(target, target, None, MS_BIND | MS_REC)
        if extra:
            remount_readonly(target, extra)
        return
    source = str(entry.get("source") or mtype)
    if mtype in ("cgroup", "cgroup2"):
        # The VM's own cgroup v2 hierarchy, seen from the container's cgroup as its root (as
        # with a private cgroup namespace under runc on a v2 host). Best effort.
        try:
            os.makedirs(target, 0o755, exist_ok=True)
            if cgroup is None:
                mount("cgroup2", target, "cgroup2", flags & ~MS_BIND, "")
            else:
                mount(cgroup, target, None, MS_BIND)
                remount_readonly(target, flags & (MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC))
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


def add_entropy(data: bytes, credit: bool) -> None:
    """Mix host randomness into the pool; credit it so early readers do not block."""
    fd = os.open("/dev/urandom", os.O_WRONLY)
    try:
        if credit:
            request = struct.pack("ii", len(data) * 8, len(data)) + data
            try:
                fcntl.ioctl(fd, RNDADDENTROPY, request)
                return
            except OSError:
                pass  # not permitted or unsupported: a plain write still mixes it in
        os.write(fd, data)
    finally:
        os.close(fd)


class Stopwatch:
    """Laps of a request's steps, returned to the host (the monitor logs them at DEBUG)."""

    def __init__(self) -> None:
        self.last = time.monotonic()
        self.laps: list[tuple[str, float]] = []

    def lap(self, name: str) -> None:
        now = time.monotonic()
        self.laps.append((name, round(now - self.last, 4)))
        self.last = now


def build_container(mode: Mode, container: dict[str, Any], log: Log, watch: Stopwatch) -> None:
    """``setup`` but the network, in runc's order, each failure naming what failed: the clock,
    entropy, cgroup limits, the root and every mount, /dev, the names and sysctls, read-only
    and masked paths. Nothing here depends on the prestart hooks (they see the bundle on the
    host, never the guest's mounts), so it may run while they do (``stage`` "early")."""
    root = mode.root
    if mode.guest_wide and container.get("time") is not None:
        # First, so everything created below carries the right timestamps.
        time.clock_settime(time.CLOCK_REALTIME, float(container["time"]))
    if container.get("entropy"):
        add_entropy(base64.b64decode(container["entropy"]), credit=mode.guest_wide)
    step = "create the container's cgroup"
    try:
        mode.prepare_cgroup()
    except OSError as exc:
        raise Refused(f"{step}: {errtext(exc)}") from exc
    if container.get("resources"):
        if mode.cgroup is None:
            log("info", "host mode: resource limits not applied")
        else:
            mode.set_limits(container["resources"])
    watch.lap("clock, entropy, cgroup")
    step = f"mount {protocol.ROOT_TAG} on {root}"
    try:
        mode.prepare_root()
        watch.lap("root")
        for entry in container.get("mounts") or []:
            step = f"mount {entry.get('type') or 'bind'} on {entry.get('destination')}"
            mount_one(root, entry, log, mode.cgroup)
        watch.lap("mounts")
        dev_is_tmpfs = any(
            os.path.normpath(str(m.get("destination"))) == "/dev" and m.get("type") == "tmpfs"
            for m in container.get("mounts") or []
        )
        if dev_is_tmpfs:
            step = "create default devices in /dev"
            make_default_devices(root)
        for key, name in (("hostname", "hostname"), ("domainname", "domainname")):
            if container.get(key):
                step = f"set {key}"
                write_file(f"/proc/sys/kernel/{name}", str(container[key]))
        for key, value in (container.get("sysctl") or {}).items():
            step = f"sysctl {key}"
            if mode.guest_wide:
                write_file("/proc/sys/" + str(key).replace(".", "/"), str(value))
            else:
                log("info", f"host mode: sysctl {key}={value} not applied")
        watch.lap("devices, names, sysctls")
        for path in container.get("readonlyPaths") or []:
            step = f"make {path} read-only"
            readonly_path(root, str(path))
        for path in container.get("maskedPaths") or []:
            step = f"mask {path}"
            mask_path(root, str(path))
        if container.get("readonly"):
            step = "remount the root read-only"
            remount_readonly(root)
        watch.lap("read-only and masked paths")
    except OSError as exc:
        raise Refused(f"{step}: {errtext(exc)}") from exc


def build_network(mode: Mode, container: dict[str, Any], log: Log, watch: Stopwatch) -> None:
    """``setup``'s network: after the prestart hooks, which give the container its interfaces."""
    if mode.guest_wide and container.get("network"):
        try:
            configure_network(container["network"], log)
        except OSError as exc:
            raise Refused(f"configure the network: {errtext(exc)}") from exc
        watch.lap("network")


def _guest_nics() -> dict[str, str]:
    """The guest's Ethernet NICs: MAC → name."""
    nics = {}
    for name in sorted(os.listdir("/sys/class/net")):
        try:
            with open(f"/sys/class/net/{name}/type") as f:
                if f.read().strip() != "1":  # ARPHRD_ETHER; lo is 772
                    continue
            with open(f"/sys/class/net/{name}/address") as f:
                nics[f.read().strip().lower()] = name
        except OSError:
            continue
    return nics


def _set_ipv6(name: str, enabled: bool) -> None:
    """Turn IPv6 on or off for a NIC, ``lo``, ``all`` or ``default``, only if that changes it:
    a write to ``all`` sets every NIC (absent without IPv6: nothing to do)."""
    path = f"/proc/sys/net/ipv6/conf/{name}/disable_ipv6"
    wanted = "0" if enabled else "1"
    with contextlib.suppress(FileNotFoundError):
        with open(path) as f:
            if f.read().strip() == wanted:
                return
        write_file(path, wanted)


def configure_network(network: dict[str, Any], log: Log) -> None:
    """Give the guest the addresses and routes the container's interfaces had on the host.

    The host gave each virtio NIC its veth's MAC, in the order of ``interfaces``. A clone's NICs
    still carry its template's MACs: those are matched by order and given the container's MAC.
    Then it waits (bounded) for each NIC's carrier, which a veth has when runc's container starts.
    """
    # IPv6 as the container's namespace has it (dockerd turns it off for an IPv4 network):
    # ``all`` first, as writing it sets every NIC; each NIC below, once it has its MAC.
    for name, enabled in (network.get("ipv6") or {}).items():
        if name in ("all", "default", "lo"):
            _set_ipv6(name, bool(enabled))
    nics = _guest_nics()
    wanted = [str(iface.get("mac", "")).lower() for iface in network.get("interfaces") or []]
    spare = [name for mac, name in nics.items() if mac not in wanted]
    names: dict[str, str] = {}
    ready: dict[str, bool] = {}  # each NIC set up → whether it has IPv6
    with Netlink() as nl:
        nl.set_link(socket.if_nametoindex("lo"))
        for iface, mac in zip(network.get("interfaces") or [], wanted, strict=True):
            if mac in nics:
                name, new_mac = nics[mac], None
            elif spare:
                name, new_mac = spare.pop(0), mac
            else:
                raise Refused(f"no network interface for MAC {mac} in the guest")
            names[mac] = name
            index = socket.if_nametoindex(name)
            nl.set_link(index, mtu=int(iface.get("mtu") or 0) or None, mac=new_mac)
            # Its link-local address comes from the MAC it has now.
            ready[name] = bool(iface.get("ipv6", True))
            _set_ipv6(name, ready[name])
            for address in iface.get("addresses") or []:
                nl.add_address(index, str(address))
        for route in network.get("routes") or []:
            dev = names.get(str(route.get("mac", "")).lower())
            metric = route.get("metric")
            nl.add_route(
                str(route.get("dst") or "default"),
                route.get("gateway"),
                socket.if_nametoindex(dev) if dev else None,
                version=int(route.get("version") or 4),
                metric=None if metric is None else int(metric),
            )
    late = await_links(ready, LINK_WAIT)
    if late:
        log("warning", f"no carrier on {', '.join(late)} after {LINK_WAIT} s: starting anyway")


# How long setup waits for a NIC's carrier (virtio-net reports it from a work queue after the
# driver loads, and the kernel's link watch may hold the news back for up to a second).
LINK_WAIT = 3.0


def _link_ready(name: str, ipv6: bool) -> bool:
    """Whether a NIC is up as a veth is when the container starts: carrier on (operstate up)
    and, with IPv6, its link-local address made (the kernel makes it once the carrier is on)."""
    try:
        with open(f"/sys/class/net/{name}/operstate") as f:
            if f.read().strip() != "up":
                return False
        if not ipv6:
            return True
        with open("/proc/net/if_inet6") as f:
            return any(
                row.split()[-1] == name and row.startswith("fe80") for row in f.read().splitlines()
            )
    except OSError:
        return False


def await_links(nics: dict[str, bool], timeout: float) -> list[str]:
    """Poll, up to ``timeout``, until every NIC (name → IPv6 on) is ready; the ones that are not."""
    deadline = time.monotonic() + timeout
    pending = dict(nics)
    while True:
        pending = {name: ipv6 for name, ipv6 in pending.items() if not _link_ready(name, ipv6)}
        if not pending or time.monotonic() >= deadline:
            return sorted(pending)
        time.sleep(0.002)


# --- the agent ------------------------------------------------------------------------------


class Agent:
    """The event loop: requests from the host, children's output, their exits."""

    def __init__(self, mode: Mode) -> None:
        self.mode = mode
        self.log_fd = mode.open_log()
        self.channel = Channel(mode)
        self.procs: dict[int, Proc] = {}
        self.by_pid: dict[int, Proc] = {}
        self.setup_done = False
        # setup but the network (build_container), maybe on its own; why it failed, if it did.
        self.built = False
        self.build_error: str | None = None
        # The init process forked at setup, waiting for start: (spec, child, its "go" pipe).
        self.prepared: tuple[ExecSpec, Child, int] | None = None
        self.exiting = False
        self.after_reply: Callable[[], None] | None = None
        try:
            with open("/proc/sys/kernel/cap_last_cap") as f:
                self.cap_last = int(f.read())
        except OSError:
            self.cap_last = len(protocol.CAPABILITIES) - 1
        self.wake_r, self.wake_w = os.pipe()
        set_nonblocking(self.wake_r)
        set_nonblocking(self.wake_w)
        self.handlers = {
            "hello": self.op_hello,
            "setup": self.op_setup,
            "exec": self.op_exec,
            "signal": self.op_signal,
            "resize": self.op_resize,
            "ps": self.op_ps,
            "update": self.op_update,
            "stats": self.op_stats,
            "shutdown": self.op_shutdown,
        }

    # -- output to the host and the console --

    def log(self, level: str, msg: str) -> None:
        """A diagnostic line: on the console/stderr, and to the host when it listens."""
        line = one_line(msg)
        try:
            os.write(self.log_fd, f"bonneville-agent: {level}: {line}\n".encode(errors="replace"))
        except OSError:
            pass
        if self.channel.fd >= 0 and not self.channel.closed:
            try:
                self.send_control({"op": "log", "level": level, "msg": line})
            except OSError:
                pass

    def send_control(self, message: dict[str, Any]) -> None:
        """Queue one control message to the host."""
        self.channel.send(protocol.encode_control(message))

    def send_data(self, ftype: int, stream: int, data: bytes) -> None:
        """Queue output (empty: EOF) of process ``stream``."""
        for frame in protocol.encode_data(ftype, stream, data):
            self.channel.send(frame)

    # -- main loop --

    def run(self) -> int:
        """Serve until shut down (host mode) or forever (PID 1)."""
        signal.signal(signal.SIGCHLD, lambda _signum, _frame: None)
        signal.set_wakeup_fd(self.wake_w)
        if self.mode.pid1:
            # The kernel drops signals PID 1 has no handler for; Python's SIGINT handler would
            # let a container's `kill -INT 1` (or ctrl-alt-del) raise KeyboardInterrupt here.
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        self.mode.start(self.log)
        self.channel.open(self.log)
        self.log("info", f"ready (pid {os.getpid()}, root {self.mode.root})")
        while not self.exiting:
            try:
                self.step()
            except Exception as exc:
                # PID 1 must never die (the kernel panics): report and carry on.
                self.log("error", f"agent loop: {describe(exc)}")
                time.sleep(0.05)  # no tight loop if the failure repeats
        return 0

    def step(self) -> None:
        """One turn: wait for something, then handle output, input, requests, exits."""
        channel = self.channel
        if not channel.connected and not channel.closed:
            self.read_channel()  # a port without a host polls readable: probe it instead
        if channel.closed:
            self.host_gone()
            return
        watched: dict[int, int] = {self.wake_r: select.POLLIN}
        if channel.connected:
            watched[channel.fd] = select.POLLIN | (select.POLLOUT if channel.queue else 0)
        reading = channel.queued < BACKPRESSURE
        for proc in self.procs.values():
            if reading:
                for fd in proc.outputs:
                    watched[fd] = watched.get(fd, 0) | select.POLLIN
            if proc.stdin_fd is not None and proc.pending:
                watched[proc.stdin_fd] = watched.get(proc.stdin_fd, 0) | select.POLLOUT
        poller = select.poll()
        for fd, events in watched.items():
            poller.register(fd, events)
        ready = dict(poller.poll(None if channel.connected else RECONNECT_POLL_MS))

        for proc in list(self.procs.values()):
            for fd in list(proc.outputs):
                if ready.get(fd, 0) & (select.POLLIN | select.POLLHUP | select.POLLERR):
                    self.read_output(proc, fd)
            stdin_fd = proc.stdin_fd
            if stdin_fd is not None and proc.pending and ready.get(stdin_fd, 0):
                self.write_stdin(proc)
        if channel.connected and ready.get(channel.fd, 0) & ~select.POLLOUT:
            self.read_channel()
        if self.wake_r in ready:
            try:
                while os.read(self.wake_r, 512):
                    pass
            except BlockingIOError:
                pass
            self.reap()
        if not channel.closed:
            channel.flush()

    def read_channel(self) -> None:
        """Read and handle what the host sent; a broken stream is logged and reopened."""
        try:
            frames = self.channel.receive()
        except protocol.ProtocolError as exc:
            self.log("error", f"protocol error from the host, dropping the channel: {exc}")
            self.channel.flush_blocking(1.0)
            self.channel.reopen(self.log)
            return
        self.handle_frames(frames)

    def handle_frames(self, frames: list[tuple[int, int, bytes]]) -> None:
        """Dispatch control frames to the request handlers and stdin to processes."""
        for ftype, stream, payload in frames:
            if ftype == protocol.CONTROL:
                try:
                    message = protocol.decode_control(payload)
                except protocol.ProtocolError as exc:
                    # The frame boundary is intact: say so and keep serving.
                    self.log("error", f"malformed control frame ignored: {exc}")
                    continue
                self.handle_request(message)
            elif ftype == protocol.STDIN:
                self.feed_stdin(stream, payload)
            else:
                self.log("warning", f"ignoring frame of type {ftype} from the host")

    def handle_request(self, message: dict[str, Any]) -> None:
        """Run one request and reply to it."""
        op = message["op"]
        reply: dict[str, Any] = {"op": "reply", "req": message.get("req")}
        handler = self.handlers.get(op)
        try:
            if handler is None:
                raise Refused(f"unknown op {op!r}")
            result = handler(message)
            reply.update(result)
            reply["ok"] = True
        except Refused as exc:
            reply.update(ok=False, error=one_line(str(exc)))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            reply.update(ok=False, error=one_line(f"bad {op} request: {type(exc).__name__} {exc}"))
        except OSError as exc:
            reply.update(ok=False, error=one_line(f"{op}: {errtext(exc)}"))
        except Exception as exc:
            self.log("error", f"{op} failed: {describe(exc)}")
            reply.update(ok=False, error=one_line(f"{op}: {exc}"))
        self.send_control(reply)
        action, self.after_reply = self.after_reply, None
        if action is not None:
            action()

    def host_gone(self) -> None:
        """The socket's peer is gone for good: nobody can use this container any more."""
        self.log("info", "host closed the channel: stopping")
        self.shutdown()

    # -- requests --

    def op_hello(self, message: dict[str, Any]) -> dict[str, Any]:
        """Version check."""
        version = message.get("version")
        if version != protocol.VERSION:
            raise Refused(
                f"unsupported protocol version {version!r} (agent speaks {protocol.VERSION})"
            )
        return {"version": protocol.VERSION, "pid": os.getpid(), "kernel": os.uname().release}

    def op_setup(self, message: dict[str, Any]) -> dict[str, Any]:
        """Build the container's filesystem and identity, once. ``stage`` "early" builds all
        but the network (build_container) while the host runs the prestart hooks; the
        ``setup`` after them then configures the network and prepares the process."""
        if self.setup_done:
            raise Refused("the container is already set up")
        container = message["container"]
        if not isinstance(container, dict):
            raise Refused("setup: container must be an object")
        stage = message.get("stage")
        if stage not in (None, "early"):
            raise Refused(f"setup: unknown stage {stage!r}")
        watch = Stopwatch()
        if self.build_error is not None:
            raise Refused(self.build_error)  # a half-built container is never finished
        if not self.built:
            try:
                build_container(self.mode, container, self.log, watch)
            except Exception as exc:
                self.build_error = str(exc) if isinstance(exc, Refused) else describe(exc)
                raise
            self.built = True
        elif stage == "early":
            raise Refused("the container is already built")
        if stage == "early":
            return {"timings": watch.laps}
        build_network(self.mode, container, self.log, watch)
        self.setup_done = True
        process = message.get("process")
        if isinstance(process, dict):
            self.after_reply = lambda: self.prepare_init(process)
        return {"timings": watch.laps}

    def op_exec(self, message: dict[str, Any]) -> dict[str, Any]:
        """Start a process in the container; its output and exit follow as frames."""
        ident = int(message["id"])
        if not 0 < ident <= 0xFFFF:
            raise Refused(f"process id {ident} is not a stream number (1-65535)")
        if not self.setup_done:
            raise Refused("the container is not set up")
        if ident in self.procs or ident == protocol.AGENT_STREAM:
            raise Refused(f"process id {ident} is already in use")
        process = message["process"]
        if not isinstance(process, dict):
            raise Refused("exec: process must be an object")
        watch = Stopwatch()
        proc = None
        if ident == protocol.INIT_STREAM and message.get("stdin"):
            proc = self.start_prepared(ident, process, watch)
        if proc is None:
            spec = ExecSpec(process, bool(message.get("stdin")), self.cap_last)
            proc = self.spawn(ident, spec, watch)
        return {"pid": proc.pid, "timings": watch.laps}

    def spawn(self, ident: int, spec: ExecSpec, watch: Stopwatch | None = None) -> Proc:
        """Fork and exec; the child's failure text arrives on a close-on-exec pipe."""
        return self.complete(ident, self.fork_child(spec, watch), watch)

    def prepare_init(self, process: dict[str, Any]) -> None:
        """Fork the container's process now and take it up to execve, as runc's create does:
        the work overlaps the host's until ``start``, whose exec then only lets it go."""
        try:
            spec = ExecSpec(process, True, self.cap_last)
            go_r, go_w = os.pipe()
        except (Refused, ValueError, TypeError, OSError) as exc:
            # start execs the usual way and reports the error where runc does.
            self.log("info", f"init process not prepared: {describe(exc)}")
            return
        try:
            self.prepared = (spec, self.fork_child(spec, go=go_r), go_w)
        except (Refused, OSError) as exc:
            os.close(go_w)
            self.log("info", f"init process not prepared: {describe(exc)}")
        finally:
            os.close(go_r)

    def start_prepared(self, ident: int, process: dict[str, Any], watch: Stopwatch) -> Proc | None:
        """The prepared init process, let go, if ``process`` is the one it was prepared for."""
        prepared, self.prepared = self.prepared, None
        if prepared is None:
            return None
        spec, child, go_w = prepared
        try:
            same = ExecSpec(process, True, self.cap_last).__dict__ == spec.__dict__
        except Exception:
            same = False
        if not same:
            os.close(go_w)  # end of file: it exits; reap() collects it
            child.discard()
            return None  # forked anew (and refused there, if the process is bad)
        try:
            os.write(go_w, b"g")
        except OSError:
            pass  # it died already: its error text (or EOF) says why
        os.close(go_w)
        return self.complete(ident, child, watch)

    def fork_child(
        self, spec: ExecSpec, watch: Stopwatch | None = None, go: int | None = None
    ) -> Child:
        """Fork a child that becomes ``spec`` (waiting for a byte on ``go`` before execve)."""
        parent_fds: list[int] = []
        child_fds: list[int] = []
        slave: int | None = None
        err_r, err_w = os.pipe()
        try:
            if spec.terminal:
                master, slave = open_pty(self.mode.root)
                parent_fds.append(master)
                child_fds.append(slave)
                if spec.rows and spec.cols:
                    set_winsize(master, spec.rows, spec.cols)
                stdio = (slave, slave, slave)
            else:
                if spec.want_stdin:
                    in_r, in_w = os.pipe()
                    parent_fds.append(in_w)
                    child_fds.append(in_r)
                else:
                    in_r = os.open("/dev/null", os.O_RDONLY)
                    child_fds.append(in_r)
                out_r, out_w = os.pipe()
                err_pipe_r, err_pipe_w = os.pipe()
                parent_fds += [out_r, err_pipe_r]
                child_fds += [out_w, err_pipe_w]
                stdio = (in_r, out_w, err_pipe_w)
            if watch:
                watch.lap("stdio")
            pid = os.fork()
            if pid == 0:  # pragma: no cover - the child execs or exits
                status = 127
                try:
                    child_exec(spec, self.mode.root, stdio, slave, err_w, self.mode.cgroup, go)
                except ExecError as exc:
                    os.write(err_w, str(exc).encode(errors="replace"))
                except OSError as exc:
                    os.write(err_w, f"{errtext(exc)}".encode(errors="replace"))
                except BaseException as exc:
                    os.write(err_w, describe(exc).encode(errors="replace"))
                finally:
                    os._exit(status)
        except BaseException:
            for fd in parent_fds + child_fds + [err_r, err_w]:
                os.close(fd)
            raise
        os.close(err_w)
        for fd in child_fds:
            os.close(fd)
        if watch:
            watch.lap("fork")
        return Child(spec, pid, err_r, parent_fds)

    def complete(self, ident: int, child: Child, watch: Stopwatch | None = None) -> Proc:
        """Wait until the child has exec'd (or failed: Refused with its text); track it."""
        spec, pid, parent_fds = child.spec, child.pid, child.parent_fds
        chunks = []
        while chunk := os.read(child.err_r, 4096):  # EOF at exec (close-on-exec) or at exit
            chunks.append(chunk)
        os.close(child.err_r)
        if watch:
            watch.lap("child setup and execve")
        if chunks:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
            for fd in parent_fds:
                os.close(fd)
            raise Refused(b"".join(chunks).decode(errors="replace"))
        proc = Proc(ident, pid, spec.terminal)
        if spec.terminal:
            proc.outputs[parent_fds[0]] = protocol.STDOUT
            proc.stdin_fd = parent_fds[0]
        else:
            if spec.want_stdin:
                proc.stdin_fd = parent_fds.pop(0)
            proc.outputs[parent_fds[0]] = protocol.STDOUT
            proc.outputs[parent_fds[1]] = protocol.STDERR
        for fd in [*proc.outputs, *([proc.stdin_fd] if proc.stdin_fd is not None else [])]:
            set_nonblocking(fd)
        self.procs[ident] = proc
        self.by_pid[pid] = proc
        return proc

    def op_signal(self, message: dict[str, Any]) -> dict[str, Any]:
        """kill(2) one process, or every process of the container."""
        sig = int(message["signal"])
        if message.get("all"):
            self.mode.kill_container(sig)
            return {}
        proc = self.procs.get(int(message["id"]))
        if proc is None:
            raise Refused("no such process")
        try:
            os.kill(proc.pid, sig)
        except ProcessLookupError as exc:
            raise Refused("no such process") from exc
        return {}

    def op_resize(self, message: dict[str, Any]) -> dict[str, Any]:
        """Window size of a process's pty."""
        proc = self.procs.get(int(message["id"]))
        if proc is None:
            raise Refused("no such process")
        if not proc.terminal or not proc.outputs:
            raise Refused(f"process {proc.id} has no terminal")
        set_winsize(next(iter(proc.outputs)), int(message["rows"]), int(message["cols"]))
        return {}

    def op_ps(self, message: dict[str, Any]) -> dict[str, Any]:
        """Guest pids of the container's processes."""
        return {"pids": self.mode.container_pids()}

    def op_update(self, message: dict[str, Any]) -> dict[str, Any]:
        """Change the container's cgroup limits (already converted and checked by the host)."""
        files = message.get("resources")
        if not isinstance(files, dict):
            raise Refused("update: resources must be an object")
        self.mode.set_limits(files)
        return {}

    def op_stats(self, message: dict[str, Any]) -> dict[str, Any]:
        """The text of the container cgroup's statistics files (the host parses them)."""
        if self.mode.cgroup is None:
            raise Refused("statistics come from the VM's cgroups (host mode has none)")
        files = {}
        for name in protocol.CGROUP_STATS_FILES:
            try:
                with open(f"{self.mode.cgroup}/{name}") as f:
                    files[name] = f.read().strip()
            except OSError:
                continue  # e.g. memory.peak, newer than some kernels
        return {"stats": files}

    def op_shutdown(self, message: dict[str, Any]) -> dict[str, Any]:
        """Power off after the reply went out."""
        self.after_reply = self.shutdown
        return {}

    def shutdown(self) -> None:
        """Stop every container process, flush what the host should get, power off / exit."""
        self.mode.kill_container(signal.SIGKILL)
        if not self.channel.closed:
            self.channel.flush_blocking(2.0)
        self.mode.power_off()
        if self.mode.pid1:
            self.log("error", "power off failed: still running")
        else:
            self.exiting = True

    # -- process I/O --

    def feed_stdin(self, ident: int, data: bytes) -> None:
        """Host bytes for a process's stdin; empty means close it."""
        proc = self.procs.get(ident)
        if proc is None or proc.stdin_fd is None:
            return
        if not data:
            if proc.terminal:
                return  # a pty has no EOF to give; the host's end closing is not the child's
            proc.stdin_eof = True
            if not proc.pending:
                proc.close_stdin()
            return
        proc.pending += data
        self.write_stdin(proc)

    def write_stdin(self, proc: Proc) -> None:
        """Write what the child takes now; keep the rest."""
        fd = proc.stdin_fd
        if fd is None:
            return
        try:
            written = os.write(fd, proc.pending)
        except BlockingIOError:
            return
        except OSError:
            proc.close_stdin()  # EPIPE/EIO: the child closed its stdin
            return
        del proc.pending[:written]
        if not proc.pending and proc.stdin_eof:
            proc.close_stdin()

    def read_output(self, proc: Proc, fd: int) -> bool:
        """Forward one chunk of output; on EOF send the EOF frame. True if data came."""
        try:
            data = os.read(fd, CHUNK)
        except BlockingIOError:
            return False
        except OSError:
            data = b""  # EIO: the pty's last slave closed
        ftype = proc.outputs[fd]
        self.send_data(ftype, proc.id, data)
        if data:
            return True
        del proc.outputs[fd]
        if proc.stdin_fd == fd:
            proc.stdin_fd = None
            proc.pending.clear()
        os.close(fd)
        return False

    def reap(self) -> None:
        """Collect every exited child (orphans too); report the host's processes."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            proc = self.by_pid.pop(pid, None)
            if proc is not None:
                self.finish(proc, status)

    def reap_all(self, exclude: Proc, timeout: float = 10.0) -> None:
        """Wait (bounded) until every killed container process is reaped."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                # SIGCHLD writes to the wake-up pipe: wait on it, not on a timer.
                select.select([self.wake_r], [], [], max(deadline - time.monotonic(), 0))
                try:
                    while os.read(self.wake_r, 512):
                        pass
                except BlockingIOError:
                    pass
                continue
            other = self.by_pid.pop(pid, None)
            if other is not None and other is not exclude:
                self.finish(other, status)

    def finish(self, proc: Proc, status: int) -> None:
        """A host process ended: its remaining output, EOFs, then ``exit``."""
        if proc.id == protocol.INIT_STREAM:
            # The container ends with its init, as a pid namespace does: once init's exit is
            # reported, no other container process is left (nor a zombie of one).
            self.mode.kill_container(signal.SIGKILL)
            self.reap_all(exclude=proc)
        for fd in list(proc.outputs):
            # Until EAGAIN only: a background grandchild may hold the pipe open forever.
            drained = 0
            while fd in proc.outputs and drained < DRAIN_LIMIT:
                if not self.read_output(proc, fd):
                    break
                drained += CHUNK
        for fd, ftype in list(proc.outputs.items()):
            self.send_data(ftype, proc.id, b"")
            del proc.outputs[fd]
            if proc.stdin_fd == fd:
                proc.stdin_fd = None
            os.close(fd)
        proc.close_stdin()
        del self.procs[proc.id]
        if os.WIFSIGNALED(status):
            signum: int | None = os.WTERMSIG(status)
            code = 128 + os.WTERMSIG(status)
        else:
            signum, code = None, os.waitstatus_to_exitcode(status)
        self.send_control({"op": "exit", "id": proc.id, "status": code, "signal": signum})


# --- entry point ----------------------------------------------------------------------------


def ensure_stdio() -> None:
    """Descriptors 0-2 exist, so pipes never land there and get clobbered by dup2."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open("/dev/null", os.O_RDWR)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)


def parse_args(argv: list[str]) -> Mode:
    """``[--fd N] [--root DIR] [--no-pid1]`` (argparse is too heavy for the guest image)."""
    channel_fd: int | None = None
    root: str | None = None
    no_pid1 = False
    args = list(argv)
    while args:
        arg = args.pop(0)
        if arg == "--no-pid1":
            no_pid1 = True
        elif arg in ("--fd", "--root") and args:
            value = args.pop(0)
            if arg == "--fd":
                channel_fd = int(value)
            else:
                root = os.path.abspath(value)
        else:
            raise SystemExit(f"usage: agent [--fd N] [--root DIR] [--no-pid1] (bad {arg!r})")
    pid1 = os.getpid() == 1 and not no_pid1
    options: dict[str, str] = {}
    if pid1:
        with open("/proc/cmdline") as f:
            options = kernel_options(f.read())
    return Mode(pid1, channel_fd, root, options)


def main(argv: list[str]) -> int:
    """Run the agent; as PID 1 never return."""
    ensure_stdio()
    mode = parse_args(argv)
    agent = Agent(mode)
    while True:
        try:
            return agent.run()
        except Exception as exc:
            if not mode.pid1:
                agent.log("error", f"fatal: {describe(exc)}")
                return 1
            agent.log("error", f"restarting the loop after: {describe(exc)}")
        except BaseException as exc:
            # KeyboardInterrupt/SystemExit: a host process may go, PID 1 may not (kernel panic).
            if not mode.pid1:
                raise
            agent.log("error", f"restarting the loop after: {describe(exc)}")
        time.sleep(1)  # no tight loop if the failure repeats


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
