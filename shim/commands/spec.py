"""`bonneville spec`: write a default config.json, as `runc spec` does."""

from __future__ import annotations

import json
import os

import click

from bonneville.spec.errors import BonnevilleError


@click.command("spec")
@click.option("--bundle", "-b", default=".", help="directory to write config.json into")
@click.option("--rootless", is_flag=True, help="a spec for a rootless container")
def spec(bundle: str, rootless: bool) -> None:
    """Create a new specification file (config.json)."""
    from bonneville.spec.defaults import default_spec

    path = os.path.join(bundle, "config.json")
    if os.path.lexists(path):
        raise BonnevilleError("File config.json exists. Remove it first")
    try:
        with open(path, "x") as f:
            json.dump(default_spec(rootless=rootless), f, indent="\t")
            f.write("\n")
    except FileNotFoundError as exc:
        raise BonnevilleError(f"bundle directory {bundle} does not exist") from exc


COMMANDS = [spec]
