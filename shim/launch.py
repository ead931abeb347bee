"""Starting a container's monitor process, early.

The monitor (shim/monitor/) is a fork of the `bonneville` process that runs `create`. It lives
as long as the container, so everything the CLI had imported when it forked stays in memory once
per container (click alone is ~1.4 MiB of it). So `create` and `run` fork it first thing, before
the CLI imports anything (shim/entry.py calls :func:`start`): the child imports only the
monitor's own modules, on another CPU while the CLI imports click, parses the bundle and checks
it; it then waits until `create` hands it its :class:`MonitorConfig` over the setup channel
(:func:`hand_over`). A CLI that ends before that (bad flags, a bad bundle) kills
and reaps the child on its way out (:func:`discard`): nothing outlives the failed command.

This module is imported before the fork, so it imports little.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
from dataclasses import dataclass, field

from bonneville.spec.errors import BonnevilleError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from bonneville.spec.config import Bundle

CONFIG_LIMIT = 64 << 20  # the setup message carries config.json

# (the CLI's PID, the monitor's PID, our end of its setup channel) of a monitor started early.
# Forks of the CLI (the validation child) see the CLI's PID here and leave the monitor alone.
_early: tuple[int, int, socket.socket] | None = None


@dataclass
class MonitorConfig:
    """What `create` hands the monitor: the container and its bundle, parsed."""

    container_id: str
    state_dir: str
    bundle: Bundle
    backend: str
    console_socket: str | None
    # `run` without a console socket uses the caller's terminal (fds 0/1) as the console.
    use_stdio_tty: bool = False
    # (st_dev, st_ino) of the network namespace create ran in: never the container's.
    runtime_netns: tuple[int, int] = (0, 0)
    # A pod member: the owner whose VM it joins, and that owner's control socket (shim/pod.py).
    owner: str = ""
    owner_socket: str = ""
    # The guest namespaces of the container (shim/pod.py: "new", "vm" or "container:<id>").
    namespaces: dict[str, str] = field(default_factory=dict)
    # No network namespace of its own: the VM reaches the host's networks through a user-mode
    # stack, and its listening ports are published on the host (shim/monitor/forward.py).
    host_network: bool = False
    # The container's host cgroup (shim/cgroups/), which create has already moved us into:
    # an owner whose VM grows raises its limits (cgroups/limits.py: raise_vm_limits).
    cgroup: dict[str, str] = field(default_factory=dict)

    def to_message(self) -> dict[str, Any]:
        return {
            "container_id": self.container_id,
            "state_dir": self.state_dir,
            "bundle": self.bundle.path,
            "config": self.bundle.raw,
            "backend": self.backend,
            "console_socket": self.console_socket,
            "use_stdio_tty": self.use_stdio_tty,
            "runtime_netns": list(self.runtime_netns),
            "owner": self.owner,
            "owner_socket": self.owner_socket,
            "namespaces": self.namespaces,
            "host_network": self.host_network,
            "cgroup": self.cgroup,
            # The monitor was forked before the CLI read its flags (--libvirt-uri sets one).
            "environ": dict(os.environ),
        }

    @classmethod
    def from_message(cls, message: dict[str, Any]) -> MonitorConfig:
        """The monitor's side: the config.json create parsed (and validates) is the one used."""
        from bonneville.spec.config import parse_bundle

        dev, ino = message["runtime_netns"]
        return cls(
            container_id=str(message["container_id"]),
            state_dir=str(message["state_dir"]),
            bundle=parse_bundle(str(message["bundle"]), message["config"]),
            backend=str(message["backend"]),
            console_socket=message["console_socket"],
            use_stdio_tty=bool(message["use_stdio_tty"]),
            runtime_netns=(int(dev), int(ino)),
            owner=str(message.get("owner") or ""),
            owner_socket=str(message.get("owner_socket") or ""),
            namespaces={str(k): str(v) for k, v in (message.get("namespaces") or {}).items()},
            cgroup={str(k): str(v) for k, v in (message.get("cgroup") or {}).items()},
            host_network=bool(message.get("host_network")),
        )


def start(backend: str | None) -> None:
    """Fork the monitor now, for the command about to create a container (entry.py calls
    this first; ``backend`` is its --backend flag, if given)."""
    global _early
    if _early is None:
        pid, sock = _fork(backend)
        _early = (os.getpid(), pid, sock)


def take(backend: str) -> tuple[int, socket.socket]:
    """The monitor for the container being created: the one started early, else a new fork."""
    global _early
    if _early is not None and _early[0] == os.getpid():
        _, pid, sock = _early
        _early = None
        return pid, sock
    return _fork(backend)


def hand_over(sock: socket.socket, config: MonitorConfig) -> None:
    """Send the monitor its configuration: it enters the container's namespaces now."""
    try:
        sock.sendall(json.dumps(config.to_message()).encode() + b"\n")
    except OSError as exc:
        raise BonnevilleError(
            f"the container monitor ended before create could start it: {exc.strerror or exc}"
        ) from exc


def discard() -> None:
    """End a monitor started early that no container took (the CLI calls this as it exits)."""
    global _early
    if _early is None or _early[0] != os.getpid():
        return
    _, pid, sock = _early
    _early = None
    sock.close()
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


def _fork(backend: str | None) -> tuple[int, socket.socket]:
    parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    pid = os.fork()
    if pid:
        child_end.close()
        return pid, parent_end
    # Child: the monitor. Never return into the CLI's code.
    status = 1
    try:
        # Out of the caller's session and process group at once: a ^C or a hangup meant for
        # the CLI must not end a container's monitor (it learns of the CLI's end by EOF).
        os.setsid()
        parent_end.close()
        from bonneville.shim.monitor import serve

        status = serve(child_end, backend)
    except BaseException:
        with contextlib.suppress(Exception):
            import logging
            import traceback

            logging.getLogger("bonneville").error("monitor crashed: %s", traceback.format_exc())
    finally:
        os._exit(status)
