"""`bonneville ps`: the host PIDs of a container (its monitor and VM process)."""

from __future__ import annotations

import json

import click

from bonneville.shim.lifecycle import query
from bonneville.shim.lifecycle.context import Context


@click.command("ps", context_settings={"ignore_unknown_options": True})
@click.option("--format", "-f", "fmt", type=click.Choice(["table", "json"]), default="table")
@click.argument("container_id")
@click.argument("ps_args", nargs=-1, type=click.UNPROCESSED)
@click.pass_obj
def ps(ctx: Context, fmt: str, container_id: str, ps_args: tuple[str, ...]) -> None:
    """List the host processes of a container."""
    pids = query.ps(ctx, container_id)
    if fmt == "json":
        click.echo(json.dumps(pids))
        return
    click.echo("PID")
    for pid in pids:
        click.echo(str(pid))


COMMANDS = [ps]
