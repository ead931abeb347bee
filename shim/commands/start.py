"""`bonneville start`: run the container's process in its (already booted) VM."""

from __future__ import annotations

import click

from bonneville.shim.lifecycle import running
from bonneville.shim.lifecycle.context import Context


@click.command("start")
@click.argument("container_id")
@click.pass_obj
def start(ctx: Context, container_id: str) -> None:
    """Start the process of a created container."""
    running.start(ctx, container_id)


COMMANDS = [start]
