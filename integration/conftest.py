"""Daemons shared by the integration suites."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

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


@pytest.fixture(scope="session")
def libvirtd() -> Iterator[str]:
    """A libvirtd for qemu:///system: the host's if one runs, else one started (and stopped)
    here, with virtlogd (libvirtd's QEMU logs through it). CI machines start no services."""
    if _answers(LIBVIRTD_SOCKET):
        yield LIBVIRTD_SOCKET
        return
    if shutil.which("libvirtd") is None:
        pytest.skip("libvirtd is not installed")
    base = Path(tempfile.mkdtemp(prefix="bv-libvirtd-"))
    daemons: list[subprocess.Popen[bytes]] = []
    try:
        for argv in (["virtlogd"], ["libvirtd"]):
            log = open(base / f"{argv[0]}.log", "wb")  # noqa: SIM115
            daemons.append(
                subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                    start_new_session=True,
                    close_fds=True,
                )
            )
            log.close()
        deadline = time.monotonic() + 60
        while not _answers(LIBVIRTD_SOCKET):
            for daemon in daemons:
                assert daemon.poll() is None, (base / "libvirtd.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "libvirtd did not come up"
            time.sleep(0.1)
        yield LIBVIRTD_SOCKET
    finally:
        for daemon in reversed(daemons):
            daemon.terminate()
            try:
                daemon.wait(timeout=30)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait()
        shutil.rmtree(base, ignore_errors=True)
