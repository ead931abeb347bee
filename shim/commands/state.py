"""`bonneville state`: the runtime-spec state JSON of one container."""

from __future__ import annotations

import json

import click

from bonneville.shim.lifecycle import query
from bonneville.shim.lifecycle.context import Context


@click.command("state")
@click.argument("container_id")
@click.pass_obj
def state(ctx: Context, container_id: str) -> None:
    """Print the state of a container."""
    click.echo(json.dumps(query.container_state(ctx, container_id), indent=2))


COMMANDS = [state]
