"""systemd's transient units, where systemd runs: the scope (or slice) that holds the
container's cgroup, started and stopped over D-Bus with busctl, as runc asks systemd."""

from __future__ import annotations

import contextlib
import os

from bonneville.spec.errors import BonnevilleError


def unit_argv(unit: str, slice_name: str, pid: int) -> list[str]:
    """busctl's StartTransientUnit call for ``unit``, as runc asks systemd over D-Bus: a scope
    in ``slice_name`` holding ``pid`` with delegation and accounting on (a slice: wanted by its
    parent), no default dependencies."""
    properties: list[str] = ["Description", "s", f"bonneville container {unit}"]
    if unit.endswith(".slice"):
        properties += ["Wants", "as", "1", slice_name]
    else:
        properties += ["Slice", "s", slice_name, "Delegate", "b", "true"]
    if pid > 0:
        properties += ["PIDs", "au", "1", str(pid)]
    for accounting in ("MemoryAccounting", "CPUAccounting", "TasksAccounting"):
        properties += [accounting, "b", "true"]
    properties += ["DefaultDependencies", "b", "false"]
    return [
        "busctl",
        "call",
        "org.freedesktop.systemd1",
        "/org/freedesktop/systemd1",
        "org.freedesktop.systemd1.Manager",
        "StartTransientUnit",
        "ssa(sv)a(sa(sv))",
        unit,
        "replace",
        str(_property_count(properties)),
        *properties,
        "0",
    ]


def _property_count(properties: list[str]) -> int:
    """How many (name, signature, value…) triples ``properties`` holds (arrays: a length too)."""
    count, i = 0, 0
    while i < len(properties):
        signature = properties[i + 1]
        i += 2 + (2 if signature in ("as", "au") else 1)
        count += 1
    return count


def _busctl(argv: list[str]) -> None:
    import subprocess

    result = subprocess.run(
        argv,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        close_fds=True,
        env={"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")},
        timeout=30,
        check=False,
    )
    if result.returncode != 0:
        raise BonnevilleError(result.stderr.decode(errors="replace").strip() or "busctl failed")


def start_unit(unit: str, slice_name: str, pid: int) -> None:
    try:
        _busctl(unit_argv(unit, slice_name, pid))
    except (OSError, BonnevilleError) as exc:
        raise BonnevilleError(f"systemd did not start unit {unit}: {exc}") from exc


def stop_unit(unit: str) -> None:
    with contextlib.suppress(OSError, BonnevilleError):
        _busctl(
            [
                "busctl",
                "call",
                "org.freedesktop.systemd1",
                "/org/freedesktop/systemd1",
                "org.freedesktop.systemd1.Manager",
                "StopUnit",
                "ss",
                unit,
                "replace",
            ]
        )
