"""`bonneville update`: change a container's resource limits (what its VM can honour)."""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from bonneville.shim.lifecycle import running
from bonneville.shim.lifecycle.context import Context
from bonneville.spec.resources import UnsupportedResource, parse_size


def _read_resources(source: str) -> dict[str, Any]:
    try:
        if source == "-":
            text = sys.stdin.read()
        else:
            with open(source, encoding="utf-8") as f:
                text = f.read()
        data = json.loads(text)
    except OSError as exc:
        raise click.ClickException(f"--resources {source}: {exc.strerror or exc}") from exc
    except ValueError as exc:
        raise click.ClickException(f"--resources {source}: not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise click.ClickException(f"--resources {source}: must be a JSON object")
    return data


def _size(value: str | None) -> int | None:
    return None if value is None else parse_size(value)


@click.command("update")
@click.option("--resources", "-r", "resources_file", help="resources JSON file, - for stdin")
@click.option("--memory", help="memory limit (bytes, or with k/m/g)")
@click.option("--memory-reservation", help="memory soft limit")
@click.option("--memory-swap", help="memory plus swap limit, -1 for unlimited")
@click.option("--kernel-memory", hidden=True)
@click.option("--kernel-memory-tcp", hidden=True)
@click.option("--cpu-period", type=int, help="CPU CFS period in microseconds")
@click.option("--cpu-quota", type=int, help="CPU CFS quota in microseconds")
@click.option("--cpu-share", type=int, help="CPU shares (relative weight)")
@click.option("--cpu-rt-period", type=int, help="not supported in a VM")
@click.option("--cpu-rt-runtime", type=int, help="not supported in a VM")
@click.option("--cpuset-cpus", help="not supported in a VM")
@click.option("--cpuset-mems", help="not supported in a VM")
@click.option("--blkio-weight", type=int, help="not supported in a VM")
@click.option("--pids-limit", type=int, help="maximum number of processes")
@click.option("--l3-cache-schema", help="not supported in a VM")
@click.option("--mem-bw-schema", help="not supported in a VM")
@click.argument("container_id")
@click.pass_obj
def update(
    ctx: Context,
    /,
    resources_file: str | None,
    container_id: str,
    **flags: Any,
) -> None:
    """Update a container's resource limits inside its VM."""
    resources = _read_resources(resources_file) if resources_file else {}
    # As in runc, flags override what the file says, field by field.
    cpu = resources.setdefault("cpu", {}) or {}
    memory = resources.setdefault("memory", {}) or {}
    try:
        for flag, key in (
            ("memory", "limit"),
            ("memory_reservation", "reservation"),
            ("memory_swap", "swap"),
            ("kernel_memory", "kernel"),
            ("kernel_memory_tcp", "kernelTCP"),
        ):
            if flags[flag] is not None:
                memory[key] = _size(flags[flag])
    except UnsupportedResource as exc:
        raise click.ClickException(str(exc)) from exc
    for flag, key in (
        ("cpu_period", "period"),
        ("cpu_quota", "quota"),
        ("cpu_share", "shares"),
        ("cpu_rt_period", "realtimePeriod"),
        ("cpu_rt_runtime", "realtimeRuntime"),
        ("cpuset_cpus", "cpus"),
        ("cpuset_mems", "mems"),
    ):
        if flags[flag] is not None:
            cpu[key] = flags[flag]
    if flags["pids_limit"] is not None:
        resources["pids"] = {"limit": flags["pids_limit"]}
    if flags["blkio_weight"] is not None:
        resources["blockIO"] = {"weight": flags["blkio_weight"]}
    for flag in ("l3_cache_schema", "mem_bw_schema"):
        if flags[flag]:
            raise click.ClickException(f"--{flag.replace('_', '-')}: Intel RDT is not supported")
    resources["cpu"], resources["memory"] = cpu, memory
    running.update(ctx, container_id, resources)


COMMANDS = [update]
