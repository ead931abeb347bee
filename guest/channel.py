"""The byte stream to the host: the virtio-serial port (or, on vSphere, a UART; in host mode a
socket), with a bounded queue of frames not yet written. Standard library only: this module
goes into the guest image."""

from __future__ import annotations

import errno
import os
import select
import stat
import termios
import time
from collections import deque

from bonneville.guest import protocol
from bonneville.guest.common import Log, set_nonblocking
from bonneville.guest.fork import await_root_disk

TYPE_CHECKING = False
if TYPE_CHECKING:
    from bonneville.guest.mode import Mode

CHUNK = 64 * 1024  # one read from the host
# Kernel arguments that switch the agent to the vSphere-style channel and root (see
# backends/vsphere/transport.py): bonneville.channel=ttyS1 (a UART instead of the virtio port),
# bonneville.root=disk (the container root is the ext4 disk labelled rootdisk.LABEL, not 9p),
# bonneville.token=T (the channel preamble's token; default: that disk's ext4 UUID).
CHANNEL_ARG = "bonneville.channel"
ROOT_ARG = "bonneville.root"
TOKEN_ARG = "bonneville.token"
SERIAL_PREAMBLE = b"BONNEVILLE-AGENT "


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
            token = self.mode.token
            if self.mode.root_disk:
                # A template VM waits here, parked, until a fork gives it a disk (fork.py).
                self.mode.root_device, disk_token = await_root_disk(log)
                token = token or disk_token
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
