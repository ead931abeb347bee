"""The connection to vSphere: logging in and out, waiting on tasks, and the runtime's network
namespace the monitor reaches the server from (``in_netns``)."""

from __future__ import annotations

import contextlib
import os
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from bonneville.backends.vsphere import tls
from bonneville.backends.vsphere.config import VSphereSettings
from bonneville.backends.vsphere.vmomi import vmomi
from bonneville.spec.errors import BackendError

TASK_TIMEOUT = 600.0  # a hang guard: uploads and clones of big disks take minutes


# ---- the runtime's network namespace -------------------------------------------------------------

CLONE_NEWNET = 0x40000000
T = TypeVar("T")


def enter_netns(fd: int) -> None:
    """Move this thread into the network namespace ``fd``."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise BackendError(f"cannot enter the runtime's network namespace: {os.strerror(err)}")


def in_netns(fd: int, fn: Callable[[], T]) -> T:
    """``fn()`` run in the network namespace ``fd`` (-1: here), in a thread of its own.

    The monitor sits in the container's network namespace, where neither vCenter nor ESXi is
    reachable; setns(2) of a network namespace is per thread, and sockets keep the namespace
    they were made in, so the connections and the serial listener made there work from any
    thread afterwards."""
    if fd < 0:
        return fn()
    results: list[T] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            enter_netns(fd)
            results.append(fn())
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run, name="vsphere-netns")
    thread.start()
    thread.join()
    if errors:
        raise errors[0]
    return results[0]


# ---- connection ------------------------------------------------------------------------------


def _fault_text(exc: object) -> str:
    msg = getattr(exc, "msg", None) or str(exc) or type(exc).__name__
    return " ".join(str(msg).split())


def wait_task(task: Any, what: str, timeout: float = TASK_TIMEOUT) -> Any:
    """A task's result; its fault becomes a BackendError naming ``what`` (cause kept).

    Waits on a property collector filter of the task's state (no polling), reading only
    info.state/error/result: vcsim reports a FileManager as some tasks' `entity`, which
    pyVmomi refuses to deserialise as a ManagedEntity, so the whole `info` is never fetched.
    """
    vim, vmodl = vmomi().vim, vmomi().vmodl
    pc = vim.ServiceInstance("ServiceInstance", task._stub).content.propertyCollector
    spec = vmodl.query.PropertyCollector.FilterSpec(
        objectSet=[vmodl.query.PropertyCollector.ObjectSpec(obj=task, skip=False)],
        propSet=[
            vmodl.query.PropertyCollector.PropertySpec(
                type=vim.Task, pathSet=["info.state", "info.error", "info.result"], all=False
            )
        ],
    )
    deadline = time.monotonic() + timeout
    values: dict[str, Any] = {}
    pc_filter = pc.CreateFilter(spec, partialUpdates=False)
    try:
        version = ""
        while str(values.get("info.state")) not in ("success", "error"):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BackendError(f"{what}: no answer from vSphere within {timeout:.0f} s")
            options = vmodl.query.PropertyCollector.WaitOptions(
                maxWaitSeconds=max(1, min(int(remaining), 60))
            )
            update = pc.WaitForUpdatesEx(version, options)
            if update is None:
                continue
            version = update.version
            for filter_set in update.filterSet or []:
                for obj in filter_set.objectSet or []:
                    for change in obj.changeSet or []:
                        values[change.name] = change.val
    except vmodl.MethodFault as exc:
        raise BackendError(f"{what}: {_fault_text(exc)}") from exc
    finally:
        with contextlib.suppress(Exception):
            pc_filter.Destroy()
    if str(values.get("info.state")) == "error":
        fault = values.get("info.error")
        raise BackendError(f"{what}: {_fault_text(fault)}") from fault
    return values.get("info.result")


def connect(cfg: VSphereSettings) -> Any:
    """A logged-in ServiceInstance; errors say what is wrong without the password."""
    SmartConnect = vmomi("pyVim.connect").SmartConnect
    vim = vmomi().vim

    try:
        return SmartConnect(
            host=cfg.host,
            port=cfg.port,
            user=cfg.username,
            pwd=cfg.password,
            protocol=cfg.scheme,
            path=cfg.path,
            sslContext=tls.session_context(cfg),
            connectionPoolTimeout=60,
        )
    except vim.fault.InvalidLogin as exc:
        raise BackendError(
            f"vSphere login to {cfg.url} as {cfg.username} failed: incorrect user name or password"
        ) from exc
    except ssl.SSLError as exc:
        raise BackendError(tls.failure(cfg, exc)) from exc
    except OSError as exc:
        raise BackendError(f"cannot reach vSphere at {cfg.url}: {exc.strerror or exc}") from exc
    except Exception as exc:
        raise BackendError(f"cannot log in to vSphere at {cfg.url}: {_fault_text(exc)}") from exc


def disconnect(si: Any) -> None:
    Disconnect = vmomi("pyVim.connect").Disconnect

    with contextlib.suppress(Exception):
        Disconnect(si)


@contextlib.contextmanager
def session(cfg: VSphereSettings) -> Iterator[Any]:
    si = connect(cfg)
    try:
        yield si
    finally:
        disconnect(si)
