"""The QEMU backend against real QEMU: launch, QMP, pause/resume, stop, destroy, failures.

Most tests boot the host's Debian kernel with a tiny busybox initramfs built here (its init
loads the virtio modules, writes a file through the 9p share, says "ready rw" ("ready ro" if it
could not) on the agent port and echoes lines back), so they need neither the guest image nor
the agent. The last test boots the
real guest image when `bonneville.backends.image` exists and speaks the protocol's `hello`.
"""

from __future__ import annotations

import glob
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from bonneville.backends import procfs
from bonneville.backends.base import Capability, VMConfig
from bonneville.backends.qemu.backend import QemuBackend, detect_accel
from bonneville.backends.qemu.machine import QemuVM
from bonneville.guest import protocol
from bonneville.spec.errors import BackendError
from tests.support import BUSYBOX

pytestmark = pytest.mark.vm

BOOT_TIMEOUT = 120.0  # a TCG boot of the Debian bzImage takes ~7 s alone, more on a busy host
KERNEL_ARGS = (
    "console=ttyS0",
    "panic=-1",
    "quiet",
    "tsc=reliable",
    "no_timer_check",
    "i8042.noaux",
    "i8042.nokbd",
    "i8042.nopnp",
    "cryptomgr.notests",
)
MODULES = (
    "drivers/virtio/virtio_ring",
    "drivers/virtio/virtio",
    "drivers/virtio/virtio_pci_legacy_dev",
    "drivers/virtio/virtio_pci_modern_dev",
    "drivers/virtio/virtio_pci",
    "drivers/char/virtio_console",
    "net/9p/9pnet",
    "net/9p/9pnet_virtio",
    "fs/netfs/netfs",
    "fs/fscache/fscache",
    "fs/9p/9p",
)
INIT = f"""#!/bin/busybox sh
/bin/busybox mount -t proc proc /proc
/bin/busybox --install -s /bin
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in {" ".join(m.rsplit("/", 1)[1] for m in MODULES)}; do insmod /modules/$m.ko; done
share=nomount
if mount -t 9p -o trans=virtio,version=9p2000.L {protocol.ROOT_TAG} /mnt; then
    share=ro
    echo guest > /mnt/guest-wrote && share=rw
fi
for p in /sys/class/virtio-ports/*; do
    [ "$(cat $p/name)" = {protocol.PORT_NAME} ] && port=/dev/${{p##*/}}
done
exec 3<>$port
echo "ready $share" >&3
while read -r line <&3; do
    [ "$line" = poweroff ] && poweroff -f
    echo "echo:$line" >&3
done
sleep 1000000
"""


# ------------------------------------------------------------------------------ test guest


def _newc(entries: list[tuple[str, int, bytes, int]]) -> bytes:
    """A newc cpio archive of (name, mode, data, rdev) entries (no external cpio needed)."""
    out = bytearray()

    def pad() -> None:
        out.extend(b"\0" * (-len(out) % 4))

    for ino, (name, mode, data, rdev) in enumerate([*entries, ("TRAILER!!!", 0, b"", 0)], 1):
        encoded = name.encode() + b"\0"
        fields = [ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev >> 8, rdev & 0xFF]
        fields += [len(encoded), 0]
        out += b"070701" + "".join(f"{f:08x}" for f in fields).encode() + encoded
        pad()
        out += data
        pad()
    return bytes(out)


def _kernel() -> tuple[str, str]:
    """The host's newest Debian kernel and its module directory."""
    kernels = sorted(glob.glob("/boot/vmlinuz-*"))
    if not kernels:
        pytest.skip("no kernel in /boot")
    release = kernels[-1].removeprefix("/boot/vmlinuz-")
    modules = f"/lib/modules/{release}/kernel"
    if not os.path.isdir(modules):
        pytest.skip(f"no modules for {release}")
    return kernels[-1], modules


