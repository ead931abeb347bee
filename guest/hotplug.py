"""RAM and vCPUs the host plugs into a running VM (a pod that grows), brought online.

The Debian kernel leaves hot-added memory blocks and CPUs offline (there is no udev in the
guest to online them): the agent does, once the host says how much it added. Standard library
only: this module goes into the guest image."""

from __future__ import annotations

import os
import time

from bonneville.guest.common import Refused, read_text, write_file

MEMORY = "/sys/devices/system/memory"
CPUS = "/sys/devices/system/cpu"
APPEAR_TIMEOUT = 20.0  # ACPI's notification reaches a guest under TCG within a second or two


def _blocks(state: str) -> list[str]:
    found = []
    for name in os.listdir(MEMORY):
        if name.startswith("memory") and name[6:].isdigit():
            try:
                if read_text(f"{MEMORY}/{name}/state") == state:
                    found.append(name)
            except OSError:
                continue
    return found


def _cpu_dirs() -> list[str]:
    return [n for n in os.listdir(CPUS) if n.startswith("cpu") and n[3:].isdigit()]


def online(added_mib: int, vcpus: int) -> dict[str, int]:
    """Wait (bounded) until ``added_mib`` MiB of new memory and ``vcpus`` CPUs are present, and
    online them; the VM's RAM (MemTotal, MiB) and online CPUs then."""
    block_mib = int(read_text(f"{MEMORY}/block_size_bytes"), 16) >> 20
    wanted_blocks = -(-added_mib // block_mib) if added_mib > 0 else 0
    deadline = time.monotonic() + APPEAR_TIMEOUT
    onlined = 0
    while True:
        for name in _blocks("offline"):
            try:
                write_file(f"{MEMORY}/{name}/state", "online")
                onlined += 1
            except OSError as exc:
                raise Refused(f"bring {name} online: {exc.strerror}") from exc
        for name in _cpu_dirs():
            path = f"{CPUS}/{name}/online"
            if os.path.exists(path) and read_text(path) == "0":
                write_file(path, "1")
        if onlined >= wanted_blocks and len(_cpu_dirs()) >= vcpus:
            break
        if time.monotonic() > deadline:
            raise Refused(
                f"the VM shows {onlined * block_mib} MiB of the {added_mib} MiB and"
                f" {len(_cpu_dirs())} of the {vcpus} vCPUs plugged in"
            )
        time.sleep(0.01)
    with open("/proc/meminfo") as f:
        total_kib = int(f.readline().split()[1])
    return {"memory_mib": total_kib >> 10, "vcpus": os.cpu_count() or 1}
