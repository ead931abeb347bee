"""The fake backend: no VM, the real agent runs as a host process over a socketpair.

It exists so the lifecycle, the monitor and the agent can be tested in seconds. The agent runs
in "host mode" (its own private mount namespace, the share directory as its root), so the same
mount and process code runs as in a guest, without touching the host's mounts.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from typing import Any

from bonneville.backends import procfs
from bonneville.backends.base import VM, Backend, Capability, VMConfig
from bonneville.spec.errors import BackendError


class FakeVM(VM):
    def __init__(self, proc: subprocess.Popen[bytes], channel: socket.socket) -> None:
        self._proc = proc
        self._channel = channel
        self._pidfd = os.pidfd_open(proc.pid)
        self._start = procfs.start_time(proc.pid)
        self._paused = False

    @property
    def channel(self) -> socket.socket:
        return self._channel

    @property
    def pid(self) -> int:
        return self._proc.pid

    def exit_fd(self) -> int:
        return self._pidfd

    def poll(self) -> bool:
        return self._proc.poll() is not None

    def private_state(self) -> dict[str, Any]:
        return {"pid": self._proc.pid, "start_time": self._start}

    def pause(self) -> None:
        os.kill(self._proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self._proc.pid, signal.SIGCONT)

    def stop(self, timeout: float = 5.0) -> None:
        if self._proc.poll() is None:
            # The agent is a subreaper: every container process is one of its descendants.
            procfs.kill_tree(self._proc.pid, signal.SIGKILL)
        self._proc.wait()
        self._channel.close()
        os.close(self._pidfd)


class FakeBackend(Backend):
    name = "fake"
    capabilities = frozenset({Capability.PAUSE, Capability.PODS})
    boots_guest_image = False

    def launch(self, config: VMConfig) -> VM:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        log = open(os.path.join(config.run_dir, "agent.log"), "ab")  # noqa: SIM115
        try:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "bonneville.guest.agent",
                    "--fd",
                    str(theirs.fileno()),
                    "--root",
                    config.share_dir,
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                pass_fds=(theirs.fileno(),),
                close_fds=True,
                env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "PYTHONPATH": ":".join(sys.path)},
                start_new_session=True,
            )
        except OSError as exc:
            ours.close()
            raise BackendError(f"cannot start the fake agent: {exc.strerror}") from exc
        finally:
            theirs.close()
            log.close()
        return FakeVM(proc, ours)

    def alive(self, private: dict[str, Any]) -> bool:
        return procfs.is_alive(int(private.get("pid", 0)), private.get("start_time"))

    def destroy(self, private: dict[str, Any]) -> None:
        pid = int(private.get("pid", 0))
        if procfs.is_alive(pid, private.get("start_time")):
            procfs.kill_tree(pid, signal.SIGKILL)