@pytest.fixture(scope="session")
def test_guest(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """(kernel, initrd) of the busybox test guest."""
    kernel, modules = _kernel()
    with open(BUSYBOX, "rb") as f:
        busybox = f.read()
    entries: list[tuple[str, int, bytes, int]] = [
        (d, 0o040755, b"", 0) for d in ("bin", "dev", "proc", "sys", "mnt", "modules")
    ]
    entries += [
        ("dev/console", 0o020600, b"", (5 << 8) | 1),
        ("bin/busybox", 0o100755, busybox, 0),
        ("bin/sh", 0o120777, b"busybox", 0),
        ("init", 0o100755, INIT.encode(), 0),
    ]
    for module in MODULES:
        with open(f"{modules}/{module}.ko", "rb") as f:
            entries.append((f"modules/{module.rsplit('/', 1)[1]}.ko", 0o100644, f.read(), 0))
    initrd = tmp_path_factory.mktemp("guest") / "initrd.cpio"
    initrd.write_bytes(_newc(entries))
    return kernel, str(initrd)


# ------------------------------------------------------------------------------ fixtures


def _open_fds() -> set[int]:
    return {int(fd) for fd in os.listdir("/proc/self/fd")}


def _gone(pid: int, timeout: float = 10.0) -> bool:
    """Whether ``pid`` (not necessarily our child) has exited within ``timeout``."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        ready, _, _ = select.select([pidfd], [], [], timeout)
        return bool(ready) or procfs.process_state(pid) in (None, "Z", "X")
    finally:
        os.close(pidfd)


Launcher = Callable[..., QemuVM]


@pytest.fixture
def launch(tmp_path: Path, test_guest: tuple[str, str]) -> Iterator[Launcher]:
    """Launches test VMs and guarantees none outlives the test, whatever happens in it."""
    backend = QemuBackend(clone=False)  # the test guest has no agent to make a template of
    vms: list[QemuVM] = []
    counter = iter(range(1, 1000))

    def launch_vm(**overrides: object) -> QemuVM:
        n = next(counter)
        share = tmp_path / f"share{n}"
        share.mkdir()
        fields: dict[str, object] = {
            "container_id": f"t{n}",
            "memory_mib": 256,
            "vcpus": 1,
            "share_dir": str(share),
            "run_dir": str(tmp_path / f"run{n}"),
            "kernel": test_guest[0],
            "initrd": test_guest[1],
            "kernel_args": KERNEL_ARGS,
        }
        fields.update(overrides)
        vm = backend.launch(VMConfig(**fields))  # type: ignore[arg-type]
        assert isinstance(vm, QemuVM)
        vms.append(vm)
        return vm

    yield launch_vm
    for vm in vms:
        private = vm.private_state()
        vm.stop(timeout=2)
        backend.destroy(private)
    assert not [vm.pid for vm in vms if not _gone(vm.pid, 0)]


def _read_line(channel: socket.socket, timeout: float = BOOT_TIMEOUT) -> bytes:
    """One line from the guest's port, within ``timeout``."""
    deadline = time.monotonic() + timeout
    line = b""
    while not line.endswith(b"\n"):
        remaining = deadline - time.monotonic()
        ready, _, _ = select.select([channel], [], [], max(0.0, remaining))
        if not ready:
            raise AssertionError(f"no line from the guest within {timeout}s (got {line!r})")
        byte = channel.recv(1)
        if not byte:
            raise AssertionError(f"the guest port closed (got {line!r})")
        line += byte
    return line


# ------------------------------------------------------------------------------ tests


def test_capabilities() -> None:
    assert QemuBackend.capabilities == {
        Capability.CLONE,
        Capability.PAUSE,
        Capability.CONSOLE,
        Capability.NETWORK,
        Capability.PODS,
        Capability.HOTPLUG,
        Capability.HOST_NETWORK,
    }
    QemuBackend().require(Capability.CLONE)


def test_launch_pause_resume_stop(launch: Launcher, tmp_path: Path) -> None:
    fds_before = _open_fds()
    backend = QemuBackend()
    vm = launch()
    private = vm.private_state()
    assert private == {"pid": vm.pid, "start_time": procfs.start_time(vm.pid)}
    assert backend.alive(private)
    assert not vm.poll()
    assert vm.qmp.execute("query-status")["status"] == "running"
    # QEMU never holds the caller's stdio (containerd waits for every writer to close).
    stdio = [os.readlink(f"/proc/{vm.pid}/fd/{fd}") for fd in (0, 1, 2)]
    assert stdio == ["/dev/null", "/dev/null", str(tmp_path / "run1" / "qemu.log")]
    # Under TCG no transparent huge pages: they only inflate each VM's resident memory.
    if detect_accel() == "tcg":
        assert "THP_enabled:\t0\n" in Path(f"/proc/{vm.pid}/status").read_text()

    # The guest booted, wrote through the share, and the agent port carries bytes both ways.
    assert _read_line(vm.channel) == b"ready rw\n"
    assert (tmp_path / "share1" / "guest-wrote").read_text() == "guest\n"
    vm.channel.sendall(b"ping\n")
    assert _read_line(vm.channel, 30) == b"echo:ping\n"
    assert (tmp_path / "run1" / "console.log").exists()
    assert (tmp_path / "run1" / "qemu.log").read_text().startswith("# qemu-system")

    vm.pause()
    assert vm.qmp.execute("query-status")["status"] == "paused"
    vm.channel.sendall(b"while-paused\n")
    ready, _, _ = select.select([vm.channel], [], [], 1.0)
    assert not ready, "a paused guest answered"
    vm.resume()
    assert vm.qmp.execute("query-status")["status"] == "running"
    assert _read_line(vm.channel, 30) == b"echo:while-paused\n"

    pid = vm.pid
    vm.stop(timeout=5)
    assert vm.poll()
    # QEMU quit when asked (QMP `quit`), before stop's deadline would have sent SIGKILL (-9).
    assert vm._proc.returncode == 0
    assert not backend.alive(private)
    assert procfs.process_state(pid) is None  # reaped, not a zombie
    assert vm.channel.fileno() == -1
    assert _open_fds() <= fds_before
    vm.stop()  # idempotent


def test_guest_poweroff_ends_the_vm(launch: Launcher) -> None:
    vm = launch()
    assert _read_line(vm.channel) == b"ready rw\n"
    vm.channel.sendall(b"poweroff\n")
    ready, _, _ = select.select([vm.exit_fd()], [], [], 30)
    assert ready, "the VM did not end after the guest powered off"
    assert vm.poll()
    assert not QemuBackend().alive(vm.private_state())
    vm.stop()


def test_readonly_share(launch: Launcher, tmp_path: Path) -> None:
    vm = launch(readonly_share=True)
    assert _read_line(vm.channel) == b"ready ro\n"
    assert not (tmp_path / "share1" / "guest-wrote").exists()


def test_destroy(launch: Launcher) -> None:
    backend = QemuBackend()
    vm = launch()
    private = vm.private_state()
    # A blob whose start time does not match (a reused PID) must not be killed.
    backend.destroy({"pid": vm.pid, "start_time": private["start_time"] + 1})
    assert not backend.alive({"pid": vm.pid, "start_time": private["start_time"] + 1})
    assert backend.alive(private)
    backend.destroy(private)
    ready, _, _ = select.select([vm.exit_fd()], [], [], 0)
    assert ready, "destroy returned before QEMU ended"
    assert vm.poll()
    assert not backend.alive(private)
    backend.destroy(private)  # idempotent
    backend.destroy({"pid": 0})
    vm.stop()


def test_missing_kernel_fails_launch_cleanly(launch: Launcher, tmp_path: Path) -> None:
    fds_before = _open_fds()
    with pytest.raises(BackendError) as info:
        launch(kernel=str(tmp_path / "no-such-kernel"))
    message = str(info.value)
    assert "\n" not in message
    assert "no-such-kernel" in message and "No such file" in message
    assert not _leftovers(str(tmp_path))
    assert _open_fds() <= fds_before


def test_bad_argument_fails_launch_cleanly(tmp_path: Path, test_guest: tuple[str, str]) -> None:
    from bonneville.backends.qemu.cmdline import QemuOptions

    backend = QemuBackend(QemuOptions(machine="no-such-machine"), clone=False)
    config = VMConfig("bad", 256, 1, str(tmp_path), str(tmp_path / "run"), *test_guest)
    with pytest.raises(BackendError, match="unsupported machine type"):
        backend.launch(config)
    assert not _leftovers(str(tmp_path))


def test_missing_binary_fails_launch_cleanly(tmp_path: Path, test_guest: tuple[str, str]) -> None:
    from bonneville.backends.qemu.cmdline import QemuOptions

    fds_before = _open_fds()
    backend = QemuBackend(QemuOptions(binary=str(tmp_path / "no-qemu")), clone=False)
    config = VMConfig("bad", 256, 1, str(tmp_path), str(tmp_path / "run"), *test_guest)
    with pytest.raises(BackendError, match="cannot start"):
        backend.launch(config)
    assert _open_fds() <= fds_before


CHILD = """
import sys
from bonneville.backends.base import VMConfig
from bonneville.backends.qemu.backend import QemuBackend
config = VMConfig("orphan", 256, 1, sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4],
                  kernel_args=("console=ttyS0", "panic=-1"))
vm = QemuBackend(clone=False).launch(config)
print(vm.pid, flush=True)
sys.stdin.read()
"""


def test_sigkill_of_the_launcher_kills_qemu(tmp_path: Path, test_guest: tuple[str, str]) -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(tmp_path), str(tmp_path / "run"), *test_guest],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    qemu_pid = 0
    try:
        assert child.stdout is not None
        ready, _, _ = select.select([child.stdout], [], [], 30)
        assert ready, "the launcher did not report a VM"
        qemu_pid = int(child.stdout.readline())
        assert procfs.is_alive(qemu_pid, None)
        child.kill()
        child.wait()
        assert _gone(qemu_pid), "QEMU outlived the process that launched it"
    finally:
        child.kill()
        child.wait()
        if qemu_pid and not _gone(qemu_pid, 0):
            os.kill(qemu_pid, signal.SIGKILL)
    assert not _leftovers(str(tmp_path))


