"""`bonneville pause` / `resume`: freeze and thaw the container's whole VM."""

from __future__ import annotations

import click

from bonneville.shim.lifecycle import running
from bonneville.shim.lifecycle.context import Context


@click.command("pause")
@click.argument("container_id")
@click.pass_obj
def pause(ctx: Context, container_id: str) -> None:
    """Pause every process of the container (the VM stops)."""
    running.pause(ctx, container_id)


@click.command("resume")
@click.argument("container_id")
@click.pass_obj
def resume(ctx: Context, container_id: str) -> None:
    """Resume a paused container."""
    running.resume(ctx, container_id)


COMMANDS = [pause, resume]
