"""The CLI's command table: each command is loaded by name, only when it runs."""

from __future__ import annotations

import importlib
import pkgutil

from bonneville.shim import cli, commands


def test_every_command_module_is_in_the_table() -> None:
    """A command missing from COMMAND_MODULES would exist in its module but never run."""
    found = {}
    for info in pkgutil.iter_modules(commands.__path__):
        module = importlib.import_module(f"bonneville.shim.commands.{info.name}")
        for command in module.COMMANDS:
            found[command.name] = info.name
    assert found == cli.COMMAND_MODULES


def test_the_group_resolves_each_name_to_its_command() -> None:
    ctx = cli.cli.make_context("bonneville", ["list"], resilient_parsing=True)
    for name in cli.cli.list_commands(ctx):
        command = cli.cli.get_command(ctx, name)
        assert command is not None and command.name == name
    assert cli.cli.get_command(ctx, "no-such-command") is None