def test_real_guest_hello(launch: Launcher) -> None:
    """The guest image and its agent answer `hello` over the VM's channel."""
    try:
        from bonneville.backends.image import ensure_image
    except ImportError:
        pytest.skip("bonneville.backends.image is not there yet")
    image = ensure_image()
    vm = launch(kernel=image.kernel, initrd=image.initrd, kernel_args=tuple(image.kernel_args))
    vm.channel.sendall(
        protocol.encode_control({"op": "hello", "req": 1, "version": protocol.VERSION})
    )
    decoder = protocol.Decoder()
    deadline = time.monotonic() + BOOT_TIMEOUT
    while True:
        ready, _, _ = select.select([vm.channel], [], [], max(0.0, deadline - time.monotonic()))
        assert ready, "no reply to hello"
        data = vm.channel.recv(65536)
        assert data, "the agent closed the channel"
        replies = [
            protocol.decode_control(payload)
            for ftype, _, payload in decoder.feed(data)
            if ftype == protocol.CONTROL
        ]
        replies = [r for r in replies if r.get("op") == "reply" and r.get("req") == 1]
        if replies:
            break
    assert replies[0]["ok"] is True, replies[0]
    assert replies[0]["version"] == protocol.VERSION


def _leftovers(marker: str) -> list[str]:
    from tests.support import leftover_processes

    return leftover_processes(marker)
