"""`bonneville list`: every container under --root, as a table, JSON, or ids."""

from __future__ import annotations

import json

import click

from bonneville.shim.lifecycle import query
from bonneville.shim.lifecycle.context import Context


@click.command("list")
@click.option("--format", "-f", "fmt", type=click.Choice(["table", "json"]), default="table")
@click.option("--quiet", "-q", is_flag=True, help="print only the ids")
@click.pass_obj
def list_command(ctx: Context, fmt: str, quiet: bool) -> None:
    """List containers."""
    containers = query.list_containers(ctx)
    if quiet:
        for c in containers:
            click.echo(c["id"])
    elif fmt == "json":
        click.echo(json.dumps(containers))
    else:
        rows = [("ID", "PID", "STATUS", "BUNDLE", "CREATED", "OWNER")]
        rows += [
            (c["id"], str(c["pid"]), c["status"], c["bundle"], c["created"], c["owner"])
            for c in containers
        ]
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        for r in rows:
            click.echo("   ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip())


COMMANDS = [list_command]
