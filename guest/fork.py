"""A vSphere template VM parked until it is forked. Standard library only: this module goes
into the guest image.

With ``bonneville.root=disk`` the agent's identity (the channel token) is its root disk's ext4
UUID. A template VM, booted once and kept running for InstantClone_Task, has no root disk: its
agent parks here. Each instant clone of it resumes in the same place with a new VM generation
ID and gets its own root disk (and its serial port pointed at its own monitor); the agent then
finds the disk and says the new token on the UART, and the handshake that follows (``hello``)
steps the clock and mixes in host entropy, as after any clone.

A fork is seen through the kernel's vmgenid driver, which reseeds the kernel's random number
generator when the generation ID changes: Linux 6.1 says so in the kernel log ("crng reseeded
due to virtual machine fork"), 6.2 and later also send a uevent with ``NEW_VMGENID=1``. Either
makes the agent rescan the SCSI buses (a hot-added disk is normally announced by the PVSCSI
device itself: the rescan covers a missed message) and re-probe the Ethernet NICs, whose
drivers read the MAC address once at probe: a clone has its own MAC and must not send with
its template's. Without any event the disks are still polled, so a clone is found either way.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import socket
import time

from bonneville.guest.common import Log, errtext, write_file
from bonneville.guest.rootdisk import LABEL, root_disk_now

FORK_LOG_MARK = b"virtual machine fork"  # 6.1's random.c: "crng reseeded due to ..."
FORK_UEVENT_MARK = b"NEW_VMGENID=1"
NETLINK_KOBJECT_UEVENT = 15
BOOT_GRACE = 10.0  # seconds a VM booted with its disk may take to probe it (SCSI is async)
BOOT_POLL_MS = 50
POLL_MS = 500  # how often a parked template looks for a root disk without any event
RESCAN_EVERY = 2.0  # after a fork, seconds between SCSI rescans until the disk is there


class ForkWatch:
    """The kernel's signs that this VM was forked: kernel log records and uevents."""

    def __init__(self, kmsg: str = "/dev/kmsg", uevents: bool = True) -> None:
        self.fds: list[int] = []
        self.kmsg = -1
        self.uevents: socket.socket | None = None
        with contextlib.suppress(OSError):
            self.kmsg = os.open(kmsg, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            self.fds.append(self.kmsg)
            with contextlib.suppress(OSError):  # (a pipe, in the unit tests, cannot seek)
                os.lseek(self.kmsg, 0, os.SEEK_END)  # what was logged before parking is past
        with contextlib.suppress(OSError):
            if not uevents:
                raise OSError(errno.ENOTSUP, "uevents not wanted")
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_KOBJECT_UEVENT)
            sock.bind((0, 1))
            sock.setblocking(False)
            self.uevents = sock
            self.fds.append(sock.fileno())

    def forked(self) -> bool:
        """Whether a fork was reported since the last call (reads everything pending)."""
        seen = False
        while self.kmsg >= 0:
            try:
                record = os.read(self.kmsg, 8192)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno == errno.EPIPE:  # records overwritten before we read them
                    continue
                break
            if not record:
                break
            seen = seen or FORK_LOG_MARK in record
        while self.uevents is not None:
            try:
                event = self.uevents.recv(65536)
            except (BlockingIOError, OSError):
                break
            seen = seen or FORK_UEVENT_MARK in event.split(b"\0")
        return seen

    def close(self) -> None:
        if self.kmsg >= 0:
            os.close(self.kmsg)
            self.kmsg = -1
        if self.uevents is not None:
            self.uevents.close()
            self.uevents = None


def rescan_scsi(log: Log) -> None:
    """Ask every SCSI host to look for new devices (all channels, targets and LUNs)."""
    base = "/sys/class/scsi_host"
    with contextlib.suppress(FileNotFoundError):
        for host in sorted(os.listdir(base)):
            try:
                write_file(f"{base}/{host}/scan", "- - -")
            except OSError as exc:
                log("warning", f"rescan of SCSI {host}: {errtext(exc)}")


def reprobe_nics(log: Log) -> list[str]:
    """Unbind and rebind the driver of every Ethernet NIC on a bus, so that it reads the
    device's MAC address again. Returns the NICs' names before the re-probe."""
    done = []
    base = "/sys/class/net"
    for name in sorted(os.listdir(base)):
        device = f"{base}/{name}/device"
        try:
            with open(f"{base}/{name}/type") as f:
                if f.read().strip() != "1":  # ARPHRD_ETHER
                    continue
            driver = os.path.realpath(f"{device}/driver")
            bus_id = os.path.basename(os.path.realpath(device))
        except OSError:
            continue  # virtual (no device): nothing to re-read
        if not os.path.isdir(driver):
            continue
        try:
            write_file(f"{driver}/unbind", bus_id)
            write_file(f"{driver}/bind", bus_id)
            done.append(name)
        except OSError as exc:
            log("warning", f"re-probe of NIC {name} ({bus_id}): {errtext(exc)}")
    return done


def await_root_disk(log: Log, grace: float = BOOT_GRACE, poll_ms: int = POLL_MS) -> tuple[str, str]:
    """(device, UUID) of the root disk: as soon as it is probed when the VM booted with it (a
    linked or full clone), else when this VM has been forked and given one (an instant clone
    of a parked template). Waits as long as it takes: a template waits for its clones, and a
    clone whose disk never comes is destroyed by its monitor when the agent does not connect."""
    watch = ForkWatch()
    poller = select.poll()
    for fd in watch.fds:
        poller.register(fd, select.POLLIN)
    parked_at = time.monotonic() + grace
    parked = False
    forked_at = 0.0
    rescanned_at = 0.0
    try:
        while True:
            found = root_disk_now()
            if found is not None:
                if parked:
                    log("info", f"root disk {found[0]} appeared: this VM is its container's now")
                return found
            if not parked and time.monotonic() >= parked_at:
                parked = True
                how = "watching the VM generation ID" if watch.fds else "polling the disks"
                log("info", f"no disk labelled {LABEL}: parked as a template ({how})")
            poller.poll(poll_ms if parked else BOOT_POLL_MS)
            now = time.monotonic()
            if watch.forked():
                forked_at = rescanned_at = now
                rescan_scsi(log)
                nics = reprobe_nics(log)
                log(
                    "info",
                    "this VM was forked (new VM generation ID): SCSI buses rescanned, "
                    f"NICs re-probed ({', '.join(nics) or 'none'}) in "
                    f"{time.monotonic() - now:.2f} s",
                )
            elif forked_at and now - rescanned_at >= RESCAN_EVERY:
                # The clone's disk is hot-added after the fork; PVSCSI announces it, but a
                # rescan finds it should that message be missed.
                rescanned_at = now
                rescan_scsi(log)
    finally:
        watch.close()
