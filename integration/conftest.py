"""Fixtures of the integration suites: the backend `runtime` runs, libvirtd, a container's
network namespace. Their helpers are in integration/support.py."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from integration.support import LIBVIRTD_SOCKET, Libvirtd, answers


@pytest.fixture
def backend_name() -> str:
    """`runtime` runs QEMU here (suites over several backends override this)."""
    return "qemu"


@pytest.fixture(scope="session")
def libvirtd() -> Iterator[Libvirtd]:
    """The host's libvirtd if one runs, else one started here and stopped afterwards (CI
    machines start no services)."""
    base = Path(tempfile.mkdtemp(prefix="bv-libvirtd-"))
    try:
        if answers(LIBVIRTD_SOCKET):
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
