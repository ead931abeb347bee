"""`bonneville pause` / `resume`: freeze and thaw the container's whole VM."""

from __future__ import annotations

import click

from bonneville.shim import lifecycle


@click.command("pause")
@click.argument("container_id")
@click.pass_obj
def pause(ctx: lifecycle.Context, container_id: str) -> None:
    """Pause every process of the container (the VM stops)."""
    lifecycle.pause(ctx, container_id)


@click.command("resume")
@click.argument("container_id")
@click.pass_obj
def resume(ctx: lifecycle.Context, container_id: str) -> None:
    """Resume a paused container."""
    lifecycle.resume(ctx, container_id)


COMMANDS = [pause, resume]
