"""An OOM kill inside the VM, told the way runc's callers hear it: by the host kernel, in the
container's host memory cgroup."""

from __future__ import annotations

import contextlib
import logging
import os
import time

from bonneville.shim.cgroups.files import read, write
from bonneville.shim.cgroups.limits import MIB

log = logging.getLogger("bonneville")

OOM_HEADROOM = 4 * MIB  # above the cgroup's usage while the OOM is provoked
OOM_ALLOCATION_LIMIT = 512 * MIB  # the victim gives up (and exits) past this


def report_oom(dirs: dict[str, str], timeout: float = 10.0) -> bool:
    """Make the host kernel OOM-kill a process in the container's memory cgroup, for a container
    the guest's OOM killer ended: containerd's shim learns of OOMs only from the cgroup of the
    PID it waits on (v1: memory.oom_control's eventfd; v2: memory.events' oom_kill), which is
    how `docker inspect` reads OOMKilled and the CRI reason "OOMKilled". The victim is a child of
    the caller (in that cgroup) with oom_score_adj 1000, so the kernel picks it over anything
    else there; the cgroup's limit drops to its usage plus a little while the child allocates,
    and is put back after. True if the kernel killed it."""
    files = _memory_files(dirs)
    if files is None:
        return False
    limit_file, usage_file, swap_file = files
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the victim
        try:
            os.close(ready_r)
            os.close(go_w)
            with open("/proc/self/oom_score_adj", "w") as f:
                f.write("1000")
            os.write(ready_w, b"r")
            if os.read(go_r, 1) == b"g":
                held: list[bytes] = []
                while len(held) * MIB < OOM_ALLOCATION_LIMIT:
                    held.append(b"\x01" * MIB)  # written, so charged: calloc'd pages are not
        finally:
            os._exit(0)
    os.close(ready_w)
    os.close(go_r)
    old_limit = old_swap = ""
    killed = False
    try:
        if os.read(ready_r, 1) != b"r":
            return False
        old_limit = read(limit_file)
        if swap_file:
            old_swap = read(swap_file)
            write(swap_file, "0")  # swapped out, the victim would never run out
        write(limit_file, str(int(read(usage_file)) + OOM_HEADROOM))
        os.write(go_w, b"g")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                pid = 0
                killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == 9
                break
            time.sleep(0.01)
    except OSError as exc:
        log.warning("cannot report the OOM kill to the host cgroup: %s", exc)
    finally:
        for fd in (ready_r, go_w):
            os.close(fd)
        if pid:
            with contextlib.suppress(OSError):
                os.kill(pid, 9)
            with contextlib.suppress(OSError):
                os.waitpid(pid, 0)
        with contextlib.suppress(OSError):
            if old_limit:
                write(limit_file, old_limit)
            if old_swap:
                write(swap_file, old_swap)
    return killed


def _memory_files(dirs: dict[str, str]) -> tuple[str, str, str] | None:
    """(limit file, usage file, swap limit file or "") of the container's memory cgroup."""
    for directory in dirs.values():
        if os.path.exists(f"{directory}/memory.max"):  # v2
            swap = f"{directory}/memory.swap.max"
            return (
                f"{directory}/memory.max",
                f"{directory}/memory.current",
                swap if os.path.exists(swap) else "",
            )
        if os.path.exists(f"{directory}/memory.limit_in_bytes"):  # v1
            return (
                f"{directory}/memory.limit_in_bytes",
                f"{directory}/memory.usage_in_bytes",
                "",
            )
    return None
