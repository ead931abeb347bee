"""The monitor: the long-lived host process of each container (its PID is the container's).

- ``pod.py``: the owner of a VM (a container alone, or a pod's sandbox) and its event loop;
- ``member.py``: a container that runs inside another's VM (a pod's app container);
- ``vm.py``: the VM, its launch and network; ``share.py``: the pod's shared filesystem;
- ``guestspec.py``: config.json as the agent's ``create`` takes it; ``daemon.py``: process
  hygiene (descriptors, log, signals).

`create` forks the monitor first thing (shim/launch.py); :func:`serve` is the fork's entry.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket

from bonneville.shim import launch, unixsock
from bonneville.shim.control import Phase, phase


def serve(sync: socket.socket, backend: str | None) -> int:
    """The monitor process (forked by shim/launch.py): import what a launch needs while `create`
    gets ready, then run the container it hands over; 0 if it hands over none (it failed).
    ``backend`` is the --backend flag if the CLI was given one."""
    _preload(backend)
    try:
        line = unixsock.read_line(sync, limit=launch.CONFIG_LIMIT)
        if not line:
            return 0
        message = json.loads(line)
        os.environ.clear()
        os.environ.update(message["environ"])
        config = launch.MonitorConfig.from_message(message)
    except Exception as exc:  # create parsed this config: a bug, but say so
        with contextlib.suppress(OSError):
            sync.sendall(phase(Phase.ERROR, error=f"monitor: bad setup message: {exc}"))
        return 1
    if config.owner:
        from bonneville.shim.monitor.member import Member

        return Member(config, sync).main()
    from bonneville.shim.monitor.pod import Pod

    return Pod(config, sync).main()


def _preload(backend: str | None) -> None:
    """Import what comes after the hand-over: the spec's parser and resources, the owner's
    modules, the backend (the flag's, else the configured one) and the image lookup. An error
    here is create's to report (it reads the same settings), not ours."""
    import bonneville.shim.monitor.pod
    import bonneville.spec.config
    import bonneville.spec.resources  # noqa: F401
    from bonneville.backends.base import backend_for_create, preload_backend

    with contextlib.suppress(Exception):
        preload_backend(backend or backend_for_create())
