"""`bonneville start`: run the container's process in its (already booted) VM."""

from __future__ import annotations

import click

from bonneville.shim import lifecycle


@click.command("start")
@click.argument("container_id")
@click.pass_obj
def start(ctx: lifecycle.Context, container_id: str) -> None:
    """Start the process of a created container."""
    lifecycle.start(ctx, container_id)


COMMANDS = [start]
