"""`bonneville kill`: send a signal to the container's process (by number or name)."""

from __future__ import annotations

import click

from bonneville.shim.lifecycle import running
from bonneville.shim.lifecycle.context import Context
from bonneville.shim.signals import parse_signal


@click.command("kill")
@click.option("--all", "-a", "all_processes", is_flag=True, help="signal every process")
@click.argument("container_id")
@click.argument("signal", default="SIGTERM")
@click.pass_obj
def kill(ctx: Context, all_processes: bool, container_id: str, signal: str) -> None:
    """Send SIGNAL (default SIGTERM) to the container's init process."""
    running.kill(ctx, container_id, parse_signal(signal), all_processes)


COMMANDS = [kill]
