"""`bonneville features`: the runtime-spec features document."""

from __future__ import annotations

import json

import click


@click.command("features")
def features() -> None:
    """Show the enabled features (runtime-spec features.md)."""
    from bonneville.shim.features import features as build

    click.echo(json.dumps(build(), indent="    "))


COMMANDS = [features]
