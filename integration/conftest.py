"""Daemons shared by the integration suites."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import Runtime, leftover_processes, terminate

LIBVIRTD_SOCKET = "/run/libvirt/libvirt-sock"


def _answers(path: str) -> bool:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(2)
        sock.connect(path)
        return True
    except OSError:
        return False
    finally:
        sock.close()


class Libvirtd:
    """libvirtd (and virtlogd, through which its QEMUs log) for qemu:///system.

    ``owned`` is False when the host already ran one: then it is used as it is, and never
    stopped or restarted by the tests.
    """

    def __init__(self, base: Path, owned: bool) -> None:
        self.base = base
        self.owned = owned
        self.virtlogd: subprocess.Popen[bytes] | None = None
        self.libvirtd: subprocess.Popen[bytes] | None = None

    def _spawn(self, name: str) -> subprocess.Popen[bytes]:
        with open(self.base / f"{name}.log", "ab") as log:
            return subprocess.Popen(
                [name],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
                close_fds=True,
            )

    def start(self) -> None:
        if self.virtlogd is None or self.virtlogd.poll() is not None:
            self.virtlogd = self._spawn("virtlogd")
        self.libvirtd = self._spawn("libvirtd")
        deadline = time.monotonic() + 60
        while not _answers(LIBVIRTD_SOCKET):
            assert self.libvirtd.poll() is None, (self.base / "libvirtd.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "libvirtd did not come up"
            time.sleep(0.1)

    def stop_libvirtd(self) -> None:
        if self.libvirtd is not None:
            terminate(self.libvirtd)
            self.libvirtd = None

    def restart(self) -> None:
        assert self.owned, "only a libvirtd the tests started may be restarted"
        self.stop_libvirtd()
        self.start()

    def stop(self) -> None:
        self.stop_libvirtd()
        if self.virtlogd is not None:
            terminate(self.virtlogd)
            self.virtlogd = None


@pytest.fixture
def runtime(tmp_path: Path) -> Iterator[Runtime]:
    """The CLI on the QEMU backend (suites with other needs define their own); every monitor
    and VM of the test must be gone afterwards."""
    rt = Runtime(tmp_path / "state", "qemu")
    yield rt
    rt.cleanup()
    assert leftover_processes(str(rt.root)) == []


@pytest.fixture(scope="session")
def libvirtd() -> Iterator[Libvirtd]:
    """The host's libvirtd if one runs, else one started here and stopped afterwards (CI
    machines start no services)."""
    base = Path(tempfile.mkdtemp(prefix="bv-libvirtd-"))
    try:
        if _answers(LIBVIRTD_SOCKET):
            yield Libvirtd(base, owned=False)
            return
        if shutil.which("libvirtd") is None:
            pytest.skip("libvirtd is not installed")
        daemon = Libvirtd(base, owned=True)
        try:
            daemon.start()
            yield daemon
        finally:
            daemon.stop()
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def container_netns() -> Iterator[str]:
    """A network namespace as dockerd's bridge driver leaves one: a veth with an address and a
    default route (the host end stays outside, as dockerd's does)."""
    name = f"bvtest-{os.getpid()}"
    outside, inside = f"bvto{os.getpid() % 10000}", f"bvti{os.getpid() % 10000}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(
            ["ip", "link", "add", outside, "type", "veth", "peer", "name", inside], check=True
        )
        subprocess.run(["ip", "link", "set", inside, "netns", name], check=True)
        for args in (
            ["addr", "add", "172.31.250.2/24", "dev", inside],
            ["link", "set", inside, "up"],
            ["route", "add", "default", "via", "172.31.250.1"],
        ):
            subprocess.run(["ip", "-n", name, *args], check=True)
        yield f"/run/netns/{name}"
    finally:
        subprocess.run(["ip", "link", "del", outside], check=False, capture_output=True)
        subprocess.run(["ip", "netns", "del", name], check=False)


def in_netns(config: dict[str, object], netns: str) -> dict[str, object]:
    """``config`` with its network namespace joined at path ``netns`` (as dockerd's)."""
    linux = config["linux"]
    assert isinstance(linux, dict)
    for namespace in linux["namespaces"]:
        if namespace["type"] == "network":
            namespace["path"] = netns
    return config
