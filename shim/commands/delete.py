"""`bonneville delete`: remove a stopped (or, with --force, any) container and its VM."""

from __future__ import annotations

import click

from bonneville.shim.lifecycle import teardown
from bonneville.shim.lifecycle.context import Context


@click.command("delete")
@click.option("--force", "-f", is_flag=True, help="kill the container first if it runs")
@click.argument("container_id")
@click.pass_obj
def delete(ctx: Context, force: bool, container_id: str) -> None:
    """Delete a container."""
    teardown.delete(ctx, container_id, force)


COMMANDS = [delete]
