"""`bonneville delete`: remove a stopped (or, with --force, any) container and its VM."""

from __future__ import annotations

import click

from bonneville.shim import lifecycle


@click.command("delete")
@click.option("--force", "-f", is_flag=True, help="kill the container first if it runs")
@click.argument("container_id")
@click.pass_obj
def delete(ctx: lifecycle.Context, force: bool, container_id: str) -> None:
    """Delete a container."""
    lifecycle.delete(ctx, container_id, force)


COMMANDS = [delete]
