"""Helpers of the integration suites: a libvirtd of our own, a config in a network namespace.
Their fixtures are in integration/conftest.py."""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

from tests.support import terminate

LIBVIRTD_SOCKET = "/run/libvirt/libvirt-sock"


def answers(path: str) -> bool:
    """Whether a unix socket at ``path`` accepts a connection."""
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
        while not answers(LIBVIRTD_SOCKET):
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


def in_netns(config: dict[str, object], netns: str) -> dict[str, object]:
    """``config`` with its network namespace joined at path ``netns`` (as dockerd's)."""
    linux = config["linux"]
    assert isinstance(linux, dict)
    for namespace in linux["namespaces"]:
        if namespace["type"] == "network":
            namespace["path"] = netns
    return config
