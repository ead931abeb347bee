"""The `bonneville` command: runc's global flags and commands (one module per command)."""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any

import click

from bonneville.shim import log as shimlog
from bonneville.shim.ids import DEFAULT_ROOT
from bonneville.shim.lifecycle.context import Context
from bonneville.shim.state import Store
from bonneville.spec.errors import BonnevilleError

VERSION = "0.1.0"

# Each command's module under bonneville.shim.commands. Only the module of the command that runs
# is imported (every CLI call is a fresh Python process; docker makes four per `docker run`).
COMMAND_MODULES = {
    "create": "create",
    "delete": "delete",
    "events": "events",
    "exec": "exec",
    "features": "features",
    "image": "image",
    "kill": "kill",
    "list": "list",
    "pause": "pause",
    "ps": "ps",
    "resume": "pause",
    "run": "run",
    "spec": "spec",
    "start": "start",
    "state": "state",
    "template": "template",
    "update": "update",
}


class _Commands(click.Group):
    """runc's commands, each loaded when asked for (`--help` loads them all to list them)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMAND_MODULES)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        module = COMMAND_MODULES.get(cmd_name)
        if module is None:
            return None
        commands: list[click.Command] = importlib.import_module(
            f"bonneville.shim.commands.{module}"
        ).COMMANDS
        return next(command for command in commands if command.name == cmd_name)


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--root", default=DEFAULT_ROOT, show_default=True, help="state directory")
@click.option("--log", "log_file", default=None, help="log file (json with --log-format json)")
@click.option("--log-format", type=click.Choice(["text", "json"]), default="text")
@click.option("--debug", is_flag=True, help="debug logging")
@click.option(
    "--systemd-cgroup",
    is_flag=True,
    help="cgroupsPath is slice:prefix:name (a systemd scope, as runc's systemd driver)",
)
@click.option("--rootless", default="auto", help="accepted for runc compatibility")
@click.option("--criu", default="criu", hidden=True)
@click.option(
    "--backend",
    envvar="BONNEVILLE_BACKEND",
    default=None,
    help="VM backend for new containers (default qemu; a container keeps its own)",
)
@click.option(
    "--libvirt-uri",
    default=None,
    help="libvirt URI for new containers of --backend libvirt (qemu:///system, qemu:///embed)",
)
@click.version_option(VERSION, "-v", "--version", prog_name="bonneville")
@click.pass_context
def cli(
    ctx: click.Context,
    root: str,
    log_file: str | None,
    log_format: str,
    debug: bool,
    systemd_cgroup: bool,
    rootless: str,
    criu: str,
    backend: str | None,
    libvirt_uri: str | None,
) -> None:
    """bonneville: an OCI runtime that runs every container in its own virtual machine."""
    shimlog.setup(log_file, log_format, debug)
    if libvirt_uri:
        # The flag outranks $BONNEVILLE_LIBVIRT_URI; the monitor inherits it from here.
        os.environ["BONNEVILLE_LIBVIRT_URI"] = libvirt_uri
    ctx.obj = Context(store=Store(root), backend=backend, systemd_cgroup=systemd_cgroup)


def main(argv: list[str] | None = None) -> None:
    """Entry point: errors become one line on stderr, a JSON entry in --log, and exit 1."""
    args = sys.argv[1:] if argv is None else argv
    try:
        result: Any = cli.main(args=args, prog_name="bonneville", standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        shimlog.fail("aborted")
    except click.ClickException as exc:
        shimlog.fail(exc.format_message())
    except (BonnevilleError, KeyboardInterrupt, OSError) as exc:
        shimlog.fail(shimlog.error_text(exc) or repr(exc))
    sys.exit(result if isinstance(result, int) else 0)
